"""The plan of a classifier variant's runs, and the synthetic-share rule: one place for both.

A variant trains ``seeds`` models at one synthetic share. Without ``ratio_sweep`` that share is
fixed (``fixed_share``) and every seed can start at once. With it (and real + synthetic data),
every candidate share is tried on the first ``sweep_seeds`` seeds, ``choose_share`` picks one from
their validation accuracies, and the remaining seeds train at that share. ``carry_out`` runs a
plan through any ``get(runs) -> [(model, history), ...]``: training (train_classifier, side by side
on CPU), or reading what a fan-out's workers trained (training/seed_runs.py); the
fan-out (flows/fanout.py) submits the same runs, those that wait for the choice last.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from pipeline.config import TrainClassifierConfig, VariantSpec

log = logging.getLogger(__name__)

# The share rule, defined here once (``choose_share`` applies it; variants record it, the report and docs cite it):
# a gain that holds across seeds, not one seed's noise; of the shares that pass, the best mean.
RATIO_RULE = ("a synthetic share above 0 is used only when it beats share 0 on validation with every sweep seed; "
              "otherwise the variant trains without synthetic images")


@dataclass(frozen=True)
class Run:
    """One model of a variant: seed ``seed_index`` at synthetic share ``share`` (None: the share the sweep chooses)."""
    seed_index: int
    share: float | None

    @property
    def waits(self) -> bool:
        """Whether it can start only once the sweep's runs are done."""
        return self.share is None


def ratio(cfg: TrainClassifierConfig, spec: VariantSpec) -> float:
    """The variant's own synthetic share of the labeled stream, or train_classifier.synthetic_ratio."""
    return cfg.synthetic_ratio if spec.synthetic_ratio is None else spec.synthetic_ratio


def fixed_share(cfg: TrainClassifierConfig, spec: VariantSpec) -> float:
    """The share without a sweep: none without synthetic images, all of them without real ones."""
    return (ratio(cfg, spec) if spec.real else 1.0) if spec.adds_images else 0.0


def sweep_shares(cfg: TrainClassifierConfig, spec: VariantSpec) -> list[float]:
    """The candidate shares tried on the first sweep_seeds seeds ([] when the variant does not sweep)."""
    return list(dict.fromkeys((ratio(cfg, spec), *cfg.ratio_sweep))) \
        if spec.adds_images and spec.real and cfg.ratio_sweep else []


def plan_runs(cfg: TrainClassifierConfig, spec: VariantSpec) -> list[Run]:
    """Every run a variant needs: the sweep's (or every seed at the fixed share), then those that wait."""
    shares = sweep_shares(cfg, spec)
    if not shares:
        return [Run(i, fixed_share(cfg, spec)) for i in range(cfg.seeds)]
    swept = min(cfg.sweep_seeds, cfg.seeds)
    return [Run(i, s) for s in shares for i in range(swept)] + [Run(i, None) for i in range(swept, cfg.seeds)]


def choose_share(sweep: dict[float, list[float]]) -> float:
    """The synthetic share to use from validation accuracies per candidate share (one per sweep
    seed), by ``RATIO_RULE`` when 0 is among the candidates; else the best mean."""
    mean = {r: sum(v) / len(v) for r, v in sweep.items()}
    if 0.0 not in sweep:
        return max(mean, key=mean.get)
    wins = [r for r in sweep if r != 0.0 and all(a > b for a, b in zip(sweep[r], sweep[0.0]))]
    return max(wins, key=mean.get) if wins else 0.0


def decide_share(cfg: TrainClassifierConfig, spec: VariantSpec, history: Callable[[Run], dict]
                 ) -> tuple[float, dict[float, list[float]] | None]:
    """The share every seed trains at, and the sweep (share -> validation accuracy per sweep seed) it was
    chosen by; ``history(run)``: a finished sweep run's training history."""
    shares = sweep_shares(cfg, spec)
    if not shares:
        return fixed_share(cfg, spec), None
    swept = range(min(cfg.sweep_seeds, cfg.seeds))
    sweep = {s: [history(Run(i, s))["best_val_acc"] for i in swept] for s in shares}
    for s, accs in sweep.items():
        log.info("ratio %.2f -> val acc %s", s, ", ".join(f"{a:.4f}" for a in accs))
    return choose_share(sweep), sweep


def carry_out(cfg: TrainClassifierConfig, spec: VariantSpec, get: Callable[[list[Run]], list[tuple]]
              ) -> tuple[list[tuple], float, dict | None]:
    """The variant's model per seed, the share they trained at and the sweep it was chosen by. ``get(runs)``
    gives each run's (model, history); every run is asked for once, those that can start at once together
    (so they can train side by side), then those that waited for the sweep's choice."""
    now = [run for run in plan_runs(cfg, spec) if not run.waits]
    done = dict(zip(now, get(now)))
    share, sweep = decide_share(cfg, spec, lambda run: done[run][1])
    rest = [Run(i, share) for i in range(cfg.seeds) if Run(i, share) not in done]
    done.update(zip(rest, get(rest) if rest else []))
    return [done[Run(i, share)] for i in range(cfg.seeds)], share, sweep
