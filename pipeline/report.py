"""Stage 6, report: did the synthetic data help? Answer first, then the evidence.

Reads the classifier metrics of every variant, the filter summary and scores, the
synthetic and real images and the generator's loss curve. Writes ``reports/``:
``report.html`` (self-contained), ``report.md``, ``metrics.json`` (for ``dvc metrics``),
``figures/*.png`` and ``plots/*.csv`` (for ``dvc plots``).
"""
from __future__ import annotations

import base64
import io
import logging
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config import Paths, Params
from pipeline.stats import mean_ci, paired_difference
from pipeline.storage import (atomic_path, load_dataset_dir, make_grid_image, read_json, save_figure,
                              sha256_file, write_json)

log = logging.getLogger(__name__)
SYNTHETIC_VARIANTS = ("real+synthetic", "real+synthetic+classic")  # the ones that answer the question
METRICS = ("accuracy", "macro_f1", "ece")
PACKAGES = ("torch", "diffusers", "timm", "torch-fidelity", "datasets", "prefect", "dvc", "accelerate")


# ---- numbers (pure) -------------------------------------------------------------------

def seed_values(variant: dict, key: str) -> dict[int, float]:
    return {int(r["seed"]): float(r[key]) for r in variant["per_seed"]}


def variant_table(variants: dict[str, dict], baseline: str = "real") -> pd.DataFrame:
    """One row per variant: mean and 95% CI of each metric, paired difference to ``baseline``."""
    rows = []
    base = variants.get(baseline)
    for name, v in variants.items():
        row = {"variant": name, "seeds": len(v["per_seed"]), "n_test": v.get("n_test")}
        for m in METRICS:
            ci = mean_ci(list(seed_values(v, m).values()))
            row.update({f"{m}": ci["mean"], f"{m}_low": ci["low"], f"{m}_high": ci["high"]})
        if base is not None and name != baseline:
            a, b = seed_values(v, "accuracy"), seed_values(base, "accuracy")
            common = sorted(set(a) & set(b))
            d = paired_difference([a[s] for s in common], [b[s] for s in common])
            row.update({"diff": d["mean_diff"], "diff_low": d["low"], "diff_high": d["high"], "p_value": d["p_value"]})
        rows.append(row)
    return pd.DataFrame(rows).set_index("variant")


def pct(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{100 * x:.1f}"


def verdict(table: pd.DataFrame) -> dict:
    """The answer in one sentence, said plainly when synthetic data did not help."""
    n_test = int(table["n_test"].dropna().iloc[0]) if table["n_test"].notna().any() else None
    seeds = int(table["seeds"].min())
    best = str(table["accuracy"].idxmax())
    candidates = [v for v in SYNTHETIC_VARIANTS if v in table.index and "diff" in table and pd.notna(table.loc[v, "diff"])]
    out = {"best_variant": best, "n_test": n_test, "seeds": seeds, "helped": None}
    if not candidates:
        out["text"] = (f"No synthetic variant was trained, so this run cannot say whether synthetic data helps. "
                       f"Best variant: {best} ({pct(table.loc[best, 'accuracy'])}% accuracy).")
        return out
    syn = max(candidates, key=lambda v: table.loc[v, "diff"])
    r = table.loc[syn]
    helped = bool(r["diff_low"] > 0)
    p = "n/a" if pd.isna(r["p_value"]) else f"{r['p_value']:.3g}"
    gain = (f"{syn} vs real: {100 * r['diff']:+.1f} points accuracy (95% CI [{100 * r['diff_low']:+.1f}, "
            f"{100 * r['diff_high']:+.1f}], paired t-test p={p}; {seeds} seeds, N={n_test} real test images)")
    if helped:
        text = f"Yes, synthetic data helped. {gain}."
    elif r["diff"] > 0:
        text = f"Not shown: synthetic data did not significantly help. {gain}; the interval includes zero."
    else:
        text = f"No, synthetic data did not help. {gain}."
    if "real+classic" in table.index:
        classic = table.loc["real+classic", "accuracy"]
        beats = table.loc[syn, "accuracy"] > classic
        text += (f" Classic augmentation alone (real+classic) reaches {pct(classic)}%; the best synthetic variant "
                 f"{'scores above' if beats else 'does not score above'} it (not tested for significance).")
    text += f" Best variant overall: {best} ({pct(table.loc[best, 'accuracy'])}%)."
    out.update({"helped": helped, "synthetic_variant": syn, "gain": float(r["diff"]),
                "gain_low": float(r["diff_low"]), "gain_high": float(r["diff_high"]), "text": text})
    return out


def per_class_gain(variants: dict[str, dict], variant: str, class_names: list[str], baseline: str = "real") -> pd.DataFrame:
    def mean_per_class(v):
        rows = [[r["per_class_accuracy"].get(n) for n in class_names] for r in v["per_seed"]]
        return np.nanmean(np.array(rows, dtype=float), axis=0)
    gain = mean_per_class(variants[variant]) - mean_per_class(variants[baseline])
    return pd.DataFrame({"class": class_names, "gain": gain, "variant": variant})


QUALITY = ("frechet_distance", "kid", "precision", "recall")


def quality_rows(filter_summary: dict) -> list[dict]:
    """Set-level quality before / after filtering beside the real-vs-real floor."""
    m = filter_summary.get("metrics") or {}
    rows = []
    for key, label in (("floor", "real vs real (floor)"), ("before", "synthetic, all"),
                       ("floor_at_accepted_n", "real vs real at the accepted N (floor)"), ("after", "synthetic, accepted")):
        if key in m:
            first = next(v for v in m[key].values() if isinstance(v, dict) and "n_real" in v)
            rows.append({"set": label, **{q: (m[key].get(q) or {}).get("value") for q in QUALITY},
                         "n_real": first["n_real"], "n_other": first["n_synthetic"]})
    return rows


# ---- pictures -------------------------------------------------------------------------

def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def fig_variants(table: pd.DataFrame):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 0.5 + 0.45 * len(table)))
    t = table.sort_values("accuracy")
    err = np.array([t["accuracy"] - t["accuracy_low"], t["accuracy_high"] - t["accuracy"]]) * 100
    colors = ["#2a9d8f" if "synthetic" in v else "#8d99ae" for v in t.index]
    ax.barh(t.index, t["accuracy"] * 100, xerr=err, color=colors, capsize=3)
    lo = max(0.0, float(t["accuracy_low"].min()) * 100 - 5)
    ax.set_xlim(lo, min(100, float(t["accuracy_high"].max()) * 100 + 2))
    ax.set_xlabel("test accuracy (%), mean and 95% CI over seeds")
    fig.tight_layout()
    return fig


def fig_per_class_gain(df: pd.DataFrame):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.bar(df["class"], df["gain"] * 100, color=["#2a9d8f" if g >= 0 else "#e76f51" for g in df["gain"]])
    ax.axhline(0, color="black", lw=0.8)
    ax.set_ylabel("accuracy gain vs real (points)")
    ax.set_title(f"per-class gain of {df['variant'].iloc[0]}")
    ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    return fig


def fig_loss(loss: pd.DataFrame):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.plot(loss["step"], loss["loss"], lw=0.6, alpha=0.4, label="loss")
    ax.plot(loss["step"], loss["loss"].rolling(20, min_periods=1).mean(), lw=1.5, label="moving mean (20)")
    ax.set_xlabel("step"), ax.set_ylabel("diffusion loss"), ax.legend()
    fig.tight_layout()
    return fig


def fig_scores(scores: pd.DataFrame, thresholds: dict[str, float]):
    cols = [c for c in ("confidence", "margin", "realism", "nn_train_distance", "clip_score")
            if c in scores and scores[c].notna().any()]
    plt = _plt()
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
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3))
    for name, pts in sweeps.items():
        ax.plot([p["ratio"] for p in pts], [100 * p["val_accuracy"] for p in pts], marker="o", label=name)
    ax.set_xlabel("synthetic share of each batch"), ax.set_ylabel("validation accuracy (%)"), ax.legend()
    fig.tight_layout()
    return fig


def png_b64(fig_or_img) -> str:
    buf = io.BytesIO()
    if hasattr(fig_or_img, "savefig"):
        fig_or_img.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    else:
        fig_or_img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def class_grids(ds, labels: np.ndarray, per_class: int, num_classes: int) -> dict[int, str]:
    """Base64 PNG grid of up to ``per_class`` images of each class (row order of ``ds``)."""
    from pipeline.storage import dataset_to_tensors

    out = {}
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)[:per_class].tolist()
        if idx:
            x, _ = dataset_to_tensors(ds.select(idx), label_column=None)
            grid = make_grid_image(x, nrow=per_class)
            k = max(1, 48 // grid.height)  # small images: integer upscale, so pixels stay square
            out[c] = png_b64(grid.resize((grid.width * k, grid.height * k), resample=0))
    return out


# ---- stage ----------------------------------------------------------------------------

def run_metadata(paths: Paths, device: str) -> dict:
    def cmd(*args):
        try:
            return subprocess.run(args, cwd=paths.root, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""
    versions = {}
    for p in PACKAGES:
        try:
            versions[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            versions[p] = "not installed"
    return {"git_revision": cmd("git", "rev-parse", "--short", "HEAD") or "unknown",
            "git_dirty": bool(cmd("git", "status", "--porcelain", "--untracked-files=no")),
            "dvc_lock_sha256": _sha_or_none(paths.root / "dvc.lock"), "device": device,
            "python": platform.python_version(), "platform": platform.platform(), "packages": versions,
            "generated": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def _sha_or_none(p: Path):
    return sha256_file(p)[:12] if p.exists() else None


def generator_facts(paths: Paths) -> dict:
    """Kind, size, training and sampling cost of the generator (for the report's Generator section)."""
    f, s = paths.generator / "generator.json", paths.synthetic / "summary.json"
    if not f.exists():
        return {}
    g = read_json(f)
    facts = {"kind": g.get("kind", "unet"), "parameters_m": g.get("num_parameters", 0) / 1e6, "steps": g.get("steps"),
             "seconds": (g.get("timing") or {}).get("seconds"), "device": g.get("device"),
             "images_per_second": read_json(s).get("images_per_second") if s.exists() else None}
    if g.get("interpreter_val_accuracy") is not None:
        facts["interpreter"] = f"interpreter accuracy on val {100 * g['interpreter_val_accuracy']:.1f}% " \
                               f"(N={g.get('interpreter_val_n')})"
    return facts


def run(params: Params, paths: Paths = Paths()) -> dict:
    from pipeline.config import resolve_device

    cfg = params.report
    prepared = read_json(paths.prepared / "summary.json")
    names = prepared["class_names"]
    files = sorted(paths.classifier_metrics.glob("*.json"))
    if not files:
        raise FileNotFoundError(f"{paths.classifier_metrics}: no classifier metrics. Run train_classifier first.")
    variants = {f.stem: read_json(f) for f in files}
    order = [v for v in params.train_classifier.variants if v in variants] + sorted(set(variants) - set(params.train_classifier.variants))
    variants = {v: variants[v] for v in order}
    table = variant_table(variants)
    answer = verdict(table)
    figs, csvs = {"variants": fig_variants(table)}, {}
    if answer.get("synthetic_variant") and "real" in variants:
        gain = per_class_gain(variants, answer["synthetic_variant"], names)
        figs["per_class_gain"], csvs["per_class_gain"] = fig_per_class_gain(gain), gain
    sweeps = {k: [{"ratio": float(r), "val_accuracy": a} for r, a in v["ratio_sweep"].items()]
              for k, v in variants.items() if v.get("ratio_sweep")}
    if sweeps:
        figs["ratio_sweep"] = fig_ratio_sweep(sweeps)
    loss_file = paths.generator / "loss.csv"
    if loss_file.exists():
        loss = pd.read_csv(loss_file)
        figs["generator_loss"], csvs["generator_loss"] = fig_loss(loss), loss
    filt = read_json(paths.filtered / "summary.json") if (paths.filtered / "summary.json").exists() else {}
    scores = pd.read_parquet(paths.filtered / "scores.parquet") if (paths.filtered / "scores.parquet").exists() else None
    if scores is not None and len(scores):
        th = filt.get("thresholds", {})
        figs["filter_scores"] = fig_scores(scores, {"confidence": th.get("min_confidence"),
                                                    "nn_train_distance": th.get("memorization_distance"),
                                                    "clip_score": th.get("clip_min_score")})

    # sample grids: real, accepted synthetic, rejected synthetic (with reasons)
    grids: dict[str, dict] = {}
    real = load_dataset_dir(paths.prepared / "dataset", "prepared data")["train"]
    grids["real"] = class_grids(real, np.asarray(real["label"]), cfg.grid_per_class, len(names))
    reasons: dict[int, str] = {}
    if scores is not None and (paths.synthetic / "dataset").exists():
        syn = load_dataset_dir(paths.synthetic / "dataset", "synthetic data")
        for key, mask in (("accepted", scores["accepted"].to_numpy()), ("rejected", ~scores["accepted"].to_numpy())):
            sub = scores[mask]
            lab = np.full(len(syn), -1)
            lab[sub["index"].to_numpy()] = sub["label"].to_numpy()
            grids[key] = class_grids(syn, lab, cfg.grid_per_class, len(names))
        rej = scores[~scores["accepted"]]
        for c in range(len(names)):
            r = rej[rej["label"] == c]["reason"].head(cfg.grid_per_class)
            reasons[c] = ", ".join(f"{k} x{n}" for k, n in r.value_counts().items())

    generator = generator_facts(paths)
    device = resolve_device(params.base)
    meta = run_metadata(paths, device)
    stage_times = {}
    for stage, f in (("prepare", paths.prepared / "summary.json"), ("train_generator", paths.generator / "generator.json"),
                     ("sample", paths.synthetic / "summary.json"), ("filter", paths.filtered / "summary.json")):
        if f.exists():
            stage_times[stage] = (read_json(f).get("timing") or {}).get("seconds")
    stage_times["train_classifier"] = sum(r.get("seconds") or 0 for v in variants.values() for r in v["per_seed"]) or None
    metrics = {"headline": answer["text"], "helped": answer["helped"], "best_variant": answer["best_variant"],
               "generator_kind": generator.get("kind"),
               "n_test": answer["n_test"], "seeds": answer["seeds"],
               **({"gain": answer["gain"], "gain_ci95_low": answer["gain_low"], "gain_ci95_high": answer["gain_high"]}
                  if "gain" in answer else {}),
               "variants": {v: {k: (None if pd.isna(x) else float(x)) for k, x in table.loc[v].items()
                                if k in ("accuracy", "accuracy_low", "accuracy_high", "macro_f1", "ece", "diff", "p_value")}
                            for v in table.index}}
    rows = [{k: (None if isinstance(x, float) and np.isnan(x) else x) for k, x in r.items()}
            for r in table.reset_index().to_dict("records")]
    ctx = {"title": cfg.title, "answer": answer, "rows": rows, "names": names, "grids": grids, "reasons": reasons,
           "figs": {k: png_b64(f) for k, f in figs.items()}, "filter": filt,
           "quality": quality_rows(filt), "quality_names": QUALITY, "prepared": prepared, "meta": meta,
           "stage_times": stage_times, "params": params.resolved(), "pct": pct, "generator": generator}
    from jinja2 import Environment, FileSystemLoader, select_autoescape

    env = Environment(loader=FileSystemLoader(Path(__file__).parent / "templates"), autoescape=select_autoescape(["html"]))
    paths.reports.mkdir(parents=True, exist_ok=True)
    with atomic_path(paths.reports / "figures", is_dir=True) as tmp:
        for k, f in figs.items():
            save_figure(f, tmp / f"{k}.png")
    for k, df in csvs.items():
        with atomic_path(paths.reports / "plots" / f"{k}.csv") as tmp:
            df.to_csv(tmp, index=False)
    for name in ("report.html", "report.md"):
        with atomic_path(paths.reports / name) as tmp:
            tmp.write_text(env.get_template(name + ".j2").render(**ctx))
    write_json(paths.reports / "metrics.json", metrics)
    log.info("report: %s", answer["text"])
    return {"headline": answer["text"], "report": str(paths.reports / "report.html")}


def main(argv: list[str] | None = None) -> None:
    from pipeline.cli import stage_main
    stage_main("report", run, argv)


if __name__ == "__main__":
    main()
