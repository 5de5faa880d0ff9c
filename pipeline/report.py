"""Stage 6, report: did the synthetic data help? Answer first, then the evidence.

Reads the classifier metrics of every variant in ``train_classifier.variants``, the pseudo-label
summary, the filter summary and scores, the synthetic and real images and the generator's loss
curve, each checked to come from the current data and params (``check_one_run``). Writes
``reports/``: ``report.html`` (self-contained), ``report.md``, ``metrics.json`` (for
``dvc metrics``), ``figures/*.png`` and ``plots/*.csv`` (for ``dvc plots``).
"""
from __future__ import annotations

import logging
import shlex
from pathlib import Path

import numpy as np
import pandas as pd
from jinja2 import Environment, FileSystemLoader, select_autoescape

from pipeline.config import Params, Paths, params_diff, resolve_device
from pipeline.core.curves import CURVES, read_curve
from pipeline.core.entrypoint import stage_main
from pipeline.core.io import (OUTPUTS, atomic_path, check_writable, load_dataset_dir, read_json, read_output, reading,
                              save_figure, stale_inputs, write_json)
from pipeline.core.plotting import png_b64
from pipeline.core.provenance import run_metadata
from pipeline.errors import DataError
from pipeline.reporting.figures import (class_grids, fig_loss, fig_per_class_gain, fig_ratio_sweep, fig_scores,
                                        fig_variants)
from pipeline.reporting.tables import (QUALITY, baseline_of, generator_quality, pct, per_class_gain, quality_rows,
                                       variant_table, verdict)

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


def earlier_outputs(paths: Paths, specs: dict, names: list[str]) -> tuple[dict[str, dict], list[str]]:
    """The summary of each earlier stage's output, checked along its chain (``core.io.read_output``).
    One that the compared variants used must be current; one they did not use and that is stale or
    damaged is left out of the report with a note, rather than described beside the wrong results."""
    used = {"prepared"} | {"pseudo" for v in names if specs[v].pseudo} | {specs[v].data for v in names}
    out, notes = {}, []
    for name, (stage, file) in OUTPUTS.items():
        if name not in used and not (getattr(paths, name) / file).exists():
            continue
        try:
            out[name] = read_output(paths, name)
        except (DataError, FileNotFoundError) as err:
            if name in used:
                raise
            notes.append(f"The {stage} output is left out of this report: {err}")
    return out, notes


def check_one_run(variants: dict[str, dict], params: Params, paths: Paths) -> None:
    """Refuse to compare classifiers that were not all trained on the current data with the current
    classifier settings: each variant records the fingerprint of every stage output it read and the
    params it was trained with, and the report would otherwise credit one setting with another's
    accuracy (or describe a generator beside images another generator made)."""
    why = {}
    for v, m in variants.items():
        reasons = [f"{n} changed since ({OUTPUTS[n][0]} ran again)" for n in stale_inputs(paths, m.get("inputs") or {})]
        if "params" not in m:
            reasons.append("no record of its settings (trained by an older synthaug)")
        else:
            changed = params_diff(m["params"], params.made_with("train_classifier", v))
            if changed:
                reasons.append("trained with other settings (" + ", ".join(changed[:4]) +
                               (", ..." if len(changed) > 4 else "") + ")")
        if reasons:
            why[v] = reasons
    if why:
        said = "\n".join(f"  {v}: {'; '.join(r)}" for v, r in why.items())
        rerun = "; ".join(f"python -m flows train_classifier --variant {shlex.quote(v)}" for v in why)
        raise DataError(f"{paths.classifier_metrics}: these variants' metrics do not come from the current data and "
                        f"params, so comparing them would mislead:\n{said}\nRe-run them: dvc repro (or {rerun}).")


def params_made_with(params: Params, outputs: dict[str, dict]) -> tuple[dict, list[str]]:
    """The params in force for each output, as the output records them, and a note for each output
    that params.yaml has changed since (dvc repro would re-make it)."""
    now = params.resolved()
    shown, notes = dict(now), []
    for name, summary in outputs.items():
        stage = OUTPUTS[name][0]
        made = summary.get("params") or {}
        if stage not in made:
            continue
        shown[stage] = made[stage]
        changed = params_diff({k: made.get(k) for k in ("base", stage)}, {k: now[k] for k in ("base", stage)})
        if changed:
            notes.append(f"{name} was made with other params than params.yaml's now ({', '.join(changed[:4])}"
                         f"{', ...' if len(changed) > 4 else ''}): this report describes it as it was made; dvc "
                         f"repro would re-run {stage}.")
    return shown, notes


def caveats(variants: dict[str, dict], specs: dict, missing: list[str], outputs: dict[str, dict]) -> list[str]:
    """What limits this run's conclusions, said in the report rather than only in a log."""
    out = []
    if missing:
        accepted = ((outputs.get("filtered") or {}).get("n") or {}).get("accepted")
        why = (" (the filter accepted none of the synthetic images, so the variants that train on them stop)"
               if accepted == 0 and any(specs[v].data == "filtered" for v in missing) else
               " (train_classifier was not run for them, or stopped)")
        out.append(f"No metrics for {', '.join(missing)}{why}: this report compares the other variants only.")
    if (outputs.get("prepared") or {}).get("upscaled"):
        out.append(f"Data: {outputs['prepared']['upscaled']}.")
    absent = sorted({c for m in variants.values() for c in m.get("test_classes_missing") or []})
    if absent:
        out.append(f"The test split has no image of {', '.join(absent)}: accuracies are over the other classes only.")
    return out


def add_points(answer: dict, points: list[str]) -> None:
    answer["points"] = answer["points"] + points
    answer["text"] = " ".join([answer["text"], *points])


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
    check_one_run(variants, params, paths)
    prepared = outputs["prepared"]
    names = prepared["class_names"]
    shown_params, drift = params_made_with(params, outputs)
    baseline = baseline_of(specs, variants)
    table = variant_table(variants, baseline)
    answer = verdict(table, variants, specs, baseline)
    add_points(answer, caveats(variants, specs, missing, outputs) + drift + notes)
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
    device = resolve_device(params.base)
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
