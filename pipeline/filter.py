"""Stage 4, filter: score every synthetic image, keep the good ones, measure set quality.

Per image: the judge's confidence in the intended label and its margin (top1 - top2), a CLIP
score when a local CLIP checkpoint is configured, k-NN realism against real images, the
distance to the nearest labeled training image (memorisation) and exact-duplicate flags.
Per set (before and after filtering, overall and per class, and a real-vs-real floor):
Frechet distance, KID, precision and recall in one feature space (torch-fidelity).

Writes ``data/filtered/``: ``dataset`` (accepted rows, same columns as the synthetic set),
``scores.parquet`` (one row per synthetic image) and ``summary.json``.
Selection never looks at the test split; test images serve only as the metric reference.
"""
from __future__ import annotations

import logging
import time

import datasets
import numpy as np
import pandas as pd
import torch

from pipeline.config import FilterConfig, Params, Paths
from pipeline.core.device import policy_for
from pipeline.core.entrypoint import stage_main
from pipeline.core.images import check_shapes, class_names_of, dataset_to_tensors
from pipeline.core.io import atomic_path, check_writable, fingerprint, load_dataset_dir, read_output, write_json
from pipeline.errors import DataError
from pipeline.models.classifier import check_input_size
from pipeline.quality.clip import clip_column
from pipeline.quality.features import FeatureSpace
from pipeline.quality.judge import judge_scores, load_or_train_judge
from pipeline.quality.metrics import quality_summary
from pipeline.quality.scores import Images, extract_features, filter_summary, score_table
from pipeline.quality.selection import select

log = logging.getLogger(__name__)


def run(params: Params, paths: Paths = Paths()) -> dict:
    cfg, seed, t0 = params.filter, params.base.seed, time.time()
    check_writable(paths.filtered, paths.feature_cache)
    policy = policy_for(params.base)
    images, synthetic, inputs = load_inputs(paths, cfg)
    (syn_x, syn_y), num_classes = images.syn, len(images.class_names)
    log.info("filter: %d synthetic images, %d classes, feature space %s, device %s", len(syn_x), num_classes,
             cfg.feature_space, policy.device)
    if off := checks_off(cfg):
        log.info("filter: checks off (every image passes them): %s", "; ".join(off))
    judge, judge_hist = load_or_train_judge(cfg, images.train, images.val, num_classes, seed, policy,
                                            paths.feature_cache)
    judged = judge_scores(judge, syn_x, syn_y, cfg.batch_size, policy)
    space = FeatureSpace(cfg.feature_space, device=policy.device, batch_size=cfg.batch_size,
                         resolution=cfg.feature_resolution, inception_weights=cfg.inception_weights,
                         judge=judge, judge_in_chans=int(images.train[0].shape[1]))
    feats, syn_seconds = extract_features(space, images, cfg.max_real, seed, paths.feature_cache)
    clip, clip_info = clip_column(cfg, syn_x, syn_y, images.class_names, policy.device)
    scores, distances = score_table(cfg, images, feats, space, judged, clip)
    scores = select(scores, cfg, num_classes, distances["memorization_distance"])
    keep = torch.from_numpy(scores["accepted"].to_numpy().copy())
    metrics = quality_summary(feats.syn, syn_y, keep, feats.ref, feats.ref_y, feats.real, feats.real_y,
                              images.class_names, space.label, k=cfg.realism_k, kid_subsets=cfg.kid_subsets, seed=seed)
    summary = {
        **filter_summary(cfg, scores, feats, images.class_names, distances, judge, judge_hist, clip_info, metrics),
        "inputs": inputs, "fingerprint": fingerprint(inputs["synthetic"], scores["index"][scores["accepted"]].tolist()),
        "timing": {"seconds": time.time() - t0, "synthetic_features_per_second": len(syn_x) / max(syn_seconds, 1e-9)},
        "params": params.resolved(),
    }
    write_outputs(paths, synthetic, scores, summary)
    log_outcome(summary, time.time() - t0)
    return summary


def load_inputs(paths: Paths, cfg: FilterConfig) -> tuple[Images, datasets.Dataset, dict]:
    """The prepared splits and the synthetic images as tensors, the synthetic dataset (accepted rows are
    selected from it) and the fingerprints of both inputs, each checked along its chain."""
    prepared_fp = read_output(paths, "prepared").get("fingerprint")
    syn_summary = read_output(paths, "synthetic")  # refused when made by an older generator or from other data
    prepared = load_dataset_dir(paths.prepared / "dataset", "prepare")
    synthetic = load_dataset_dir(paths.synthetic / "dataset", "sample")
    class_names = class_names_of(prepared["train"])
    if class_names_of(synthetic) != class_names:
        raise DataError(f"{paths.synthetic}: synthetic class names {class_names_of(synthetic)} differ from the "
                        f"prepared ones {class_names}. Re-run train_generator and sample on this data.")
    train, val, test = (dataset_to_tensors(prepared[s]) for s in ("train", "val", "test"))
    check_input_size(cfg.judge_arch, len(class_names), train[0].shape[1], train[0].shape[-1], key="filter.judge_arch")
    pool = dataset_to_tensors(prepared["pool"], label_column=None)[0] if "pool" in prepared else None
    syn = dataset_to_tensors(synthetic)
    if len(syn[0]) == 0:
        raise DataError(f"{paths.synthetic}: the synthetic dataset is empty. Re-run sample.")
    check_shapes({"prepared train split's": train[0].shape[1:], "synthetic": syn[0].shape[1:]}, str(paths.synthetic),
                 "sample")
    seeds = np.asarray(synthetic["seed"] if "seed" in synthetic.column_names else [-1] * len(synthetic), dtype=np.int64)
    images = Images(class_names, train, val, test, pool, syn, seeds, source_columns(synthetic))
    return images, synthetic, {"synthetic": syn_summary.get("fingerprint"), "prepared": prepared_fp}


def checks_off(cfg: FilterConfig) -> list[str]:
    """The per-image checks that the settings turn off (the micro profile turns off what an untrained generator
    cannot pass), each with the key that does it."""
    return [what for what, off in (("judge confidence (filter.min_confidence: 0)", cfg.min_confidence == 0),
                                   ("realism (filter.require_realism: false)", not cfg.require_realism),
                                   ("memorisation (filter.memorization_ratio: 0)", cfg.memorization_ratio == 0)) if off]


def write_outputs(paths: Paths, synthetic: datasets.Dataset, scores: pd.DataFrame, summary: dict) -> None:
    """``data/filtered``: the accepted rows of the synthetic set, the scores, the summary (all or none)."""
    with atomic_path(paths.filtered, is_dir=True) as tmp:
        synthetic.select(np.flatnonzero(scores["accepted"].to_numpy()).tolist()).save_to_disk(str(tmp / "dataset"))
        scores.to_parquet(tmp / "scores.parquet", index=False)
        write_json(tmp / "summary.json", summary)


def source_columns(synthetic: datasets.Dataset) -> dict[str, np.ndarray]:
    """Strength and source of each image (generated ones: strength 1, no source)."""
    n, cols = len(synthetic), synthetic.column_names
    def column(name, default, dtype):
        return np.asarray(list(synthetic[name]) if name in cols else [default] * n, dtype=dtype)
    return {"strength": column("strength", 1.0, float), "source_split": column("source_split", "", object),
            "source_index": column("source_index", -1, np.int64)}


def log_outcome(summary: dict, seconds: float) -> None:
    """What was kept, why the rest was not, and the Frechet distance before and after."""
    acc, m = summary["acceptance"], summary["metrics"]
    if acc["classes_without_accepted"]:
        log.warning("filter: no image accepted in classes %s", acc["classes_without_accepted"])
    log.info("filter: kept %d of %d (%s); FD %s -> %s (real floor at those N: %s, %s) in %.0f s", acc["accepted"],
             acc["generated"], {k: v for k, v in acc["rejected_by_first_reason"].items() if v}, _fmt(m["before"]),
             _fmt(m["after"]), f'{_fmt(m["floor"])} / {_fmt(m["floor_at_accepted_n"])}', summary["feature_space"],
             seconds)


def _fmt(m: dict) -> str:
    v = m["frechet_distance"]["value"]
    return "n/a" if v is None else f"{v:.3g}"


def main(argv: list[str] | None = None) -> None:
    stage_main("filter", run, argv)


if __name__ == "__main__":
    main()
