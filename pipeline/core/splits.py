"""Deterministic, stratified splits (pure: indices in, indices out)."""
from __future__ import annotations

import numpy as np
import torch

from pipeline.config import PrepareConfig
from pipeline.core.images import image_hashes
from pipeline.core.sources import Source
from pipeline.errors import DataError


def make_splits(src: Source, cfg: PrepareConfig, seed: int) -> tuple[dict[str, np.ndarray], dict]:
    """Indices of train / val / pool (and dev, with ``cfg.dev_per_class``) into ``src.images`` and of test into
    the test arrays (or into ``src.images`` for a hold-out). Deterministic given ``seed``."""
    rng = np.random.default_rng(seed)
    n_classes = len(src.class_names)
    if n_classes < 2:
        raise DataError(f"the source has {n_classes} class(es) ({src.class_names}); a classifier needs at least two. "
                        "Add a folder (imagefolder) or labels for another class.")
    candidates = np.arange(len(src.images))
    notes: dict = {}
    if src.test_images is None:  # stratified hold-out test split
        test = []
        for c in range(n_classes):
            idx = rng.permutation(np.flatnonzero(src.labels == c))
            test.extend(idx[: max(1, int(round(len(idx) * cfg.test_fraction)))] if len(idx) > 1 else [])
        test = np.sort(np.asarray(test, dtype=np.int64))
        candidates = np.setdiff1d(candidates, test)
        test_hashes = set(image_hashes(src.images[test]))
    else:
        test = np.arange(len(src.test_images))
        test_hashes = set(image_hashes(src.test_images))
    cand_hashes = image_hashes(src.images[candidates])
    dup = np.array([h in test_hashes for h in cand_hashes], dtype=bool)
    notes["train_test_exact_duplicates"] = int(dup.sum())
    candidates = candidates[~dup]  # an image that is also in test never enters training
    train, val, rest = [], [], []
    need = cfg.labeled_per_class + cfg.val_per_class
    short = {}
    for c in range(n_classes):
        idx = rng.permutation(candidates[src.labels[candidates] == c])
        if len(idx) < need:
            short[src.class_names[c]] = int(len(idx))
        train.extend(idx[: cfg.labeled_per_class])
        val.extend(idx[cfg.labeled_per_class: need])
        rest.extend(idx[need:])
    if short:
        raise DataError(
            "classes with fewer usable images than labeled_per_class + val_per_class = "
            f"{cfg.labeled_per_class} + {cfg.val_per_class} = {need}: "
            + ", ".join(f"{k!r} has {v}" for k, v in short.items())
            + ". Add images, or lower prepare.labeled_per_class / prepare.val_per_class.")
    rest = rng.permutation(np.asarray(rest, dtype=np.int64))
    pool = rest if cfg.unlabeled_pool == -1 else rest[: cfg.unlabeled_pool]
    splits = {"train": train, "val": val, "pool": pool, "test": test}
    if cfg.dev_per_class:  # drawn last, from what the others left, so that they are the same with or without it
        splits["dev"] = dev_split(rest[len(pool):], src, cfg)
    out = {k: np.sort(np.asarray(v, dtype=np.int64)) for k, v in splits.items()}
    return out, notes


def dev_split(left: np.ndarray, src: Source, cfg: PrepareConfig) -> np.ndarray:
    """The first ``dev_per_class`` images of each class in ``left`` (a seeded permutation of the images
    no other split took); a DataError when a class has fewer."""
    dev, short = [], {}
    for c, name in enumerate(src.class_names):
        idx = left[src.labels[left] == c]
        if len(idx) < cfg.dev_per_class:
            short[name] = int(len(idx))
        dev.extend(idx[: cfg.dev_per_class])
    if short:
        raise DataError(
            f"prepare.dev_per_class is {cfg.dev_per_class}, but after the labeled, val, test and pool splits "
            + ", ".join(f"{k!r} has {v} image(s) left" for k, v in short.items())
            + ". Lower prepare.unlabeled_pool (-1 takes every image left) or prepare.dev_per_class.")
    return np.asarray(dev, dtype=np.int64)


def stratified_subset(y: torch.Tensor, n: int, num_classes: int, seed: int) -> torch.Tensor:
    """Sorted indices of min(n, len(y)) items, classes as equal as the data allows (round robin
    over a seeded shuffle of each class; deterministic)."""
    g = torch.Generator().manual_seed(seed)
    order = []
    for c in range(num_classes):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        order += [(rank, c, int(i)) for rank, i in enumerate(idx)]
    order.sort()
    return torch.sort(torch.tensor([i for _, _, i in order[:n]], dtype=torch.long)).values
