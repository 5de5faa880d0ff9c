"""Diffusion backbones, schedulers and the guided denoising loop (kinds unet and dit).

The backbone is a class-conditional diffusers ``UNet2DModel`` (kind unet) or
``DiTTransformer2DModel`` (kind dit): class ids 0..K-1 are the classes and id K
(``null_label``) is the "no class" label used for classifier-free guidance. Images are
held in [-1, 1], padded (centered, with -1) to a side the backbone divides (UNet
down-sampling, DiT patches), and cropped back after sampling.
"""
from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, DiTTransformer2DModel, DPMSolverMultistepScheduler, UNet2DModel
from diffusers.models.embeddings import LabelEmbedding

from pipeline.config import ConfigError, SampleConfig, TrainGeneratorConfig
from pipeline.storage import read_json

INFERENCE_SCHEDULERS = {"ddim": DDIMScheduler, "dpm++": DPMSolverMultistepScheduler}
# kind -> (backbone class, sub-folder of the generator folder holding its weights)
BACKBONES = {"unet": (UNet2DModel, "unet"), "dit": (DiTTransformer2DModel, "transformer")}


def padded_size(image_size: int, levels: int) -> int:
    """Smallest side >= image_size that 2**(levels-1) divides (28 with 3 levels stays 28)."""
    q = 2 ** (levels - 1)
    return int(math.ceil(image_size / q) * q)


def pad_images(x: torch.Tensor, size: int) -> torch.Tensor:
    """Center-pad N,C,H,W images in [-1, 1] to size x size with -1 (black)."""
    extra = size - x.shape[-1]
    if extra == 0:
        return x
    lo = extra // 2
    return F.pad(x, (lo, extra - lo, lo, extra - lo), value=-1.0)


def crop_images(x: torch.Tensor, image_size: int) -> torch.Tensor:
    lo = (x.shape[-1] - image_size) // 2
    return x[..., lo:lo + image_size, lo:lo + image_size]


def to_unit(x_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 -> float in [-1, 1]."""
    return x_uint8.float() / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float in [-1, 1] -> uint8."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def build_unet(cfg: TrainGeneratorConfig, image_size: int, channels: int, num_classes: int) -> UNet2DModel:
    """A fresh class-conditional UNet from the architecture keys of ``cfg``."""
    ch = tuple(cfg.block_out_channels)
    if not ch:
        raise ConfigError("train_generator.block_out_channels: needs at least one level")
    down = ["DownBlock2D"] * len(ch)
    up = ["UpBlock2D"] * len(ch)
    if cfg.attention:
        down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
    groups = min(32, math.gcd(*ch))
    return UNet2DModel(
        sample_size=padded_size(image_size, len(ch)), in_channels=channels, out_channels=channels,
        block_out_channels=ch, layers_per_block=cfg.layers_per_block,
        down_block_types=tuple(down), up_block_types=tuple(up), norm_num_groups=groups,
        num_class_embeds=num_classes + 1)


def build_dit(cfg: TrainGeneratorConfig, image_size: int, channels: int, num_classes: int
              ) -> DiTTransformer2DModel:
    """A fresh class-conditional DiT (adaLN-zero) from ``cfg.dit``; id K is the null class."""
    d = cfg.dit
    model = DiTTransformer2DModel(
        num_attention_heads=d.num_heads, attention_head_dim=d.head_dim, in_channels=channels,
        out_channels=channels, num_layers=d.num_layers, patch_size=d.patch_size,
        sample_size=int(math.ceil(image_size / d.patch_size) * d.patch_size), num_embeds_ada_norm=num_classes)
    return without_label_dropout(model)


def without_label_dropout(model):
    """DiT drops 10% of labels inside its embedding while training; we drop them ourselves
    (train_generator.p_uncond, to the same null id K), so the built-in dropout is turned off."""
    for m in model.modules():
        if isinstance(m, LabelEmbedding):
            m.dropout_prob = 0.0
    return model


def build_backbone(cfg: TrainGeneratorConfig, image_size: int, channels: int, num_classes: int):
    return (build_dit if cfg.kind == "dit" else build_unet)(cfg, image_size, channels, num_classes)


def conditional_from_pretrained(path: str, image_size: int, channels: int, num_classes: int
                                ) -> tuple[UNet2DModel, list[str]]:
    """Load a local diffusers UNet2DModel folder as a conditional UNet with K+1 class ids.

    An unconditional checkpoint (or one with another class count) gets a fresh class
    embedding; returns the model and the names of the weights that were not in the file.
    """
    folder = Path(path)
    if (folder / "unet" / "config.json").exists():
        folder = folder / "unet"  # a generator folder written by train_generator
    if not (folder / "config.json").exists():
        raise ConfigError(f"train_generator.init: {path!r} is neither scratch, pretrain nor a diffusers "
                          "UNet2DModel folder (no config.json found). Fix the path.")
    source = UNet2DModel.from_pretrained(str(folder))
    conf = dict(source.config)
    levels = len(conf["block_out_channels"])
    side = conf["sample_size"] if isinstance(conf["sample_size"], int) else conf["sample_size"][0]
    if side != padded_size(image_size, levels):
        raise ConfigError(f"train_generator.init: the checkpoint {path!r} works at {side}px but "
                          f"prepare.image_size is {image_size} (padded to {padded_size(image_size, levels)}). "
                          "Use a checkpoint of the same size or change prepare.image_size.")
    if conf["in_channels"] != channels or conf["out_channels"] != channels:
        raise ConfigError(f"train_generator.init: the checkpoint {path!r} has {conf['in_channels']} channels "
                          f"but prepare.channels is {channels}. Use a matching checkpoint or change prepare.channels.")
    conf["num_class_embeds"] = num_classes + 1
    conf["class_embed_type"] = None
    model = UNet2DModel.from_config({k: v for k, v in conf.items() if not k.startswith("_")})
    state = {k: v for k, v in source.state_dict().items()
             if k in model.state_dict() and model.state_dict()[k].shape == v.shape}
    missing = sorted(model.load_state_dict(state, strict=False).missing_keys)
    return model, missing


def train_scheduler(cfg: TrainGeneratorConfig) -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule,
                         prediction_type=cfg.prediction_type, clip_sample=False)


def inference_scheduler(name: str, train_config: dict):
    """A DDIM / DPM-Solver++ scheduler built from the saved training scheduler config."""
    if name not in INFERENCE_SCHEDULERS:
        raise ConfigError(f"sample.sampler: unknown sampler {name!r} (allowed: {', '.join(INFERENCE_SCHEDULERS)})")
    # trailing spacing starts at the last training step (pure noise, SNR ~ 0), where an epsilon
    # model's x0 estimate is unbounded: predicted x0 is clipped to the data range [-1, 1]
    extra = {"timestep_spacing": "trailing"}
    if name == "dpm++":
        extra.update(algorithm_type="dpmsolver++", solver_order=2, thresholding=True, sample_max_value=1.0)
    else:
        extra.update(clip_sample=True, clip_sample_range=1.0)
    return INFERENCE_SCHEDULERS[name].from_config(dict(train_config), **extra)


def autocast(device: torch.device | str):
    """bf16 autocast on CUDA, nothing elsewhere."""
    dev = torch.device(device)
    return torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else contextlib.nullcontext()


def guided_output(unet: UNet2DModel, x: torch.Tensor, t, labels: torch.Tensor, guidance: float,
                  null_label: int) -> torch.Tensor:
    """Classifier-free guided model output: out_u + w * (out_c - out_u).

    w = 0 is the unconditional model, w = 1 the conditional one (one pass each); other
    values run the conditional and unconditional halves in one forward of 2B.
    """
    if guidance == 1.0 or guidance == 0.0:
        lab = labels if guidance == 1.0 else torch.full_like(labels, null_label)
        return unet(x, _per_image(t, x), class_labels=lab).sample.float()
    x2 = torch.cat([x, x])
    both = unet(x2, _per_image(t, x2), class_labels=torch.cat([labels, torch.full_like(labels, null_label)])).sample
    cond, uncond = both.float().chunk(2)
    return uncond + guidance * (cond - uncond)


def _per_image(t, x: torch.Tensor) -> torch.Tensor:
    """One timestep per image (DiT, unlike the UNet, does not broadcast a scalar)."""
    return torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])


@torch.no_grad()
def denoise(unet: UNet2DModel, scheduler, noise: torch.Tensor, labels: torch.Tensor, guidance: float,
            steps: int, null_label: int) -> torch.Tensor:
    """Run the sampler from ``noise`` (N,C,S,S) to images in [-1, 1] (float, padded size)."""
    scheduler.set_timesteps(steps, device=noise.device)
    x = noise * scheduler.init_noise_sigma
    with autocast(noise.device):
        for t in scheduler.timesteps:
            model_in = scheduler.scale_model_input(x, t)
            if noise.device.type == "cuda":
                model_in = model_in.contiguous(memory_format=torch.channels_last)
            out = guided_output(unet, model_in, t, labels, guidance, null_label)
            x = scheduler.step(out, t, x).prev_sample.float()
    return x.clamp(-1, 1)


def seeded_noise(seeds: list[int], shape: tuple[int, ...], device) -> torch.Tensor:
    """One initial-noise tensor per image from its own CPU generator (device independent)."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s)))
                        for s in seeds]).to(device)


class DiffusionGenerator:
    """A trained diffusion backbone + its noise schedule, behind the sample stage's interface."""

    def __init__(self, model, sched_conf: dict, meta: dict):
        self.model, self.sched_conf, self.meta = model, sched_conf, meta

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def sample(self, labels: torch.Tensor, seeds: list[int], cfg: SampleConfig) -> torch.Tensor:
        """uint8 images (N,C,H,W, CPU) of classes ``labels``, image i from noise seeded by seeds[i]."""
        m, s = self.meta, self.model.config.sample_size
        noise = seeded_noise(seeds, (m["channels"], s, s), self.device)
        x = denoise(self.model, inference_scheduler(cfg.sampler, self.sched_conf), noise, labels.to(self.device),
                    cfg.guidance_scale, cfg.num_inference_steps, m["null_label"])
        return to_uint8(crop_images(x, m["image_size"])).cpu()


def load_backbone(folder: Path, kind: str, device: str):
    cls, sub = BACKBONES[kind]
    model = cls.from_pretrained(str(folder / sub)).to(device).eval()
    return model.to(memory_format=torch.channels_last) if torch.device(device).type == "cuda" else model


def load(folder: Path, meta: dict, device: str) -> DiffusionGenerator:
    """The generator written by train_generator for kind unet or dit."""
    return DiffusionGenerator(load_backbone(folder, meta["kind"], device),
                              read_json(folder / "scheduler" / "scheduler_config.json"), meta)
