"""Classifier training on tensors: exactly ``steps`` AdamW steps, best-on-validation weights.

Images are uint8 N,C,H,W tensors, labels int64; the network sees ``to_unit(x)`` =
``(x/255 - 0.5)/0.5``. No file I/O here: the train_classifier stage and the filter's judge
both call ``fit_classifier`` / ``predict_proba``.
"""
from __future__ import annotations

import copy
import logging
import math
import time

import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from torch import nn

from pipeline.config import TrainClassifierConfig, VariantSpec
from pipeline.core.images import to_unit
from pipeline.core.device import DevicePolicy, as_policy
from pipeline.errors import ConfigError
from pipeline.models.classifier import build_model
from pipeline.training.augment import crop_flip, trivial_augment_wide

log = logging.getLogger(__name__)

AUGMENTS = ("standard", "classic")


class IndexStream:
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


def synthetic_use(synthetic: tuple[torch.Tensor, torch.Tensor] | None, ratio: float, steps: int, batch_size: int,
                  class_names: list[str]) -> dict:
    """How many synthetic images of each class a variant trains on, and how often each is seen."""
    if not synthetic or not len(synthetic[0]):
        return {"synthetic_per_class": None, "synthetic_seen_per_image": 0.0}
    y = synthetic[1].argmax(1) if synthetic[1].ndim == 2 else synthetic[1]  # soft labels: their top class
    counts = torch.bincount(y, minlength=len(class_names)).tolist()
    return {"synthetic_per_class": dict(zip(class_names, counts)),
            "synthetic_seen_per_image": round(steps * int(round(batch_size * ratio)) / len(y), 2)}


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


@torch.no_grad()
def predict_proba(model: nn.Module, x: torch.Tensor, batch_size: int = 256,
                  device: str | DevicePolicy = "cpu") -> torch.Tensor:
    """Class probabilities (float32 N,K, on CPU) for uint8 N,C,H,W images (``device``: a name or
    the run's ``DevicePolicy``)."""
    policy = as_policy(device)
    policy.prepare(model).eval()
    out = []
    for i in range(0, len(x), batch_size):
        with policy.autocast():
            logits = model(policy.inputs(to_unit(policy.to_device(x[i:i + batch_size]))))
        out.append(logits.float().softmax(-1).cpu())
    return torch.cat(out) if out else torch.zeros(0, 0)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, device: str | DevicePolicy
             ) -> float:
    if len(x) == 0:
        return float("nan")
    return float((predict_proba(model, x, batch_size, device).argmax(1) == y.cpu()).float().mean())


def soft_targets(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Class ids (N,) or probabilities (N,K) -> probabilities (N,K)."""
    return y.float() if y.ndim == 2 else F.one_hot(y, num_classes).float()


def sharpen(p: torch.Tensor, temperature: float) -> torch.Tensor:
    """p^(1/T), renormalised (T < 1 sharpens towards the top class; T = 1 leaves p as it is)."""
    q = p.double().clamp_min(1e-12) ** (1.0 / temperature)
    return (q / q.sum(1, keepdim=True)).float()


def fit_classifier(model: nn.Module, train_x: torch.Tensor | None, train_y: torch.Tensor | None,
                   val_x: torch.Tensor, val_y: torch.Tensor, *, steps: int, batch_size: int, lr: float,
                   weight_decay: float, seed: int, device: str | DevicePolicy = "cpu", augment: str = "standard",
                   synthetic: tuple[torch.Tensor, torch.Tensor] | None = None, synthetic_ratio: float = 0.0,
                   pseudo: tuple[torch.Tensor, torch.Tensor] | None = None, pseudo_share: float | None = None,
                   eval_every: int = 100, label_smoothing: float = 0.0, progress: bool = True
                   ) -> tuple[nn.Module, dict]:
    """Train ``model`` for exactly ``steps`` AdamW steps (one-cycle LR; timm's optimizer factory,
    so norms and biases get no weight decay) and return the weights
    with the best validation accuracy (checked every ``eval_every`` steps and at the end).

    Each batch holds ``round(batch_size * synthetic_ratio)`` synthetic images and real ones
    for the rest; with no real data (``train_x`` None or empty) batches are all synthetic. With
    ``pseudo`` (pseudo-labeled pool images), ``round(pseudo_share * real)`` of the real part of
    each batch come from the pool and the rest from the labeled images (``pseudo_share`` None: the
    pool's share of the two sets). Labels are class ids or,
    for any source, probabilities (N,K: soft labels, a cross-entropy with soft targets).
    ``augment``: standard = random crop + flip; classic = TrivialAugmentWide (one draw per image,
    batched on ``device``: ``training.augment``), then crop + flip. ``device``: a name or the run's
    ``DevicePolicy`` (precision, memory format, fused AdamW, compile, pinned batches).
    """
    if augment not in AUGMENTS:
        raise ConfigError(f"augment must be one of {AUGMENTS}, got {augment!r}")
    has_real = train_x is not None and len(train_x) > 0
    has_syn = synthetic is not None and len(synthetic[0]) > 0 and (synthetic_ratio > 0 or not has_real)
    if not has_real and not has_syn:
        raise ValueError("fit_classifier: no training images (neither real nor synthetic)")
    n_real, n_syn = batch_composition(batch_size, synthetic_ratio, has_real, has_syn)
    if pseudo is not None and len(pseudo[0]) and has_real:
        share = len(pseudo[0]) / (len(pseudo[0]) + len(train_x)) if pseudo_share is None else pseudo_share
        n_pool = int(round(n_real * share))
    else:
        n_pool = 0
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout draws from the global generator; batches and augmentation from gen
    parts = [(src, n) for src, n in (((train_x, train_y), n_real - n_pool), (pseudo, n_pool), (synthetic, n_syn)) if n]
    k = next((y.shape[1] for (_, y), _ in parts if y.ndim == 2), None)  # soft labels anywhere: all soft
    streams = [(x, soft_targets(y, k) if k else y, n, IndexStream(len(x), gen)) for (x, y), n in parts]

    policy = as_policy(device)
    policy.prepare(model).train()
    forward = policy.compiled(model)  # weights shared with model: best_state is taken from model
    opt = create_optimizer_v2(model, opt="adamw", lr=lr, weight_decay=weight_decay,  # no decay on norms, biases
                              fused=policy.fused_optimizer or None)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, one_cycle(steps))
    loss_fn = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    hist = {"step": [], "val_acc": [], "train_loss": [], "lr": []}
    best_acc, best_step, best_state = -1.0, 0, None
    running, seen, t0 = torch.zeros((), device=policy.device), 0, time.time()  # loss summed on the device
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=steps, desc="classifier", leave=False, disable=None)  # off when not a terminal
    for step in range(1, steps + 1):
        idx = [stream.take(n) for _, _, n, stream in streams]
        xb = torch.cat([x[i] for (x, _, _, _), i in zip(streams, idx)])
        yb = torch.cat([y[i] for (_, y, _, _), i in zip(streams, idx)])
        xb = policy.to_device(xb)
        if augment == "classic":  # one op and magnitude per image, on the device, in batch
            xb = trivial_augment_wide(xb, gen)
        xb = crop_flip(xb, gen)
        yb = policy.to_device(yb)
        with policy.autocast():
            loss = loss_fn(forward(policy.inputs(to_unit(xb))).float(), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        running += loss.detach()  # read every eval_every steps: no host sync per step
        seen += 1
        if bar is not None:
            bar.update(1)
        if step % eval_every == 0 or step == steps:
            acc = accuracy(model, val_x, val_y, max(256, batch_size), policy)
            model.train()
            hist["step"].append(step), hist["val_acc"].append(acc)
            hist["train_loss"].append(float(running) / seen), hist["lr"].append(sched.get_last_lr()[0])
            running, seen = torch.zeros((), device=policy.device), 0
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
    hist.update(steps=steps, best_step=best_step, best_val_acc=best_acc, real_per_batch=n_real - n_pool,
                pseudo_per_batch=n_pool, synthetic_per_batch=n_syn, augment=augment, soft_labels=k is not None, seconds=time.time() - t0,
                seconds_per_step=(time.time() - t0) / steps)
    return model, hist


def choose_ratio(sweep: dict[float, list[float]]) -> float:
    """The synthetic share to use from validation accuracies per candidate share (one per sweep
    seed): with 0 among the candidates, a share above 0 is taken only when it beats 0 on every
    seed (a gain that holds across seeds, not one seed's noise), the best mean of those; otherwise 0."""
    mean = {r: sum(v) / len(v) for r, v in sweep.items()}
    if 0.0 not in sweep:
        return max(mean, key=mean.get)
    wins = [r for r in sweep if r != 0.0 and all(a > b for a, b in zip(sweep[r], sweep[0.0]))]
    return max(wins, key=mean.get) if wins else 0.0


RATIO_RULE = ("a synthetic share above 0 is used only when it beats share 0 on validation with every sweep seed; "
              "otherwise the variant trains without synthetic images")


def train_variant(cfg: TrainClassifierConfig, spec: VariantSpec, real: tuple[torch.Tensor, torch.Tensor],
                  val: tuple[torch.Tensor, torch.Tensor], synthetic: tuple[torch.Tensor, torch.Tensor] | None,
                  seeds: list[int], device: str | DevicePolicy, num_classes: int,
                  pseudo: tuple[torch.Tensor, torch.Tensor] | None = None
                  ) -> tuple[list[tuple[nn.Module, dict]], float, dict | None]:
    """One model per seed of a variant; returns them, the synthetic share used and the ratio sweep
    (share -> validation accuracy per sweep seed).

    With ``cfg.ratio_sweep`` (and real + synthetic data) every candidate share is tried with the
    first ``cfg.sweep_seeds`` seeds and ``choose_ratio`` picks one for all seeds (the sweep's
    models of that share are kept).
    """
    def one(seed: int, ratio: float):
        torch.manual_seed(seed)
        model = build_model(cfg.arch, num_classes, val[0].shape[1], cfg.pretrained)
        return fit_classifier(model, *(real if spec.real else (None, None)), *val, steps=cfg.steps,
                              batch_size=cfg.batch_size, lr=cfg.lr, weight_decay=cfg.weight_decay, seed=seed,
                              device=device, augment=spec.augment, synthetic=synthetic, synthetic_ratio=ratio,
                              pseudo=pseudo, pseudo_share=cfg.pseudo_share,
                              eval_every=cfg.eval_every, label_smoothing=cfg.label_smoothing)

    ratio = cfg.synthetic_ratio if spec.real else 1.0
    if synthetic is None:
        ratio = 0.0
    sweep, done = None, {}
    if synthetic is not None and spec.real and cfg.ratio_sweep:
        sweep = {}
        for r in dict.fromkeys((cfg.synthetic_ratio, *cfg.ratio_sweep)):
            for seed in seeds[:cfg.sweep_seeds]:
                done[(r, seed)] = one(seed, r)
            sweep[r] = [done[(r, s)][1]["best_val_acc"] for s in seeds[:cfg.sweep_seeds]]
            log.info("ratio %.2f -> val acc %s", r, ", ".join(f"{a:.4f}" for a in sweep[r]))
        ratio = choose_ratio(sweep)
    results = [done.get((ratio, seed)) or one(seed, ratio) for seed in seeds]
    return results, ratio, sweep
