"""Kind cgan: hinge-loss GAN training with DiffAugment and a generator EMA.

One D step then one G step on the same fakes; Adam with betas (0, 0.99). DiffAugment (Zhao
et al. 2020) applies random differentiable color / translation / cutout to real and fake
images alike before D sees them, which keeps D from memorising a small training set. The
saved generator is the EMA of the generator's weights (diffusers ``EMAModel``) whose
BatchNorm statistics are re-estimated at the end ("standing statistics"). Every random
draw of step k comes from ``step_rng(seed, 0, k)``, so a resumed run ends with the weights
of an uninterrupted one.
"""
from __future__ import annotations

import copy
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.training_utils import EMAModel
from torch import nn

from pipeline.config import Params
from pipeline.core.device import DevicePolicy, as_policy
from pipeline.core.images import to_unit
from pipeline.core.seeding import step_rng
from pipeline.core.tensors import num_parameters
from pipeline.errors import ConfigError
from pipeline.models import gan
from pipeline.models.gan import CondGenerator, GanGenerator, ProjectionDiscriminator
from pipeline.training import checkpoint
from pipeline.training.augment import cutout
from pipeline.training.generator import Fitted, TrainData, generator_meta

log = logging.getLogger(__name__)
BN_BATCHES = 8  # batches that re-estimate the EMA generator's BatchNorm statistics


# ---- DiffAugment: one random draw per image, from the step's random stream ----------------

def _u(x: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    return torch.rand(len(x), 1, 1, 1, generator=rng, device=x.device)


def _color(x, rng):
    x = x + (_u(x, rng) - 0.5)  # brightness
    m = x.mean(1, keepdim=True)
    x = (x - m) * (_u(x, rng) * 2) + m  # saturation (nothing to do on one channel)
    m = x.mean((1, 2, 3), keepdim=True)
    return (x - m) * (_u(x, rng) + 0.5) + m  # contrast


def _translation(x, rng, ratio: float = 0.125):
    """Shift by up to ratio of the side; uncovered pixels are 0 (as in the paper's code)."""
    n, _, h, w = x.shape
    dy, dx = int(h * ratio + 0.5), int(w * ratio + 0.5)
    ty = torch.randint(-dy, dy + 1, (n, 1, 1), generator=rng, device=x.device)
    tx = torch.randint(-dx, dx + 1, (n, 1, 1), generator=rng, device=x.device)
    iy = (torch.arange(h, device=x.device)[None, :, None] + ty).clamp(-1, h) + 1
    ix = (torch.arange(w, device=x.device)[None, None, :] + tx).clamp(-1, w) + 1
    padded = F.pad(x, (1, 1, 1, 1))
    return padded.permute(0, 2, 3, 1)[torch.arange(n, device=x.device)[:, None, None], iy, ix].permute(0, 3, 1, 2)


AUGMENTS = {"color": _color, "translation": _translation, "cutout": cutout}


def parse_policy(policy: str) -> list[str]:
    names = [p.strip() for p in policy.split(",") if p.strip()]
    bad = [p for p in names if p not in AUGMENTS]
    if bad:
        raise ConfigError(f"train_generator.cgan.diffaugment: unknown policy {bad} (allowed: {', '.join(AUGMENTS)})")
    return names


def diff_augment(x: torch.Tensor, policy: str, rng: torch.Generator) -> torch.Tensor:
    """DiffAugment (Zhao et al. 2020): comma-separated policies, differentiable in x."""
    for name in parse_policy(policy):
        x = AUGMENTS[name](x, rng)
    return x


def draw_real(data: TrainData, batch_size: int, hflip: bool, rng: torch.Generator):
    dev = data.images.device
    idx = data.draw(batch_size, rng)
    x = to_unit(data.images[idx])
    if hflip:
        x = torch.where((torch.rand(batch_size, generator=rng, device=dev) < 0.5)[:, None, None, None], x.flip(-1), x)
    return x, data.labels[idx]


@torch.no_grad()
def standing_stats(g: CondGenerator, num_classes: int, batch_size: int, rng: torch.Generator) -> CondGenerator:
    """Re-estimate BatchNorm statistics of ``g`` (EMA weights) from its own samples; eval mode."""
    bns = [m for m in g.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
    g.train()
    dev = next(g.parameters()).device
    for _ in range(BN_BATCHES):
        g(torch.randn(batch_size, g.z_dim, generator=rng, device=dev),
          torch.randint(num_classes, (batch_size,), generator=rng, device=dev))
    for m in bns:
        m.momentum = 0.1
    return g.eval()


def fit(params: Params, data: TrainData, accelerator, ckpt_dir: Path, chash: str,
        policy: DevicePolicy | None = None, *, stop_at: int | None = None) -> Fitted:
    """Train (or resume) the GAN under ``policy`` (default: the data's device's). ``stop_at`` ends
    early after that step's checkpoint (tests)."""
    cfg, gc, seed = params.train_generator, params.train_generator.cgan, params.base.seed
    policy = policy or as_policy(str(accelerator.device if accelerator is not None else data.images.device))
    device = torch.device(policy.device)
    parse_policy(gc.diffaugment)
    if accelerator is not None and accelerator.num_processes > 1:
        raise ConfigError(f"kind cgan trains in one process (launched with {accelerator.num_processes}); "
                          "run it without accelerate launch / torchrun and with num_processes: 1")
    if cfg.init != "scratch":
        log.warning("train_generator.init=%s is ignored by kind cgan (it trains from scratch on train)", cfg.init)
    g = policy.prepare(CondGenerator(gc.z_dim, data.num_classes, data.channels, data.image_size, gc.g_channels)).train()
    d = policy.prepare(ProjectionDiscriminator(data.num_classes, data.channels, gc.d_channels)).train()
    ema = EMAModel(g.parameters(), decay=cfg.ema_decay, foreach=policy.fused_optimizer)
    fused = policy.fused_optimizer or None
    opt_g = torch.optim.Adam(g.parameters(), lr=gc.lr_g, betas=(0.0, 0.99), fused=fused)
    opt_d = torch.optim.Adam(d.parameters(), lr=gc.lr_d, betas=(0.0, 0.99), fused=fused)
    n_g, n_d = num_parameters(g), num_parameters(d)
    log.info("train_generator: cgan, G %.2fM + D %.2fM params, %d steps of batch %d on %s, diffaugment %r",
             n_g / 1e6, n_d / 1e6, cfg.steps, cfg.batch_size, device, gc.diffaugment)
    losses = torch.zeros(2, cfg.steps, device=device)  # rows: D loss, G loss
    state = {"g": g, "d": d, "ema": ema, "opt_g": opt_g, "opt_d": opt_d}
    resumed = checkpoint.resume(ckpt_dir, chash, state, device)  # the EMA back on the device
    start = resumed.step
    if start:
        losses[:, :start] = resumed.losses.to(device)
    t0 = time.perf_counter()
    for step in range(start, cfg.steps):
        rng = step_rng(seed, 0, step, device)
        real, y = draw_real(data, cfg.batch_size, cfg.hflip, rng)
        with policy.autocast():
            fake = g(torch.randn(len(y), gc.z_dim, generator=rng, device=device), y).float()
            out = d(policy.inputs(diff_augment(torch.cat([real, fake.detach()]), gc.diffaugment, rng)),
                    torch.cat([y, y])).float()
        d_loss = F.relu(1 - out[:len(y)]).mean() + F.relu(1 + out[len(y):]).mean()
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()
        d.requires_grad_(False)  # the G step needs gradients through D, not for it
        with policy.autocast():
            g_loss = -d(policy.inputs(diff_augment(fake, gc.diffaugment, rng)), y).float().mean()
        opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        opt_g.step()
        d.requires_grad_(True)
        ema.step(g.parameters())
        losses[0, step], losses[1, step] = d_loss.detach(), g_loss.detach()
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            recent = losses[:, max(0, done - cfg.log_every):done].mean(1).tolist()
            log.info("step %d/%d d_loss %.4f g_loss %.4f  %.3f s/step", done, cfg.steps, *recent,
                     (time.perf_counter() - t0) / (done - start))
        if done % cfg.checkpoint_every == 0 or done == cfg.steps or done == stop_at:
            checkpoint.save(ckpt_dir, chash, done, state, losses[:, :done], resumed.seconds + time.perf_counter() - t0)
        if stop_at is not None and done >= stop_at:
            break
    n_done = min(cfg.steps, stop_at or cfg.steps)
    g_ema = copy.deepcopy(g)
    ema.copy_to(g_ema.parameters())
    g_ema = standing_stats(g_ema, data.num_classes, cfg.batch_size, step_rng(seed, 0, cfg.steps, device))
    extra = {"z_dim": gc.z_dim, "image_size_padded": g.base * 4, "discriminator_parameters": n_d}
    history = {"loss": losses[0, :n_done].tolist(), "lr": [gc.lr_g] * n_done, "g_loss": losses[1, :n_done].tolist()}
    return Fitted(GanGenerator(g_ema, {**generator_meta(cfg, data), **extra}, policy),
                  lambda folder: gan.save(folder, g_ema),
                  history, (resumed.seconds + time.perf_counter() - t0) / max(1, n_done), start, n_g, extra)
