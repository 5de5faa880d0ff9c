"""Kind datasetgan: the unconditional UNet (the diffusion loop, every step unconditional) and
the interpreter on its features of the labeled images (see pipeline/models/datasetgan.py)."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.config import Params
from pipeline.core.device import DevicePolicy
from pipeline.core.images import pad_images, to_unit
from pipeline.core.io import save_safetensors
from pipeline.core.seeding import derived_seed
from pipeline.core.tensors import num_parameters
from pipeline.models.datasetgan import INTERPRETER_FILE, DatasetGanGenerator, Interpreter, unet_features
from pipeline.models.diffusion import DiffusionGenerator, build_backbone, make_pipeline, save_pipeline, train_scheduler
from pipeline.training.diffusion import train
from pipeline.training.generator import Fitted, TrainData, generator_meta

log = logging.getLogger(__name__)


def fit_interpreter(feats: torch.Tensor, labels: torch.Tensor, num_classes: int, steps: int, seed: int
                    ) -> Interpreter:
    torch.manual_seed(seed)
    model = Interpreter(feats.shape[1], num_classes).to(feats.device)
    model.mean.copy_(feats.mean(0))
    model.std.copy_(feats.std(0).clamp_min(1e-6))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2)
    for _ in range(steps):  # full batch: a few thousand rows
        loss = F.cross_entropy(model(feats), labels, label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


def fit(params: Params, data: TrainData, accelerator, ckpt_dir: Path, chash: str, policy: DevicePolicy) -> Fitted:
    cfg, dcfg = params.train_generator, params.train_generator.datasetgan
    device = accelerator.device
    # every step unconditional, on train + pool: the "pretrain" phase of the diffusion loop
    ucfg = cfg.model_copy(update={"kind": "unet", "init": "pretrain", "pretrain_steps": cfg.steps, "steps": 0})
    unet = build_backbone(ucfg, data.image_size, data.channels, data.num_classes)
    n_params = num_parameters(unet)
    log.info("datasetgan: unconditional UNet %.2fM params, %d steps of batch %d on %d train + pool images",
             n_params / 1e6, cfg.steps, cfg.batch_size, len(data.unlabeled))
    res = train(unet, ucfg, data, seed=params.base.seed, ckpt_dir=ckpt_dir, chash=chash, accelerator=accelerator,
                policy=policy)
    sched = train_scheduler(cfg)
    ema = res.ema_model.to(device).eval()
    size, t = ema.config.sample_size, dcfg.feature_timestep

    def feats(images: torch.Tensor, draw: int) -> torch.Tensor:
        out = []
        for i in range(0, len(images), 256):
            x = pad_images(to_unit(images[i:i + 256].to(device)), size)
            out.append(unet_features(ema, sched, x, t, [derived_seed(j, draw) for j in range(i, i + len(x))],
                                     data.num_classes))
        return torch.cat(out)

    train_f = torch.cat([feats(data.images, d) for d in range(dcfg.feature_draws)])
    train_y = data.labels.to(device).repeat(dcfg.feature_draws)
    interpreter = fit_interpreter(train_f, train_y, data.num_classes, dcfg.interpreter_steps, params.base.seed)
    with torch.no_grad():
        train_acc = (interpreter(train_f).argmax(1) == train_y).float().mean().item()
        val_acc = None
        if data.val_images is not None and len(data.val_images):
            val_f = feats(data.val_images, dcfg.feature_draws)
            val_acc = (interpreter(val_f).argmax(1) == data.val_labels.to(device)).float().mean().item()
    log.info("datasetgan: interpreter on %d features (t=%d): train accuracy %.3f, val accuracy %s",
             train_f.shape[1], t, train_acc, "n/a" if val_acc is None else f"{val_acc:.3f}")

    pipe = make_pipeline(ema, dict(sched.config), data.class_names, data.image_size, policy)

    def save(folder: Path) -> Path:
        save_safetensors(interpreter.state_dict(), folder / INTERPRETER_FILE)
        return save_pipeline(folder, pipe)

    extra = {"feature_timestep": t, "label_tries": dcfg.label_tries, "feature_dim": int(train_f.shape[1]),
             "interpreter_train_accuracy": round(train_acc, 4),
             "interpreter_val_accuracy": None if val_acc is None else round(val_acc, 4),
             "interpreter_val_n": 0 if data.val_images is None else len(data.val_images),
             "sample_size": size, "prediction_type": cfg.prediction_type}
    meta = {**generator_meta(cfg, data), **extra}
    generator = DatasetGanGenerator(DiffusionGenerator(pipe, meta), interpreter, meta)
    return Fitted(generator, save, {"loss": res.losses, "lr": res.lrs}, res.seconds_per_step, res.resumed_from,
                  n_params + sum(p.numel() for p in interpreter.parameters()), extra)


