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

import numpy as np
import pandas as pd
import torch

from pipeline.config import Params, Paths
from pipeline.core.device import policy_for
from pipeline.core.entrypoint import stage_main
from pipeline.core.images import class_names_of, dataset_to_tensors
from pipeline.core.io import atomic_path, check_writable, fingerprint, load_dataset_dir, read_output, write_json
from pipeline.core.splits import stratified_subset
from pipeline.errors import DataError
from pipeline.models.classifier import check_input_size
from pipeline.quality.clip import clip_column
from pipeline.quality.features import FeatureSpace, cached_features, state_fingerprint
from pipeline.quality.judge import judge_scores, load_or_train_judge
from pipeline.quality.metrics import nearest, quality_summary, realism
from pipeline.quality.selection import acceptance_summary, duplicate_flags, select

log = logging.getLogger(__name__)


def run(params: Params, paths: Paths = Paths()) -> dict:
    cfg, seed, t0 = params.filter, params.base.seed, time.time()
    check_writable(paths.filtered, paths.feature_cache)
    policy = policy_for(params.base)
    device = policy.device
    prepared_fp = read_output(paths, "prepared").get("fingerprint")
    syn_summary = read_output(paths, "synthetic")  # refused when made by an older generator or from other data
    prepared = load_dataset_dir(paths.prepared / "dataset", "prepare")
    synthetic = load_dataset_dir(paths.synthetic / "dataset", "sample")
    class_names = class_names_of(prepared["train"])
    if class_names_of(synthetic) != class_names:
        raise DataError(f"{paths.synthetic}: synthetic class names {class_names_of(synthetic)} differ from the "
                        f"prepared ones {class_names}. Re-run train_generator and sample on this data.")
    K = len(class_names)
    train, val, test = (dataset_to_tensors(prepared[s]) for s in ("train", "val", "test"))
    check_input_size(cfg.judge_arch, K, train[0].shape[1], train[0].shape[-1], key="filter.judge_arch")
    pool_x = dataset_to_tensors(prepared["pool"], label_column=None)[0] if "pool" in prepared else None
    syn_x, syn_y = dataset_to_tensors(synthetic)
    if len(syn_x) == 0:
        raise DataError(f"{paths.synthetic}: the synthetic dataset is empty. Re-run sample.")
    cache = paths.feature_cache
    log.info("filter: %d synthetic images, %d classes, feature space %s, device %s", len(syn_x), K,
             cfg.feature_space, device)

    judge, judge_hist = load_or_train_judge(cfg, train, val, K, seed, policy, cache)
    js = judge_scores(judge, syn_x, syn_y, cfg.batch_size, policy)
    space = FeatureSpace(cfg.feature_space, device=device, batch_size=cfg.batch_size,
                         resolution=cfg.feature_resolution, inception_weights=cfg.inception_weights,
                         judge=judge, judge_in_chans=int(train[0].shape[1]))
    t_feat = time.time()
    f_syn = space(syn_x)
    syn_seconds = time.time() - t_feat
    f_train = cached_features(space, train[0], cache, "train")
    f_real = torch.cat([f_train, cached_features(space, val[0], cache, "val")])  # the labeled images
    f_manifold = f_real[: cfg.max_real]
    if pool_x is not None and len(f_manifold) < cfg.max_real:
        extra = pool_x[: cfg.max_real - len(f_manifold)]
        f_manifold = torch.cat([f_manifold, cached_features(space, extra, cache, "pool")])
    ref_idx = stratified_subset(test[1], cfg.max_real, K, seed)
    f_ref, ref_y = cached_features(space, test[0][ref_idx], cache, "test-ref"), test[1][ref_idx]

    inside, real_score = realism(f_syn, f_manifold, k=cfg.realism_k)
    src = source_columns(synthetic)
    from_train = torch.where(torch.tensor(src["source_split"] == "train"), torch.from_numpy(src["source_index"]), -1)
    nn_train = nearest(f_syn, f_train, exclude=from_train)  # an img2img variation is not a copy of its own source
    train_nn = nearest(f_train, f_train, exclude_self=True)
    memo_threshold = cfg.memorization_ratio * float(train_nn.median())
    src_dist = source_distances(space, src, f_syn, f_train, pool_x)
    clip_col, clip_info = clip_column(cfg, syn_x, syn_y, class_names, device)
    dup = duplicate_flags(syn_x, torch.cat([train[0], val[0]]), test[0])
    seeds = synthetic["seed"] if "seed" in synthetic.column_names else [-1] * len(syn_x)
    scores = pd.DataFrame({
        "index": np.arange(len(syn_x)), "label": syn_y.numpy(), "seed": np.asarray(seeds, dtype=np.int64),
        "confidence": js["confidence"], "margin": js["margin"], "predicted": js["predicted"],
        "realism": real_score.numpy(), "inside_manifold": inside.numpy(),
        "nn_train_distance": nn_train.numpy(), "clip_score": clip_col, **dup, **src,
        "source_distance": src_dist, "near_copy_of_source": src_dist < memo_threshold,
    })
    scores = select(scores, cfg, K, memo_threshold)
    keep = torch.from_numpy(scores["accepted"].to_numpy().copy())

    label = space.label
    metrics = quality_summary(f_syn, syn_y, keep, f_ref, ref_y, f_real, torch.cat([train[1], val[1]]), class_names,
                              label, k=cfg.realism_k, kid_subsets=cfg.kid_subsets, seed=seed)
    summary = {
        "feature_space": label, "feature_space_param": cfg.feature_space,
        "note": "metrics in this feature space are not comparable with published Inception FID values"
        if cfg.feature_space != "inception" else "torch-fidelity inception-v3-compat features",
        "n": {"synthetic": len(syn_x), "accepted": int(keep.sum()), "metric_reference": len(f_ref),
              "manifold_reference": len(f_manifold), "train": len(f_train),
              "floor_real": min(len(f_real), len(syn_x))},
        "acceptance": acceptance_summary(scores, class_names),
        "near_copies_of_source": near_copy_summary(scores),
        "thresholds": {"min_confidence": cfg.min_confidence, "require_realism": cfg.require_realism,
                       "realism_k": cfg.realism_k, "memorization_ratio": cfg.memorization_ratio,
                       "memorization_distance": memo_threshold, "median_train_nn_distance": float(train_nn.median()),
                       "keep_top_fraction": cfg.keep_top_fraction, "balance": cfg.balance,
                       "clip_min_score": cfg.clip.min_score},
        "judge": {"arch": cfg.judge_arch, "val_accuracy": judge_hist.get("best_val_acc"),
                  "steps": cfg.judge_steps, "fingerprint": state_fingerprint(judge),
                  "synthetic_agreement": float((js["predicted"] == syn_y.numpy()).mean())},
        "clip": clip_info, "metrics": metrics,
        "inputs": {"synthetic": syn_summary.get("fingerprint"), "prepared": prepared_fp},
        "fingerprint": fingerprint(syn_summary.get("fingerprint"), scores["index"][scores["accepted"]].tolist()),
        "timing": {"seconds": time.time() - t0, "synthetic_features_per_second": len(syn_x) / max(syn_seconds, 1e-9)},
        "params": params.resolved(),
    }
    acc = summary["acceptance"]
    if acc["classes_without_accepted"]:
        log.warning("filter: no image accepted in classes %s", acc["classes_without_accepted"])
    with atomic_path(paths.filtered, is_dir=True) as tmp:
        synthetic.select(np.flatnonzero(scores["accepted"].to_numpy()).tolist()).save_to_disk(str(tmp / "dataset"))
        scores.to_parquet(tmp / "scores.parquet", index=False)
        write_json(tmp / "summary.json", summary)
    log.info("filter: kept %d of %d (%s); FD %s -> %s (real floor at those N: %s, %s) in %.0f s", acc["accepted"], acc["generated"],
             {k: v for k, v in acc["rejected_by_first_reason"].items() if v},
             _fmt(metrics["before"]), _fmt(metrics["after"]), f'{_fmt(metrics["floor"])} / '
             f'{_fmt(metrics["floor_at_accepted_n"])}', label, time.time() - t0)
    return summary


def source_columns(synthetic) -> dict[str, np.ndarray]:
    """Strength and source of each image (generated ones: strength 1, no source)."""
    n, cols = len(synthetic), synthetic.column_names
    def column(name, default, dtype):
        return np.asarray(list(synthetic[name]) if name in cols else [default] * n, dtype=dtype)
    return {"strength": column("strength", 1.0, float), "source_split": column("source_split", "", object),
            "source_index": column("source_index", -1, np.int64)}


def source_distances(space, src: dict, f_syn: torch.Tensor, f_train: torch.Tensor, pool_x) -> np.ndarray:
    """Feature distance of each img2img image to its own source image (NaN without one)."""
    out = np.full(len(f_syn), np.nan)
    for split, feats in (("train", lambda idx: f_train[idx]),
                         ("pool", lambda idx: space(pool_x[idx]))):  # pool sources exist only with a pool
        rows = np.flatnonzero(src["source_split"] == split)
        if len(rows):
            f_src = feats(torch.from_numpy(src["source_index"][rows]))
            out[rows] = (f_syn[rows].double() - f_src.double()).norm(dim=1).numpy()
    return out


def near_copy_summary(scores: pd.DataFrame) -> dict:
    """img2img images closer to their own source than the memorisation distance, per strength
    (counted and reported, not rejected: they are the source image, slightly changed)."""
    with_source = scores[scores["source_split"] != ""]
    return {str(s): {"images": int(len(g)), "near_copies": int(g["near_copy_of_source"].sum()),
                     "median_source_distance": float(g["source_distance"].median())}
            for s, g in with_source.groupby("strength")}


def _fmt(m: dict) -> str:
    v = m["frechet_distance"]["value"]
    return "n/a" if v is None else f"{v:.3g}"


def main(argv: list[str] | None = None) -> None:
    stage_main("filter", run, argv)


if __name__ == "__main__":
    main()
