"""Semi-supervised classifier training on a labeled set and an unlabeled pool: FixMatch with an EMA
teacher and class-fair pseudo-labels (the labeler of ``pseudo_label``).

FixMatch (Sohn et al. 2020): each step takes ``batch_size`` labeled images and ``unlabeled_ratio``
times as many pool images. The teacher (an EMA of the student's weights, timm's ``ModelEmaV3``)
predicts a weakly augmented view of each pool image (crop + flip); where its confidence clears the
threshold, the class trains the student on a strongly augmented view (TrivialAugmentWide + crop +
flip + Cutout, FixMatch's RandAugment + Cutout) of the same image. Confident pseudo-labels come out skewed towards easy classes (DebiasPL,
CVPR 2022), so one of:

- ``flexmatch`` (Zhang et al. 2021): a threshold per class, scaled by how many pool images that
  class has already claimed (the best-learned class keeps the full threshold, with warm-up while
  most of the pool is unclaimed);
- ``da``: distribution alignment (ReMixMatch): the teacher's probabilities are rescaled by the
  labeled set's class frequencies over their running mean before thresholding;
- ``none``: plain FixMatch.

At the cpu profile's 1,500 steps FlexMatch's warm-up never ends (most of the pool stays unclaimed), so
its thresholds stay near 0 and every pool image trains the student on its teacher's class. That is the
default on purpose: on the pool study's dev split (N = 5,000; seeds 0 and 1) it beat plain FixMatch at
0.95 (59% of the pool above it) by 0.5 and 0.7 points and distribution alignment by 0.7 and 0.4.

Computation only (tensors in, model out), like ``training.classifier``; exactly ``steps`` AdamW
steps with one-cycle LR, and the teacher with the best validation accuracy is returned.
"""
from __future__ import annotations

import copy
import logging
import math
import time

import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from timm.utils import ModelEmaV3
from torch import nn

from pipeline.config import PseudoLabelConfig
from pipeline.core.device import DevicePolicy, as_policy
from pipeline.core.images import to_unit
from pipeline.training.augment import crop_flip, cutout, trivial_augment_wide
from pipeline.training.classifier import IndexStream, accuracy, one_cycle

log = logging.getLogger(__name__)


class ClassFairness:
    """Per-class confidence thresholds of pool pseudo-labels (``flexmatch`` | ``da`` | ``none``)."""

    def __init__(self, method: str, threshold: float, pool_size: int, prior: torch.Tensor, device: str):
        self.method, self.threshold, self.prior = method, threshold, prior.to(device)
        self.claimed = torch.full((pool_size,), -1, dtype=torch.long, device=device)  # flexmatch: class or -1
        self.mean_p = torch.full_like(self.prior, 1.0 / len(prior))  # da: running mean of the teacher's p

    def __call__(self, p: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pseudo-label, mask) of the pool images ``idx`` whose teacher probabilities are ``p``."""
        if self.method == "da":
            self.mean_p = 0.999 * self.mean_p + 0.001 * p.mean(0)
            p = p * self.prior / self.mean_p
            p = p / p.sum(1, keepdim=True)
        conf, label = p.max(1)
        if self.method != "flexmatch":
            return label, conf >= self.threshold
        claimed = torch.bincount(self.claimed[self.claimed >= 0], minlength=len(self.prior)).float()
        unclaimed = (self.claimed < 0).sum().float()
        beta = claimed / torch.maximum(claimed.max(), unclaimed).clamp_min(1)  # warm-up while the pool is unclaimed
        mask = conf >= self.threshold * (beta / (2 - beta))[label]  # FlexMatch's convex mapping
        over = conf >= self.threshold
        self.claimed[idx[over]] = label[over]
        return label, mask


def fit_fixmatch(model: nn.Module, labeled: tuple[torch.Tensor, torch.Tensor], pool: torch.Tensor,
                 val: tuple[torch.Tensor, torch.Tensor], cfg: PseudoLabelConfig, *, seed: int,
                 device: str | DevicePolicy = "cpu", progress: bool = True) -> tuple[nn.Module, dict]:
    """Train ``model`` on uint8 ``labeled`` images and the unlabeled ``pool`` (N,C,H,W) for ``cfg.steps``
    steps; return the EMA teacher with the best validation accuracy and the training history."""
    policy = as_policy(device).for_classifiers()
    (lx, ly), k = labeled, int(model.num_classes)  # a timm model
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    streams = IndexStream(len(lx), gen), IndexStream(len(pool), gen)
    n_pool = cfg.unlabeled_ratio * cfg.batch_size
    prior = torch.bincount(ly, minlength=k).float() / len(ly)
    fair = ClassFairness(cfg.fairness, cfg.fixmatch_threshold, len(pool), prior, policy.device)
    policy.prepare(model).train()
    teacher = ModelEmaV3(model, decay=cfg.ema_decay, use_warmup=True)
    forward = policy.compiled(model)
    opt = create_optimizer_v2(model, opt="adamw", lr=cfg.lr, weight_decay=cfg.weight_decay,
                              fused=policy.fused_optimizer or None)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, one_cycle(cfg.steps))
    hist = {"step": [], "val_acc": [], "labeled_loss": [], "pool_loss": [], "mask_rate": [], "lr": []}
    sums, seen, t0 = torch.zeros(3, device=policy.device), 0, time.time()  # read every eval_every steps
    best_acc, best_step, best_state = -1.0, 0, None
    eval_every = max(1, cfg.steps // 10)
    for step in range(1, cfg.steps + 1):
        li, pi = streams[0].take(cfg.batch_size), streams[1].take(n_pool)
        xl = policy.to_device(lx[li])
        if cfg.augment == "classic":
            xl = trivial_augment_wide(xl, gen)
        xl, yl = crop_flip(xl, gen), policy.to_device(ly[li])
        xu = policy.to_device(pool[pi])
        weak, strong = crop_flip(xu, gen), cutout(crop_flip(trivial_augment_wide(xu, gen), gen), gen)
        with torch.no_grad(), policy.autocast():
            p = teacher.module(policy.inputs(to_unit(weak))).float().softmax(1)
        pseudo, mask = fair(p, pi.to(policy.device))
        with policy.autocast():
            logits = forward(policy.inputs(to_unit(torch.cat([xl, strong])))).float()
        loss_l = F.cross_entropy(logits[:len(xl)], yl)
        loss_u = (F.cross_entropy(logits[len(xl):], pseudo, reduction="none") * mask).mean()
        loss = loss_l + cfg.unlabeled_weight * loss_u
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        teacher.update(model, step)
        sums += torch.stack([loss_l.detach(), loss_u.detach(), mask.float().mean()])
        seen += 1
        if step % eval_every == 0 or step == cfg.steps:
            acc = accuracy(teacher.module, val[0], val[1], 256, policy)
            ll, lu, rate = (sums / seen).tolist()
            for key, v in zip(("step", "val_acc", "labeled_loss", "pool_loss", "mask_rate", "lr"),
                              (step, acc, ll, lu, rate, sched.get_last_lr()[0])):
                hist[key].append(v)
            sums, seen = torch.zeros(3, device=policy.device), 0
            if best_state is None or (not math.isnan(acc) and acc >= best_acc):
                best_acc, best_step = acc, step
                best_state = copy.deepcopy({n: v.detach().cpu() for n, v in teacher.module.state_dict().items()})
            if progress:
                log.info("fixmatch step %d/%d: labeled loss %.4f, pool loss %.4f, %.0f%% of the pool batch "
                         "above its threshold, teacher val acc %.4f", step, cfg.steps, ll, lu, 100 * rate, acc)
    best = teacher.module
    best.load_state_dict(best_state)
    hist.update(steps=cfg.steps, best_step=best_step, best_val_acc=best_acc, seconds=time.time() - t0,
                method=f"fixmatch+{cfg.fairness}", unlabeled_ratio=cfg.unlabeled_ratio)
    return best.eval(), hist
