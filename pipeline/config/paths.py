"""``Paths``: every file the pipeline reads or writes, named once, relative to the project root."""
from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict


def _under_root(rel: str) -> property:
    return property(lambda self: self.root / rel, doc=f"``{rel}`` under the project root")


def labeler_file(index: int) -> str:
    """Where pseudo_label keeps its seed ``index``'s model, under ``Paths.pseudo`` (its history: .json beside it)."""
    return f"labelers/seed{index}.safetensors"


def classifier_file(index: int) -> str:
    """Where train_classifier keeps a variant's seed ``index``'s weights, under ``Paths.classifier / variant``."""
    return f"seed{index}/model.safetensors"


class Paths(BaseModel):
    """Every path the pipeline reads or writes, named once, relative to ``root``."""

    model_config = ConfigDict(frozen=True)
    root: Path = Path(".")

    prepared = _under_root("data/prepared")
    pseudo = _under_root("data/pseudo")
    generator = _under_root("models/generator")
    generator_checkpoints = _under_root("models/generator_checkpoints")
    synthetic = _under_root("data/synthetic")
    synthetic_shards = _under_root("data/synthetic_shards")
    filtered = _under_root("data/filtered")
    feature_cache = _under_root("data/cache")
    classifier = _under_root("models/classifier")
    classifier_metrics = _under_root("metrics/classifier")
    classifier_seeds = _under_root("models/classifier_seeds")  # a fan-out's seed runs (flows/fanout.py)
    stage_timing = _under_root("metrics/stages")  # run times kept out of the stage outputs they describe
    reports = _under_root("reports")
