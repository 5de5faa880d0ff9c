"""reporting/study.py: a study's finished DVC experiments summarized, on synthetic metrics (no training)."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.errors import ConfigError, DataError
from pipeline.reporting import study

CLASSES = [f"c{i}" for i in range(10)]


def metrics(labels_per_class, dev, n_train_real=None):
    """A variant's metrics file as train_classifier writes it, with only what the study reads."""
    return {"n_train_real": labels_per_class * 10 if n_train_real is None else n_train_real, "class_names": CLASSES,
            "per_seed": [{"seed": 3000 + i, "accuracy": 0.99, "best_val_accuracy": d - 0.01, "dev_accuracy": d}
                         for i, d in enumerate(dev)]}


def runs():
    return [
        {"run": "b5", "variants": {"fixmatch": metrics(5, [0.70, 0.72, 0.71]),
                                   "fixmatch+synthetic": metrics(5, [0.73, 0.74, 0.74]),
                                   "fixmatch+oracle": metrics(5, [0.78, 0.79, 0.80])}},
        {"run": "b50", "variants": {"fixmatch": metrics(50, [0.84, 0.85, 0.86]),
                                    "fixmatch+synthetic": metrics(50, [0.84, 0.85, 0.85])}},
        {"run": "workspace", "variants": {"fixmatch": metrics(50, [0.84, 0.85, 0.86]),  # the same as b50
                                          "fixmatch+synthetic": metrics(50, [0.84, 0.85, 0.85])}},
        {"run": "b5-size1000", "variants": {"fixmatch": metrics(5, [0.70, 0.72, 0.71]),  # another synthetic set
                                            "fixmatch+synthetic": metrics(5, [0.71, 0.72, 0.73])}},
    ]


def test_rows_per_budget_paired_with_the_reference_of_their_own_run():
    rows = study.summarize(runs(), "fixmatch")
    got = {(r["labels_per_class"], r["row"]): r for r in rows}
    assert set(got) == {(5, "fixmatch"), (5, "fixmatch+oracle"), (5, "fixmatch+synthetic (b5)"),
                        (5, "fixmatch+synthetic (b5-size1000)"), (50, "fixmatch"), (50, "fixmatch+synthetic")}
    syn = got[(5, "fixmatch+synthetic (b5)")]
    assert syn["vs_reference"]["mean_diff"] == pytest.approx(0.08 / 3) and syn["vs_reference"]["n"] == 3
    assert syn["vs_reference"]["low"] > 0 and syn["mean"] == pytest.approx(0.7366667) and syn["n"] == 3
    assert got[(5, "fixmatch")]["vs_reference"] is None and got[(50, "fixmatch")]["run"] == "b50"  # workspace: once
    assert got[(50, "fixmatch+synthetic")]["vs_reference"]["mean_diff"] == pytest.approx(-0.01 / 3)
    md = study.to_markdown(rows, "fixmatch", "dev_accuracy", "Label budget")
    assert "## 5 labeled images per class" in md and "| fixmatch+oracle | b5 | 3 | 79.00 [" in md
    assert "| +8.0 [" in md and "dev split" in md and "never read" in md
    with pytest.raises(ConfigError, match="never reads the test split"):
        study.summarize(runs(), "fixmatch", score="accuracy")
    no_dev = [{"run": "x", "variants": {"fixmatch": {"n_train_real": 50, "class_names": CLASSES,
                                                     "per_seed": [{"seed": 0, "accuracy": 0.9}]}}}]
    with pytest.raises(DataError, match="prepare.dev_per_class"):
        study.summarize(no_dev, "fixmatch")


def test_finished_runs_from_dvc_exp_show_json():
    def data(n):
        return {"metrics": {"metrics/classifier/fixmatch.json": {"data": {"n_train_real": n}},
                            "metrics/classifier/gone.json": {"error": {"type": "FileNotFoundError"}},
                            "reports/metrics.json": {"data": {}}}}
    doc = [{"rev": "workspace", "data": data(50), "experiments": None},
           {"rev": "a" * 40, "name": "main", "data": data(50), "experiments": [
               {"name": "b5", "executor": None,
                "revs": [{"rev": "b" * 40, "name": "b5", "data": data(50), "error": None}]},
               {"name": "queued", "executor": "dvc-task", "revs": [{"rev": "c" * 40, "data": data(5), "error": None}]},
               {"name": "failed", "executor": None, "revs": [{"rev": "d" * 40, "data": {}, "error": {"type": "x"}}]}]}]
    assert study.finished(doc) == [("b5", "b" * 40, ["metrics/classifier/fixmatch.json"]),
                                   ("workspace", None, ["metrics/classifier/fixmatch.json"])]


def test_run_writes_markdown_json_and_plot(tmp_path, monkeypatch):
    for variant, m in runs()[0]["variants"].items():
        (tmp_path / "metrics/classifier").mkdir(parents=True, exist_ok=True)
        (tmp_path / f"metrics/classifier/{variant}.json").write_text(json.dumps(m))
    files = [f"metrics/classifier/{v}.json" for v in runs()[0]["variants"]]
    doc = [{"rev": "workspace", "data": {"metrics": {f: {"data": {}} for f in files}}}]
    monkeypatch.setattr(study, "exp_show", lambda repo: doc)
    rows = study.run(tmp_path, "fixmatch", out=Path("reports/label_budget"), title="Label budget")
    assert len(rows) == 3
    assert (tmp_path / "reports/label_budget.png").stat().st_size > 0
    assert "![Label budget](label_budget.png)" in (tmp_path / "reports/label_budget.md").read_text()
    assert json.loads((tmp_path / "reports/label_budget.json").read_text())["reference"] == "fixmatch"


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_reads_a_real_experiment_at_its_commit(tmp_path):
    """dvc exp run of a one-stage project that writes a variant's metrics: the study finds and reads it."""
    dvc = str(Path(sys.executable).parent / "dvc")

    def sh(*a):
        return subprocess.run(a, cwd=tmp_path, check=True, capture_output=True, text=True)

    sh("git", "init", "-q")
    sh("git", "config", "user.email", "t@t")
    sh("git", "config", "user.name", "t")
    sh(dvc, "init", "-q")
    sh(dvc, "config", "core.analytics", "false")
    (tmp_path / "params.yaml").write_text("prepare:\n  labeled_per_class: 50\n")
    (tmp_path / "make.py").write_text(
        "import json, os, yaml\nn = yaml.safe_load(open('params.yaml'))['prepare']['labeled_per_class']\n"
        "os.makedirs('metrics/classifier', exist_ok=True)\n"
        "for v, d in (('fixmatch', 0.0), ('fixmatch+oracle', 0.05)):\n"
        "    json.dump({'n_train_real': n * 2, 'class_names': ['a', 'b'], 'per_seed': [{'seed': s, 'dev_accuracy':"
        " 0.5 + n / 1000 + d + s / 100} for s in range(3)]}, open(f'metrics/classifier/{v}.json', 'w'))\n")
    (tmp_path / "dvc.yaml").write_text(
        f"stages:\n  t:\n    cmd: {sys.executable} make.py\n    deps: [make.py]\n    params: [prepare]\n"
        "    metrics:\n      - metrics/classifier/fixmatch.json:\n          cache: false\n"
        "      - metrics/classifier/fixmatch+oracle.json:\n          cache: false\n")
    sh("git", "add", "-A")
    sh("git", "commit", "-qm", "init")
    sh(dvc, "exp", "run", "-q", "-S", "prepare.labeled_per_class=5", "-n", "b5")
    rows = study.run(tmp_path, "fixmatch", out=Path("reports/s"))
    assert {(r["labels_per_class"], r["row"], r["run"]) for r in rows} == {
        (5, "fixmatch", "b5"), (5, "fixmatch+oracle", "b5")}
    oracle = next(r for r in rows if r["variant"] == "fixmatch+oracle")
    assert oracle["vs_reference"]["mean_diff"] == pytest.approx(0.05) and oracle["mean"] == pytest.approx(0.565)
