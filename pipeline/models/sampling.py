"""Sampling any generator over a range of global image indices, in batches and shards.

A ``Plan`` says what image ``i`` of the synthetic set is: its class and, for image-to-image
variations (SDEdit), its source image and strength. Image ``i`` is made from its own seed
``image_seed(base_seed, i)``, so it depends on its seed, not on the batch or shard it was made
in (up to float rounding when batch compositions differ).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from pipeline.config import SampleConfig
from pipeline.core.seeding import image_seed
from pipeline.models.registry import Generator


@dataclass(frozen=True)
class Plan:
    """Per global index: class, strength (1 = from pure noise) and source row (-1 = none)."""
    labels: torch.Tensor
    strengths: torch.Tensor
    source_rows: torch.Tensor
    sources: torch.Tensor | None = None  # uint8 N,C,H,W source images of img2img
    origins: list[tuple[str, int]] | None = None  # where each source came from: (split, row in that split)

    def origin(self, indices) -> tuple[list[float], list[str], list[int]]:
        """Strength, source split ("" = none) and source row (-1 = none) of the images at ``indices``."""
        rows = self.source_rows[list(indices)].tolist()
        split = [self.origins[r][0] if r >= 0 else "" for r in rows]
        return ([float(v) for v in self.strengths[list(indices)]], split,
                [self.origins[r][1] if r >= 0 else -1 for r in rows])

    def __len__(self) -> int:
        return len(self.labels)

    def preview(self, num_classes: int, per_class: int) -> tuple[list[list[int]], int]:
        """Up to ``per_class`` indices of each class for a preview grid, and the grid's row length.
        img2img: whole sources only, each row one source's variations, weakest strength first (the
        row length counts the source image that ``with_sources`` puts in front)."""
        per_source = 1 if self.sources is None else int((self.source_rows == self.source_rows[0]).sum())
        take = max(1, per_class // per_source) * per_source
        orders = [sorted(torch.nonzero(self.labels == c).flatten().tolist(),
                         key=lambda i: (int(self.source_rows[i]), float(self.strengths[i])))[:take]
                  for c in range(num_classes)]
        nrow = per_source + 1 if self.sources is not None else math.ceil(math.sqrt(max(map(len, orders))))
        return orders, nrow

    def with_sources(self, images: torch.Tensor, order: list[int]) -> torch.Tensor:
        """The preview ``images`` of ``order`` (from ``preview``) with each img2img source image in front
        of its variations; generated images as they are."""
        if self.sources is None or not order:
            return images
        per_source = int((self.source_rows == self.source_rows[0]).sum())
        rows = zip(self.sources[self.source_rows[order[::per_source]]], images.split(per_source))
        return torch.cat([torch.cat([source[None], variations]) for source, variations in rows])


def generation_plan(num_classes: int, per_class: int) -> Plan:
    """``per_class`` images of each class from noise, class-major (label = i // per_class)."""
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    return Plan(labels, torch.ones(len(labels)), torch.full((len(labels),), -1))


def img2img_plan(sources: torch.Tensor, labels: torch.Tensor, strengths: tuple[float, ...], variations: int,
                 origins: list[tuple[str, int]]) -> Plan:
    """``variations`` variations of every source image at every strength, strength-major (so a batch
    mostly holds one strength), then source, then variation."""
    rows = torch.arange(len(sources)).repeat_interleave(variations).repeat(len(strengths))
    s = torch.tensor(strengths, dtype=torch.float64).repeat_interleave(len(sources) * variations)
    return Plan(labels[rows], s, rows, sources, origins)


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


def generate(generator: Generator, plan: Plan, indices: range, cfg: SampleConfig, base_seed: int, batch_size: int,
             progress: bool = True) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """uint8 images (N,C,H,W), labels and seeds for the global ``indices`` of ``plan``."""
    meta = generator.meta
    images, seeds = [], []
    with tqdm(total=len(indices), unit="img", desc="sample", disable=not progress) as bar:
        for r in batch_ranges(indices, batch_size):
            idx = torch.tensor(list(r))
            batch_seeds = [image_seed(base_seed, i) for i in r]
            out = torch.empty(len(r), meta["channels"], meta["image_size"], meta["image_size"], dtype=torch.uint8)
            for s in plan.strengths[idx].unique().tolist():  # one call per strength (one noise schedule)
                sel = torch.nonzero(plan.strengths[idx] == s).flatten()
                rows = plan.source_rows[idx[sel]]
                kw = {} if plan.sources is None else {"images": plan.sources[rows], "strength": float(s)}
                out[sel] = generator.sample(plan.labels[idx[sel]], [batch_seeds[j] for j in sel.tolist()], cfg, **kw)
            images.append(out)
            seeds.extend(batch_seeds)
            bar.update(len(r))
    empty = torch.zeros(0, meta["channels"], meta["image_size"], meta["image_size"], dtype=torch.uint8)
    return (torch.cat(images) if images else empty, plan.labels[list(indices)].long(), seeds)
