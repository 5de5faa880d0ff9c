"""train_classifier's seeds as separate runs (pipeline/training/seed_runs.py): what a fan-out's
workers and its gather do, in one process on tiny data."""
import json

import pytest

import pipeline.train_classifier as tc
from pipeline.errors import ConfigError, DataError
from pipeline.training.plan import Run, plan_runs
from tests.test_train_classifier import micro_params, write_project

VARIANT = "real+synthetic"


def without_timing(d):
    if isinstance(d, dict):
        return {k: without_timing(v) for k, v in d.items() if k not in ("seconds", "seconds_per_step")}
    return [without_timing(v) for v in d] if isinstance(d, list) else d


def test_seed_runs_then_gather_write_what_one_process_writes(tmp_path):
    paths, _ = write_project(tmp_path)
    params = micro_params(seeds=3, ratio_sweep=(0.0,))
    cfg = params.train_classifier
    runs = plan_runs(cfg, cfg.variants[VARIANT])
    assert runs == [Run(i, r) for r in (0.5, 0.0) for i in (0, 1)] + [Run(2, None)]  # the sweep: 2 shares x 2 seeds,
    assert [r.waits for r in runs] == [False] * 4 + [True]  # then a seed that takes the sweep's choice
    assert plan_runs(cfg, cfg.variants["real"]) == [Run(i, 0.0) for i in range(3)]  # no sweep: every seed at once

    with pytest.raises(DataError, match="--seed_index 0 --ratio 0.5 is not finished"):  # needs the choice, too early
        tc.run(params, paths, VARIANT, seed_index=2)
    for r in runs:
        tc.run(params, paths, VARIANT, seed_index=r.seed_index, ratio=r.share)
    with pytest.raises(ConfigError, match="--seed_index 3"):
        tc.run(params, paths, VARIANT, seed_index=3)
    gathered = tc.run(params, paths, VARIANT, gather=True)
    written = {p: json.loads((paths.classifier / VARIANT / f"seed{i}" / "metrics.json").read_text())
               for i, p in enumerate(("a", "b", "c"))}

    one = tc.run(params, paths, VARIANT)  # the same variant in one process (dvc repro's way)
    assert set(one["ratio_sweep"]) == {"0.5", "0.0"} and len(one["per_seed"]) == 3
    assert without_timing(gathered) == without_timing(one)
    for i, p in enumerate(("a", "b", "c")):
        again = json.loads((paths.classifier / VARIANT / f"seed{i}" / "metrics.json").read_text())
        assert without_timing(again) == without_timing(written[p])


def test_gather_refuses_missing_or_stale_seed_runs(tmp_path):
    paths, _ = write_project(tmp_path)
    params = micro_params(seeds=2)
    for i in range(2):
        tc.run(params, paths, "real", seed_index=i)
    tc.run(micro_params(seeds=2, lr=0.01), paths, "real", seed_index=0)  # other params: replaces seed 0's run
    with pytest.raises(DataError, match=r"seed run --seed_index 0 --ratio 0 is not finished"):
        tc.run(params, paths, "real", gather=True)
    with pytest.raises(DataError, match=r"seed run --seed_index 0 --ratio 0 is not finished"):  # none with these params
        tc.run(micro_params(seeds=2, lr=0.02), paths, "real", gather=True)
    tc.run(params, paths, "real", seed_index=0)
    assert tc.run(params, paths, "real", gather=True)["seeds"] == [3000, 3001]
