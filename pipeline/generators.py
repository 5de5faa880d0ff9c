"""Generator families (``train_generator.kind``) behind one interface.

A trained generator folder (``models/generator/``) holds ``generator.json`` (its
``meta``: kind, num_classes, class_names, null_label, image_size, channels, fingerprint,
...) and the weights of its kind. ``load_generator`` gives the sample stage an object
with ``meta`` and ``sample(labels, seeds, cfg)``, whatever the kind, so sample, filter,
classify and report need no per-kind code. Each kind's module provides
``load(folder, meta, device)`` and, for cgan and datasetgan, ``fit(params, data, ...) ->
Fitted``; the diffusion kinds' ``fit`` is in train_generator, beside their training loop.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import torch

from pipeline.config import ConfigError, SampleConfig
from pipeline.storage import read_json

GENERATOR_META = "generator.json"
KINDS = {  # kind -> module with load() (and fit(), but for the diffusion kinds)
    "unet": "pipeline.diffusion",  # class-conditional diffusion, UNet2DModel
    "dit": "pipeline.diffusion",  # class-conditional diffusion, DiTTransformer2DModel
    "cgan": "pipeline.gan",  # conditional GAN, one forward pass per image
    "datasetgan": "pipeline.datasetgan",  # unconditional diffusion + interpreter-assigned labels
}


class Generator(Protocol):
    meta: dict

    def sample(self, labels: torch.Tensor, seeds: list[int], cfg: SampleConfig) -> torch.Tensor:
        """uint8 images (N,C,H,W, CPU) of classes ``labels``; image i depends on (labels[i], seeds[i]) only."""


@dataclass
class Fitted:
    """What a kind's fit() hands back to train_generator."""
    generator: Generator  # the trained generator in eval mode (used for the preview grid)
    save: Callable[[Path], Path]  # writes the weights into a generator folder; returns the main weights file
    history: dict[str, list[float]]  # per-step columns of loss.csv; "loss" and "lr" first
    seconds_per_step: float  # training time / steps, over every run that built the checkpoints
    resumed_from: int  # step of the checkpoint the run resumed from (0 = fresh)
    num_parameters: int
    extra: dict = field(default_factory=dict)  # kind-specific facts for generator.json


def module_of(kind: str):
    if kind not in KINDS:
        raise ConfigError(f"train_generator.kind: unknown generator kind {kind!r} (allowed: {', '.join(KINDS)})")
    return importlib.import_module(KINDS[kind])


def load_generator(folder: str | Path, device: str = "cpu") -> Generator:
    """Read a train_generator output folder into a ready-to-sample generator."""
    folder = Path(folder)
    meta_file = folder / GENERATOR_META
    if not meta_file.exists():
        raise FileNotFoundError(f"{meta_file}: generator not found. Run train_generator first (dvc repro).")
    meta = read_json(meta_file)
    meta.setdefault("kind", "unet")
    return module_of(meta["kind"]).load(folder, meta, device)
