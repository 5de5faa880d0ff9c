"""Stage 2, train_generator: the generator of ``train_generator.kind`` on the prepared data.

Kinds (pipeline/generators.py): unet and dit (class-conditional diffusion, trained here),
cgan (pipeline/gan.py), datasetgan (pipeline/datasetgan.py). Reads ``data/prepared/``
(train; plus pool for ``init: pretrain`` and datasetgan) and writes ``models/generator/``:
the weights of the kind (safetensors), ``generator.json`` (kind, what sample needs,
fingerprint, params), ``loss.csv`` and a ``samples.png`` preview. Resumable checkpoints
live in ``models/generator_checkpoints/`` and are tied to the training config by a hash;
a killed run resumes from the latest one and ends with the same weights as an
uninterrupted run.

Multi-GPU: ``accelerate launch -m pipeline.train_generator`` (each process draws its own
batches; batch_size is per process).
"""
from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.training_utils import EMAModel

from pipeline.config import ConfigError, Paths, Params, SampleConfig, TrainGeneratorConfig, resolve_device
from pipeline.diffusion import (BACKBONES, DiffusionGenerator, build_backbone, conditional_from_pretrained,
                                pad_images, to_unit, train_scheduler)
from pipeline.generators import GENERATOR_META, Fitted, module_of
from pipeline.prepare import DataError
from pipeline.storage import (atomic_path, dataset_to_tensors, load_dataset_dir, make_grid_image,
                              read_json, save_png, sha256_file, sha256_tensor, write_json)

log = logging.getLogger(__name__)
KEEP_CHECKPOINTS = 2
# keys that do not change the weights a run ends with (left out of the checkpoint hash)
NOT_HASHED = ("checkpoint_every", "log_every", "preview_per_class")


@dataclass
class TrainData:
    """Training tensors (uint8 N,C,H,W on the training device) and their description."""
    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    unlabeled: torch.Tensor | None = None  # train + pool images for unconditional pre-training
    class_names: list[str] = field(default_factory=list)
    val_images: torch.Tensor | None = None  # the val split (uint8, CPU), for kinds that score a labeler
    val_labels: torch.Tensor | None = None

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])


@dataclass
class TrainResult:
    ema_unet: torch.nn.Module  # UNet2DModel or DiTTransformer2DModel
    losses: list[float]
    lrs: list[float]
    seconds_per_step: float  # training time / steps, over every run that built the checkpoints
    resumed_from: int  # step of the checkpoint the run resumed from (0 = fresh)


# ---- schedule and batches -------------------------------------------------------------

def total_steps(cfg: TrainGeneratorConfig) -> int:
    return cfg.steps + (cfg.pretrain_steps if cfg.init == "pretrain" else 0)


def lr_factor(step: int, cfg: TrainGeneratorConfig) -> float:
    """LR multiplier at 0-based optimizer step: linear warm-up, then constant or cosine.

    The schedule restarts when conditional fine-tuning follows unconditional pre-training.
    """
    pre = cfg.pretrain_steps if cfg.init == "pretrain" else 0
    s, n = (step, pre) if step < pre else (step - pre, cfg.steps)
    warm = min(cfg.warmup_steps, n)
    if s < warm:
        return (s + 1) / warm
    if cfg.lr_schedule == "constant":
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * (s - warm) / max(1, n - warm)))


def step_generator(seed: int, rank: int, step: int, device) -> torch.Generator:
    """The random stream of one training step (batch indices, noise, timesteps, label dropout).

    Derived from (seed, process, step) alone, so a resumed run draws exactly what an
    uninterrupted one would, on every process, without any sampler state to restore.
    """
    digest = hashlib.sha256(f"{seed}:{rank}:{step}".encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def draw_batch(data: TrainData, cfg: TrainGeneratorConfig, step: int, gen: torch.Generator,
               sample_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images in [-1, 1] (padded) and class ids (num_classes = null) for one step."""
    dev = data.images.device
    null = data.num_classes
    pretraining = cfg.init == "pretrain" and step < cfg.pretrain_steps
    source = data.unlabeled if pretraining else data.images
    idx = torch.randint(len(source), (cfg.batch_size,), generator=gen, device=dev)
    x = to_unit(source[idx])
    if pretraining:
        labels = torch.full((cfg.batch_size,), null, dtype=torch.long, device=dev)
    else:
        labels = data.labels[idx]
        drop = torch.rand(cfg.batch_size, generator=gen, device=dev) < cfg.p_uncond
        labels = torch.where(drop, torch.full_like(labels, null), labels)
    if cfg.hflip:
        flip = torch.rand(cfg.batch_size, generator=gen, device=dev) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return pad_images(x, sample_size), labels


def diffusion_loss(unet, scheduler, x0: torch.Tensor, labels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """DDPM training loss (MSE on epsilon or v) at random timesteps."""
    noise = torch.randn(x0.shape, generator=gen, device=x0.device)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (x0.shape[0],), generator=gen, device=x0.device)
    xt = scheduler.add_noise(x0, noise, t)
    target = noise if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(x0, noise, t)
    return F.mse_loss(unet(xt, t, class_labels=labels).sample.float(), target)


# ---- checkpoints ----------------------------------------------------------------------

def config_hash(cfg: TrainGeneratorConfig, seed: int, data: TrainData, extra: dict) -> str:
    """Hash of everything that decides the trained weights (config, seed, data, device)."""
    conf = {k: v for k, v in cfg.model_dump(mode="json").items() if k not in NOT_HASHED}
    data_fp = [sha256_tensor(data.images), sha256_tensor(data.labels),
               sha256_tensor(data.unlabeled) if data.unlabeled is not None else None]
    blob = json.dumps({"cfg": conf, "seed": seed, "data": data_fp, **extra}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _ckpt_files(ckpt_dir: Path, chash: str) -> tuple[list[Path], list[Path]]:
    files = sorted(ckpt_dir.glob("ckpt-*.pt")) if ckpt_dir.exists() else []
    own = [f for f in files if f.name.startswith(f"ckpt-{chash[:12]}-")]
    return own, [f for f in files if f not in own]


def save_checkpoint(ckpt_dir: Path, chash: str, state: dict) -> Path:
    path = ckpt_dir / f"ckpt-{chash[:12]}-{state['step']:08d}.pt"
    with atomic_path(path) as tmp:
        torch.save({"config_hash": chash, **state}, tmp)
    own, _ = _ckpt_files(ckpt_dir, chash)
    for old in own[:-KEEP_CHECKPOINTS]:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(ckpt_dir: Path, chash: str) -> tuple[dict | None, Path | None]:
    """The latest checkpoint of this config, or None. A foreign-config one is ignored."""
    own, foreign = _ckpt_files(ckpt_dir, chash)
    if foreign:
        log.warning("ignoring %d checkpoint(s) in %s written with a different training config "
                    "(e.g. %s); not resuming from them", len(foreign), ckpt_dir, foreign[-1].name)
    if not own:
        return None, None
    path = own[-1]
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, pickle garbage, wrong file ...
        raise DataError(f"{path}: checkpoint is corrupt and cannot be read ({type(err).__name__}: "
                        f"{str(err).splitlines()[0][:200] if str(err) else ''}). Delete this file "
                        "and run again (training resumes from an older checkpoint or starts over).") from None
    need = {"config_hash", "step", "model", "ema", "optimizer", "lr_scheduler", "losses", "rng"}
    if not isinstance(state, dict) or not need <= set(state):
        raise DataError(f"{path}: not a train_generator checkpoint (missing "
                        f"{sorted(need - set(state) if isinstance(state, dict) else need)}). Delete this file and run again.")
    if state["config_hash"] != chash:
        log.warning("%s: written with a different training config; ignored", path)
        return None, None
    return state, path


# ---- training loop --------------------------------------------------------------------

def train(unet: torch.nn.Module, cfg: TrainGeneratorConfig, data: TrainData, *, seed: int, ckpt_dir: Path,
          chash: str, accelerator=None, stop_at: int | None = None) -> TrainResult:
    """Train ``unet`` (resuming from ``ckpt_dir`` if a checkpoint of ``chash`` is there).

    ``stop_at`` ends the run early after that step's checkpointing (used to test resume).
    """
    from accelerate import Accelerator

    accelerator = accelerator or Accelerator(cpu=data.images.device.type == "cpu")
    device = accelerator.device
    n_total = total_steps(cfg)
    scheduler = train_scheduler(cfg)
    cuda = device.type == "cuda"
    unet = unet.to(device, memory_format=torch.channels_last if cuda else torch.contiguous_format).train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=cuda)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    ema = EMAModel(unet.parameters(), decay=cfg.ema_decay, foreach=cuda, model_cls=type(unet),
                   model_config=unet.config)
    losses = torch.zeros(n_total, device=device)
    state, path = load_checkpoint(Path(ckpt_dir), chash)
    start, seconds_before = 0, 0.0
    if state is not None:
        try:
            unet.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            lr_sched.load_state_dict(state["lr_scheduler"])
            ema.load_state_dict(state["ema"])
        except (RuntimeError, KeyError, ValueError, TypeError) as err:
            raise DataError(f"{path}: checkpoint does not fit this model ({str(err).splitlines()[0][:200]}). "
                            "Delete this file and run again.") from None
        start = int(state["step"])
        seconds_before = float(state.get("seconds", 0.0))
        losses[:start] = state["losses"].to(device)
        torch.set_rng_state(state["rng"]["torch"])
        if torch.cuda.is_available() and state["rng"].get("cuda"):
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        log.info("resuming from %s (step %d of %d)", path, start, n_total)
    ema.to(device)
    model, optimizer = accelerator.prepare(unet, optimizer)
    sample_size = unet.config.sample_size
    t0, timed_from = time.perf_counter(), start
    for step in range(start, n_total):
        gen = step_generator(seed, accelerator.process_index, step, device)
        x0, labels = draw_batch(data, cfg, step, gen, sample_size)
        with accelerator.autocast():
            loss = diffusion_loss(model, scheduler, x0, labels, gen)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        lr_sched.step()
        ema.step(accelerator.unwrap_model(model).parameters())
        losses[step] = loss.detach()
        done = step + 1
        if done % cfg.log_every == 0 or done == n_total:
            sps = (time.perf_counter() - t0) / max(1, done - timed_from)
            recent = losses[max(0, done - cfg.log_every):done].mean().item()
            log.info("step %d/%d loss %.4f lr %.2e  %.3f s/step", done, n_total, recent,
                     cfg.lr * lr_factor(step, cfg), sps)
        if done % cfg.checkpoint_every == 0 or done == n_total or done == stop_at:
            if accelerator.is_main_process:
                save_checkpoint(Path(ckpt_dir), chash, {
                    "step": done, "model": accelerator.unwrap_model(model).state_dict(),
                    "optimizer": optimizer.state_dict(), "lr_scheduler": lr_sched.state_dict(),
                    "ema": ema.state_dict(), "losses": losses[:done].cpu(),
                    "seconds": seconds_before + time.perf_counter() - t0,
                    "rng": {"torch": torch.get_rng_state(),
                            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}})
            accelerator.wait_for_everyone()
        if stop_at is not None and done >= stop_at:
            break
    n_done = min(n_total, stop_at or n_total)
    seconds_per_step = (seconds_before + time.perf_counter() - t0) / max(1, n_done)
    ema_unet = type(unet).from_config(accelerator.unwrap_model(model).config)
    ema.copy_to(ema_unet.parameters())
    return TrainResult(ema_unet.eval(), losses[:n_done].tolist(),
                       [cfg.lr * lr_factor(s, cfg) for s in range(n_done)], seconds_per_step, start)


# ---- stage ----------------------------------------------------------------------------

def load_train_data(params: Params, paths: Paths, device: str) -> TrainData:
    cfg = params.train_generator
    summary = read_json(paths.prepared / "summary.json")
    dd = load_dataset_dir(paths.prepared / "dataset", "prepared data")
    x, y = dataset_to_tensors(dd["train"])
    if y is None or len(x) == 0:
        raise DataError(f"{paths.prepared}: the train split has no labeled images. Re-run prepare.")
    unlabeled = None
    if cfg.init == "pretrain" or cfg.kind == "datasetgan":
        if cfg.init == "pretrain" and cfg.pretrain_steps == 0:
            raise ConfigError("train_generator.pretrain_steps: init=pretrain needs pretrain_steps > 0")
        if "pool" not in dd:
            raise DataError(f"{paths.prepared}: init=pretrain and kind=datasetgan need the unlabeled pool "
                            "split; set prepare.unlabeled_pool > 0 and re-run prepare, or use init=scratch.")
        unlabeled = torch.cat([x, dataset_to_tensors(dd["pool"], label_column=None)[0]])
        unlabeled = unlabeled.to(device)
    val_x, val_y = dataset_to_tensors(dd["val"]) if "val" in dd else (None, None)
    return TrainData(x.to(device), y.to(device), int(summary["num_classes"]), unlabeled,
                     list(summary["class_names"]), val_x, val_y)


def make_unet(cfg: TrainGeneratorConfig, data: TrainData) -> tuple[torch.nn.Module, list[str]]:
    """The starting backbone for ``cfg.init`` and the weights a checkpoint init did not provide."""
    if cfg.init in ("scratch", "pretrain"):
        return build_backbone(cfg, data.image_size, data.channels, data.num_classes), []
    if cfg.kind != "unet":
        raise ConfigError(f"train_generator.init: a checkpoint folder works for kind unet only; kind {cfg.kind} "
                          "takes init scratch or pretrain.")
    if not Path(cfg.init).exists():
        raise ConfigError(f"train_generator.init: {cfg.init!r} is not scratch or pretrain and no such "
                          "folder exists. Give a local diffusers UNet2DModel folder.")
    unet, missing = conditional_from_pretrained(cfg.init, data.image_size, data.channels, data.num_classes)
    log.info("init from %s; architecture keys of params are ignored; %d weights new (not in the checkpoint): %s",
             cfg.init, len(missing), ", ".join(missing) or "none")
    return unet, missing


def fit(params: Params, data: TrainData, accelerator, ckpt_dir: Path, chash: str) -> Fitted:
    """Kinds unet and dit: DDPM training of a class-conditional backbone."""
    cfg = params.train_generator
    model, missing = make_unet(cfg, data)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("train_generator: %s, %.2fM params, %d steps of batch %d on %s, padded size %d", cfg.kind,
             n_params / 1e6, total_steps(cfg), cfg.batch_size, accelerator.device, model.config.sample_size)
    res = train(model, cfg, data, seed=params.base.seed, ckpt_dir=ckpt_dir, chash=chash, accelerator=accelerator)
    sched = train_scheduler(cfg)
    sub = BACKBONES[cfg.kind][1]

    def save(folder: Path) -> Path:
        res.ema_unet.save_pretrained(folder / sub, safe_serialization=True)
        sched.save_pretrained(folder / "scheduler")
        return folder / sub / "diffusion_pytorch_model.safetensors"

    meta = generator_meta(cfg, data)
    generator = DiffusionGenerator(res.ema_unet.to(accelerator.device), dict(sched.config), meta)
    return Fitted(generator, save, {"loss": res.losses, "lr": res.lrs}, res.seconds_per_step, res.resumed_from,
                  n_params, {"sample_size": res.ema_unet.config.sample_size, "prediction_type": cfg.prediction_type,
                             "init": cfg.init, "init_new_weights": missing})


def generator_meta(cfg: TrainGeneratorConfig, data: TrainData) -> dict:
    """The generator.json fields every kind has and its sample() relies on."""
    return {"kind": cfg.kind, "num_classes": data.num_classes, "class_names": data.class_names,
            "null_label": data.num_classes, "image_size": data.image_size, "channels": data.channels}


PREVIEW = SampleConfig(sampler="dpm++", num_inference_steps=20, guidance_scale=2.0)


def preview(generator, num_classes: int, per_class: int) -> torch.Tensor:
    """uint8 grid rows = classes (diffusion kinds: DPM-Solver++, 20 steps, guidance 2)."""
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    return generator.sample(labels, list(range(len(labels))), PREVIEW)


def run(params: Params, paths: Paths = Paths()) -> dict:
    from accelerate import Accelerator

    cfg = params.train_generator
    device = resolve_device(params.base)
    mp = "bf16" if cfg.mixed_precision == "bf16" or (cfg.mixed_precision == "auto" and device == "cuda") else "no"
    accelerator = Accelerator(cpu=device == "cpu", mixed_precision=mp)
    data = load_train_data(params, paths, str(accelerator.device))
    torch.manual_seed(params.base.seed)  # the initial weights, so the same seed gives the same run
    run_facts = {"device": device, "mixed_precision": mp, "processes": accelerator.num_processes}
    if cfg.init not in ("scratch", "pretrain") and Path(cfg.init).exists():  # a changed init checkpoint is a new run
        run_facts["init_files"] = [sha256_file(p) for p in sorted(Path(cfg.init).rglob("*")) if p.is_file()]
    chash = config_hash(cfg, params.base.seed, data, run_facts)
    fitter = fit if cfg.kind in BACKBONES else module_of(cfg.kind).fit
    fitted = fitter(params, data, accelerator, paths.generator_checkpoints, chash)
    meta = {}
    if accelerator.is_main_process:
        with atomic_path(paths.generator, is_dir=True) as tmp:
            weights = fitted.save(tmp)
            columns = list(fitted.history)
            with open(tmp / "loss.csv", "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["step", *columns])
                w.writerows([s + 1, *(f"{v:.6g}" for v in row)]
                            for s, row in enumerate(zip(*(fitted.history[c] for c in columns))))
            if cfg.preview_per_class:
                grid = preview(fitted.generator, data.num_classes, cfg.preview_per_class)
                save_png(make_grid_image(grid, nrow=cfg.preview_per_class), tmp / "samples.png")
            losses = fitted.history["loss"]
            meta = {
                **generator_meta(cfg, data), **fitted.extra, "fingerprint": sha256_file(weights),
                "num_parameters": fitted.num_parameters, "steps": len(losses),
                "resumed_from_step": fitted.resumed_from, "seconds_per_step": round(fitted.seconds_per_step, 4),
                "timing": {"seconds": round(fitted.seconds_per_step * len(losses), 1)},
                "final_loss": sum(losses[-50:]) / len(losses[-50:]) if losses else None,
                "device": str(accelerator.device), "mixed_precision": mp, "processes": accelerator.num_processes,
                "config_hash": chash, "params": params.resolved(),
            }
            write_json(tmp / GENERATOR_META, meta)
        log.info("train_generator: wrote %s (%s, %.3f s/step, fingerprint %s)", paths.generator, cfg.kind,
                 fitted.seconds_per_step, meta["fingerprint"][:12])
    accelerator.wait_for_everyone()
    return meta


def main(argv: list[str] | None = None) -> None:
    from pipeline.cli import stage_main
    stage_main("train_generator", run, argv)


if __name__ == "__main__":
    main()
