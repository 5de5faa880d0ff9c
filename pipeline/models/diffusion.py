"""Diffusion backbones, schedulers and the generator folder as a diffusers pipeline (kinds unet, dit).

The backbone is a class-conditional diffusers ``UNet2DModel`` (kind unet) or
``DiTTransformer2DModel`` (kind dit): class ids 0..K-1 are the classes and id K
(``null_label``) is the "no class" label used for classifier-free guidance. Images are
held in [-1, 1], padded (centered, with -1) to a side the backbone divides (UNet
down-sampling, DiT patches), and cropped back after sampling. The guided denoising loop is
``ClassConditionalPipeline.__call__`` (pipeline/models/class_conditional.py).
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DiTTransformer2DModel, DPMSolverMultistepScheduler, UNet2DModel
from diffusers.models.embeddings import LabelEmbedding

from pipeline.config import SampleConfig, TrainGeneratorConfig
from pipeline.core.device import DevicePolicy, as_policy
from pipeline.core.images import to_unit
from pipeline.core.seeding import seeded_noise
from pipeline.errors import ConfigError
from pipeline.models import class_conditional
from pipeline.models.class_conditional import ClassConditionalPipeline

INFERENCE_SCHEDULERS = {"ddim": DDIMScheduler, "dpm++": DPMSolverMultistepScheduler}
# kind -> (backbone class, pipeline component = sub-folder of the generator folder holding its weights)
BACKBONES = {"unet": (UNet2DModel, "unet"), "dit": (DiTTransformer2DModel, "transformer")}
PIPELINE_FILE = "synthaug_pipeline.py"  # the pipeline's code, copied into every generator folder
# the scheduler keys that describe training (the noise schedule); samplers are built from these
SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type",
                 "rescale_betas_zero_snr")


def padded_size(image_size: int, levels: int) -> int:
    """Smallest side >= image_size that 2**(levels-1) divides (28 with 3 levels stays 28)."""
    q = 2 ** (levels - 1)
    return int(math.ceil(image_size / q) * q)


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
    """A local diffusers UNet2DModel folder (or a generator folder) as a conditional UNet with K+1
    class ids: ``from_pretrained`` with ``num_class_embeds`` set, so an unconditional checkpoint (or
    one with another class count) gets a fresh class embedding. Returns the model and the names of
    the weights that were not in the checkpoint."""
    folder = Path(path)
    if (folder / "unet" / "config.json").exists():
        folder = folder / "unet"  # a generator folder written by train_generator
    if not (folder / "config.json").exists():
        raise ConfigError(f"train_generator.init: {path!r} is neither scratch, pretrain nor a diffusers "
                          "UNet2DModel folder (no config.json found). Fix the path.")
    try:
        conf = UNet2DModel.load_config(str(folder))
    except (OSError, ValueError) as err:  # diffusers: an unreadable or non-JSON config
        raise ConfigError(f"train_generator.init: {folder / 'config.json'} is not a readable diffusers config "
                          f"({str(err).splitlines()[0][:200]}). Fix the path.") from None
    if conf.get("_class_name", "UNet2DModel") != "UNet2DModel" or \
            not {"block_out_channels", "sample_size", "in_channels", "out_channels"} <= set(conf):
        raise ConfigError(f"train_generator.init: {path!r} holds a {conf.get('_class_name') or 'non-UNet'} config, "
                          "not a diffusers UNet2DModel. Point it at a UNet2DModel folder or a generator folder "
                          "written by train_generator (kind unet).")
    levels = len(conf["block_out_channels"])
    side = conf["sample_size"] if isinstance(conf["sample_size"], int) else conf["sample_size"][0]
    if side != padded_size(image_size, levels):
        raise ConfigError(f"train_generator.init: the checkpoint {path!r} works at {side}px but "
                          f"prepare.image_size is {image_size} (padded to {padded_size(image_size, levels)}). "
                          "Use a checkpoint of the same size or change prepare.image_size.")
    if conf["in_channels"] != channels or conf["out_channels"] != channels:
        raise ConfigError(f"train_generator.init: the checkpoint {path!r} has {conf['in_channels']} channels "
                          f"but prepare.channels is {channels}. Use a matching checkpoint or change prepare.channels.")
    model, info = UNet2DModel.from_pretrained(
        str(folder), num_class_embeds=num_classes + 1, class_embed_type=None, low_cpu_mem_usage=False,
        ignore_mismatched_sizes=True, output_loading_info=True)
    new = sorted({*info["missing_keys"], *(k for k, *_ in info["mismatched_keys"])})
    return model, new


def train_scheduler(cfg: TrainGeneratorConfig) -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule,
                         prediction_type=cfg.prediction_type, rescale_betas_zero_snr=cfg.zero_terminal_snr,
                         clip_sample=False)


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
    schedule = {k: v for k, v in dict(train_config).items() if k in SCHEDULE_KEYS}
    return INFERENCE_SCHEDULERS[name].from_config(schedule, **extra)


class DiffusionGenerator:
    """A diffusers ``ClassConditionalPipeline`` behind the sample stage's interface."""

    def __init__(self, pipe: ClassConditionalPipeline, meta: dict):
        self.pipe, self.meta = pipe, meta
        self.schedule = dict(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)  # the sample stage shows its own bar

    @property
    def device(self) -> torch.device:
        return self.pipe.backbone.device

    def sample(self, labels: torch.Tensor, seeds: list[int], cfg: SampleConfig, images: torch.Tensor | None = None,
               strength: float = 1.0) -> torch.Tensor:
        """uint8 images (N,C,H,W, CPU) of classes ``labels``, image i from noise seeded by seeds[i];
        with ``images`` (uint8, the same N): variations of them, noised to ``strength`` (SDEdit)."""
        s, ch = self.pipe.backbone.config.sample_size, self.meta["channels"]
        self.pipe.scheduler = inference_scheduler(cfg.sampler, self.schedule)
        return self.pipe(labels, num_inference_steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale,
                         guidance_rescale=cfg.guidance_rescale, guidance_interval=cfg.guidance_interval,
                         noise=seeded_noise(seeds, (ch, s, s), self.device), output_type="uint8",
                         image=None if images is None else to_unit(images), strength=strength).images.cpu()


def use_policy(pipe: ClassConditionalPipeline, policy: DevicePolicy) -> ClassConditionalPipeline:
    """The pipeline's backbone on the policy's device, memory format and precision."""
    policy.prepare(pipe.backbone)
    pipe.autocast_dtype, pipe.channels_last = policy.autocast_dtype, policy.channels_last
    return pipe.to(policy.device)


def make_pipeline(backbone, schedule: dict, class_names: list[str], image_size: int,
                  policy: DevicePolicy | None = None) -> ClassConditionalPipeline:
    """The pipeline of a trained backbone (UNet or DiT, also a compiled one), sampling with
    DPM-Solver++ built from the training noise ``schedule``, under ``policy`` (default: the
    backbone's device's)."""
    part = "transformer" if isinstance(getattr(backbone, "_orig_mod", backbone), DiTTransformer2DModel) else "unet"
    pipe = ClassConditionalPipeline(scheduler=inference_scheduler("dpm++", schedule), class_names=list(class_names),
                                    image_size=image_size, **{part: backbone})
    return use_policy(pipe, policy or as_policy(str(backbone.device)))


def save_pipeline(folder: Path, pipe: ClassConditionalPipeline) -> Path:
    """Write a diffusers pipeline folder (``model_index.json``, backbone, scheduler, the pipeline's
    code); returns the backbone's weights file."""
    sub = "unet" if pipe.unet is not None else "transformer"
    pipe.save_pretrained(folder, safe_serialization=True)
    shutil.copy(class_conditional.__file__, folder / PIPELINE_FILE)
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = [Path(PIPELINE_FILE).stem, ClassConditionalPipeline.__name__]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return folder / sub / "diffusion_pytorch_model.safetensors"


def load_pipeline(folder: Path, kind: str, device: str | DevicePolicy) -> ClassConditionalPipeline:
    """The pipeline of a generator folder, built from its parts (no code is run from the folder), on
    ``device`` (a name or the run's ``DevicePolicy``: precision, memory format, compile)."""
    policy = as_policy(device)
    cls, sub = BACKBONES[kind]
    index = json.loads((Path(folder) / "model_index.json").read_text())
    model = policy.compiled(cls.from_pretrained(str(Path(folder) / sub)).eval())  # use_policy moves and lays it out
    pipe = ClassConditionalPipeline(
        scheduler=DPMSolverMultistepScheduler.from_pretrained(str(Path(folder) / "scheduler")),
        class_names=index["class_names"], image_size=index["image_size"], **{sub: model})
    return use_policy(pipe, policy)


def load(folder: Path, meta: dict, device: str | DevicePolicy) -> DiffusionGenerator:
    """The generator written by train_generator for kind unet or dit."""
    return DiffusionGenerator(load_pipeline(folder, meta["kind"], device), meta)
