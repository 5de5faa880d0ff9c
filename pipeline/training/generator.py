"""What every generator family's training shares: its data, its result, its registry.

``FITTERS`` maps ``train_generator.kind`` to the module whose ``fit(params, data,
accelerator, ckpt_dir, chash) -> Fitted`` trains it; ``pipeline.models.registry`` maps the
same kinds to their ``load``.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline.config import SampleConfig, TrainGeneratorConfig
from pipeline.models.registry import Generator, check_kind

FITTERS = {"unet": "pipeline.training.diffusion", "dit": "pipeline.training.diffusion",
           "cgan": "pipeline.training.gan", "datasetgan": "pipeline.training.datasetgan"}
# keys that do not change the weights a run ends with (left out of the checkpoint hash): how the global
# batch is split over processes and forward passes is one of them, so a run resumes on another process count
NOT_HASHED = ("checkpoint_every", "log_every", "preview_per_class", "num_processes", "gradient_accumulation_steps")
PREVIEW = SampleConfig(sampler="dpm++", num_inference_steps=20, guidance_scale=2.0)


@dataclass
class TrainData:
    """Training tensors (uint8 N,C,H,W on the training device) and their description."""
    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    unlabeled: torch.Tensor | None = None  # train + pool images for unconditional pre-training
    class_names: list[str] = field(default_factory=list)
    val_images: torch.Tensor | None = None  # the val split (uint8, CPU), for kinds that score a labeler
    val_labels: torch.Tensor | None = None
    inputs: dict = field(default_factory=dict)  # fingerprints of the stage outputs read (recorded in generator.json)
    weights: torch.Tensor | None = None  # relative draw probability of each labeled image (None = uniform)
    num_pseudo: int = 0  # how many of the labeled images are pseudo-labeled pool images (the last ones)

    def draw(self, n: int, rng: torch.Generator) -> torch.Tensor:
        """Indices of ``n`` labeled images, with replacement, by ``weights``."""
        if self.weights is None:
            return torch.randint(len(self.images), (n,), generator=rng, device=self.images.device)
        return torch.multinomial(self.weights, n, replacement=True, generator=rng)

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])


@dataclass
class Fitted:
    """What a kind's fit() hands back to train_generator."""
    generator: Generator  # the trained generator in eval mode (used for the preview grid)
    save: Callable[[Path], Path]  # writes the weights into a generator folder; returns the main weights file
    history: dict[str, list[float]]  # per-step curves (DVCLive logs); "loss" and "lr" first
    seconds_per_step: float  # training time / steps, over every run that built the checkpoints
    resumed_from: int  # step of the checkpoint the run resumed from (0 = fresh)
    num_parameters: int
    extra: dict = field(default_factory=dict)  # kind-specific facts for generator.json


def fitter(kind: str) -> Callable[..., Fitted]:
    return importlib.import_module(FITTERS[check_kind(kind)]).fit


def hashed_config(cfg: TrainGeneratorConfig) -> dict:
    return {k: v for k, v in cfg.model_dump(mode="json").items() if k not in NOT_HASHED}


def generator_meta(cfg: TrainGeneratorConfig, data: TrainData) -> dict:
    """The generator.json fields every kind has and its sample() relies on."""
    return {"kind": cfg.kind, "num_classes": data.num_classes, "class_names": data.class_names,
            "null_label": data.num_classes, "image_size": data.image_size, "channels": data.channels,
            "inputs": data.inputs, "labels": "pseudo" if data.num_pseudo else "labeled",
            "num_labeled": len(data.images) - data.num_pseudo, "num_pseudo_labeled": data.num_pseudo}


def preview(generator: Generator, num_classes: int, per_class: int) -> torch.Tensor:
    """uint8 images, rows = classes (diffusion kinds: DPM-Solver++, 20 steps, guidance 2)."""
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    return generator.sample(labels, list(range(len(labels))), PREVIEW)
