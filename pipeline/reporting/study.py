"""Studies as DVC experiments: each point of a study is one ``dvc exp run`` of the pipeline over params (a label
budget, a synthetic set's size, ...; docs/studies.md), and ``synthaug study`` summarizes the finished ones.

Which runs there are and their metrics come from ``dvc exp show --json`` (the workspace counts as a run); each
variant's per-seed scores from its ``metrics/classifier/<variant>.json`` at the run's commit (``dvc exp show``
keeps numbers only, not the per-seed list). A run's label budget is its labeled images per class (the variant
record's ``n_train_real`` over its classes). Every row is compared with the named reference variant of the same
run, paired by seed (``core.stats.paired_difference``, 95%). Scores are on the dev split (``prepare.dev_per_class``)
or on val, never on test: a study never reads the test set. Writes ``<out>.md``, ``<out>.json`` and ``<out>.png``.
"""
from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

from pipeline.core.io import atomic_path, save_figure, write_json
from pipeline.core.plotting import pyplot
from pipeline.core.stats import mean_ci, paired_difference
from pipeline.errors import ConfigError, DataError

log = logging.getLogger(__name__)
METRICS_DIR = "metrics/classifier/"
SCORES = {"dev_accuracy": "dev split (prepare.dev_per_class)", "best_val_accuracy": "val split (model selection)"}


def exp_show(repo: Path) -> list[dict]:
    """``dvc exp show --json`` of ``repo``, parsed (the dvc next to this interpreter, as ``synthaug repro``)."""
    dvc = shutil.which("dvc", path=str(Path(sys.executable).parent)) or shutil.which("dvc")
    if dvc is None:
        raise ConfigError("synthaug study: the dvc command is not installed here; run make setup (or pip install dvc)")
    out = subprocess.run([dvc, "exp", "show", "--json"], cwd=repo, capture_output=True, text=True)
    if out.returncode:
        raise DataError(f"dvc exp show failed in {repo}: {out.stderr.strip()[-400:]}")
    return json.loads(out.stdout)


def finished(doc: list[dict]) -> list[tuple[str, str | None, list[str]]]:
    """(name, commit or None for the workspace, variant metric files) of every finished run in ``dvc exp show
    --json``'s output: the workspace and each experiment that is neither queued nor running."""
    def files(data: dict) -> list[str]:
        return sorted(f for f, m in (data.get("metrics") or {}).items()
                      if f.startswith(METRICS_DIR) and f.endswith(".json") and "data" in m)

    runs, workspace = [], []  # the workspace last: where it equals an experiment, the experiment names the rows
    for base in doc:
        if base.get("rev") == "workspace" and base.get("data"):
            workspace.append(("workspace", None, files(base["data"])))
        for exp in base.get("experiments") or []:
            if exp.get("executor"):  # queued or running: not finished
                continue
            for r in exp.get("revs") or []:
                if not r.get("error") and r.get("data"):
                    runs.append((r.get("name") or exp.get("name") or r["rev"][:7], r["rev"], files(r["data"])))
    return runs + workspace


def read_variants(repo: Path, rev: str | None, files: list[str]) -> dict[str, dict]:
    """variant -> its metrics file (full, per-seed list included) at commit ``rev`` (None: the workspace)."""
    out = {}
    for f in files:
        if rev is None:
            text = (repo / f).read_text()
        else:
            got = subprocess.run(["git", "show", f"{rev}:{f}"], cwd=repo, capture_output=True, text=True)
            if got.returncode:
                log.warning("study: %s has no %s in git; skipped", rev[:7], f)
                continue
            text = got.stdout
        out[f[len(METRICS_DIR):-len(".json")]] = json.loads(text)
    return out


def budget(variants: dict[str, dict]) -> int | None:
    """A run's labeled images per class: the most any of its variants trained on, over its classes."""
    per_class = [m["n_train_real"] / len(m["class_names"]) for m in variants.values()
                 if m.get("n_train_real") and m.get("class_names")]
    return round(max(per_class)) if per_class else None


def scores(m: dict, score: str) -> dict[int, float]:
    return {r["seed"]: r[score] for r in m.get("per_seed") or [] if r.get(score) is not None}


def summarize(runs: list[dict], reference: str, score: str = "dev_accuracy") -> list[dict]:
    """One record per (label budget, row): ``runs`` are {"run": name, "variants": {variant: metrics}}. A row is a
    variant of a run (named ``variant`` alone when no other run at that budget has a different one of that name);
    its mean and 95% interval of ``score`` over seeds, and its paired difference with ``reference`` of the same run."""
    if score not in SCORES:
        raise ConfigError(f"study: score {score!r} is not one of {sorted(SCORES)}: a study never reads the test split")
    seen, rows = {}, []
    for run in runs:
        at = budget(run["variants"])
        ref = scores(run["variants"].get(reference, {}), score)
        for variant, m in run["variants"].items():
            s = scores(m, score)
            if not s:
                continue
            key = (at, variant, tuple(sorted(s.items())))
            if key in seen:  # the same results in two runs (the workspace and its experiment): once
                continue
            seen[key] = True
            pairs = sorted(set(s) & set(ref))
            diff = (paired_difference([s[k] for k in pairs], [ref[k] for k in pairs])
                    if variant != reference and len(pairs) >= 2 else None)
            rows.append({"labels_per_class": at, "row": variant, "run": run["run"], "variant": variant,
                         "seeds": sorted(s),
                         **{k: v for k, v in mean_ci(list(s.values())).items() if k != "confidence"},
                         "vs_reference": diff})
    names = {}
    for r in rows:
        names.setdefault((r["labels_per_class"], r["variant"]), set()).add(r["run"])
    for r in rows:
        if len(names[(r["labels_per_class"], r["variant"])]) > 1:
            r["row"] = f"{r['variant']} ({r['run']})"
    if not rows:
        raise DataError(f"study: no finished run has {score} per seed; with dev_accuracy, set prepare.dev_per_class "
                        "above 0 in the study's runs (docs/studies.md)")
    return sorted(rows, key=lambda r: (r["labels_per_class"] or 0, r["row"]))


def pts(x: float | None) -> str:
    return "" if x is None else f"{100 * x:+.1f}"


def to_markdown(rows: list[dict], reference: str, score: str, title: str) -> str:
    lines = [f"# {title}", "",
             "Each point is one `dvc exp run` of the pipeline (docs/studies.md); accuracy in % on the "
             f"{SCORES[score]}, mean over seeds with a 95% Student-t interval; each row against `{reference}` of the "
             "same run, paired by seed (95%, `paired_difference`). The test split is never read.", ""]
    for at in dict.fromkeys(r["labels_per_class"] for r in rows):
        lines += [f"## {at} labeled images per class", "",
                  f"| row | run | seeds | accuracy % [95%] | vs {reference}, points [95%] | p |",
                  "|---|---|---|---|---|---|"]
        for r in (r for r in rows if r["labels_per_class"] == at):
            d = r["vs_reference"]
            vs = "reference" if r["variant"] == reference else "" if d is None else \
                f"{pts(d['mean_diff'])} [{pts(d['low'])}, {pts(d['high'])}]"
            p = "" if d is None or d["p_value"] is None else f"{d['p_value']:.3f}"
            lines.append(f"| {r['row']} | {r['run']} | {r['n']} | {100 * r['mean']:.2f} "
                         f"[{100 * r['low']:.2f}, {100 * r['high']:.2f}] | {vs} | {p} |")
        lines.append("")
    return "\n".join(lines)


def figure(rows: list[dict], score: str):
    """Accuracy against labels per class, one line per row, its 95% interval shaded."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name in dict.fromkeys(r["row"] for r in rows):
        pts_ = sorted((r for r in rows if r["row"] == name and r["labels_per_class"]),
                      key=lambda r: r["labels_per_class"])
        x = [r["labels_per_class"] for r in pts_]
        ax.plot(x, [100 * r["mean"] for r in pts_], marker="o", label=name)
        ax.fill_between(x, [100 * r["low"] for r in pts_], [100 * r["high"] for r in pts_], alpha=0.2)
    ax.set_xscale("log")
    ax.set_xlabel("labeled images per class")
    ax.set_ylabel(f"accuracy % ({score.replace('_accuracy', '').replace('best_', '')} split)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def run(repo: Path = Path("."), reference: str = "fixmatch", names: list[str] | None = None,
        score: str = "dev_accuracy", out: Path = Path("reports/study"), title: str = "Study") -> list[dict]:
    """Summarize the finished runs of ``repo`` (only ``names``, when given) into ``out``.md / .json / .png."""
    runs = [{"run": name, "variants": read_variants(repo, rev, files)}
            for name, rev, files in finished(exp_show(repo)) if not names or name in names]
    rows = summarize(runs, reference, score)
    out = repo / out
    with atomic_path(out.with_suffix(".md")) as tmp:
        tmp.write_text(to_markdown(rows, reference, score, title) + f"\n![{title}]({out.name}.png)\n")
    write_json(out.with_suffix(".json"), {"reference": reference, "score": score, "rows": rows})
    save_figure(figure(rows, score), out.with_suffix(".png"))
    log.info("study: %d rows from %d runs -> %s.md", len(rows), len(runs), out)
    return rows
