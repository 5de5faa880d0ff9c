"""Stage 1, prepare: read a labeled image source and write deterministic splits.

Writes ``data/prepared/``: a ``DatasetDict`` (train = the small labeled set, val, test,
optionally pool = unlabeled images, and with ``prepare.dev_per_class`` a labeled dev split that only
studies score on) and ``summary.json``. The pool keeps its source labels
in a ``hidden_label`` column that no training step reads: pseudo_label uses it only to report how
accurate its pseudo-labels are. Readers live in
``pipeline.core.sources``, the split rule in ``pipeline.core.splits``.
"""
from __future__ import annotations

import logging
import time

import datasets
import numpy as np
import torch

from pipeline.config import Params, Paths
from pipeline.core.entrypoint import stage_main
from pipeline.core.images import tensors_to_dataset
from pipeline.core.io import atomic_path, check_writable, fingerprint, sha256_tensor, write_json
from pipeline.core.sources import READERS
from pipeline.core.splits import make_splits

log = logging.getLogger(__name__)
IMBALANCE = 10  # a source class with this many times the images of another is remarked in the summary


def run(params: Params, paths: Paths = Paths()) -> dict:
    cfg = params.prepare
    check_writable(paths.prepared, paths.stage_timing)
    t0 = time.perf_counter()
    log.info("prepare: reading %s from %s", cfg.source, cfg.path)
    src = READERS[cfg.source](cfg)
    split_idx, notes = make_splits(src, cfg, params.base.seed)
    source_counts = np.bincount(src.labels, minlength=len(src.class_names))
    if source_counts.min() and source_counts.max() >= IMBALANCE * source_counts.min():
        big, small = int(source_counts.argmax()), int(source_counts.argmin())
        notes["class_imbalance"] = (
            f"class {src.class_names[big]!r} has {source_counts[big]} source images, "
            f"{source_counts[big] / source_counts[small]:.0f}x the {source_counts[small]} of "
            f"{src.class_names[small]!r}: the labeled set takes labeled_per_class of each, but the unlabeled pool "
            "(pseudo-labels, generator pre-training) keeps the imbalance; see pool_counts_per_class")
        log.warning("prepare: %s", notes["class_imbalance"])
    if src.upscale > 2:
        notes["upscaled"] = (f"the smallest source images ({src.min_side}px) were enlarged {src.upscale:.0f}x to "
                             f"prepare.image_size {cfg.image_size}: they hold little detail at that size")
        log.warning("prepare: %s", notes["upscaled"])
    test_x, test_y = (src.test_images, src.test_labels) if src.test_images is not None else (src.images, src.labels)
    def build(x, y, hidden=None):
        t = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2)
        return tensors_to_dataset(t, y, src.class_names, None if hidden is None else {"hidden_label": hidden})

    arrays = {name: (src.images[idx], src.labels[idx]) for name, idx in split_idx.items()
              if name in ("train", "val", "dev")}
    arrays["test"] = (test_x[split_idx["test"]], test_y[split_idx["test"]])
    if len(split_idx["pool"]):
        arrays["pool"] = (src.images[split_idx["pool"]], None)
    dd = datasets.DatasetDict({name: build(x, y) for name, (x, y) in arrays.items() if name != "pool"})
    if "pool" in arrays:  # its labels only for a diagnostic (pseudo-label accuracy); no training step reads them
        dd["pool"] = build(arrays["pool"][0], None, src.labels[split_idx["pool"]])
    # what later stages record they were made from (the report refuses to mix runs)
    data_fp = fingerprint({name: [sha256_tensor(x), None if y is None else sha256_tensor(y)]
                           for name, (x, y) in arrays.items()}, src.class_names)
    counts = {name: np.bincount(np.asarray(ds["label"]), minlength=len(src.class_names)).tolist()
              for name, ds in dd.items() if "label" in ds.column_names}
    summary = {
        "source": cfg.source, "source_path": cfg.path, "source_fingerprint": src.fingerprint,
        "image_size": cfg.image_size, "channels": cfg.channels, "class_names": src.class_names,
        "num_classes": len(src.class_names), "sizes": {k: len(v) for k, v in dd.items()}, "fingerprint": data_fp,
        "counts_per_class": counts, "source_counts_per_class": dict(zip(src.class_names, source_counts.tolist())),
        # the pool's source labels, which no training step reads: how its classes are balanced
        "pool_counts_per_class": np.bincount(src.labels[split_idx["pool"]], minlength=len(src.class_names)).tolist(),
        "skipped_images": src.skipped, **notes,
        "seed": params.base.seed, "params": params.resolved(),
    }
    summary["headline"] = (
        f"{cfg.source}: " + ", ".join(f"{k} {v}" for k, v in summary["sizes"].items())
        + f" images of {cfg.image_size}px x {cfg.channels}ch in {len(src.class_names)} classes; "
        f"{notes['train_test_exact_duplicates']} train/test duplicates dropped, "
        f"{len(src.skipped)} unreadable files skipped")
    with atomic_path(paths.prepared, is_dir=True) as tmp:
        dd.save_to_disk(str(tmp / "dataset"))
        write_json(tmp / "summary.json", summary)
    # the run time goes beside, not into, data/prepared: identical data hash identically for DVC
    write_json(paths.stage_timing / "prepare.json", {"seconds": round(time.perf_counter() - t0, 1)})
    log.info("prepare: wrote %s: %s", paths.prepared, summary["headline"])
    return summary


def main(argv: list[str] | None = None) -> None:
    stage_main("prepare", run, argv)


if __name__ == "__main__":
    main()
