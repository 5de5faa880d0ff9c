"""What a classifier learns from each batch: the task objects of ``training.classifier.fit`` (one loop for
every classifier; timm's ``timm/task`` and USB's algorithm / thresholding-hook split are the model).

``fit`` draws the labeled sources (augmented: ``Batch.x``, uint8, their labels ``Batch.y``) and the
unlabeled pool (``Batch.pool``, raw), and a task turns them into a loss:

- ``Supervised``: cross-entropy on the labeled images; the ``taught`` rows are labeled by a ``Teacher``
  from the very view the student sees (consistent distillation);
- ``FixMatch`` (Sohn et al. 2020): the labeled loss plus, on the pool, the ``ema`` copy's class of a weak
  view (crop + flip) trains a strong view (TrivialAugmentWide + crop + flip + Cutout) where a ``Mask``
  lets it through. Masks: ``Threshold`` (plain FixMatch), ``FlexMatch`` (Zhang et al. 2021: thresholds
  per class, scaled by how much of the pool each class has claimed), ``DistributionAlignment``
  (ReMixMatch: the teacher's probabilities rescaled by the labeled prior over their running mean).
  Confident pseudo-labels skew towards easy classes (DebiasPL, CVPR 2022), hence the class-fair masks.
  A new method (FreeMatch, say) is one more ``Mask``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.core.device import DevicePolicy
from pipeline.core.images import to_unit
from pipeline.training.augment import crop_flip, cutout, trivial_augment_wide

log = logging.getLogger(__name__)


@dataclass
class Batch:
    """One step's images: the labeled ones augmented (uint8 on the device) with their labels (class ids
    or probabilities), the rows a teacher labels (indices or None), and the raw pool images with their
    rows in the pool (None without a pool)."""
    x: torch.Tensor
    y: torch.Tensor
    taught: torch.Tensor | None = None
    pool: tuple[torch.Tensor, torch.Tensor] | None = None


@dataclass
class Teacher:
    """Trained classifiers whose mean prediction of each augmented view labels the ``taught`` rows
    ("function matching": Beyer et al., CVPR 2022), softened or sharpened by ``temperature``
    (softmax(logits / T)); several models: the mean of their probabilities (a seed ensemble)."""
    models: list[nn.Module]
    temperature: float = 1.0

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, policy: DevicePolicy) -> torch.Tensor:
        with policy.autocast():
            return sum((m(x).float() / self.temperature).softmax(1) for m in self.models) / len(self.models)


class Supervised:
    """Cross-entropy (``label_smoothing``) of the labeled batch; ``teacher`` labels its taught rows."""
    pool_per_step = 0

    def __init__(self, label_smoothing: float = 0.0, teacher: Teacher | None = None):
        self.loss_fn, self.teacher = nn.CrossEntropyLoss(label_smoothing=label_smoothing), teacher

    def loss(self, forward, batch: Batch, policy: DevicePolicy, gen: torch.Generator, ema) -> tuple[torch.Tensor, dict]:
        x, y = policy.inputs(to_unit(batch.x)), batch.y
        if batch.taught is not None:  # fit refuses taught rows without a teacher
            y[batch.taught] = self.teacher(x[batch.taught], policy)
        with policy.autocast():
            return self.loss_fn(forward(x).float(), y), {}


class Threshold:
    """Plain FixMatch: a pool image counts when its top class's probability reaches ``threshold``."""

    def __init__(self, threshold: float):
        self.threshold = threshold

    def __call__(self, p: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pseudo-label, mask) of the pool images ``idx`` whose teacher probabilities are ``p``."""
        conf, label = p.max(1)
        return label, conf >= self.threshold


class DistributionAlignment(Threshold):
    """ReMixMatch's distribution alignment: p times the labeled ``prior`` over p's running mean, then
    the threshold."""

    def __init__(self, threshold: float, prior: torch.Tensor, momentum: float = 0.999):
        super().__init__(threshold)
        self.prior, self.momentum = prior, momentum
        self.mean_p = torch.full_like(prior, 1.0 / len(prior))

    def __call__(self, p, idx):
        self.mean_p = self.momentum * self.mean_p + (1 - self.momentum) * p.mean(0)
        p = p * self.prior / self.mean_p
        return super().__call__(p / p.sum(1, keepdim=True), idx)


class FlexMatch(Threshold):
    """FlexMatch's class-wise thresholds: ``threshold`` scaled by how many pool images each class has
    claimed (above the threshold once) against the best-learned class, with warm-up while most of the
    pool is unclaimed, through the convex mapping beta / (2 - beta)."""

    def __init__(self, threshold: float, pool_size: int, num_classes: int, device: str | torch.device):
        super().__init__(threshold)
        self.num_classes = num_classes
        self.claimed = torch.full((pool_size,), -1, dtype=torch.long, device=device)  # class, or -1

    def __call__(self, p, idx):
        conf, label = p.max(1)
        claimed = torch.bincount(self.claimed[self.claimed >= 0], minlength=self.num_classes).float()
        unclaimed = (self.claimed < 0).sum().float()
        beta = claimed / torch.maximum(claimed.max(), unclaimed).clamp_min(1)
        mask = conf >= self.threshold * (beta / (2 - beta))[label]
        over = conf >= self.threshold
        self.claimed[idx[over]] = label[over]
        return label, mask


class FixMatch:
    """FixMatch: the labeled loss plus ``weight`` x the masked loss of strong pool views on the ``ema``
    copy's class of weak ones; ``pool_per_step`` pool images per step. Labeled and strong views go
    through the network as one batch (shared batch-norm statistics, as in FixMatch)."""

    def __init__(self, mask: Threshold, pool_per_step: int, weight: float = 1.0):
        self.mask, self.pool_per_step, self.weight = mask, pool_per_step, weight

    def loss(self, forward, batch: Batch, policy: DevicePolicy, gen: torch.Generator, ema) -> tuple[torch.Tensor, dict]:
        xu, idx = batch.pool
        weak, strong = crop_flip(xu, gen), cutout(crop_flip(trivial_augment_wide(xu, gen), gen), gen)
        with torch.no_grad(), policy.autocast():
            p = ema.module(policy.inputs(to_unit(weak))).float().softmax(1)
        pseudo, mask = self.mask(p, idx.to(policy.device))
        n = len(batch.x)
        with policy.autocast():
            logits = forward(policy.inputs(to_unit(torch.cat([batch.x, strong])))).float()
        labeled = F.cross_entropy(logits[:n], batch.y)
        pool = (F.cross_entropy(logits[n:], pseudo, reduction="none") * mask).mean()
        return labeled + self.weight * pool, {"labeled_loss": labeled, "pool_loss": pool,
                                               "mask_rate": mask.float().mean()}


def fixmatch(cfg, labels: torch.Tensor, pool_size: int, num_classes: int, device) -> FixMatch:
    """FixMatch as ``pseudo_label`` configures it (``cfg``: a ``PseudoLabelConfig``; ``fairness`` names the
    mask: flexmatch | da | none), for a pool of ``pool_size`` and labeled class ids ``labels`` (distribution
    alignment's prior): ``unlabeled_ratio`` pool images per labeled one."""
    if cfg.pool_per_step > pool_size:  # a step draws the pool more than once: costs more, sees nothing new
        log.warning("pseudo_label.unlabeled_ratio %d x batch_size %d = %d pool images in each step, more than "
                    "the pool's %d: each step draws pool images more than once. A smaller unlabeled_ratio (or a "
                    "larger prepare.unlabeled_pool) costs less", cfg.unlabeled_ratio, cfg.batch_size,
                    cfg.pool_per_step, pool_size)
    if cfg.fairness == "flexmatch":
        mask = FlexMatch(cfg.fixmatch_threshold, pool_size, num_classes, device)
    elif cfg.fairness == "da":
        prior = torch.bincount(labels, minlength=num_classes).float() / len(labels)
        mask = DistributionAlignment(cfg.fixmatch_threshold, prior.to(device))
    else:
        mask = Threshold(cfg.fixmatch_threshold)
    return FixMatch(mask, cfg.pool_per_step, cfg.unlabeled_weight)
