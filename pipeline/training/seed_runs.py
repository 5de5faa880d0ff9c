"""A classifier variant's seeds as separate runs, for a fan-out over workers (flows/deploy.py).

``python -m pipeline.train_classifier --variant V --seed_index i`` trains seed ``i`` alone (with
``--ratio r``: one run of the ratio sweep, seed ``i`` at share ``r``) into
``models/classifier_seeds/V/seed<i>-share<r>/`` (weights + training history, stamped with the
variant's params and the fingerprints of its inputs; a run finds its result there and keeps it).
``--gather`` reads them where one process would have trained them, then tests and writes exactly
what that process writes. The sweep's choice is made once, by ``choose_ratio`` over the finished
sweep runs (the numbers one process uses), before the seeds that take it start. ``data`` below is
the stage's ``VariantData``.
"""
from __future__ import annotations

import logging
from pathlib import Path

from pipeline.config import Params, Paths
from pipeline.core.io import atomic_path, fingerprint, read_json, write_json
from pipeline.errors import ConfigError, DataError
from pipeline.models.classifier import load_classifier, save_classifier
from pipeline.training.classifier import choose_ratio, train_variant

log = logging.getLogger(__name__)
CLI_OPTIONS = {  # python -m pipeline.train_classifier's fan-out flags (run's keywords)
    "seed_index": {"type": int, "help": "fan-out: train this seed alone, into models/classifier_seeds/"},
    "ratio": {"type": float, "help": "with --seed_index: at this synthetic share (a ratio sweep run)"},
    "gather": {"action": "store_true", "help": "fan-out: test and write the finished seed runs"}}


def sweep_ratios(params: Params, variant: str) -> list[float]:
    """The synthetic shares train_variant tries on the first sweep_seeds seeds ([] when it does not sweep)."""
    cfg = params.train_classifier
    spec = cfg.variants[variant]
    return list(dict.fromkeys((cfg.synthetic_ratio, *cfg.ratio_sweep))) \
        if spec.uses_synthetic and spec.real and cfg.ratio_sweep else []


def fanout_runs(params: Params, variant: str) -> tuple[list[dict], list[dict]]:
    """A fan-out's runs of ``variant`` (``run`` keywords): those that can start at once (the ratio
    sweep's, or every seed when there is no sweep), then the seeds that take the sweep's choice."""
    ratios, n = sweep_ratios(params, variant), params.train_classifier.seeds
    if not ratios:
        return [{"seed_index": i} for i in range(n)], []
    swept = min(params.train_classifier.sweep_seeds, n)
    return [{"seed_index": i, "ratio": r} for r in ratios for i in range(swept)], \
        [{"seed_index": i} for i in range(swept, n)]


def seed_dir(paths: Paths, variant: str, index: int, ratio: float) -> Path:
    return paths.classifier_seeds / variant / f"seed{index}-share{ratio:g}"


def seed_stamp(params: Params, variant: str, data) -> str:
    """What a seed run depends on: the variant's params and the fingerprints of its inputs."""
    return fingerprint(params.made_with("train_classifier", variant), data.inputs)


def read_seed(params: Params, paths: Paths, variant: str, data, index: int, ratio: float):
    """A finished seed run (model, history), or None when absent or made with other params or data."""
    where = seed_dir(paths, variant, index, ratio)
    if not (where / "history.json").exists():
        return None
    hist = read_json(where / "history.json", "train_classifier")
    if hist.pop("made_with", None) != seed_stamp(params, variant, data):
        log.warning("%s: made with other params or data; not used", where)
        return None
    return load_classifier(where / "model.safetensors", len(data.class_names), data.val[0].shape[1],
                           "train_classifier --gather reads it"), hist


def chosen_share(params: Params, paths: Paths, variant: str, data) -> tuple[float, dict | None]:
    """The synthetic share train_variant uses, and the sweep (from the finished sweep runs) it chose it by."""
    cfg = params.train_classifier
    ratios = sweep_ratios(params, variant)
    if not ratios:  # as train_variant: none without synthetic images, all of them without real ones
        return (0.0 if data.synthetic is None else cfg.synthetic_ratio if cfg.variants[variant].real else 1.0), None
    swept = range(min(cfg.sweep_seeds, cfg.seeds))
    runs = {(r, i): read_seed(params, paths, variant, data, i, r) for r in ratios for i in swept}
    missing = [f"--seed_index {i} --ratio {r:g}" for (r, i), got in runs.items() if got is None]
    if missing:
        raise DataError(f"{variant}: the ratio sweep is not finished in {paths.classifier_seeds / variant} (missing "
                        f"{', '.join(missing)}); run those first, then the other seeds")
    sweep = {r: [runs[(r, i)][1]["best_val_acc"] for i in swept] for r in ratios}
    return choose_ratio(sweep), sweep


def train_seed(params: Params, paths: Paths, variant: str, data, seeds: list[int], index: int,
               ratio: float | None, device) -> dict:
    """Seed ``index`` of ``variant`` at ``ratio`` (None: the share the sweep chose) into
    models/classifier_seeds/ (kept when already there, made with the same params and data)."""
    cfg = params.train_classifier
    if not 0 <= index < len(seeds):
        raise ConfigError(f"--seed_index {index}: train_classifier.seeds is {len(seeds)}, so it must be 0 to "
                          f"{len(seeds) - 1}")
    ratio = chosen_share(params, paths, variant, data)[0] if ratio is None else ratio
    where = seed_dir(paths, variant, index, ratio)
    if read_seed(params, paths, variant, data, index, ratio) is None:
        one = cfg.model_copy(update={"synthetic_ratio": ratio, "ratio_sweep": []})  # this share, no sweep
        [(model, hist)], _, _ = train_variant(one, cfg.variants[variant], data.train, data.val, data.synthetic,
                                              [seeds[index]], device, len(data.class_names), data.pseudo)
        with atomic_path(where, is_dir=True) as tmp:
            save_classifier(model, tmp / "model.safetensors", cfg.arch, len(data.class_names), data.val[0].shape[1])
            write_json(tmp / "history.json", {**hist, "made_with": seed_stamp(params, variant, data)})
    else:
        log.info("train_classifier %s: %s already done; kept", variant, where)
    return {"headline": f"{variant}: seed {index} at synthetic share {ratio:g} in {where}"}


def gather_seeds(params: Params, paths: Paths, variant: str, data):
    """What train_variant returns, read from a fan-out's finished seed runs."""
    ratio, sweep = chosen_share(params, paths, variant, data)
    results = [read_seed(params, paths, variant, data, i, ratio) for i in range(params.train_classifier.seeds)]
    missing = [i for i, got in enumerate(results) if got is None]
    if missing:
        raise DataError(f"{variant}: seed run(s) {missing} at synthetic share {ratio:g} are not in "
                        f"{paths.classifier_seeds / variant}; run them (--seed_index) before --gather")
    return results, ratio, sweep
