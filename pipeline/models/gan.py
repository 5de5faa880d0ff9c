"""Kind cgan: a class-conditional GAN that draws an image in one forward pass.

Generator (DCGAN style): a latent z ~ N(0, I) joined with a learned class embedding goes
through a linear layer to a g_channels x s/4 x s/4 map (s = the image side padded up to a
multiple of 4, so 28 stays 28), two blocks of 4x4 stride-2 transposed convolution +
BatchNorm + ReLU that double the side, a 3x3 convolution and tanh to [-1, 1]; the result
is cropped back to the image side.

Discriminator: a projection discriminator (Miyato & Koyama 2018). Spectral-normalised
convolutions with LeakyReLU (two 4x4 stride-2 ones halve the side twice, then a 3x3 one)
and global sum pooling give a feature h; the output is linear(h) + <embed(y), h>: the
class enters as an inner product with the image features, not as an input channel.

Training: hinge loss (D: relu(1 - D(real)) + relu(1 + D(fake)); G: -D(fake)), Adam with
betas (0, 0.99), one D step then one G step on the same fakes. DiffAugment (Zhao et al.
2020) applies random differentiable color / translation / cutout to real and fake images
alike before D sees them, which keeps D from memorising a small training set. The saved
and sampled generator is an EMA of the generator's weights whose BatchNorm statistics are
re-estimated at the end ("standing statistics"). Training: pipeline/training/gan.py.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from pipeline.config import SampleConfig
from pipeline.core.device import DevicePolicy, as_policy
from pipeline.core.images import crop_images, to_uint8
from pipeline.core.io import read_json, save_safetensors, write_json
from pipeline.core.seeding import seeded_noise
from pipeline.models.diffusion import padded_size


class CondGenerator(nn.Module):
    def __init__(self, z_dim: int, num_classes: int, channels: int, image_size: int, g_channels: int):
        super().__init__()
        self.arch = {"z_dim": z_dim, "num_classes": num_classes, "channels": channels, "image_size": image_size,
                     "g_channels": g_channels}
        self.z_dim, self.image_size, c = z_dim, image_size, g_channels
        self.base = padded_size(image_size, 3) // 4
        self.embed = nn.Embedding(num_classes, z_dim)
        self.fc = nn.Linear(2 * z_dim, c * self.base ** 2)

        def up(i: int, o: int) -> list[nn.Module]:  # 2x upsampling
            return [nn.ConvTranspose2d(i, o, 4, 2, 1, bias=False), nn.BatchNorm2d(o), nn.ReLU()]

        self.net = nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), *up(c, c // 2), *up(c // 2, c // 4),
                                 nn.Conv2d(c // 4, channels, 3, padding=1), nn.Tanh())

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.fc(torch.cat([z, self.embed(y)], 1)).view(len(z), -1, self.base, self.base)
        return crop_images(self.net(h), self.image_size)


class ProjectionDiscriminator(nn.Module):
    def __init__(self, num_classes: int, channels: int, d_channels: int):
        super().__init__()
        c = d_channels
        self.net = nn.Sequential(
            spectral_norm(nn.Conv2d(channels, c, 4, 2, 1)), nn.LeakyReLU(0.2),
            spectral_norm(nn.Conv2d(c, 2 * c, 4, 2, 1)), nn.LeakyReLU(0.2),
            spectral_norm(nn.Conv2d(2 * c, 4 * c, 3, 1, 1)), nn.LeakyReLU(0.2))
        self.linear = spectral_norm(nn.Linear(4 * c, 1))
        self.embed = spectral_norm(nn.Embedding(num_classes, 4 * c))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.net(x).sum((2, 3))
        return self.linear(h).squeeze(1) + (self.embed(y) * h).sum(1)


class GanGenerator:
    """The EMA generator behind the sample stage's interface (sampler, steps, guidance unused)."""

    def __init__(self, model: CondGenerator, meta: dict, policy: DevicePolicy | None = None):
        self.model, self.meta = model.eval(), meta
        self.policy = policy or as_policy(str(next(model.parameters()).device))

    @torch.no_grad()
    def sample(self, labels: torch.Tensor, seeds: list[int], cfg: SampleConfig | None = None) -> torch.Tensor:
        """uint8 images (N,C,H,W, CPU); image i from z seeded by seeds[i] and class labels[i]."""
        dev = self.policy.device
        z = seeded_noise(seeds, (self.model.z_dim,), dev)
        with self.policy.autocast():
            x = self.model(z, labels.to(dev))
        return to_uint8(x.float()).cpu()


def save(folder: Path, model: CondGenerator) -> Path:
    """Write ``gan/config.json`` and ``gan/generator.safetensors``; returns the weights file."""
    write_json(folder / "gan" / "config.json", model.arch)
    weights = folder / "gan" / "generator.safetensors"
    save_safetensors(model.state_dict(), weights)
    return weights


def load(folder: Path, meta: dict, device: str | DevicePolicy) -> GanGenerator:
    """The generator written by train_generator for kind cgan."""
    folder = Path(folder)
    policy = as_policy(device)
    model = CondGenerator(**read_json(folder / "gan" / "config.json"))
    model.load_state_dict(load_file(str(folder / "gan" / "generator.safetensors")))
    return GanGenerator(policy.prepare(model), meta, policy)
