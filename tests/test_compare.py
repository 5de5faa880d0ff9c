"""compare: one row per generator run, from the stage summaries; markdown, JSON and figure."""
from __future__ import annotations

import subprocess
import sys

import pytest

from pipeline.core.io import read_json, write_json
from pipeline.reporting import compare


def fake_run(root, kind: str, fd: float, gain: float, helped: bool = False) -> None:
    """The four summaries a finished pipeline run leaves, with only the fields compare reads."""
    metric = lambda v: {"value": v}  # noqa: E731
    write_json(root / compare.FILES["generator"], {"kind": kind, "num_parameters": 1_060_000, "steps": 1000,
                                                   "timing": {"seconds": 600.0}, "device": "cpu",
                                                   "fingerprint": kind * 8})
    write_json(root / compare.FILES["sample"], {"images_per_second": 5.0 if kind == "unet" else 400.0})
    write_json(root / compare.FILES["filter"], {
        "feature_space": "efficientnet-lite0 (ImageNet)", "acceptance": {"rate": 0.25},
        "n": {"synthetic": 1000, "accepted": 250, "metric_reference": 1000},
        "metrics": {"before": {"frechet_distance": metric(fd), "kid": metric(0.05), "precision": metric(0.4),
                               "recall": metric(0.3)},
                    "after": {"frechet_distance": metric(fd - 10)}, "floor": {"frechet_distance": metric(17.0)}}})
    write_json(root / compare.FILES["report"], {
        "helped": helped, "seeds": 3, "n_test": 10000, "gain_ci95_low": gain - 0.02, "gain_ci95_high": gain + 0.02,
        "variants": {"real": {"accuracy": 0.77},
                     "real+synthetic": {"accuracy": 0.77 + gain, "diff": gain, "p_value": 0.5},
                     "synthetic-only": {"accuracy": 0.6}}})


def test_workspace_run_becomes_one_row_with_its_numbers(tmp_path):
    fake_run(tmp_path, "cgan", fd=80.0, gain=-0.01)
    df = compare.run(tmp_path)
    assert len(df) == 1
    r = df.iloc[0]
    assert (r.kind, r.run, r.fd_all, r.fd_accepted, r.n_accepted, r.images_per_second) == (
        "cgan", "workspace", 80.0, 70.0, 250, 400.0)
    md = (tmp_path / "reports" / "generators.md").read_text()
    assert "| cgan | workspace | 1.06 | 600 (1000) | 400.00 (cpu) | 80.0 (1000) | 70.0 (250) | 17.0 |" in md
    assert "-1.0 [-3.0, +1.0]" in md and "No generator's synthetic data significantly helped" in md
    assert read_json(tmp_path / "reports" / "generators.json")["runs"][0]["kind"] == "cgan"
    assert (tmp_path / "reports" / "generators.png").read_bytes()[:4] == b"\x89PNG"


def test_missing_summaries_are_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no finished runs to compare"):
        compare.run(tmp_path)


def test_experiments_are_read_at_their_commits(tmp_path):
    """Two kinds committed on experiment refs (as dvc exp run leaves them) plus the workspace."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    git("config", "user.email", "t@example.com")
    git("config", "user.name", "t")
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=tmp_path, check=True)
    git("commit", "-qm", "baseline")
    base = git("rev-parse", "HEAD")
    for kind, fd in (("dit", 90.0), ("unet", 99.0)):
        # dvc exp run: a commit on top of the baseline under refs/exps/<base[:2]>/<base[2:]>/<name>; HEAD stays
        fake_run(tmp_path, kind, fd=fd, gain=0.004)
        git("add", "-A")
        git("commit", "-qm", kind)
        git("update-ref", f"refs/exps/{base[:2]}/{base[2:]}/cpu-{kind}", git("rev-parse", "HEAD"))
        git("reset", "-q", "--hard", base)
    fake_run(tmp_path, "unet", fd=99.0, gain=0.004)  # the workspace holds the outputs of cpu-unet
    df = compare.collect(tmp_path)  # the workspace equals cpu-unet: one row for it
    assert sorted(zip(df.kind, df.fd_all)) == [("dit", 90.0), ("unet", 99.0)]
    assert list(compare.collect(tmp_path, ["cpu-dit"]).kind) == ["dit"]
