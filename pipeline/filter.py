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

import json
import logging
import math
import time

import numpy as np
import pandas as pd
import torch

from pipeline.config import FilterConfig, Params, Paths, resolve_device
from pipeline.features import (FeatureSpace, cached_features, clip_scores, load_clip, nearest,
                               per_class_metrics, pixel_hashes, realism, set_metrics, state_fingerprint)
from pipeline.storage import (atomic_path, class_names_of, dataset_to_tensors, load_dataset_dir,
                              sha256_tensor, write_json)

log = logging.getLogger(__name__)

# rejection reasons, in the order they are checked (an image gets the first that applies)
REASONS = ("duplicate", "copy_of_train", "copy_of_test", "memorized", "low_confidence", "unrealistic",
           "low_clip_score", "below_top_fraction", "balance")


# ---- judge ------------------------------------------------------------------------------

def train_judge(cfg: FilterConfig, train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor],
                num_classes: int, seed: int, device: str) -> tuple[torch.nn.Module, dict]:
    """A timm classifier (cfg.judge_arch) trained on the real labeled train split, selected on val."""
    from pipeline.train_classifier import build_model, fit_classifier

    model = build_model(cfg.judge_arch, num_classes, int(train[0].shape[1]))
    return fit_classifier(model, train[0], train[1], val[0], val[1], steps=cfg.judge_steps,
                          batch_size=cfg.judge_batch_size, lr=cfg.judge_lr, weight_decay=0.05, seed=seed,
                          device=device, augment="standard", eval_every=max(1, cfg.judge_steps // 5),
                          progress=False)


def judge_scores(judge: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, device: str
                 ) -> dict[str, np.ndarray]:
    """Probability of the intended label, margin top1 - top2 of the probabilities, predicted class."""
    from pipeline.train_classifier import predict_proba

    p = predict_proba(judge, x, batch_size, device)
    top2 = p.topk(min(2, p.shape[1]), dim=1).values
    margin = top2[:, 0] - (top2[:, 1] if top2.shape[1] > 1 else 0)
    return {"confidence": p[torch.arange(len(y)), y].numpy(), "margin": margin.numpy(),
            "predicted": p.argmax(1).numpy()}


# ---- selection (pure) --------------------------------------------------------------------

def duplicate_flags(syn_x: torch.Tensor, train_x: torch.Tensor, test_x: torch.Tensor) -> dict[str, np.ndarray]:
    """Exact pixel duplicates: within the synthetic set (all but the first copy) and of real images."""
    h = pixel_hashes(syn_x)
    first = pd.Series(h).duplicated(keep="first").to_numpy()
    return {"duplicate": first,
            "copy_of_train": np.isin(h, pixel_hashes(train_x)),
            "copy_of_test": np.isin(h, pixel_hashes(test_x))}


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


# ---- stage ---------------------------------------------------------------------------------

def _clip_column(cfg: FilterConfig, syn_x, syn_y, class_names, device) -> tuple[np.ndarray, dict]:
    if not cfg.clip.checkpoint:
        return np.full(len(syn_x), np.nan), {
            "used": False, "why": "filter.clip.checkpoint not set (no CLIP weights are installed here; "
                                  "point it at a local CLIPModel/CLIPProcessor folder to score images)"}
    model, proc = load_clip(cfg.clip.checkpoint, device)
    s = clip_scores(model, proc, syn_x, syn_y, class_names, cfg.clip.prompt, cfg.batch_size, device)
    return s.numpy(), {"used": True, "checkpoint": cfg.clip.checkpoint, "prompt": cfg.clip.prompt,
                       "min_score": cfg.clip.min_score, "score": "100 * max(cos(image, prompt), 0)"}


def _load_or_train_judge(cfg, train, val, num_classes, seed, device, cache_dir):
    from safetensors.torch import load_file, save_file
    from pipeline.train_classifier import build_model

    key = sha256_tensor(torch.cat([train[0].flatten(), val[0].flatten()]))[:12] + \
        f"-{sha256_tensor(torch.cat([train[1], val[1]]))[:8]}-{cfg.judge_arch}-s{cfg.judge_steps}" \
        f"-lr{cfg.judge_lr}-b{cfg.judge_batch_size}-seed{seed}"
    path = cache_dir / f"judge-{key}.safetensors"
    if path.exists():
        model = build_model(cfg.judge_arch, num_classes, int(train[0].shape[1]))
        model.load_state_dict(load_file(str(path)))
        meta = path.with_suffix(".json")
        hist = json.loads(meta.read_text()) if meta.exists() else {}
        log.info("filter: judge from cache %s", path.name)
        return model.eval(), hist
    model, hist = train_judge(cfg, train, val, num_classes, seed, device)
    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp))
    keep = {k: hist[k] for k in ("best_val_acc", "best_step", "steps", "seconds") if k in hist}
    write_json(path.with_suffix(".json"), keep)
    return model.eval(), keep


def run(params: Params, paths: Paths = Paths()) -> dict:
    cfg, seed, t0 = params.filter, params.base.seed, time.time()
    device = resolve_device(params.base)
    prepared = load_dataset_dir(paths.prepared / "dataset", "prepared dataset")
    synthetic = load_dataset_dir(paths.synthetic / "dataset", "synthetic dataset")
    class_names = class_names_of(prepared["train"])
    if class_names_of(synthetic) != class_names:
        from pipeline.prepare import DataError
        raise DataError(f"{paths.synthetic}: synthetic class names {class_names_of(synthetic)} differ from the "
                        f"prepared ones {class_names}. Re-run train_generator and sample on this data.")
    K = len(class_names)
    train, val, test = (dataset_to_tensors(prepared[s]) for s in ("train", "val", "test"))
    pool_x = dataset_to_tensors(prepared["pool"], label_column=None)[0] if "pool" in prepared else None
    syn_x, syn_y = dataset_to_tensors(synthetic)
    if len(syn_x) == 0:
        from pipeline.prepare import DataError
        raise DataError(f"{paths.synthetic}: the synthetic dataset is empty. Re-run sample.")
    cache = paths.feature_cache
    log.info("filter: %d synthetic images, %d classes, feature space %s, device %s", len(syn_x), K,
             cfg.feature_space, device)

    judge, judge_hist = _load_or_train_judge(cfg, train, val, K, seed, device, cache)
    js = judge_scores(judge, syn_x, syn_y, cfg.batch_size, device)
    space = FeatureSpace(cfg.feature_space, device=device, batch_size=cfg.batch_size,
                         resolution=cfg.feature_resolution, inception_weights=cfg.inception_weights,
                         judge=judge, judge_in_chans=int(train[0].shape[1]))
    t_feat = time.time()
    f_syn = space(syn_x)
    syn_seconds = time.time() - t_feat
    labeled_x = torch.cat([train[0], val[0]])
    labeled_y = torch.cat([train[1], val[1]])
    f_train = cached_features(space, train[0], cache, "train")
    f_labeled = torch.cat([f_train, cached_features(space, val[0], cache, "val")])
    f_manifold = f_labeled[: cfg.max_real]
    if pool_x is not None and len(f_manifold) < cfg.max_real:
        extra = pool_x[: cfg.max_real - len(f_manifold)]
        f_manifold = torch.cat([f_manifold, cached_features(space, extra, cache, "pool")])
    ref_idx = stratified_subset(test[1], cfg.max_real, K, seed)
    f_ref, ref_y = cached_features(space, test[0][ref_idx], cache, "test-ref"), test[1][ref_idx]

    inside, real_score = realism(f_syn, f_manifold, k=cfg.realism_k)
    nn_train = nearest(f_syn, f_train)
    train_nn = nearest(f_train, f_train, exclude_self=True)
    memo_threshold = cfg.memorization_ratio * float(train_nn.median())
    clip_col, clip_info = _clip_column(cfg, syn_x, syn_y, class_names, device)
    dup = duplicate_flags(syn_x, labeled_x, test[0])
    seeds = synthetic["seed"] if "seed" in synthetic.column_names else [-1] * len(syn_x)
    scores = pd.DataFrame({
        "index": np.arange(len(syn_x)), "label": syn_y.numpy(), "seed": np.asarray(seeds, dtype=np.int64),
        "confidence": js["confidence"], "margin": js["margin"], "predicted": js["predicted"],
        "realism": real_score.numpy(), "inside_manifold": inside.numpy(),
        "nn_train_distance": nn_train.numpy(), "clip_score": clip_col, **dup,
    })
    scores = select(scores, cfg, K, memo_threshold)
    keep = torch.from_numpy(scores["accepted"].to_numpy().copy())

    label = space.label
    mkw = {"k": cfg.realism_k, "kid_subsets": cfg.kid_subsets, "seed": seed}
    n_floor = min(len(f_labeled), len(syn_x))
    floor_idx = stratified_subset(labeled_y, n_floor, K, seed)
    metrics = {
        "feature_space": label, "reference": f"real test subset, class-stratified (n={len(f_ref)})",
        "before": set_metrics(f_syn, f_ref, label, **mkw),
        "after": set_metrics(f_syn[keep], f_ref, label, **mkw),
        "floor": {"what": "real labeled train+val images vs the same test reference: the value a perfect "
                          "generator would reach at this N", **set_metrics(f_labeled[floor_idx], f_ref, label, **mkw)},
        "floor_at_accepted_n": {  # the metrics are biased by N: compare "after" with this one
            "what": "the same floor with as many real images as were accepted",
            **set_metrics(f_labeled[stratified_subset(labeled_y, min(len(f_labeled), int(keep.sum())), K, seed)],
                          f_ref, label, **mkw)},
        "per_class": {
            "before": per_class_metrics(f_syn, syn_y, f_ref, ref_y, class_names, label, **mkw),
            "after": per_class_metrics(f_syn[keep], syn_y[keep], f_ref, ref_y, class_names, label, **mkw),
            "floor": per_class_metrics(f_labeled, labeled_y, f_ref, ref_y, class_names, label, **mkw),
        },
    }
    summary = {
        "feature_space": label, "feature_space_param": cfg.feature_space,
        "note": "metrics in this feature space are not comparable with published Inception FID values"
        if cfg.feature_space != "inception" else "torch-fidelity inception-v3-compat features",
        "n": {"synthetic": len(syn_x), "accepted": int(keep.sum()), "metric_reference": len(f_ref),
              "manifold_reference": len(f_manifold), "train": len(f_train), "floor_real": n_floor},
        "acceptance": acceptance_summary(scores, class_names),
        "thresholds": {"min_confidence": cfg.min_confidence, "require_realism": cfg.require_realism,
                       "realism_k": cfg.realism_k, "memorization_ratio": cfg.memorization_ratio,
                       "memorization_distance": memo_threshold, "median_train_nn_distance": float(train_nn.median()),
                       "keep_top_fraction": cfg.keep_top_fraction, "balance": cfg.balance,
                       "clip_min_score": cfg.clip.min_score},
        "judge": {"arch": cfg.judge_arch, "val_accuracy": judge_hist.get("best_val_acc"),
                  "steps": cfg.judge_steps, "fingerprint": state_fingerprint(judge),
                  "synthetic_agreement": float((js["predicted"] == syn_y.numpy()).mean())},
        "clip": clip_info, "metrics": metrics,
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


def _fmt(m: dict) -> str:
    v = m["frechet_distance"]["value"]
    return "n/a" if v is None else f"{v:.3g}"


def main(argv: list[str] | None = None) -> None:
    from pipeline.cli import stage_main
    stage_main("filter", run, argv)


if __name__ == "__main__":
    main()
