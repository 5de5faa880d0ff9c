"""Stage 6, report: did the synthetic data help? Answer first, then the evidence.

Reads the classifier metrics of every variant in ``train_classifier.variants``, the pseudo-label
summary, the filter summary and scores, the synthetic and real images and the generator's loss
curve, each checked to come from the current data and params (``core.provenance``). Writes
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
from pipeline.core.io import (OUTPUTS, atomic_path, check_writable, load_dataset_dir, read_json, reading, save_figure,
                              write_json)
from pipeline.core.plotting import png_b64
from pipeline.core.provenance import check_classifiers, earlier_outputs, params_made_with, run_metadata
from pipeline.reporting.figures import (class_grids, fig_loss, fig_per_class_gain, fig_ratio_sweep, fig_scores,
                                        fig_variants)
from pipeline.reporting.tables import (QUALITY, add_points, baseline_of, caveats, generator_quality, labeler_point,
                                       pct, per_class_gain, quality_rows, variant_table, verdict)

log = logging.getLogger(__name__)


def generator_facts(outputs: dict[str, dict]) -> dict:
    """Kind, size, training and sampling cost of the generator (for the report's Generator section)."""
    g = outputs.get("generator")
    if not g:
        return {}
    facts = {"kind": g.get("kind", "unet"), "parameters_m": g.get("num_parameters", 0) / 1e6, "steps": g.get("steps"),
             "seconds": (g.get("timing") or {}).get("seconds"), "device": g.get("device"),
             "images_per_second": (outputs.get("synthetic") or {}).get("images_per_second")}
    if g.get("interpreter_val_accuracy") is not None:
        facts["interpreter"] = f"interpreter accuracy on val {100 * g['interpreter_val_accuracy']:.1f}% " \
                               f"(N={g.get('interpreter_val_n')})"
    return facts


def run(params: Params, paths: Paths = Paths()) -> dict:
    cfg = params.report
    specs = params.train_classifier.variants
    check_writable(paths.reports, paths.reports / "figures", paths.reports / "plots")
    files = {v: paths.classifier_metrics / f"{v}.json" for v in specs}
    missing = [v for v, f in files.items() if not f.exists()]
    if len(missing) == len(files):
        raise FileNotFoundError(f"{paths.classifier_metrics}: no classifier metrics. Run train_classifier first.")
    if missing:
        log.warning("report: no metrics for variant(s) %s (train_classifier not run for them); left out", missing)
    variants = {v: read_json(f, "train_classifier") for v, f in files.items() if v not in missing}
    outputs, notes = earlier_outputs(paths, specs, list(variants))
    check_classifiers(variants, params, paths, outputs)
    prepared = outputs["prepared"]
    names = prepared["class_names"]
    shown_params, drift = params_made_with(params, outputs)
    baseline = baseline_of(specs, variants)
    table = variant_table(variants, baseline)
    answer = verdict(table, variants, specs, baseline, (outputs.get("pseudo") or {}).get("labeler"))
    labeler = labeler_point(outputs.get("pseudo") or {}, table)
    add_points(answer, ([labeler] if labeler else []) + caveats(variants, specs, missing, outputs) + drift + notes)
    figs, csvs = {"variants": fig_variants(table)}, {}
    if answer.get("synthetic_variant"):
        gain = per_class_gain(variants, answer["synthetic_variant"], names, baseline)
        figs["per_class_gain"], csvs["per_class_gain"] = fig_per_class_gain(gain), gain
    sweeps = {k: [{"ratio": float(r), "val_accuracy": a} for r, a in v["ratio_sweep"].items()]
              for k, v in variants.items() if v.get("ratio_sweep")}
    if sweeps:
        figs["ratio_sweep"] = fig_ratio_sweep(sweeps)
    if "generator" in outputs and (paths.generator / CURVES).exists():
        with reading(paths.generator / CURVES, "train_generator") as f:
            loss = read_curve(f, "loss")
        figs["generator_loss"], csvs["generator_loss"] = fig_loss(loss), loss
    filt = outputs.get("filtered") or {}
    scores = None
    if filt and (paths.filtered / "scores.parquet").exists():
        with reading(paths.filtered / "scores.parquet", "filter") as f:
            scores = pd.read_parquet(f)
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
    if scores is not None and "synthetic" in outputs:
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

    generator = generator_facts(outputs)
    device = resolve_device(params.base, compute=False)  # reads results: a gpu run's report renders anywhere
    meta = run_metadata(paths.root, device)
    pseudo = outputs.get("pseudo") or {}
    timing = paths.stage_timing / "prepare.json"
    stage_times = {"prepare": read_json(timing, "prepare").get("seconds") if timing.exists() else None}
    for name, facts in outputs.items():
        if name != "prepared":
            stage_times[OUTPUTS[name][0]] = (facts.get("timing") or facts).get("seconds")
    stage_times["train_classifier"] = sum(r.get("seconds") or 0 for v in variants.values() for r in v["per_seed"]) or None
    metrics = {"headline": answer["headline"], "answer": answer["points"], "helped": answer["helped"], "best_variant": answer["best_variant"],
               "synthetic_variant": answer.get("synthetic_variant"), "baseline": baseline,
               "generator_kind": generator.get("kind"),
               "n_test": answer["n_test"], "seeds": answer["seeds"],
               **({"gain": answer["gain"], "gain_ci95_low": answer["gain_low"], "gain_ci95_high": answer["gain_high"],
                   "detectable_difference": answer["detectable_difference"]} if "gain" in answer else {}),
               "comparisons": answer["comparisons"], "stage_seconds": stage_times,
               **{k: answer.get(k) for k in ("strongest_without_synthetic", "versus_strongest")},
               "generator_quality": generator_quality(filt, table, params.train_classifier.variants) if filt else None,
               "pseudo_labels": {k: pseudo.get(k) for k in ("kept", "pool_size", "pseudo_label_accuracy", "threshold",
                                                            "labeler")},
               "variants": {v: {k: (None if pd.isna(x) else float(x)) for k, x in table.loc[v].items()
                                if k in ("accuracy", "accuracy_low", "accuracy_high", "val_accuracy", "macro_f1", "ece",
                                         "diff", "p_value", "synthetic_ratio")}
                            for v in table.index}}
    rows = [{k: (None if isinstance(x, float) and np.isnan(x) else x) for k, x in r.items()}
            for r in table.reset_index().to_dict("records")]
    ctx = {"title": cfg.title, "answer": answer, "rows": rows, "names": names, "grids": grids, "reasons": reasons,
           "figs": {k: png_b64(f) for k, f in figs.items()}, "filter": filt,
           "quality": quality_rows(filt), "quality_names": QUALITY, "prepared": prepared, "meta": meta,
           "stage_times": stage_times, "params": shown_params, "pct": pct, "generator": generator,
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
