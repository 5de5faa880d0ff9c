"""Where a result came from: what each output was made from and with (checked before results are
compared), git revision, dvc.lock, package versions, machine."""
from __future__ import annotations

import platform
import shlex
import subprocess
import time
from importlib import metadata
from pathlib import Path

from pipeline.config import STAGES, Params, Paths, keeps_output, params_diff
from pipeline.core.io import OUTPUTS, read_output, sha256_file
from pipeline.errors import DataError

PACKAGES = ("torch", "diffusers", "timm", "torch-fidelity", "datasets", "prefect", "dvc", "accelerate")


def package_versions(packages=PACKAGES) -> dict[str, str]:
    out = {}
    for p in packages:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = "not installed"
    return out


def _git(root: Path, *args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def git_revision(root: Path) -> tuple[str | None, bool]:
    """Short HEAD revision (None outside git) and whether tracked files have uncommitted changes."""
    rev = _git(root, "rev-parse", "--short", "HEAD") or None
    return rev, bool(rev and _git(root, "status", "--porcelain", "--untracked-files=no"))


def run_metadata(root: Path, device: str) -> dict:
    """Git revision (and whether the tree was dirty), dvc.lock hash, device, versions, time."""
    rev, dirty = git_revision(root)
    lock = Path(root) / "dvc.lock"
    return {"git_revision": rev or "unknown", "git_dirty": dirty,
            "dvc_lock_sha256": sha256_file(lock)[:12] if lock.exists() else None, "device": device,
            "python": platform.python_version(), "platform": platform.platform(), "packages": package_versions(),
            "generated": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


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


def check_classifiers(variants: dict[str, dict], params: Params, paths: Paths, outputs: dict[str, dict]) -> None:
    """Refuse to compare classifiers that were not all trained on the current data with the current
    classifier settings: each variant records the fingerprint of every stage output it read and the
    params it was trained with, and the report would otherwise credit one setting with another's
    accuracy (or describe a generator beside images another generator made). ``outputs``: the
    current outputs as ``earlier_outputs`` read and checked them (any other is read here)."""
    why = {}
    for v, m in variants.items():
        reasons = [f"{n} changed since ({OUTPUTS[n][0]} ran again)" for n, fp in (m.get("inputs") or {}).items()
                   if fp != (outputs.get(n) or read_output(paths, n)).get("fingerprint")]
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
        same = keeps_output(STAGES[stage])  # e.g. sample's shard count: the same images whatever it is
        changed = params_diff(*({"base": p.get("base"), stage: {k: v for k, v in (p.get(stage) or {}).items()
                                                                if k not in same}} for p in (made, now)))
        if changed:
            notes.append(f"{name} was made with other params than params.yaml's now ({', '.join(changed[:4])}"
                         f"{', ...' if len(changed) > 4 else ''}): this report describes it as it was made; dvc "
                         f"repro would re-run {stage}.")
    return shown, notes
