"""Sampling any generator over a range of global image indices, in batches and shards.

Image ``i`` (global, class-major: label = i // per_class) is made from its own seed
``image_seed(base.seed, i)``, so it depends on its seed, not on the batch or shard it was
made in (up to float rounding when batch compositions differ).
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from pipeline.config import SampleConfig
from pipeline.core.seeding import image_seed
from pipeline.models.registry import Generator


def shard_range(n_images: int, shard_index: int, num_shards: int) -> range:
    """Contiguous, balanced range of global indices of one shard (independent of batch size)."""
    return range(shard_index * n_images // num_shards, (shard_index + 1) * n_images // num_shards)


def batch_ranges(indices: range, batch_size: int) -> list[range]:
    """Cut ``indices`` at global multiples of batch_size (a shard reuses the single-run batches)."""
    out, start = [], indices.start
    while start < indices.stop:
        stop = min(indices.stop, (start // batch_size + 1) * batch_size)
        out.append(range(start, stop))
        start = stop
    return out


def generate(generator: Generator, indices: range, cfg: SampleConfig, base_seed: int, batch_size: int,
             progress: bool = True) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """uint8 images (N,C,H,W), labels and seeds for the global ``indices``."""
    meta = generator.meta
    images, labels, seeds = [], [], []
    with tqdm(total=len(indices), unit="img", desc="sample", disable=not progress) as bar:
        for r in batch_ranges(indices, batch_size):
            batch_seeds = [image_seed(base_seed, i) for i in r]
            y = torch.tensor([i // cfg.per_class for i in r])
            images.append(generator.sample(y, batch_seeds, cfg))
            labels.append(y)
            seeds.extend(batch_seeds)
            bar.update(len(r))
    empty = torch.zeros(0, meta["channels"], meta["image_size"], meta["image_size"], dtype=torch.uint8)
    return (torch.cat(images) if images else empty,
            torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long), seeds)
