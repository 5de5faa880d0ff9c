"""Training curves as DVCLive logs: ``<folder>/plots/metrics/<name>.tsv`` (columns step, value),
which ``dvc plots show`` draws (plot definitions in dvc.yaml)."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

CURVES = "dvclive"  # the folder of DVCLive logs inside a stage's output folder


def write_curves(folder: str | Path, curves: dict[str, tuple[list[int], list[float]]]) -> None:
    """Log each named curve (its steps, its values) with DVCLive into ``folder`` (a fresh folder,
    e.g. inside a stage's atomic output). A name may hold a slash (``seed0/val_acc``)."""
    from dvclive import Live  # imported here: training loops import without DVC (a bare GPU box has none)

    with Live(dir=str(folder), save_dvc_exp=False, dvcyaml=None, report=None, monitor_system=False) as live:
        for name, (steps, values) in curves.items():
            for step, value in zip(steps, values):
                live.step = int(step)
                live.log_metric(name, float(value), plot=True)


def read_curve(folder: str | Path, name: str) -> pd.DataFrame:
    """One curve written by ``write_curves``: columns step and ``name``'s last part."""
    return pd.read_csv(Path(folder) / "plots" / "metrics" / f"{name}.tsv", sep="\t")
