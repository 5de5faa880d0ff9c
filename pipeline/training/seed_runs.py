"""A classifier variant's runs (training/plan.py) as separate processes, for a fan-out over workers
(flows/fanout.py).

``python -m pipeline.train_classifier --variant V --seed_index i`` trains seed ``i`` alone (with
``--ratio r``: at share ``r``, one run of the ratio sweep; without: at the share the finished
sweep chose) into ``models/classifier_seeds/V/seed<i>-share<r>/`` (weights + training history,
stamped with the variant's params and the fingerprints of its inputs; a run finds its result there
and keeps it). ``--gather`` carries out the same plan reading those runs instead of training, so
the stage then tests and writes exactly what one process writes. ``data`` below is the stage's
``VariantData``.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

from pipeline.config import Params, Paths, labeler_file
from pipeline.core.io import atomic_path, fingerprint, read_json, read_output, write_json
from pipeline.errors import ConfigError, DataError
from pipeline.models.classifier import load_classifier, save_classifier
from pipeline.training.classifier import train_one
from pipeline.training.plan import Run, decide_share, plan_runs

log = logging.getLogger(__name__)
CLI_OPTIONS = {  # python -m pipeline.train_classifier's fan-out flags (run's keywords)
    "seed_index": {"type": int, "help": "fan-out: train this seed alone, into models/classifier_seeds/"},
    "ratio": {"type": float, "help": "with --seed_index: at this synthetic share (one of the plan's)"},
    "gather": {"action": "store_true", "help": "fan-out: test and write the finished seed runs"}}


class SeedRuns:
    """A variant's finished runs in ``models/classifier_seeds/<variant>/``."""

    def __init__(self, params: Params, paths: Paths, variant: str, data):
        self.params, self.variant, self.data = params, variant, data
        self.folder = paths.classifier_seeds / variant
        self.stamp = fingerprint(params.made_with("train_classifier", variant), data.inputs)  # what a run depends on

    def where(self, run: Run) -> Path:
        return self.folder / f"seed{run.seed_index}-share{run.share:g}"

    def history(self, run: Run) -> dict | None:
        """A finished run's training history, or None when absent or made with other params or data."""
        where = self.where(run)
        if not (where / "history.json").exists():
            return None
        hist = read_json(where / "history.json", "train_classifier")
        if hist.pop("made_with", None) != self.stamp:
            log.warning("%s: made with other params or data; not used", where)
            return None
        return hist

    def finished(self, run: Run) -> dict:
        """A finished run's history; a DataError that says which run to start when it is not there."""
        hist = self.history(run)
        if hist is None:
            raise DataError(f"{self.variant}: seed run --seed_index {run.seed_index} --ratio {run.share:g} is not "
                            f"finished in {self.folder}; run it first (the ratio sweep's runs before the other seeds, "
                            f"every run before --gather)")
        return hist

    def read(self, runs: list[Run]) -> list[tuple]:
        """Finished runs as (model, history) each (``training.plan.carry_out``'s ``get``)."""
        hists = [self.finished(run) for run in runs]  # every run there, or which one to start
        return [(load_classifier(self.where(run) / "model.safetensors", len(self.data.class_names),
                                 self.data.val[0].shape[1], "train_classifier --gather reads it", "train_classifier"),
                 hist)
                for run, hist in zip(runs, hists)]

    def train(self, run: Run, seed: int, device) -> None:
        """Train ``run`` (at seed ``seed``) and keep it, unless it is already there."""
        where = self.where(run)
        if self.history(run) is not None:
            log.info("train_classifier %s: %s already done; kept", self.variant, where)
            return
        cfg = self.params.classifier_config(self.variant)
        model, hist = train_one(cfg, cfg.variants[self.variant], self.data, seed, run.share, device)
        with atomic_path(where, is_dir=True) as tmp:
            save_classifier(model, tmp / "model.safetensors", cfg.arch, len(self.data.class_names),
                            self.data.val[0].shape[1])
            write_json(tmp / "history.json", {**hist, "made_with": self.stamp})


def train_seed(params: Params, paths: Paths, variant: str, data, seeds: list[int], index: int,
               ratio: float | None, device) -> dict:
    """Seed ``index`` of ``variant`` at ``ratio`` (None: the share the finished sweep chose) into
    models/classifier_seeds/ (kept when already there, made with the same params and data)."""
    cfg = params.classifier_config(variant)
    if index is None:
        raise ConfigError(f"--ratio {ratio}: it says at which share --seed_index trains one seed run, and was given "
                          "without --seed_index; add --seed_index, or leave --ratio out to train every seed")
    if not 0 <= index < len(seeds):
        raise ConfigError(f"--seed_index {index}: train_classifier.seeds is {len(seeds)}, so it must be 0 to "
                          f"{len(seeds) - 1}")
    runs = SeedRuns(params, paths, variant, data)
    run = Run(index, decide_share(cfg, cfg.variants[variant], runs.finished)[0] if ratio is None
              else planned_share(cfg, variant, index, ratio))
    runs.train(run, seeds[index], device)
    return {"headline": f"{variant}: seed {index} at synthetic share {run.share:g} in {runs.where(run)}"}


def planned_share(cfg, variant: str, index: int, ratio: float) -> float:
    """``ratio`` when the plan (training/plan.py) trains seed ``index`` of ``variant`` at that share; else a
    ConfigError naming the shares it does train at (a share out of [0, 1], nan, or one no run gathers)."""
    shares = [r.share for r in plan_runs(cfg, cfg.variants[variant]) if r.seed_index == index and r.share is not None]
    planned = next((s for s in shares if math.isclose(s, ratio, abs_tol=1e-9)), None)  # nan is close to nothing
    if planned is None:
        where = (f"at share {', '.join(f'{s:g}' for s in shares)} (its synthetic_ratio and ratio_sweep, in [0, 1])"
                 if shares else "at the share its ratio sweep chooses: leave --ratio out")
        raise ConfigError(f"--ratio {ratio}: variant {variant!r} trains seed {index} {where}. Only those runs are "
                          "gathered into the variant's result.")
    return planned


def load_labelers(paths: Paths, class_names: list[str], in_chans: int, needed_by: str) -> tuple[list, list[dict]]:
    """pseudo_label's models (one per seed) and their training histories, with each one's training time
    from ``metrics/stages/pseudo_label.json`` (None without it: the histories in data/pseudo keep none)."""
    seeds = (read_output(paths, "pseudo").get("labeler") or {}).get("seeds") or []
    if not seeds:
        raise DataError(f"{paths.pseudo}: pseudo_label trained no labeler (no pool), and {needed_by} need one. Give "
                        "prepare a pool (prepare.unlabeled_pool) and run pseudo_label again.")
    files = [paths.pseudo / labeler_file(i) for i in range(len(seeds))]
    timing = paths.stage_timing / "pseudo_label.json"
    seconds = list((read_json(timing, "pseudo_label").get("labelers") or []) if timing.exists() else [])
    seconds += [None] * (len(files) - len(seconds))
    return ([load_classifier(f, len(class_names), in_chans, needed_by, "pseudo_label") for f in files],
            [{"seconds": s, **read_json(f.with_suffix(".json"), "pseudo_label")} for f, s in zip(files, seconds)])


def pseudo_label_runs(params: Params, paths: Paths, variant: str, data):
    """``carry_out``'s ``get`` when ``variant`` is pseudo_label's learner itself (same learner, data and
    augmentation): pseudo_label's models and histories, tested rather than trained twice; None otherwise."""
    if params.train_classifier.variants[variant] != params.learner()[1] or params.pseudo_label.method != "fixmatch":
        return None
    models, hists = load_labelers(paths, data.class_names, data.val[0].shape[1], f"variant {variant!r}")
    if len(models) != params.pseudo_label.seeds:
        raise DataError(f"{paths.pseudo}: pseudo_label trained {len(models)} model(s) and variant {variant!r} needs "
                        f"{params.pseudo_label.seeds} (pseudo_label.seeds). Re-run pseudo_label (dvc repro).")
    data.inputs["pseudo"] = read_output(paths, "pseudo").get("fingerprint")
    return lambda runs: [(models[r.seed_index], hists[r.seed_index]) for r in runs]
