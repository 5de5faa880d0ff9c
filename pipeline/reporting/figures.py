"""The report's pictures: matplotlib figures and base64 image grids (no file I/O)."""
from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline.core.images import dataset_to_tensors, make_grid_image
from pipeline.core.plotting import png_b64, pyplot
from pipeline.reporting.tables import per_class_gain


def fig_variants(table: pd.DataFrame):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 0.5 + 0.45 * len(table)))
    t = table.sort_values("accuracy")
    low, high = t["accuracy_low"].fillna(t["accuracy"]), t["accuracy_high"].fillna(t["accuracy"])  # 1 seed: no CI
    err = np.array([t["accuracy"] - low, high - t["accuracy"]]) * 100
    colors = ["#2a9d8f" if "synthetic" in v else "#8d99ae" for v in t.index]
    ax.barh(t.index, t["accuracy"] * 100, xerr=err, color=colors, capsize=3)
    lo = max(0.0, float(low.min()) * 100 - 5)
    ax.set_xlim(lo, min(100, float(high.max()) * 100 + 2))
    ax.set_xlabel("test accuracy (%), mean and 95% CI over seeds")
    fig.tight_layout()
    return fig


def fig_per_class_gain(df: pd.DataFrame):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.bar(df["class"], df["gain"] * 100, color=["#2a9d8f" if g >= 0 else "#e76f51" for g in df["gain"]])
    ax.axhline(0, color="black", lw=0.8)
    ax.set_ylabel(f"accuracy gain vs {df['baseline'].iloc[0]} (points)")
    ax.set_title(f"per-class gain of {df['variant'].iloc[0]}")
    ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    return fig


def fig_loss(loss: pd.DataFrame):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.plot(loss["step"], loss["loss"], lw=0.6, alpha=0.4, label="loss")
    ax.plot(loss["step"], loss["loss"].rolling(20, min_periods=1).mean(), lw=1.5, label="moving mean (20)")
    ax.set_xlabel("step"), ax.set_ylabel("diffusion loss"), ax.legend()
    fig.tight_layout()
    return fig


def fig_scores(scores: pd.DataFrame, thresholds: dict[str, float]):
    cols = [c for c in ("confidence", "margin", "realism", "nn_train_distance", "clip_score")
            if c in scores and scores[c].notna().any()]
    plt = pyplot()
    fig, axes = plt.subplots(1, max(1, len(cols)), figsize=(3.2 * max(1, len(cols)), 2.8))
    for ax, c in zip(np.atleast_1d(axes), cols):
        ax.hist([scores.loc[scores["accepted"], c].dropna(), scores.loc[~scores["accepted"], c].dropna()],
                bins=30, stacked=True, label=["accepted", "rejected"], color=["#2a9d8f", "#e76f51"])
        if thresholds.get(c) is not None:
            ax.axvline(thresholds[c], color="black", ls="--", lw=1)
        ax.set_title(c)
    np.atleast_1d(axes)[0].legend()
    fig.tight_layout()
    return fig


def fig_ratio_sweep(sweeps: dict[str, list[dict]]):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3))
    for name, pts in sweeps.items():
        ax.plot([p["ratio"] for p in pts], [100 * p["val_accuracy"] for p in pts], marker="o", label=name)
    ax.set_xlabel("synthetic share of each batch"), ax.set_ylabel("validation accuracy (%)"), ax.legend()
    fig.tight_layout()
    return fig


def class_grids(ds, labels: np.ndarray, per_class: int, num_classes: int) -> dict[int, str]:
    """Base64 PNG grid of up to ``per_class`` images of each class (row order of ``ds``)."""
    out = {}
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)[:per_class].tolist()
        if idx:
            x, _ = dataset_to_tensors(ds.select(idx), label_column=None)
            grid = make_grid_image(x, nrow=per_class)
            k = max(1, 48 // grid.height)  # small images: integer upscale, so pixels stay square
            out[c] = png_b64(grid.resize((grid.width * k, grid.height * k), resample=0))
    return out


def report_figures(table: pd.DataFrame, variants: dict[str, dict], answer: dict, names: list[str],
                   loss: pd.DataFrame | None, scores: pd.DataFrame | None, thresholds: dict
                   ) -> tuple[dict, dict[str, pd.DataFrame]]:
    """The report's figures by name, and the tables behind those that ``dvc plots`` shows."""
    figs, csvs = {"variants": fig_variants(table)}, {}
    top = next((f for f in answer["findings"] if f["a"] == answer["synthetic_variant"]), None)
    if top:  # the headline's pair: the synthetic variant against the best without (else real, classic)
        gain = per_class_gain(variants, top["a"], names, top["b"])
        figs["per_class_gain"], csvs["per_class_gain"] = fig_per_class_gain(gain), gain
    sweeps = {k: [{"ratio": float(r), "val_accuracy": a} for r, a in v["ratio_sweep"].items()]
              for k, v in variants.items() if v.get("ratio_sweep")}
    if sweeps:
        figs["ratio_sweep"] = fig_ratio_sweep(sweeps)
    if loss is not None:
        figs["generator_loss"], csvs["generator_loss"] = fig_loss(loss), loss
    if scores is not None and len(scores):
        figs["filter_scores"] = fig_scores(scores, {"confidence": thresholds.get("min_confidence"),
                                                    "nn_train_distance": thresholds.get("memorization_distance"),
                                                    "clip_score": thresholds.get("clip_min_score")})
    return figs, csvs


def sample_grids(real, synthetic, scores: pd.DataFrame | None, num_classes: int, per_class: int
                 ) -> tuple[dict[str, dict], dict[int, str]]:
    """Grids of real, accepted and rejected synthetic images (``synthetic`` None: real only) per
    class, and why each class's rejected ones were rejected."""
    grids = {"real": class_grids(real, np.asarray(real["label"]), per_class, num_classes)}
    reasons: dict[int, str] = {}
    if synthetic is not None:
        accepted = scores["accepted"].to_numpy()
        for key, mask in (("accepted", accepted), ("rejected", ~accepted)):
            labels = np.full(len(synthetic), -1)
            labels[scores["index"].to_numpy()[mask]] = scores["label"].to_numpy()[mask]
            grids[key] = class_grids(synthetic, labels, per_class, num_classes)
        rejected = scores[~accepted]
        for c in range(num_classes):
            r = rejected[rejected["label"] == c]["reason"].head(per_class)
            reasons[c] = ", ".join(f"{k} x{n}" for k, n in r.value_counts().items())
    return grids, reasons
