"""Classifier training on tensors: exactly ``steps`` AdamW steps, best-on-validation weights.

Images are uint8 N,C,H,W tensors, labels int64; the network sees ``to_unit(x)`` =
``(x/255 - 0.5)/0.5``. A batch draws from sources (``Source``: labeled, pseudo-labeled, synthetic;
``batch_sources``). No file I/O here: the train_classifier stage (``train_one``), the labeler and
the filter's judge all call ``fit`` / ``predict_proba``; what each learns per batch is a task
(``training.tasks``: supervised, distillation, FixMatch).
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
from timm.utils import ModelEmaV3
from torch import nn

from pipeline.config import Params, PseudoLabelConfig, TrainClassifierConfig, VariantSpec
from pipeline.core.device import DevicePolicy, as_policy
from pipeline.core.images import to_unit
from pipeline.core.parallel import cpu_cores, map_processes
from pipeline.core.stats import classification_metrics
from pipeline.errors import ConfigError
from pipeline.models.classifier import build_model
from pipeline.training.augment import crop_flip, trivial_augment_wide
from pipeline.training.plan import RATIO_RULE
from pipeline.training.tasks import Batch, Supervised, Teacher, fixmatch

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
        raise ValueError("fit: no training images (neither real nor synthetic)")
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


def ensemble_proba(models: list[nn.Module], x: torch.Tensor, device: str | DevicePolicy, flip: bool = False,
                   batch_size: int = 512) -> torch.Tensor:
    """The mean of ``models``' probabilities (``predict_proba``) of ``x``: a seed ensemble's prediction."""
    return sum(predict_proba(m, x, batch_size, device, flip) for m in models) / len(models)


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


def fit(model: nn.Module, sources: list[Source], val: Pair, *, steps: int, lr: float, weight_decay: float, seed: int,
        device: str | DevicePolicy = "cpu", augment: str = "standard", eval_every: int = 100,
        label_smoothing: float = 0.0, teacher: Teacher | None = None, task=None, pool: torch.Tensor | None = None,
        ema_decay: float | None = None, progress: bool = True) -> tuple[nn.Module, dict]:
    """Train ``model`` for exactly ``steps`` AdamW steps (one-cycle LR; timm's optimizer factory, so norms
    and biases get no weight decay) and return the weights with the best validation accuracy (checked
    every ``eval_every`` steps and at the end): the one loop of every classifier (variants, labeler, judge).

    Each step draws ``per_batch`` images from each of the labeled ``sources`` (``batch_sources``; labels
    are class ids or, for any source, probabilities N,K: a cross-entropy with soft targets), augments
    them (``augment``: standard = random crop + flip; classic = TrivialAugmentWide, one draw per image,
    batched on the device, then crop + flip), and ``task.pool_per_step`` raw images of the unlabeled
    ``pool``; the ``task`` (``training.tasks``; default ``Supervised(label_smoothing, teacher)``, the
    ``teacher`` labeling the images of ``taught`` sources from the view itself) makes the loss.
    ``ema_decay``: an EMA copy of the weights (timm's ``ModelEmaV3``) is kept, used by the task, validated
    and returned. ``device``: a name or the run's ``DevicePolicy`` (precision, memory format, fused
    AdamW, compile).
    """
    if augment not in AUGMENTS:
        raise ConfigError(f"augment must be one of {AUGMENTS}, got {augment!r}")
    task = task or Supervised(label_smoothing, teacher)
    teacher = getattr(task, "teacher", None)
    active = [s for s in sources if s.per_batch]
    if not active:
        raise ValueError("fit: no training images (no source draws any)")
    if task.pool_per_step and (pool is None or not len(pool)):
        raise ValueError("fit: the task learns from an unlabeled pool, and no pool image was given")
    batch_size = sum(s.per_batch for s in active)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout draws from the global generator; batches and augmentation from gen
    taught = torch.cat([torch.full((s.per_batch,), s.taught) for s in active])
    if taught.any() and teacher is None:
        raise ValueError("fit: a source is to be labeled by a teacher, and no teacher was given")
    k = next((s.y.shape[1] for s in active if s.y.ndim == 2), None)  # soft labels anywhere: all soft
    if k is None and taught.any():
        k = int(model.num_classes)  # a timm model
    streams = [(s.x, soft_targets(s.y, k) if k else s.y, s.per_batch, IndexStream(len(s.x), gen)) for s in active]
    pool_stream = IndexStream(len(pool), gen) if task.pool_per_step else None

    policy = as_policy(device).for_classifiers()
    policy.prepare(model).train()
    rows = None
    if taught.any():  # the taught rows as indices, on the device: no host sync per step
        for m in teacher.models:
            policy.prepare(m).eval()
        rows = policy.to_device(taught.nonzero().squeeze(1))
    ema = ModelEmaV3(model, decay=ema_decay, use_warmup=True) if ema_decay is not None else None
    kept = ema.module if ema is not None else model  # what is validated and returned
    forward = policy.compiled(model)  # weights shared with model
    opt = create_optimizer_v2(model, opt="adamw", lr=lr, weight_decay=weight_decay,  # no decay on norms, biases
                              fused=policy.fused_optimizer or None)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, one_cycle(steps))
    hist = {"step": [], "val_acc": [], "train_loss": [], "lr": []}
    best_acc, best_step, best_state = -1.0, 0, None
    sums, seen, t0 = None, 0, time.time()  # losses summed on the device, read every eval_every steps
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=steps, desc="classifier", leave=False, disable=None)  # off when not a terminal
    for step in range(1, steps + 1):
        idx = [stream.take(n) for _, _, n, stream in streams]
        pi = pool_stream.take(task.pool_per_step) if pool_stream else None
        xb = policy.to_device(torch.cat([x[i] for (x, _, _, _), i in zip(streams, idx)]))
        yb = torch.cat([y[i] for (_, y, _, _), i in zip(streams, idx)])
        if augment == "classic":  # one op and magnitude per image, on the device, in batch
            xb = trivial_augment_wide(xb, gen)
        batch = Batch(crop_flip(xb, gen), policy.to_device(yb), rows,
                      None if pi is None else (policy.to_device(pool[pi]), pi))
        loss, parts = task.loss(forward, batch, policy, gen, ema)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if ema is not None:
            ema.update(model, step)
        now = torch.stack([loss.detach(), *(v.detach() for v in parts.values())])
        sums, seen = (now if sums is None else sums + now), seen + 1  # no host sync per step
        if bar is not None:
            bar.update(1)
        if step % eval_every == 0 or step == steps:
            acc = accuracy(kept, *val, max(256, batch_size), policy)
            model.train()
            means = dict(zip(("train_loss", *parts), (sums / seen).tolist()))
            for key, v in {"step": step, "val_acc": acc, **means, "lr": sched.get_last_lr()[0]}.items():
                hist.setdefault(key, []).append(v)
            sums, seen = None, 0
            if best_state is None or (not math.isnan(acc) and acc >= best_acc):
                best_acc, best_step = acc, step
                best_state = copy.deepcopy({k: v.detach().cpu() for k, v in kept.state_dict().items()})
            if bar is not None:
                bar.set_postfix(loss=f"{means['train_loss']:.3f}", val=f"{acc:.3f}")
            if progress:
                log.info("step %d/%d: %s, val acc %.4f", step, steps,
                         ", ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in means.items()), acc)
    if bar is not None:
        bar.close()
    kept.load_state_dict(best_state)
    kept.eval()
    hist.update(steps=steps, best_step=best_step, best_val_acc=best_acc,
                **{f"{s.name}_per_batch": s.per_batch for s in sources}, pool_per_batch=task.pool_per_step,
                augment=augment, soft_labels=k is not None, taught=[s.name for s in active if s.taught],
                seconds=time.time() - t0, seconds_per_step=(time.time() - t0) / steps)
    return kept, hist


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
    pool: torch.Tensor | None = None  # unlabeled pool images (learner: fixmatch)
    learner: PseudoLabelConfig | None = None  # the semi-supervised learner's settings (learner: fixmatch)
    oracle: dict = field(default_factory=dict)  # oracle: true: how many pool images of each class replace synthetic


def train_one(cfg: TrainClassifierConfig, spec: VariantSpec, data: VariantData, seed: int, share: float,
              device: str | DevicePolicy) -> tuple[nn.Module, dict]:
    """One model of a variant: seed ``seed`` at synthetic share ``share``; ``learner: fixmatch`` adds the
    unlabeled pool, FixMatch's loss and its EMA (``data.learner``'s settings)."""
    torch.manual_seed(seed)
    model = build_model(cfg.arch, len(data.class_names), data.val[0].shape[1], cfg.pretrained)
    sources = batch_sources(cfg.batch_size, data.train if spec.real else None, data.pseudo, data.synthetic, share,
                            cfg.pseudo_share, data.taught)
    semi = spec.learner == "fixmatch"
    if semi and (data.learner is None or data.pool is None or not len(data.pool)):
        raise ValueError("train_one: learner fixmatch needs the unlabeled pool and pseudo_label's settings")
    task = fixmatch(data.learner, data.train[1], len(data.pool), len(data.class_names),
                    as_policy(device).device) if semi else None
    return fit(model, sources, data.val, steps=cfg.steps, lr=cfg.lr, weight_decay=cfg.weight_decay, seed=seed,
               device=device, augment=spec.augment, eval_every=cfg.eval_every, label_smoothing=cfg.label_smoothing,
               teacher=data.teacher, task=task, pool=data.pool if semi else None,
               ema_decay=data.learner.ema_decay if semi else None)


def train_runs(cfg: TrainClassifierConfig, spec: VariantSpec, data: VariantData, jobs: list[tuple[int, float]],
               device: DevicePolicy, workers: int | str = "auto") -> list[tuple[nn.Module, dict]]:
    """``train_one`` for each (seed, share) of ``jobs``, ``workers`` side by side (core.parallel; auto: one
    per CPU core at one thread each, one after another on CUDA)."""
    if workers == "auto":
        workers = 1 if device.is_cuda else cpu_cores()
    calls = [(cfg, spec, data, seed, share, device) for seed, share in jobs]
    return map_processes(train_one, calls, workers, [f"seed {seed} share {share:g}" for seed, share in jobs])


def score_on_test(model: nn.Module, hist: dict, seed: int, test: tuple, class_names: list[str],
                  cfg: TrainClassifierConfig, device: str | DevicePolicy, variant: str, flip: bool = False) -> dict:
    """One seed's model on the test split (``flip``: mirror-image TTA), with its training record."""
    num_classes = len(class_names)
    m = classification_metrics(predict_proba(model, test[0], cfg.eval_batch_size, device, flip), test[1], num_classes,
                               cfg.ece_bins)
    m["per_class_accuracy"] = dict(zip(class_names, m["per_class_accuracy"]))
    m.update(seed=seed, best_val_accuracy=hist["best_val_acc"], best_step=hist["best_step"],
             steps=hist["steps"], seconds=None if hist.get("seconds") is None else round(hist["seconds"], 2))
    log.info("train_classifier %s seed %d: test acc %.4f, macro-F1 %.4f, ECE %.4f (val %.4f @ step %d, %s)",
             variant, seed, m["accuracy"], m["macro_f1"], m["ece"], hist["best_val_acc"], hist["best_step"],
             f"trained in {m['seconds']:.0f}s" if m["seconds"] is not None else "training time not recorded")
    return m


def variant_record(params: Params, variant: str, data: VariantData, share: float, sweep, test) -> dict:
    """What every output of the variant says about how it was trained."""
    cfg = params.classifier_config(variant)
    spec, synthetic = cfg.variants[variant], data.synthetic
    semi = spec.learner == "fixmatch"
    return {"variant": variant, "learner": params.pseudo_label.name if semi else "supervised",
            "arch": cfg.arch, "pretrained": cfg.pretrained, "augment": spec.augment,
            "tta": "flip" if semi and params.pseudo_label.flip else "none", "trains_on_real": spec.real,
            "n_pool": len(data.pool) if semi else 0,
            "pool_per_batch": params.pseudo_label.pool_per_step if semi else 0,
            "synthetic_source": str(data.synthetic_path) if data.synthetic_path else None,
            "synthetic_ratio": share, "ratio_rule": RATIO_RULE if sweep else None, "steps": cfg.steps,
            "batch_size": cfg.batch_size,
            "pseudo": {"share": cfg.pseudo_share, "labels": cfg.pseudo_labels,
                       "temperature": cfg.pseudo_temperature} if data.pseudo else None,
            "synthetic_labels": cfg.synthetic_labels if synthetic else None,
            "n_train_real": len(data.train[0]) if spec.real else 0, "n_pseudo_labeled": count(data.pseudo),
            "n_synthetic": count(synthetic), "n_val": len(data.val[0]), "n_test": len(test[1]),
            **synthetic_use(synthetic, share, cfg.steps, cfg.batch_size, data.class_names),
            "class_names": data.class_names, "test_classes_missing": test[2],
            "inputs": data.inputs,  # the report refuses metrics of other data or other settings
            "params": params.made_with("train_classifier", variant)}


def count(pair) -> int:
    """How many images a (images, labels) pair holds (0 for None)."""
    return len(pair[0]) if pair else 0
