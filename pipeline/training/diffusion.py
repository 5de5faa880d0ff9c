"""Kinds unet and dit: DDPM training of a class-conditional backbone (the loop written out).

Each optimizer step draws its global batch (images, label dropout, noise, timesteps) from
``step_rng(seed, 0, step)``, the same on every process; each process trains on its share of
it in ``gradient_accumulation_steps`` forward passes (accelerate's ``accumulate``; DDP
averages the gradients), so 1, 2 or 8 processes take the same optimizer steps up to float
rounding. State is checkpointed through ``training.checkpoint``, so a killed run resumes to
the same weights, also on another number of processes. ``init: pretrain`` first trains
unconditionally (every label = the null id) on train + pool for ``pretrain_steps``, then
fine-tunes conditionally on train.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers.training_utils import EMAModel, compute_snr

from pipeline.config import Params, TrainGeneratorConfig
from pipeline.core.device import DevicePolicy, as_policy
from pipeline.core.images import pad_images, to_unit
from pipeline.core.seeding import step_rng
from pipeline.core.tensors import num_parameters
from pipeline.errors import ConfigError
from pipeline.models.diffusion import (DiffusionGenerator, build_backbone, conditional_from_pretrained, make_pipeline,
                                       save_pipeline, train_scheduler)
from pipeline.training import checkpoint
from pipeline.training.generator import Fitted, TrainData, generator_meta

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    ema_model: torch.nn.Module  # UNet2DModel or DiTTransformer2DModel with the EMA weights
    losses: list[float]
    lrs: list[float]
    seconds_per_step: float  # training time / steps, over every run that built the checkpoints
    resumed_from: int  # step of the checkpoint the run resumed from (0 = fresh)


def total_steps(cfg: TrainGeneratorConfig) -> int:
    return cfg.steps + (cfg.pretrain_steps if cfg.init == "pretrain" else 0)


def lr_factor(step: int, cfg: TrainGeneratorConfig) -> float:
    """LR multiplier at 0-based optimizer step: linear warm-up, then constant or cosine.

    The schedule restarts when conditional fine-tuning follows unconditional pre-training.
    Kept: diffusers' and timm's warm-up schedules start at 0 (or warmup_lr_init), not 1/warmup, and have no restart.
    """
    pre = cfg.pretrain_steps if cfg.init == "pretrain" else 0
    s, n = (step, pre) if step < pre else (step - pre, cfg.steps)
    warm = min(cfg.warmup_steps, n)
    if s < warm:
        return (s + 1) / warm
    if cfg.lr_schedule == "constant":
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * (s - warm) / max(1, n - warm)))


def draw_batch(data: TrainData, cfg: TrainGeneratorConfig, step: int, rng: torch.Generator,
               sample_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images in [-1, 1] (padded) and class ids (num_classes = null) for one step."""
    dev = data.images.device
    null = data.num_classes
    pretraining = cfg.init == "pretrain" and step < cfg.pretrain_steps
    if pretraining:
        idx = torch.randint(len(data.unlabeled), (cfg.batch_size,), generator=rng, device=dev)
    else:
        idx = data.draw(cfg.batch_size, rng)
    x = to_unit((data.unlabeled if pretraining else data.images)[idx])
    if pretraining:
        labels = torch.full((cfg.batch_size,), null, dtype=torch.long, device=dev)
    else:
        labels = data.labels[idx]
        drop = torch.rand(cfg.batch_size, generator=rng, device=dev) < cfg.p_uncond
        labels = torch.where(drop, torch.full_like(labels, null), labels)
    if cfg.hflip:
        flip = torch.rand(cfg.batch_size, generator=rng, device=dev) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return pad_images(x, sample_size), labels


def draw_noise(x0: torch.Tensor, scheduler, rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The noise and the timestep of each image of a batch."""
    noise = torch.randn(x0.shape, generator=rng, device=x0.device)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (x0.shape[0],), generator=rng, device=x0.device)
    return noise, t


def diffusion_loss(unet, scheduler, x0: torch.Tensor, labels: torch.Tensor, rng: torch.Generator,
                   snr_gamma: float = 0.0) -> torch.Tensor:
    """DDPM training loss (MSE on epsilon or v) at random timesteps (see ``noised_loss``)."""
    return noised_loss(unet, scheduler, x0, labels, *draw_noise(x0, scheduler, rng), snr_gamma)


def noised_loss(unet, scheduler, x0: torch.Tensor, labels: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                snr_gamma: float = 0.0, memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """DDPM training loss of ``x0`` noised with ``noise`` to timesteps ``t``; with ``snr_gamma`` each
    image's loss is weighted by Min-SNR-gamma (min(SNR, gamma) in x0 terms, as diffusers' examples)."""
    xt = scheduler.add_noise(x0, noise, t).contiguous(memory_format=memory_format)
    v = scheduler.config.prediction_type == "v_prediction"
    target = scheduler.get_velocity(x0, noise, t) if v else noise
    err = (unet(xt, t, class_labels=labels).sample.float() - target).pow(2).mean(dim=(1, 2, 3))
    if snr_gamma:
        snr = compute_snr(scheduler, t)
        err = err * snr.clamp(max=snr_gamma) / (snr + 1 if v else snr)
    return err.mean()


def train(model: torch.nn.Module, cfg: TrainGeneratorConfig, data: TrainData, *, seed: int, ckpt_dir: Path,
          chash: str, accelerator=None, policy: DevicePolicy | None = None, stop_at: int | None = None
          ) -> TrainResult:
    """Train ``model`` (resuming from ``ckpt_dir`` if a checkpoint of ``chash`` is there) under
    ``policy`` (default: the device's; its precision is the accelerator's mixed_precision).

    ``stop_at`` ends the run early after that step's checkpointing (used to test resume).
    """
    from accelerate import Accelerator

    accelerator = accelerator or Accelerator(cpu=data.images.device.type == "cpu")
    accelerator.gradient_accumulation_steps = accum = cfg.gradient_accumulation_steps
    micro, rem = divmod(cfg.batch_size, accelerator.num_processes * accum)
    if rem:
        raise ConfigError(f"train_generator.batch_size {cfg.batch_size} must be a multiple of the "
                          f"{accelerator.num_processes} processes launched x gradient_accumulation_steps {accum}")
    device = accelerator.device
    policy = policy or as_policy(str(device))
    n_total = total_steps(cfg)
    scheduler = train_scheduler(cfg)
    model = policy.prepare(model).train()
    optimizer = policy.adamw(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    ema = EMAModel(model.parameters(), decay=cfg.ema_decay, foreach=policy.fused_optimizer, model_cls=type(model),
                   model_config=model.config)
    losses = torch.zeros(n_total, device=device)
    state = {"model": model, "optimizer": optimizer, "lr_scheduler": lr_sched, "ema": ema}
    resumed = checkpoint.resume(ckpt_dir, chash, state, device)
    start = resumed.step
    if start:
        losses[:start] = resumed.losses.to(device)
    wrapped, optimizer = accelerator.prepare(model, optimizer)
    forward = policy.compiled(wrapped)  # weights shared with wrapped: checkpoints are taken from model
    sample_size = model.config.sample_size
    first_row = accelerator.process_index * accum * micro  # this process's share of each global batch
    t0 = time.perf_counter()
    for step in range(start, n_total):
        rng = step_rng(seed, 0, step, device)
        x0, labels = draw_batch(data, cfg, step, rng, sample_size)
        noise, t = draw_noise(x0, scheduler, rng)
        step_loss = torch.zeros((), device=device)
        for k in range(accum):
            rows = slice(first_row + k * micro, first_row + (k + 1) * micro)
            with accelerator.accumulate(wrapped):  # no gradient sync and no optimizer step until the last pass
                with policy.autocast():
                    loss = noised_loss(forward, scheduler, x0[rows], labels[rows], noise[rows], t[rows], cfg.snr_gamma,
                                       policy.memory_format)
                accelerator.backward(loss)  # divided by accum
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(wrapped.parameters(), cfg.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            step_loss += loss.detach() / accum
        lr_sched.step()
        ema.step(accelerator.unwrap_model(wrapped).parameters())
        losses[step] = accelerator.reduce(step_loss, reduction="mean")  # the global batch's loss
        done = step + 1
        if done % cfg.log_every == 0 or done == n_total:
            sps = (time.perf_counter() - t0) / max(1, done - start)
            recent = losses[max(0, done - cfg.log_every):done].mean().item()
            log.info("step %d/%d loss %.4f lr %.2e  %.3f s/step", done, n_total, recent,
                     cfg.lr * lr_factor(step, cfg), sps)
        if done % cfg.checkpoint_every == 0 or done == n_total or done == stop_at:
            if accelerator.is_main_process:
                checkpoint.save(ckpt_dir, chash, done, state, losses[:done],
                                resumed.seconds + time.perf_counter() - t0)
            accelerator.wait_for_everyone()
        if stop_at is not None and done >= stop_at:
            break
    n_done = min(n_total, stop_at or n_total)
    seconds_per_step = (resumed.seconds + time.perf_counter() - t0) / max(1, n_done)
    ema_model = type(model).from_config(accelerator.unwrap_model(wrapped).config)
    ema.copy_to(ema_model.parameters())
    return TrainResult(ema_model.eval(), losses[:n_done].tolist(),
                       [cfg.lr * lr_factor(s, cfg) for s in range(n_done)], seconds_per_step, start)


def make_backbone(cfg: TrainGeneratorConfig, data: TrainData) -> tuple[torch.nn.Module, list[str]]:
    """The starting backbone for ``cfg.init`` and the weights a checkpoint init did not provide."""
    if cfg.init in ("scratch", "pretrain"):
        return build_backbone(cfg, data.image_size, data.channels, data.num_classes), []
    if cfg.kind != "unet":
        raise ConfigError(f"train_generator.init: a checkpoint folder works for kind unet only; kind {cfg.kind} "
                          "takes init scratch or pretrain.")
    if not Path(cfg.init).exists():
        raise ConfigError(f"train_generator.init: {cfg.init!r} is not scratch or pretrain and no such "
                          "folder exists. Give a local diffusers UNet2DModel folder.")
    model, missing = conditional_from_pretrained(cfg.init, data.image_size, data.channels, data.num_classes)
    log.info("init from %s; architecture keys of params are ignored; %d weights new (not in the checkpoint): %s",
             cfg.init, len(missing), ", ".join(missing) or "none")
    return model, missing


def fit(params: Params, data: TrainData, accelerator, ckpt_dir: Path, chash: str, policy: DevicePolicy) -> Fitted:
    """Kinds unet and dit: DDPM training of a class-conditional backbone."""
    cfg = params.train_generator
    model, missing = make_backbone(cfg, data)
    n_params = num_parameters(model)
    log.info("train_generator: %s, %.2fM params, %d steps of batch %d (%d process(es) x %d pass(es)) on %s, padded "
             "size %d", cfg.kind, n_params / 1e6, total_steps(cfg), cfg.batch_size, accelerator.num_processes,
             cfg.gradient_accumulation_steps, accelerator.device, model.config.sample_size)
    res = train(model, cfg, data, seed=params.base.seed, ckpt_dir=ckpt_dir, chash=chash, accelerator=accelerator,
                policy=policy)
    schedule = dict(train_scheduler(cfg).config)
    meta = generator_meta(cfg, data)
    ema = res.ema_model.to(accelerator.device)
    pipe = make_pipeline(ema, schedule, data.class_names, data.image_size, policy)
    return Fitted(DiffusionGenerator(pipe, meta), lambda folder: save_pipeline(folder, pipe),
                  {"loss": res.losses, "lr": res.lrs}, res.seconds_per_step, res.resumed_from, n_params,
                  {"sample_size": ema.config.sample_size, "prediction_type": cfg.prediction_type,
                   "zero_terminal_snr": cfg.zero_terminal_snr, "snr_gamma": cfg.snr_gamma,
                   "init": cfg.init, "init_new_weights": missing})
