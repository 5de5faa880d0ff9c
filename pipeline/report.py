"""Stage 6, report: did the synthetic data help? Answer first, then the evidence.

Reads the classifier metrics of every variant in ``train_classifier.variants``, the pseudo-label
summary, the filter summary and scores, the synthetic and real images and the generator's loss
curve, each checked to come from the current data and params (``core.provenance``). Writes
``reports/``: ``report.html`` (self-contained), ``report.md``, ``metrics.json`` (for
``dvc metrics``), ``figures/*.png`` and ``plots/*.csv`` (for ``dvc plots``).
"""
from __future__ import annotations

import html
import logging
from pathlib import Path

import pandas as pd
from jinja2 import Environment, FileSystemLoader, select_autoescape

from pipeline.config import Params, Paths, VariantSpec, classifier_file, resolve_device
from pipeline.core.curves import CURVES, read_curve
from pipeline.core.entrypoint import stage_main
from pipeline.core.io import (atomic_path, check_writable, checked, load_dataset_dir, read_json, reading, save_figure,
                              write_json)
from pipeline.core.plotting import png_b64
from pipeline.core.provenance import check_classifiers, earlier_outputs, params_made_with, run_metadata
from pipeline.errors import DataError
from pipeline.reporting import summary
from pipeline.reporting.figures import report_figures, sample_grids
from pipeline.reporting.tables import QUALITY, pct, quality_rows, variant_table
from pipeline.reporting.verdict import baseline_of, conclude

log = logging.getLogger(__name__)


def run(params: Params, paths: Paths = Paths()) -> dict:
    """Write ``reports/`` for the current outputs; return the headline and the page's path."""
    specs = params.train_classifier.variants
    check_writable(paths.reports, paths.reports / "figures", paths.reports / "plots")
    variants, missing = read_variants(specs, paths)
    outputs, notes = earlier_outputs(paths, specs, list(variants))
    check_classifiers(variants, params, paths, outputs)
    shown_params, drift = params_made_with(params, outputs)
    baseline = baseline_of(specs, variants)
    table = variant_table(variants, baseline)
    answer = conclude(table, variants, specs, baseline, outputs, missing, drift + notes)
    answer["model"] = model_file(paths, answer["recommend"], answer["recommend_seed_index"])
    prepared, filt = outputs["prepared"], outputs.get("filtered") or {}
    names = prepared["class_names"]
    loss, scores = read_loss(paths, outputs), read_scores(paths, filt)
    figs, csvs = report_figures(table, variants, answer, names, loss, scores, filt.get("thresholds", {}))
    real, synthetic = read_samples(paths, outputs, scores)
    grids, reasons = sample_grids(real, synthetic, scores, len(names), params.report.grid_per_class)
    meta = run_metadata(paths.root, resolve_device(params.base, compute=False))  # a gpu run's report renders anywhere
    stage_times = summary.stage_seconds(outputs, variants, read_stage_seconds(paths))
    page = {"title": params.report.title, "answer": answer, "rows": summary.rows(table), "names": names,
            "grids": grids, "reasons": reasons, "figs": {k: png_b64(f) for k, f in figs.items()}, "filter": filt,
            "quality": quality_rows(filt), "quality_names": QUALITY, "prepared": prepared, "meta": meta,
            "stage_times": stage_times, "params": shown_params, "pct": pct,
            "generator": summary.generator_facts(outputs), "pseudo": outputs.get("pseudo") or {}}
    write(paths, figs, csvs, page, summary.metrics(answer, table, outputs, specs, stage_times))
    log.info("report: %s (%s)", answer["headline"], answer["model"])
    return {"headline": answer["headline"], "report": str(paths.reports / "report.html")}


def read_variants(specs: dict[str, VariantSpec], paths: Paths) -> tuple[dict[str, dict], list[str]]:
    """The classifier metrics of each variant in ``specs``, and the variants that have none."""
    files = {v: paths.classifier_metrics / f"{v}.json" for v in specs}
    missing = [v for v, f in files.items() if not f.exists()]
    if len(missing) == len(files):
        raise FileNotFoundError(f"{paths.classifier_metrics}: no classifier metrics. Run train_classifier first.")
    if missing:
        log.warning("report: no metrics for variant(s) %s (train_classifier not run for them); left out", missing)
    return {v: read_variant(f) for v, f in files.items() if v not in missing}, missing


def read_variant(path: Path) -> dict:
    """One variant's metrics, with the types the report computes with (else a DataError naming the file)."""
    m = checked(read_json(path, "train_classifier"), path, "train_classifier", per_seed=list, n_test=int,
                synthetic_ratio=(int, float), synthetic_per_class=dict, n_synthetic=int, learner=str, steps=int)
    if not m.get("per_seed"):
        raise DataError(f"{path}: no per-seed results: the file is damaged. Re-run the train_classifier stage "
                        "(dvc repro -f train_classifier).")
    for r in m["per_seed"]:
        checked(r if isinstance(r, dict) else {"per_seed": r}, path, "train_classifier", per_seed=dict, seed=int,
                accuracy=(int, float), best_val_accuracy=(int, float), macro_f1=(int, float), ece=(int, float),
                per_class_accuracy=dict)
    return m


def model_file(paths: Paths, variant: str, index: int) -> str:
    """Where the recommended variant's seed ``index`` keeps its weights, relative to the project root."""
    return (paths.classifier / variant / classifier_file(index)).relative_to(paths.root).as_posix()


def read_loss(paths: Paths, outputs: dict[str, dict]) -> pd.DataFrame | None:
    """The generator's loss curve (DVCLive), if it was trained and wrote one."""
    if "generator" not in outputs or not (paths.generator / CURVES).exists():
        return None
    with reading(paths.generator / CURVES, "train_generator") as f:
        return read_curve(f, "loss")


def read_scores(paths: Paths, filt: dict) -> pd.DataFrame | None:
    """The filter's score of each synthetic image, if the filter ran and wrote them."""
    if not filt or not (paths.filtered / "scores.parquet").exists():
        return None
    with reading(paths.filtered / "scores.parquet", "filter") as f:
        return pd.read_parquet(f)


def read_samples(paths: Paths, outputs: dict[str, dict], scores: pd.DataFrame | None) -> tuple:
    """The real training images, and the synthetic ones where the filter scored them (else None)."""
    real = load_dataset_dir(paths.prepared / "dataset", "prepare")["train"]
    scored = scores is not None and "synthetic" in outputs
    return real, load_dataset_dir(paths.synthetic / "dataset", "sample") if scored else None


def read_stage_seconds(paths: Paths) -> dict[str, float | None]:
    """Seconds of the stages that keep their run time out of their outputs (prepare, pseudo_label: in
    ``metrics/stages/<stage>.json``), by stage; a stage without that record is left out."""
    out = {}
    for stage in ("prepare", "pseudo_label"):
        timing = paths.stage_timing / f"{stage}.json"
        if timing.exists():
            out[stage] = read_json(timing, stage).get("seconds")
    return out


def write(paths: Paths, figs: dict, csvs: dict[str, pd.DataFrame], page: dict, metrics: dict) -> None:
    """reports/: figures, plot tables, report.html and report.md (rendered from ``page``), metrics.json."""
    folder = FileSystemLoader(Path(__file__).parent / "templates")
    env = {"report.html": Environment(loader=folder, autoescape=select_autoescape(["html.j2"])),
           "report.md": Environment(loader=folder, finalize=markdown_text)}  # names and titles come from users
    paths.reports.mkdir(parents=True, exist_ok=True)
    with atomic_path(paths.reports / "figures", is_dir=True) as tmp:
        for k, f in figs.items():
            save_figure(f, tmp / f"{k}.png")
    for k, df in csvs.items():
        with atomic_path(paths.reports / "plots" / f"{k}.csv") as tmp:
            df.to_csv(tmp, index=False)
    for name in ("report.html", "report.md"):
        with atomic_path(paths.reports / name) as tmp:
            tmp.write_text(env[name].get_template(name + ".j2").render(**page))
    write_json(paths.reports / "metrics.json", metrics)


def markdown_text(value) -> object:
    """Every value report.md shows, as text: no HTML tag of a class name or title reaches a Markdown viewer,
    no ``|`` breaks a table row."""
    return html.escape(value, quote=False).replace("|", "\\|") if isinstance(value, str) else value


def main(argv: list[str] | None = None) -> None:
    stage_main("report", run, argv)


if __name__ == "__main__":
    main()
