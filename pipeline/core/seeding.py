"""Every random draw is derived from a seed, so runs repeat, resume and shard exactly."""
from __future__ import annotations

import hashlib

import torch

SEED_STRIDE = 1_000_000_007  # image seeds of different base seeds never collide below this many images


def _hash_seed(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def step_rng(seed: int, rank: int, step: int, device) -> torch.Generator:
    """The random stream of one training step (batch indices, noise, timesteps, label dropout).

    Derived from (seed, process, step) alone, so a resumed run draws exactly what an
    uninterrupted one would, on every process, without any sampler state to restore.
    """
    return torch.Generator(device=device).manual_seed(_hash_seed(f"{seed}:{rank}:{step}"))


def image_seed(base_seed: int, index: int) -> int:
    """The noise seed of synthetic image ``index`` (global, class-major)."""
    return base_seed * SEED_STRIDE + index


def derived_seed(seed: int, k: int) -> int:
    """Seed of candidate k of the image with seed ``seed`` (no collisions with image seeds in practice)."""
    return _hash_seed(f"datasetgan:{seed}:{k}")


def seeded_noise(seeds: list[int], shape: tuple[int, ...], device) -> torch.Tensor:
    """One standard-normal tensor per seed, each from its own CPU generator (device independent).

    Kept: diffusers' ``randn_tensor`` with a generator per seed gives identical tensors but is no shorter, is a
    diffusers-internal helper and would import diffusers (seconds) into every user of this module."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s)))
                        for s in seeds]).to(device)
