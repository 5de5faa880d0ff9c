"""The package's shape: imports go one way, modules stay small, and dvc.yaml lists the code each
stage runs (so editing that code re-runs the stage instead of leaving a stale cached output)."""
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline import STAGE_ORDER

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
STAGES = ("prepare", "pseudo_label", "train_generator", "sample", "filter", "train_classifier", "report")


def test_every_stage_is_checked_and_dvc_runs_them_in_order():
    assert STAGES == STAGE_ORDER
    names = list(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])
    assert [n for n in names if n in STAGES] == list(STAGES)
    assert "data/pseudo" in stage_deps("train_generator")  # the generator learns from the pseudo-labels


def test_import_layers_contract_is_kept(capsys):
    """pyproject.toml's import-linter contract, checked in this process. Through import-linter's
    application function, not its CLI function: that one reconfigures logging (dictConfig), which
    disables every logger already made, the pipeline's included, for the rest of the session."""
    import importlinter.api  # noqa: F401 (configures import-linter's adapters)
    from importlinter.application.use_cases import SUCCESS, lint_imports

    logging.getLogger("pipeline.prepare")  # exists before the check, as it does in a session
    passed = lint_imports(config_filename=str(ROOT / "pyproject.toml"), cache_dir=None, no_logo=True)
    out = capsys.readouterr().out
    assert passed == SUCCESS, out[-3000:]
    assert "1 kept, 0 broken" in out
    assert not logging.getLogger("pipeline.prepare").disabled  # later tests still see the pipeline's log


def test_modules_stay_small():
    sizes = {p.relative_to(ROOT).as_posix(): len(p.read_text().splitlines()) for p in (ROOT / "pipeline").rglob("*.py")}
    assert max(sizes.values()) <= 400, {k: v for k, v in sizes.items() if v > 400}
    stage_sizes = {s: sizes[f"pipeline/{s}.py"] for s in STAGES}
    assert max(stage_sizes.values()) < 200, stage_sizes


def stage_deps(stage: str) -> list[str]:
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]
    deps = (spec.get("do") or spec)["deps"]
    return [d for d in deps if "${" not in d]


@pytest.fixture(scope="module")
def import_graph():
    import grimp

    return grimp.build_graph("pipeline", "flows", cache_dir=None)


def module_file(module: str) -> str:
    path = ROOT / module.replace(".", "/")
    return (path / "__init__.py" if path.is_dir() else path.with_suffix(".py")).relative_to(ROOT).as_posix()


def imported_files(graph, stage: str) -> set[str]:
    """Repository-relative files of every pipeline module the stage's flow imports, anywhere in the
    code (grimp reads the import statements, also those inside functions), with their packages."""
    modules = {f"pipeline.{stage}"} | graph.find_upstream_modules(f"pipeline.{stage}") | \
        graph.find_upstream_modules("flows.stages")
    modules = {m for m in modules if m.split(".")[0] == "pipeline"}
    modules |= {m.rsplit(".", i)[0] for m in modules for i in range(1, m.count(".") + 1)}  # their packages
    return {module_file(m) for m in modules} - {"pipeline/__init__.py"}  # version and stage names only


@pytest.mark.parametrize("stage", STAGES)
def test_dvc_deps_cover_every_module_the_stage_imports(stage, import_graph):
    deps = stage_deps(stage)
    files = imported_files(import_graph, stage)
    assert f"pipeline/{stage}.py" in files and "pipeline/core/__init__.py" in files
    uncovered = sorted(f for f in files
                       if not any(f == d or f.startswith(d.rstrip("/") + "/") for d in deps))
    assert not uncovered, f"dvc.yaml stage {stage} runs code it does not depend on: {uncovered}"
    assert "pipeline/profiles.yaml" in deps  # the size presets pipeline/config reads


def test_editing_the_judges_training_code_marks_filter_changed(tmp_path):
    """After a run is recorded (dvc commit), an edit to classifier fitting (which trains the
    pseudo-labeler and the filter's judge) makes dvc re-run pseudo_label, filter and the
    classifiers, not prepare, sample or report."""
    for name in ("pipeline", "flows", "dvc.yaml", "prefect.toml"):
        src = ROOT / name
        (shutil.copytree(src, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
         if src.is_dir() else shutil.copy(src, tmp_path / name))
    (tmp_path / "source").mkdir()
    (tmp_path / "source" / "x").write_text("x")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["prepare"]["path"] = "source"
    params["train_classifier"]["variants"] = {"real": {"data": "prepared"}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    for out in ("data/prepared", "data/pseudo", "models/generator", "models/generator_checkpoints", "data/synthetic",
                "data/synthetic_shards", "data/filtered", "data/cache", "models/classifier/real",
                "metrics/classifier/real/plots/metrics", "reports/figures", "reports/plots"):
        (tmp_path / out).mkdir(parents=True)
        (tmp_path / out / "x").write_text("x")
    for out in ("metrics/classifier/real.json", "metrics/stages/prepare.json", "metrics/stages/pseudo_label.json",
                "reports/report.html", "reports/report.md", "reports/metrics.json"):
        (tmp_path / out).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / out).write_text("{}")

    def dvc(*args):
        return subprocess.run([str(BIN / "dvc"), *args], cwd=tmp_path, capture_output=True, text=True, check=True)

    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    dvc("init", "-q")
    dvc("config", "core.analytics", "false")
    dvc("commit", "-f", "-q")
    assert json.loads(dvc("status", "--json").stdout) == {}
    with open(tmp_path / "pipeline" / "training" / "classifier.py", "a") as f:
        f.write("\n# an edit to classifier fitting\n")
    changed = set(json.loads(dvc("status", "--json").stdout))
    assert {"pseudo_label", "filter", "train_classifier@real"} <= changed
    assert not changed & {"prepare", "sample", "report"}, changed
