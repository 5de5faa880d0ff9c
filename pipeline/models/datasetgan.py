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

Training (steps 1 and 3): pipeline/training/datasetgan.py.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from safetensors.torch import load_file
from torch import nn

from pipeline.config import SampleConfig
from pipeline.core.device import DevicePolicy, as_policy
from pipeline.core.images import pad_images, to_unit
from pipeline.core.seeding import derived_seed, seeded_noise
from pipeline.models.diffusion import DiffusionGenerator, load_pipeline

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


class DatasetGanGenerator:
    """The unconditional diffusion pipeline + interpreter behind the sample stage's interface."""

    def __init__(self, diffusion: DiffusionGenerator, interpreter: Interpreter, meta: dict):
        self.diffusion, self.interpreter, self.meta = diffusion, interpreter, meta
        self.unet = diffusion.pipe.unet
        self.feature_scheduler = DDPMScheduler.from_config(diffusion.schedule)

    def features(self, x_padded: torch.Tensor, seeds: list[int]) -> torch.Tensor:
        return unet_features(self.unet, self.feature_scheduler, x_padded, self.meta["feature_timestep"], seeds,
                             self.meta["null_label"])

    @torch.no_grad()
    def sample(self, labels: torch.Tensor, seeds: list[int], cfg: SampleConfig) -> torch.Tensor:
        m, tries = self.meta, self.meta["label_tries"]
        device = self.diffusion.device
        cand = [derived_seed(seed, k) for seed in seeds for k in range(tries)]
        null = torch.full((len(cand),), m["null_label"])
        x = self.diffusion.sample(null, cand, cfg.model_copy(update={"guidance_scale": 0.0})).to(device)
        padded = pad_images(to_unit(x), self.unet.config.sample_size)
        probs = self.interpreter(self.features(padded, cand)).softmax(1)
        want = labels.to(device).repeat_interleave(tries)
        score = probs.gather(1, want[:, None]).view(len(seeds), tries)
        best = score.argmax(1)
        log.debug("datasetgan: mean interpreter confidence of kept candidates %.3f", score.max(1).values.mean())
        return x.view(len(seeds), tries, *x.shape[1:])[torch.arange(len(seeds), device=device), best].cpu()


def load(folder: Path, meta: dict, device: str | DevicePolicy) -> DatasetGanGenerator:
    policy = as_policy(device)
    state = load_file(str(Path(folder) / INTERPRETER_FILE))
    interpreter = Interpreter(meta["feature_dim"], meta["num_classes"], hidden=state["net.0.weight"].shape[0])
    interpreter.load_state_dict(state)
    return DatasetGanGenerator(DiffusionGenerator(load_pipeline(folder, "unet", policy), meta),
                               interpreter.to(policy.device).eval(), meta)
