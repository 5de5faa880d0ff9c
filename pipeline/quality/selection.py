"""Which synthetic images to keep: every check per image, the first failing one named (pure)."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch

from pipeline.config import FilterConfig
from pipeline.core.images import image_hashes

# rejection reasons, in the order they are checked (an image gets the first that applies)
REASONS = ("duplicate", "copy_of_train", "copy_of_test", "memorized", "low_confidence", "unrealistic",
           "low_clip_score", "below_top_fraction", "balance")


def duplicate_flags(syn_x: torch.Tensor, train_x: torch.Tensor, test_x: torch.Tensor) -> dict[str, np.ndarray]:
    """Exact pixel duplicates: within the synthetic set (all but the first copy) and of real images."""
    h = image_hashes(syn_x)
    first = pd.Series(h).duplicated(keep="first").to_numpy()
    return {"duplicate": first,
            "copy_of_train": np.isin(h, image_hashes(train_x)),
            "copy_of_test": np.isin(h, image_hashes(test_x))}


def select(scores: pd.DataFrame, cfg: FilterConfig, num_classes: int, memorization_threshold: float) -> pd.DataFrame:
    """Add ``accepted`` and ``reason`` (first failing check, "" when kept) to a scores table."""
    df = scores.copy()
    fails = {
        "duplicate": df["duplicate"].to_numpy(bool),
        "copy_of_train": df["copy_of_train"].to_numpy(bool),
        "copy_of_test": df["copy_of_test"].to_numpy(bool),
        "memorized": df["nn_train_distance"].to_numpy() < memorization_threshold,
        "low_confidence": df["confidence"].to_numpy() < cfg.min_confidence,
        "unrealistic": (~df["inside_manifold"].to_numpy(bool)) if cfg.require_realism else np.zeros(len(df), bool),
        "low_clip_score": (df["clip_score"].to_numpy() < cfg.clip.min_score) if cfg.clip.min_score is not None
        else np.zeros(len(df), bool),
    }
    reason = np.full(len(df), "", dtype=object)
    for name, bad in fails.items():
        reason[(reason == "") & bad] = name
    labels, conf = df["label"].to_numpy(), df["confidence"].to_numpy()
    if cfg.keep_top_fraction < 1.0:  # per class, rank every generated image by confidence
        for c in range(num_classes):
            idx = np.flatnonzero(labels == c)
            order = idx[np.argsort(-conf[idx], kind="stable")]
            cut = order[math.ceil(cfg.keep_top_fraction * len(idx)):]
            reason[cut[reason[cut] == ""]] = "below_top_fraction"
    if cfg.balance:
        kept = [np.flatnonzero((labels == c) & (reason == "")) for c in range(num_classes)]
        nonzero = [len(k) for k in kept if len(k)]
        target = min(nonzero) if nonzero else 0
        for k in kept:
            order = k[np.argsort(-conf[k], kind="stable")]
            reason[order[target:]] = "balance"
    df["reason"] = reason.astype(str)
    df["accepted"] = df["reason"] == ""
    return df


def acceptance_summary(df: pd.DataFrame, class_names: list[str]) -> dict:
    per_class = {}
    for c, name in enumerate(class_names):
        sub = df[df["label"] == c]
        per_class[name] = {"generated": int(len(sub)), "accepted": int(sub["accepted"].sum()),
                           "rate": float(sub["accepted"].mean()) if len(sub) else None}
    rejected = df.loc[~df["accepted"], "reason"].value_counts()
    return {"generated": int(len(df)), "accepted": int(df["accepted"].sum()),
            "rate": float(df["accepted"].mean()) if len(df) else None,
            "per_class": per_class,
            "rejected_by_first_reason": {r: int(rejected.get(r, 0)) for r in REASONS},
            "classes_without_accepted": [n for n, v in per_class.items() if v["generated"] and not v["accepted"]]}


def confident_per_class(proba: torch.Tensor, threshold: float, per_class_cap: int, balance: bool = False
                        ) -> torch.Tensor:
    """Indices (ascending) of rows whose top probability is at least ``threshold``, at most
    ``per_class_cap`` per predicted class (0 = no cap), the most confident kept first; ``balance``:
    every class cut to the count of the class with the fewest (classes with none left out of the count)."""
    conf, pred = proba.max(1)
    keep = []
    for c in range(proba.shape[1]):
        idx = torch.nonzero((pred == c) & (conf >= threshold)).flatten()
        idx = idx[conf[idx].argsort(descending=True, stable=True)]
        keep.append(idx[:per_class_cap] if per_class_cap else idx)
    if balance:
        n = min((len(k) for k in keep if len(k)), default=0)
        keep = [k[:n] for k in keep]
    return torch.cat(keep).sort().values if keep else torch.zeros(0, dtype=torch.long)
