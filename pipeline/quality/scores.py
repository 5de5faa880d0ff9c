"""The filter's computation: features of the synthetic and real sets, one score row per synthetic
image, and the summary of what was kept and why. Tensors and tables in, tables and dicts out."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline.config import FilterConfig
from pipeline.core.splits import stratified_subset
from pipeline.quality.features import FeatureSpace, cached_features, state_fingerprint
from pipeline.quality.metrics import nearest, realism
from pipeline.quality.selection import acceptance_summary, duplicate_flags

Split = tuple[torch.Tensor, torch.Tensor]  # uint8 N,C,H,W images and their labels


@dataclass(frozen=True)
class Images:
    """What the filter reads: the real splits, the pool's images (None without a pool), the synthetic
    images with their seeds and sources (strength, source_split, source_index: see sample)."""
    class_names: list[str]
    train: Split
    val: Split
    test: Split
    pool: torch.Tensor | None
    syn: Split
    seeds: np.ndarray
    sources: dict[str, np.ndarray]


@dataclass(frozen=True)
class Features:
    """Features of the synthetic images and of the real sets they are measured against."""
    syn: torch.Tensor
    train: torch.Tensor  # labeled train images: memorisation
    real: torch.Tensor  # labeled train + val images: the real-vs-real floor
    real_y: torch.Tensor
    manifold: torch.Tensor  # up to max_real labeled images, topped up from the pool: realism
    ref: torch.Tensor  # a class-stratified test subset: the metric reference
    ref_y: torch.Tensor


def extract_features(space: FeatureSpace, images: Images, max_real: int, seed: int, cache_dir: Path
                     ) -> tuple[Features, float]:
    """Features of every synthetic image and of the real sets (cached), and the seconds the synthetic ones took."""
    t0 = time.time()
    syn = space(images.syn[0])
    seconds = time.time() - t0
    train = cached_features(space, images.train[0], cache_dir, "train")
    real = torch.cat([train, cached_features(space, images.val[0], cache_dir, "val")])
    manifold = real[:max_real]
    if images.pool is not None and len(manifold) < max_real:
        extra = images.pool[: max_real - len(manifold)]
        manifold = torch.cat([manifold, cached_features(space, extra, cache_dir, "pool")])
    ref_idx = stratified_subset(images.test[1], max_real, len(images.class_names), seed)
    ref = cached_features(space, images.test[0][ref_idx], cache_dir, "test-ref")
    real_y = torch.cat([images.train[1], images.val[1]])
    return Features(syn, train, real, real_y, manifold, ref, images.test[1][ref_idx]), seconds


def score_table(cfg: FilterConfig, images: Images, feats: Features, space: FeatureSpace,
                judged: dict[str, np.ndarray], clip: np.ndarray) -> tuple[pd.DataFrame, dict[str, float]]:
    """One row per synthetic image (the judge's scores, realism, distance to the nearest train image,
    CLIP score, exact copies, source and distance to it), and the memorisation distance
    (``memorization_ratio`` x the median distance between train images) with that median."""
    syn_x, syn_y = images.syn
    src = images.sources
    inside, real_score = realism(feats.syn, feats.manifold, k=cfg.realism_k)
    from_train = torch.where(torch.tensor(src["source_split"] == "train"), torch.from_numpy(src["source_index"]), -1)
    nn_train = nearest(feats.syn, feats.train, exclude=from_train)  # a variation is not a copy of its own source
    median_nn = float(nearest(feats.train, feats.train, exclude_self=True).median())
    memorization = cfg.memorization_ratio * median_nn
    src_dist = source_distances(space, src, feats.syn, feats.train, images.pool)
    dup = duplicate_flags(syn_x, torch.cat([images.train[0], images.val[0]]), images.test[0])
    scores = pd.DataFrame({
        "index": np.arange(len(syn_x)), "label": syn_y.numpy(), "seed": images.seeds, **judged,
        "realism": real_score.numpy(), "inside_manifold": inside.numpy(), "nn_train_distance": nn_train.numpy(),
        "clip_score": clip, **dup, **src, "source_distance": src_dist, "near_copy_of_source": src_dist < memorization,
    })
    return scores, {"memorization_distance": memorization, "median_train_nn_distance": median_nn}


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


def filter_summary(cfg: FilterConfig, scores: pd.DataFrame, feats: Features, class_names: list[str],
                   distances: dict[str, float], judge: torch.nn.Module, judge_hist: dict, clip: dict,
                   metrics: dict) -> dict:
    """What was kept and why, the thresholds, the judge, CLIP and the set metrics (from ``quality_summary``)."""
    return {
        "feature_space": metrics["feature_space"], "feature_space_param": cfg.feature_space,
        "note": "metrics in this feature space are not comparable with published Inception FID values"
        if cfg.feature_space != "inception" else "torch-fidelity inception-v3-compat features",
        "n": {"synthetic": len(scores), "accepted": int(scores["accepted"].sum()), "metric_reference": len(feats.ref),
              "manifold_reference": len(feats.manifold), "train": len(feats.train),
              "floor_real": min(len(feats.real), len(scores))},
        "acceptance": acceptance_summary(scores, class_names),
        "near_copies_of_source": near_copy_summary(scores),
        "thresholds": {"min_confidence": cfg.min_confidence, "require_realism": cfg.require_realism,
                       "realism_k": cfg.realism_k, "memorization_ratio": cfg.memorization_ratio, **distances,
                       "keep_top_fraction": cfg.keep_top_fraction, "balance": cfg.balance,
                       "clip_min_score": cfg.clip.min_score},
        "judge": {"arch": cfg.judge_arch, "val_accuracy": judge_hist.get("best_val_acc"),
                  "steps": cfg.judge_steps, "fingerprint": state_fingerprint(judge),
                  "synthetic_agreement": float((scores["predicted"] == scores["label"]).mean())},
        "clip": clip, "metrics": metrics,
    }
