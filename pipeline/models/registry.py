"""Generator families (``train_generator.kind``) behind one interface.

A trained generator folder (``models/generator/``) holds ``generator.json`` (its ``meta``:
kind, num_classes, class_names, null_label, image_size, channels, fingerprint, ...) and
the weights of its kind. ``load_generator`` gives the sample stage an object with ``meta``
and ``sample(labels, seeds, cfg)``, whatever the kind, so sample, filter, classify and
report need no per-kind code. Each kind's module here provides ``load(folder, meta,
device)``; its training lives in ``pipeline.training`` (``FITTERS`` there).
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Protocol

import torch

from pipeline.config import SampleConfig
from pipeline.core.io import checked, read_json, reading
from pipeline.errors import ConfigError

GENERATOR_META = "generator.json"
KINDS = {  # kind -> module with load()
    "unet": "pipeline.models.diffusion",  # class-conditional diffusion, UNet2DModel
    "dit": "pipeline.models.diffusion",  # class-conditional diffusion, DiTTransformer2DModel
    "cgan": "pipeline.models.gan",  # conditional GAN, one forward pass per image
    "datasetgan": "pipeline.models.datasetgan",  # unconditional diffusion + interpreter-assigned labels
}


class Generator(Protocol):
    meta: dict

    def sample(self, labels: torch.Tensor, seeds: list[int], cfg: SampleConfig) -> torch.Tensor:
        """uint8 images (N,C,H,W, CPU) of classes ``labels``; image i depends on (labels[i], seeds[i]) only."""


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ConfigError(f"train_generator.kind: unknown generator kind {kind!r} (allowed: {', '.join(KINDS)})")
    return kind


def load_generator(folder: str | Path, device="cpu") -> Generator:
    """Read a train_generator output folder into a ready-to-sample generator on ``device`` (a name
    or the run's ``core.device.DevicePolicy``)."""
    folder = Path(folder)
    meta = checked(read_json(folder / GENERATOR_META, "train_generator"), folder / GENERATOR_META, "train_generator",
                   kind=str, num_classes=int, class_names=list, image_size=int, channels=int)
    module = importlib.import_module(KINDS[check_kind(meta.get("kind", "unet"))])
    with reading(folder, "train_generator"):  # truncated weights, a garbage config ...
        return module.load(folder, {"kind": "unet", **meta}, device)
