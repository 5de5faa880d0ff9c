"""Stage 6, report: did the synthetic data help? Answer first, then the evidence.

Reads the classifier metrics of every variant in ``train_classifier.variants``, the pseudo-label
summary, the filter
summary and scores, the synthetic and real images and the generator's loss curve. Writes
``reports/``: ``report.html`` (self-contained), ``report.md``, ``metrics.json`` (for
``dvc metrics``), ``figures/*.png`` and ``plots/*.csv`` (for ``dvc plots``).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
from jinja2 import Environment, FileSystemLoader, select_autoescape

from pipeline.config import Params, Paths, resolve_device
from pipeline.core.curves import CURVES, read_curve
from pipeline.core.entrypoint import stage_main
from pipeline.core.io import atomic_path, check_writable, load_dataset_dir, read_json, save_figure, write_json
from pipeline.core.plotting import png_b64
from pipeline.core.provenance import run_metadata
from pipeline.errors import DataError
from pipeline.reporting.figures import (class_grids, fig_loss, fig_per_class_gain, fig_ratio_sweep, fig_scores,
                                        fig_variants)
from pipeline.reporting.tables import (QUALITY, generator_quality, pct, per_class_gain, quality_rows, variant_table,
                                       verdict)

log = logging.getLogger(__name__)


def generator_facts(paths: Paths) -> dict:
    """Kind, size, training and sampling cost of the generator (for the report's Generator section)."""
    f, s = paths.generator / "generator.json", paths.synthetic / "summary.json"
    if not f.exists():
        return {}
    g = read_json(f, "train_generator")
    facts = {"kind": g.get("kind", "unet"), "parameters_m": g.get("num_parameters", 0) / 1e6, "steps": g.get("steps"),
             "seconds": (g.get("timing") or {}).get("seconds"), "device": g.get("device"),
             "images_per_second": read_json(s, "sample").get("images_per_second") if s.exists() else None}
    if g.get("interpreter_val_accuracy") is not None:
        facts["interpreter"] = f"interpreter accuracy on val {100 * g['interpreter_val_accuracy']:.1f}% " \
                               f"(N={g.get('interpreter_val_n')})"
    return facts


def check_one_run(variants: dict[str, dict], params: Params, paths: Paths, prepared_fp: str | None) -> None:
    """Refuse to compare classifiers trained on different data: every variant must record the
    current prepared data and, if it used synthetic images, the current synthetic set."""
    specs = params.train_classifier.variants
    syn = {source: read_json(getattr(paths, source) / "summary.json", stage).get("fingerprint")
           for source, stage in (("filtered", "filter"), ("synthetic", "sample"))
           if any(specs[v].data == source for v in variants)}
    pseudo = read_json(paths.pseudo / "summary.json", "pseudo_label").get("fingerprint") \
        if any(specs[v].pseudo for v in variants) else None
    stale = [v for v, m in variants.items()
             if m.get("inputs") != {"prepared": prepared_fp, "synthetic": syn.get(specs[v].data),
                                    "pseudo": pseudo if specs[v].pseudo else None}]
    if stale:
        raise DataError(f"{paths.classifier_metrics}: the metrics of {', '.join(stale)} come from another run (other "
                        "prepared or synthetic data than the current ones), so comparing them would mislead. Re-run "
                        "train_classifier for them (dvc repro, or python -m flows train_classifier --variant <name>).")


def run(params: Params, paths: Paths = Paths()) -> dict:
    cfg = params.report
    check_writable(paths.reports)
    prepared = read_json(paths.prepared / "summary.json", "prepare")
    names = prepared["class_names"]
    files = {v: paths.classifier_metrics / f"{v}.json" for v in params.train_classifier.variants}
    missing = [v for v, f in files.items() if not f.exists()]
    if len(missing) == len(files):
        raise FileNotFoundError(f"{paths.classifier_metrics}: no classifier metrics. Run train_classifier first.")
    if missing:
        log.warning("report: no metrics for variant(s) %s (train_classifier not run for them); left out", missing)
    variants = {v: read_json(f, "train_classifier") for v, f in files.items() if v not in missing}
    check_one_run(variants, params, paths, prepared.get("fingerprint"))
    table = variant_table(variants)
    answer = verdict(table, variants, params.train_classifier.variants)
    figs, csvs = {"variants": fig_variants(table)}, {}
    if answer.get("synthetic_variant") and "real" in variants:
        gain = per_class_gain(variants, answer["synthetic_variant"], names)
        figs["per_class_gain"], csvs["per_class_gain"] = fig_per_class_gain(gain), gain
    sweeps = {k: [{"ratio": float(r), "val_accuracy": a} for r, a in v["ratio_sweep"].items()]
              for k, v in variants.items() if v.get("ratio_sweep")}
    if sweeps:
        figs["ratio_sweep"] = fig_ratio_sweep(sweeps)
    if (paths.generator / CURVES).exists():
        loss = read_curve(paths.generator / CURVES, "loss")
        figs["generator_loss"], csvs["generator_loss"] = fig_loss(loss), loss
    filt = read_json(paths.filtered / "summary.json", "filter") if (paths.filtered / "summary.json").exists() else {}
    scores = pd.read_parquet(paths.filtered / "scores.parquet") if (paths.filtered / "scores.parquet").exists() else None
    if scores is not None and len(scores):
        th = filt.get("thresholds", {})
        figs["filter_scores"] = fig_scores(scores, {"confidence": th.get("min_confidence"),
                                                    "nn_train_distance": th.get("memorization_distance"),
                                                    "clip_score": th.get("clip_min_score")})

    # sample grids: real, accepted synthetic, rejected synthetic (with reasons)
    grids: dict[str, dict] = {}
    real = load_dataset_dir(paths.prepared / "dataset", "prepare")["train"]
    grids["real"] = class_grids(real, np.asarray(real["label"]), cfg.grid_per_class, len(names))
    reasons: dict[int, str] = {}
    if scores is not None and (paths.synthetic / "dataset").exists():
        syn = load_dataset_dir(paths.synthetic / "dataset", "sample")
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
    meta = run_metadata(paths.root, device)
    pseudo = read_json(paths.pseudo / "summary.json") if (paths.pseudo / "summary.json").exists() else {}
    stage_times = {}
    for stage, f in (("prepare", paths.stage_timing / "prepare.json"), ("pseudo_label", paths.pseudo / "summary.json"),
                     ("train_generator", paths.generator / "generator.json"),
                     ("sample", paths.synthetic / "summary.json"), ("filter", paths.filtered / "summary.json")):
        if f.exists():
            facts = read_json(f)
            stage_times[stage] = (facts.get("timing") or facts).get("seconds")
    stage_times["train_classifier"] = sum(r.get("seconds") or 0 for v in variants.values() for r in v["per_seed"]) or None
    metrics = {"headline": answer["headline"], "answer": answer["points"], "helped": answer["helped"], "best_variant": answer["best_variant"],
               "synthetic_variant": answer.get("synthetic_variant"),
               "generator_kind": generator.get("kind"),
               "n_test": answer["n_test"], "seeds": answer["seeds"],
               **({"gain": answer["gain"], "gain_ci95_low": answer["gain_low"], "gain_ci95_high": answer["gain_high"],
                   "detectable_difference": answer["detectable_difference"]} if "gain" in answer else {}),
               "comparisons": answer["comparisons"], "stage_seconds": stage_times,
               "generator_quality": generator_quality(filt, table, params.train_classifier.variants) if filt else None,
               "pseudo_labels": {k: pseudo.get(k) for k in ("kept", "pool_size", "pseudo_label_accuracy", "threshold")},
               "variants": {v: {k: (None if pd.isna(x) else float(x)) for k, x in table.loc[v].items()
                                if k in ("accuracy", "accuracy_low", "accuracy_high", "val_accuracy", "macro_f1", "ece",
                                         "diff", "p_value", "synthetic_ratio")}
                            for v in table.index}}
    rows = [{k: (None if isinstance(x, float) and np.isnan(x) else x) for k, x in r.items()}
            for r in table.reset_index().to_dict("records")]
    ctx = {"title": cfg.title, "answer": answer, "rows": rows, "names": names, "grids": grids, "reasons": reasons,
           "figs": {k: png_b64(f) for k, f in figs.items()}, "filter": filt,
           "quality": quality_rows(filt), "quality_names": QUALITY, "prepared": prepared, "meta": meta,
           "stage_times": stage_times, "params": params.resolved(), "pct": pct, "generator": generator,
           "pseudo": pseudo}
    env = Environment(loader=FileSystemLoader(Path(__file__).parent / "templates"), autoescape=select_autoescape(["html.j2"]))
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
    log.info("report: %s %s", answer["headline"], answer["text"])
    return {"headline": answer["headline"], "report": str(paths.reports / "report.html")}


def main(argv: list[str] | None = None) -> None:
    stage_main("report", run, argv)


if __name__ == "__main__":
    main()
