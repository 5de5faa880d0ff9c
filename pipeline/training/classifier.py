"""Classifier training on tensors: exactly ``steps`` AdamW steps, best-on-validation weights.

Images are uint8 N,C,H,W tensors, labels int64; the network sees ``to_unit(x)`` =
``(x/255 - 0.5)/0.5``. A batch draws from sources (``Source``: labeled, pseudo-labeled, synthetic;
``batch_sources``). No file I/O here: the train_classifier stage (``train_one``), the labeler
and the filter's judge all call ``fit_classifier`` / ``predict_proba``.
"""
from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from torch import nn

from pipeline.config import TrainClassifierConfig, VariantSpec
from pipeline.core.images import to_unit
from pipeline.core.stats import classification_metrics
from pipeline.core.device import DevicePolicy, as_policy
from pipeline.core.parallel import cpu_cores, map_processes
from pipeline.errors import ConfigError
from pipeline.models.classifier import build_model
from pipeline.training.augment import crop_flip, trivial_augment_wide

log = logging.getLogger(__name__)

AUGMENTS = ("standard", "classic")


class IndexStream:
    """Endless reshuffled indices into a source of ``n`` items. (Not a seeded ``RandomSampler``: that
    draws one more permutation at each epoch's end, which would shift the augmentation's draws from
    the same generator and so change every result.)"""

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


@dataclass
class Source:
    """Training images (uint8 N,C,H,W) with labels (class ids N, or probabilities N,K) and how many of
    them each batch draws (``name``: what the training history calls the source)."""
    name: str
    x: torch.Tensor | None
    y: torch.Tensor | None
    per_batch: int
    taught: bool = False  # labels from the teacher's prediction of the very view the student sees


@dataclass
class Teacher:
    """A trained classifier whose predictions of each augmented batch label the ``taught`` sources
    (consistent distillation, "function matching": Beyer et al., CVPR 2022), softened or sharpened by
    ``temperature`` (softmax(logits / T))."""
    model: nn.Module
    temperature: float = 1.0

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, policy: DevicePolicy) -> torch.Tensor:
        with policy.autocast():
            return (self.model(x).float() / self.temperature).softmax(1)


Pair = tuple[torch.Tensor, torch.Tensor]


def batch_sources(batch_size: int, real: Pair | None = None, pseudo: Pair | None = None,
                  synthetic: Pair | None = None, synthetic_share: float = 0.0, pseudo_share: float | None = None,
                  taught: tuple[str, ...] = ()) -> list[Source]:
    """The labeled, pseudo-labeled and synthetic sources of a batch of ``batch_size``:
    ``round(batch_size * synthetic_share)`` synthetic images and real ones for the rest (all synthetic
    without real images); of the real part, ``round(pseudo_share * real)`` from the pool (``pseudo_share``
    None: the pool's share of the two sets) and the rest from the labeled images. ``taught``: the sources
    (pseudo, synthetic) labeled by a ``Teacher`` as they are drawn."""
    has_real = real is not None and len(real[0]) > 0
    has_syn = synthetic is not None and len(synthetic[0]) > 0 and (synthetic_share > 0 or not has_real)
    if not has_real and not has_syn:
        raise ValueError("fit_classifier: no training images (neither real nor synthetic)")
    n_syn = 0 if not has_syn else batch_size if not has_real else int(round(batch_size * synthetic_share))
    n_real, n_pool = batch_size - n_syn, 0
    if pseudo is not None and len(pseudo[0]) and has_real:
        share = len(pseudo[0]) / (len(pseudo[0]) + len(real[0])) if pseudo_share is None else pseudo_share
        n_pool = int(round(n_real * share))
    none = (None, None)
    return [Source("real", *(real or none), n_real - n_pool),
            Source("pseudo", *(pseudo or none), n_pool, "pseudo" in taught),
            Source("synthetic", *(synthetic or none), n_syn, "synthetic" in taught)]


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
    works for a handful of steps: linear warm-up from ``start`` to 1, cosine down to ``end``. (diffusers'
    and timm's cosine schedules warm up from 0 and end at 0: the same shape, other numbers.)"""
    warm = max(1, round(warmup * steps))

    def factor(i: int) -> float:
        if i < warm:
            return start + (1 - start) * i / warm
        t = min(1.0, (i - warm) / max(1, steps - warm))
        return end + (1 - end) * 0.5 * (1 + math.cos(math.pi * t))
    return factor


@torch.no_grad()
def predict_proba(model: nn.Module, x: torch.Tensor, batch_size: int = 256,
                  device: str | DevicePolicy = "cpu", flip: bool = False) -> torch.Tensor:
    """Class probabilities (float32 N,K, on CPU) for uint8 N,C,H,W images (``device``: a name or
    the run's ``DevicePolicy``); ``flip``: the mean of each image's and its mirror image's
    (test-time augmentation for a model that trained on flipped views)."""
    policy = as_policy(device).for_classifiers()
    policy.prepare(model).eval()
    out = []
    for i in range(0, len(x), batch_size):
        xb = to_unit(policy.to_device(x[i:i + batch_size]))
        views = (xb, xb.flip(-1)) if flip else (xb,)
        with policy.autocast():
            p = sum(model(policy.inputs(v)).float().softmax(-1) for v in views) / len(views)
        out.append(p.cpu())
    return torch.cat(out) if out else torch.zeros(0, 0)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, device: str | DevicePolicy,
             flip: bool = False) -> float:
    """Share of ``x`` that ``model`` classifies as ``y`` (NaN for no images); ``flip`` as in ``predict_proba``."""
    if len(x) == 0:
        return float("nan")
    return float((predict_proba(model, x, batch_size, device, flip).argmax(1) == y.cpu()).float().mean())


def soft_targets(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Class ids (N,) or probabilities (N,K) -> probabilities (N,K)."""
    return y.float() if y.ndim == 2 else F.one_hot(y, num_classes).float()


def sharpen(p: torch.Tensor, temperature: float) -> torch.Tensor:
    """p^(1/T), renormalised (T < 1 sharpens towards the top class; T = 1 leaves p as it is)."""
    q = p.double().clamp_min(1e-12) ** (1.0 / temperature)
    return (q / q.sum(1, keepdim=True)).float()


def fit_classifier(model: nn.Module, sources: list[Source], val: Pair, *, steps: int, lr: float,
                   weight_decay: float, seed: int, device: str | DevicePolicy = "cpu", augment: str = "standard",
                   eval_every: int = 100, label_smoothing: float = 0.0, teacher: Teacher | None = None,
                   progress: bool = True) -> tuple[nn.Module, dict]:
    """Train ``model`` for exactly ``steps`` AdamW steps (one-cycle LR; timm's optimizer factory,
    so norms and biases get no weight decay) and return the weights
    with the best validation accuracy (checked every ``eval_every`` steps and at the end).

    Each batch draws ``per_batch`` images from each of the ``sources`` (``batch_sources``). Labels
    are class ids or, for any source, probabilities (N,K: soft labels, a cross-entropy with soft
    targets). ``augment``: standard = random crop + flip; classic = TrivialAugmentWide (one draw per
    image, batched on ``device``: ``training.augment``), then crop + flip. ``teacher``: labels the
    images of ``taught`` sources from the augmented view itself. ``device``: a name or the
    run's ``DevicePolicy`` (precision, memory format, fused AdamW, compile, pinned batches).
    """
    if augment not in AUGMENTS:
        raise ConfigError(f"augment must be one of {AUGMENTS}, got {augment!r}")
    active = [s for s in sources if s.per_batch]
    if not active:
        raise ValueError("fit_classifier: no training images (no source draws any)")
    batch_size = sum(s.per_batch for s in active)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout draws from the global generator; batches and augmentation from gen
    taught = torch.cat([torch.full((s.per_batch,), s.taught) for s in active])
    if taught.any() and teacher is None:
        raise ValueError("fit_classifier: a source is to be labeled by a teacher, and no teacher was given")
    k = next((s.y.shape[1] for s in active if s.y.ndim == 2), None)  # soft labels anywhere: all soft
    if k is None and taught.any():
        k = int(model.num_classes)  # a timm model
    streams = [(s.x, soft_targets(s.y, k) if k else s.y, s.per_batch, IndexStream(len(s.x), gen)) for s in active]

    policy = as_policy(device).for_classifiers()
    policy.prepare(model).train()
    teach = teacher is not None and bool(taught.any())
    if teach:  # the taught rows as indices, on the device: no host sync per step
        policy.prepare(teacher.model).eval()
        taught = policy.to_device(taught.nonzero().squeeze(1))
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
        xb = policy.inputs(to_unit(crop_flip(xb, gen)))
        yb = policy.to_device(yb)
        if teach:
            yb[taught] = teacher(xb[taught], policy)
        with policy.autocast():
            loss = loss_fn(forward(xb).float(), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        running += loss.detach()  # read every eval_every steps: no host sync per step
        seen += 1
        if bar is not None:
            bar.update(1)
        if step % eval_every == 0 or step == steps:
            acc = accuracy(model, *val, max(256, batch_size), policy)
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
    hist.update(steps=steps, best_step=best_step, best_val_acc=best_acc,
                **{f"{s.name}_per_batch": s.per_batch for s in sources}, augment=augment, soft_labels=k is not None,
                taught=[s.name for s in active if s.taught],
                seconds=time.time() - t0, seconds_per_step=(time.time() - t0) / steps)
    return model, hist


@dataclass
class VariantData:
    """What a variant trains and selects on (never the test split)."""
    train: tuple[torch.Tensor, torch.Tensor]  # the labeled images
    val: tuple[torch.Tensor, torch.Tensor]
    class_names: list[str]
    pseudo: tuple[torch.Tensor, torch.Tensor] | None = None  # pool images, pseudo-labels (ids or probabilities)
    synthetic: tuple[torch.Tensor, torch.Tensor] | None = None
    synthetic_path: Path | None = None
    inputs: dict = field(default_factory=dict)  # stage output -> fingerprint of what it read (the report checks)
    taught: tuple[str, ...] = ()  # sources (pseudo, synthetic) the teacher labels as they are drawn
    teacher: Teacher | None = None


def train_one(cfg: TrainClassifierConfig, spec: VariantSpec, data: VariantData, seed: int, share: float,
              device: str | DevicePolicy) -> tuple[nn.Module, dict]:
    """One model of a variant: seed ``seed`` at synthetic share ``share``."""
    torch.manual_seed(seed)
    model = build_model(cfg.arch, len(data.class_names), data.val[0].shape[1], cfg.pretrained)
    sources = batch_sources(cfg.batch_size, data.train if spec.real else None, data.pseudo, data.synthetic, share,
                            cfg.pseudo_share, data.taught)
    return fit_classifier(model, sources, data.val, steps=cfg.steps, lr=cfg.lr, weight_decay=cfg.weight_decay,
                          seed=seed, device=device, augment=spec.augment, eval_every=cfg.eval_every,
                          label_smoothing=cfg.label_smoothing, teacher=data.teacher)


def train_runs(cfg: TrainClassifierConfig, spec: VariantSpec, data: VariantData, jobs: list[tuple[int, float]],
               device: DevicePolicy, workers: int | str = "auto") -> list[tuple[nn.Module, dict]]:
    """``train_one`` for each (seed, share) of ``jobs``, ``workers`` side by side (core.parallel; auto: one
    per CPU core at one thread each, one after another on CUDA)."""
    if workers == "auto":
        workers = 1 if device.is_cuda else cpu_cores()
    calls = [(cfg, spec, data, seed, share, device) for seed, share in jobs]
    return map_processes(train_one, calls, workers, [f"seed {seed} share {share:g}" for seed, share in jobs])


def score_on_test(model: nn.Module, hist: dict, seed: int, test: tuple, class_names: list[str],
                  cfg: TrainClassifierConfig, device: str | DevicePolicy, variant: str) -> dict:
    """One seed's model on the test split, with its training record."""
    num_classes = len(class_names)
    m = classification_metrics(predict_proba(model, test[0], cfg.eval_batch_size, device), test[1], num_classes,
                               cfg.ece_bins)
    m["per_class_accuracy"] = dict(zip(class_names, m["per_class_accuracy"]))
    m.update(seed=seed, best_val_accuracy=hist["best_val_acc"], best_step=hist["best_step"],
             steps=hist["steps"], seconds=round(hist["seconds"], 2))
    log.info("train_classifier %s seed %d: test acc %.4f, macro-F1 %.4f, ECE %.4f (val %.4f @ step %d, %.0fs)",
             variant, seed, m["accuracy"], m["macro_f1"], m["ece"], hist["best_val_acc"], hist["best_step"],
             hist["seconds"])
    return m
