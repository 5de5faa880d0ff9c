"""The oracle of a synthetic set: as many pool images of each class as the set has, with their true labels
(the pool's ``hidden_label``, which prepare keeps for diagnostics). It is the ceiling of any synthetic set of
that size, and exists only where the source labels the pool (fashion-mnist, labeled image folders)."""
from __future__ import annotations

import numpy as np
import torch

from pipeline.config import Paths
from pipeline.core.images import dataset_to_tensors
from pipeline.core.io import load_dataset_dir
from pipeline.errors import DataError


def draw_like(hidden: torch.Tensor, counts: list[int], seed: int, class_names: list[str]) -> torch.Tensor:
    """Sorted indices into the pool: ``counts[c]`` images whose true label is ``c``, a seeded draw of each
    class (deterministic); a DataError when the pool holds fewer of a class."""
    rng = np.random.default_rng(seed)
    labels, out, short = hidden.numpy(), [], {}
    for c, n in enumerate(counts):
        idx = rng.permutation(np.flatnonzero(labels == c))
        if len(idx) < n:
            short[class_names[c]] = (n, len(idx))
        out.extend(idx[:n])
    if short:
        raise DataError("the oracle needs as many pool images of each class as the synthetic set has, and the pool "
                        "has fewer: " + ", ".join(f"{k!r} needs {a}, has {b}" for k, (a, b) in short.items())
                        + ". Give prepare a larger pool (prepare.unlabeled_pool) or make a smaller synthetic set.")
    return torch.sort(torch.as_tensor(np.asarray(out, dtype=np.int64))).values


def load_oracle(paths: Paths, like: torch.Tensor, class_names: list[str], seed: int, variant: str
                ) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Pool images and their true labels, as many of each class as the class ids ``like`` (the synthetic
    set's labels) hold; also a record (pool indices' count per class, where they come from)."""
    where = paths.prepared / "dataset"
    dd = load_dataset_dir(where, "prepare")
    if "pool" not in dd or len(dd["pool"]) == 0:
        raise DataError(f"{where}: no pool, and variant {variant!r} (oracle: true) draws truly labeled pool images. "
                        "Set prepare.unlabeled_pool above 0 (or -1) or drop the variant.")
    if "hidden_label" not in dd["pool"].column_names:
        raise DataError(f"{where}: the pool has no labels (no hidden_label column), so variant {variant!r} "
                        "(oracle: true) cannot be drawn: an oracle needs a source that labels its pool "
                        "(fashion-mnist, a labeled image folder). Drop the variant.")
    x, hidden = dataset_to_tensors(dd["pool"], label_column="hidden_label")
    counts = torch.bincount(like, minlength=len(class_names)).tolist()
    idx = draw_like(hidden, counts, seed, class_names)
    return x[idx], hidden[idx], {"oracle_per_class": dict(zip(class_names, counts)), "oracle_source": str(where)}
