"""Kind datasetgan: an unconditional generator whose samples are labeled by its own features.

DatasetGAN (Zhang et al. 2021) labels a generator's samples with a small "interpreter"
trained on the generator's internal features of a few labeled images; label-efficient
diffusion segmentation (Baranchuk et al. 2022) reads those features from a diffusion
UNet fed noised real images. Here, for classification:

1. an unconditional diffusion UNet is trained on train + pool (labels unused), with the
   DDPM loop of the diffusion kinds (every step unconditional);
2. features: an image is noised to ``feature_timestep`` and passed through the UNet once;
   the outputs of the middle block and of every up block are average-pooled to 2x2 and
   joined;
3. the interpreter (an MLP on standardised features) is trained on the labeled train
   images (``feature_draws`` noised copies each) and scored on the val split;
4. image i of class c: ``label_tries`` unconditional candidates are drawn from seeds
   derived from the image's seed, the interpreter labels them, and the candidate it finds
   most likely to be class c is kept. Labels are the interpreter's, so the filter stage
   (judge confidence) checks them independently.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline.config import Params, SampleConfig
from diffusers import DDPMScheduler

from pipeline.diffusion import (build_backbone, crop_images, denoise, inference_scheduler, load_backbone,
                                pad_images, seeded_noise, to_uint8, to_unit, train_scheduler)
from pipeline.generators import Fitted
from pipeline.storage import read_json
from pipeline.train_generator import TrainData, generator_meta, train

log = logging.getLogger(__name__)
INTERPRETER_FILE = "interpreter.safetensors"


class Interpreter(nn.Module):
    """MLP from standardised UNet features to class logits."""

    def __init__(self, dim: int, num_classes: int, hidden: int = 256):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Dropout(0.2), nn.Linear(hidden, num_classes))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.net((f - self.mean) / self.std)


def derived_seed(seed: int, k: int) -> int:
    """Seed of candidate k of the image with seed ``seed`` (no collisions with image seeds in practice)."""
    return int.from_bytes(hashlib.sha256(f"datasetgan:{seed}:{k}".encode()).digest()[:8], "little") >> 1


@torch.no_grad()
def unet_features(unet, scheduler, x: torch.Tensor, t: int, seeds: list[int], null_label: int) -> torch.Tensor:
    """Pooled middle- and up-block activations (N, D) of images ``x`` (padded, [-1, 1]) noised to ``t``."""
    noise = seeded_noise(seeds, tuple(x.shape[1:]), x.device)
    steps = torch.full((len(x),), t, device=x.device, dtype=torch.long)
    captured: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: captured.append(out[0] if isinstance(out, tuple) else out))
             for m in (unet.mid_block, *unet.up_blocks)]
    try:
        unet(scheduler.add_noise(x, noise, steps), steps, class_labels=torch.full_like(steps, null_label))
    finally:
        for h in hooks:
            h.remove()
    # 2x2 average pooling keeps coarse layout (where the object is), not only which features fire
    return torch.cat([F.adaptive_avg_pool2d(f.float(), 2).flatten(1) for f in captured], 1)


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


class DatasetGanGenerator:
    """Unconditional UNet + interpreter behind the sample stage's interface."""

    def __init__(self, unet, sched_conf: dict, interpreter: Interpreter, meta: dict):
        self.unet, self.sched_conf, self.interpreter, self.meta = unet, sched_conf, interpreter, meta
        self.feature_scheduler = DDPMScheduler.from_config(dict(sched_conf))

    def features(self, x_padded: torch.Tensor, seeds: list[int]) -> torch.Tensor:
        return unet_features(self.unet, self.feature_scheduler, x_padded, self.meta["feature_timestep"], seeds,
                             self.meta["null_label"])

    @torch.no_grad()
    def sample(self, labels: torch.Tensor, seeds: list[int], cfg: SampleConfig) -> torch.Tensor:
        m, tries = self.meta, self.meta["label_tries"]
        device = next(self.unet.parameters()).device
        s = self.unet.config.sample_size
        cand = [derived_seed(seed, k) for seed in seeds for k in range(tries)]
        null = torch.full((len(cand),), m["null_label"], device=device)
        x = denoise(self.unet, inference_scheduler(cfg.sampler, self.sched_conf),
                    seeded_noise(cand, (m["channels"], s, s), device), null, 0.0, cfg.num_inference_steps,
                    m["null_label"])
        probs = self.interpreter(self.features(x, cand)).softmax(1)
        want = labels.to(device).repeat_interleave(tries)
        score = probs.gather(1, want[:, None]).view(len(seeds), tries)
        best = score.argmax(1)
        log.debug("datasetgan: mean interpreter confidence of kept candidates %.3f", score.max(1).values.mean())
        x = x.view(len(seeds), tries, *x.shape[1:])[torch.arange(len(seeds), device=device), best]
        return to_uint8(crop_images(x, m["image_size"])).cpu()


def fit(params: Params, data: TrainData, accelerator, ckpt_dir: Path, chash: str) -> Fitted:
    cfg, dcfg = params.train_generator, params.train_generator.datasetgan
    device = accelerator.device
    # every step unconditional, on train + pool: the "pretrain" phase of the diffusion loop
    ucfg = cfg.model_copy(update={"kind": "unet", "init": "pretrain", "pretrain_steps": cfg.steps, "steps": 0})
    unet = build_backbone(ucfg, data.image_size, data.channels, data.num_classes)
    n_params = sum(p.numel() for p in unet.parameters())
    log.info("datasetgan: unconditional UNet %.2fM params, %d steps of batch %d on %d train + pool images",
             n_params / 1e6, cfg.steps, cfg.batch_size, len(data.unlabeled))
    res = train(unet, ucfg, data, seed=params.base.seed, ckpt_dir=ckpt_dir, chash=chash, accelerator=accelerator)
    sched = train_scheduler(cfg)
    ema = res.ema_unet.to(device).eval()
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

    def save(folder: Path) -> Path:
        ema.save_pretrained(folder / "unet", safe_serialization=True)
        sched.save_pretrained(folder / "scheduler")
        save_file({k: v.contiguous().cpu() for k, v in interpreter.state_dict().items()}, folder / INTERPRETER_FILE)
        return folder / "unet" / "diffusion_pytorch_model.safetensors"

    extra = {"feature_timestep": t, "label_tries": dcfg.label_tries, "feature_dim": int(train_f.shape[1]),
             "interpreter_train_accuracy": round(train_acc, 4),
             "interpreter_val_accuracy": None if val_acc is None else round(val_acc, 4),
             "interpreter_val_n": 0 if data.val_images is None else len(data.val_images),
             "sample_size": size, "prediction_type": cfg.prediction_type}
    generator = DatasetGanGenerator(ema, dict(sched.config), interpreter, {**generator_meta(cfg, data), **extra})
    return Fitted(generator, save, {"loss": res.losses, "lr": res.lrs}, res.seconds_per_step, res.resumed_from,
                  n_params + sum(p.numel() for p in interpreter.parameters()), extra)


def load(folder: Path, meta: dict, device: str) -> DatasetGanGenerator:
    unet = load_backbone(folder, "unet", device)
    state = load_file(str(folder / INTERPRETER_FILE))
    interpreter = Interpreter(meta["feature_dim"], meta["num_classes"], hidden=state["net.0.weight"].shape[0])
    interpreter.load_state_dict(state)
    return DatasetGanGenerator(unet, read_json(folder / "scheduler" / "scheduler_config.json"),
                               interpreter.to(device).eval(), meta)
