"""Compare generator kinds across runs: the generative trilemma measured on your data.

Run each kind as a DVC experiment (``dvc exp run -S train_generator.kind=cgan`` ...), then
``synthaug compare``. A run's numbers come from its own stage outputs, read at the
experiment's commit with ``dvc.api`` (the workspace counts as a run too):
``models/generator/generator.json`` (training time), ``data/synthetic/summary.json``
(sampling speed), ``data/filtered/summary.json`` (Frechet distance, KID,
precision/recall, acceptance) and ``reports/metrics.json`` (accuracy gain). Writes
``reports/generators.md``, ``reports/generators.json`` and ``reports/generators.png``.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd

from pipeline.core.io import atomic_path, save_figure, write_json
from pipeline.core.plotting import pyplot
from pipeline.reporting.tables import pct

log = logging.getLogger(__name__)
FILES = {"generator": "models/generator/generator.json", "sample": "data/synthetic/summary.json",
         "filter": "data/filtered/summary.json", "report": "reports/metrics.json"}


def read_run(repo: Path, rev: str | None) -> dict | None:
    """The four summaries of one run (``rev`` None = the workspace), or None if one is missing."""
    import dvc.api

    out = {}
    for key, rel in FILES.items():
        try:
            if rev is None:
                out[key] = json.loads((repo / rel).read_text())
            else:
                with dvc.api.open(rel, repo=str(repo), rev=rev) as f:
                    out[key] = json.load(f)
        except Exception as err:  # not run to the end, or outputs no longer in the cache
            log.warning("%s: no %s (%s); run skipped", rev or "workspace", rel, type(err).__name__)
            return None
    return out


def experiments(repo: Path) -> list[tuple[str, str]]:
    """(name, commit) of every finished DVC experiment in ``repo`` (``dvc.api.exp_show``)."""
    import dvc.api
    from dvc.exceptions import DvcException
    from scmrepo.exceptions import SCMError

    try:
        rows = dvc.api.exp_show(repo=str(repo))
    except (DvcException, SCMError) as err:  # not a git + DVC repository: the workspace is the only run
        log.info("compare: no DVC experiments in %s (%s)", repo, type(err).__name__)
        return []
    return [(r["Experiment"], r["rev"]) for r in rows
            if r.get("Experiment") and r.get("State") in (None, "Success")]


def row(name: str, run: dict) -> dict:
    """One table row: speed, quality and usefulness of one run's generator."""
    g, s, f, r = run["generator"], run["sample"], run["filter"], run["report"]
    m = f["metrics"]
    syn = r["variants"].get(r.get("synthetic_variant") or "real+synthetic", {})
    cas = r["variants"].get("synthetic-only", {})
    return {
        "kind": g.get("kind", "unet"), "run": name, "parameters_m": round(g["num_parameters"] / 1e6, 2),
        "train_steps": g["steps"], "train_seconds": g["timing"]["seconds"], "device": g["device"],
        "images_per_second": s["images_per_second"], "n_synthetic": f["n"]["synthetic"],
        "fd_all": m["before"]["frechet_distance"]["value"], "kid_all": m["before"]["kid"]["value"],
        "precision_all": m["before"]["precision"]["value"], "recall_all": m["before"]["recall"]["value"],
        "n_accepted": f["n"]["accepted"],
        "fd_accepted": (m.get("after") or {}).get("frechet_distance", {}).get("value"),
        "fd_floor": m["floor"]["frechet_distance"]["value"], "n_reference": f["n"]["metric_reference"],
        "feature_space": f["feature_space"], "acceptance": f["acceptance"]["rate"],
        "synthetic_variant": r.get("synthetic_variant"), "gain": syn.get("diff"),
        "gain_low": r.get("gain_ci95_low"), "gain_high": r.get("gain_ci95_high"),
        "gain_p": syn.get("p_value"),
        "real_accuracy": r["variants"].get(r.get("baseline") or "real", {}).get("accuracy"),
        "synthetic_only_accuracy": cas.get("accuracy"), "helped": r["helped"], "seeds": r["seeds"],
        "n_test": r["n_test"], "fingerprint": g["fingerprint"],
    }


def collect(repo: Path = Path("."), names: list[str] | None = None) -> pd.DataFrame:
    """Rows of the workspace and every experiment (or only ``names``), one per distinct run."""
    runs = [("workspace", None), *experiments(repo)]
    rows = []
    for name, rev in runs:
        if names and name not in names:
            continue
        run = read_run(repo, rev)
        if run is not None:
            rows.append(row(name, run))
    if not rows:
        raise FileNotFoundError("no finished runs to compare: run `dvc repro` or "
                                "`dvc exp run -S train_generator.kind=<kind>` first")
    df = pd.DataFrame(rows)
    # the workspace usually equals one experiment: keep one row per distinct result
    return df.drop_duplicates(["fingerprint", "gain", "fd_all"]).sort_values(["kind", "run"]).reset_index(drop=True)


def to_markdown(df: pd.DataFrame) -> str:
    first = df.iloc[0]
    lines = [
        "# Generator comparison",
        "",
        f"Each row is one full pipeline run (`dvc exp run -S train_generator.kind=...`). Quality: "
        f"{first.feature_space} features against {first.n_reference} real test images "
        "(lower FD is better; precision = realism, recall = coverage). Accuracy: the synthetic variant best on "
        "validation minus real, "
        f"paired by seed ({first.seeds} seeds, N={first.n_test} real test images, 95% CI). Speeds are wall-clock "
        "on the device named, under whatever else ran on it.",
        "",
        "| kind | run | params (M) | train s (steps) | sampling img/s | FD all (N) | FD accepted (N) | "
        "real floor FD | precision | recall | accepted | synthetic-only acc % | gain vs real, points [95% CI] | p |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in df.itertuples():
        gain = ("n/a" if r.gain is None or pd.isna(r.gain)
                else f"{100 * r.gain:+.1f} [{100 * r.gain_low:+.1f}, {100 * r.gain_high:+.1f}]")
        fd_acc = "n/a" if r.fd_accepted is None or pd.isna(r.fd_accepted) else f"{r.fd_accepted:.1f} ({r.n_accepted})"
        p = "" if r.gain_p is None or pd.isna(r.gain_p) else f"{r.gain_p:.2f}"
        train = f"{r.train_seconds:.0f}" if r.train_seconds else "n/a"  # 0: resumed from finished checkpoints
        lines.append(
            f"| {r.kind} | {r.run} | {r.parameters_m:.2f} | {train} ({r.train_steps}) | "
            f"{r.images_per_second:.2f} ({r.device}) | {r.fd_all:.1f} ({r.n_synthetic}) | {fd_acc} | "
            f"{r.fd_floor:.1f} | {r.precision_all:.2f} | {r.recall_all:.2f} | {100 * r.acceptance:.1f}% | "
            f"{pct(r.synthetic_only_accuracy)} | {gain} | {p} |")
    helped = df[df.helped.astype(bool)]
    lines += ["", ("Synthetic data significantly helped with: " + ", ".join(helped.kind) + "."
                   if len(helped) else "No generator's synthetic data significantly helped (every interval includes "
                   "zero or lies below it)."), ""]
    return "\n".join(lines)


def figure(df: pd.DataFrame):
    """The trilemma: sampling speed vs quality (FD), marker size = coverage (recall), label = gain."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for r in df.itertuples():
        ax.scatter(r.images_per_second, r.fd_all, s=60 + 600 * r.recall_all, alpha=0.6)
        gain = "" if r.gain is None or pd.isna(r.gain) else f" ({100 * r.gain:+.1f} pts)"
        ax.annotate(f"{r.kind}{gain}", (r.images_per_second, r.fd_all), xytext=(6, 6), textcoords="offset points")
    ax.axhline(df.fd_floor.iloc[0], color="grey", ls="--", lw=1,
               label=f"real vs real floor (N={df.n_reference.iloc[0]})")
    ax.set_xscale("log")
    ax.set_xlabel("sampling speed, images/s (log)")
    ax.set_ylabel(f"Frechet distance, all samples\n({df.feature_space.iloc[0]})")
    ax.set_title("generators: speed vs quality (marker size = recall)")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    return fig


def run(repo: Path = Path("."), names: list[str] | None = None, out: Path | None = None) -> pd.DataFrame:
    df = collect(repo, names)
    out = out or repo / "reports"
    with atomic_path(out / "generators.md") as tmp:
        tmp.write_text(to_markdown(df))
    write_json(out / "generators.json", {"runs": df.to_dict(orient="records")})
    save_figure(figure(df), out / "generators.png")
    log.info("compare: %d runs (%s) -> %s", len(df), ", ".join(df.kind), out / "generators.md")
    return df
