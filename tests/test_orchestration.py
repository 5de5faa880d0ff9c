"""End to end: `dvc repro` on the micro profile, on a copy of the project in a temp dir with the
session's tiny Fashion-MNIST-format dataset (a deployment through a worker: test_deployment.py; the
fan-outs: test_fanout.py)."""
import json

import pytest
import yaml

from tests.helpers import env, project_copy, ran_stages, run

pytestmark = pytest.mark.slow


def test_dvc_repro_end_to_end_then_cached_then_partial(tmp_path, tiny_fmnist, prefect_server):
    proj = project_copy(tmp_path / "proj", tiny_fmnist)
    e = env(**prefect_server)
    first = run(["dvc", "repro"], proj, env=e)
    stages = ran_stages(first.stdout)
    assert {"prepare", "pseudo_label", "train_generator", "sample", "filter", "report",
            "train_classifier@real"} <= stages
    html = (proj / "reports/report.html").read_text()
    metrics = json.loads((proj / "reports/metrics.json").read_text())
    assert metrics["synthetic_variant"] in html and "data:image/png;base64," in html
    assert metrics["headline"].startswith(f"Use {metrics['recommend']} (") and len(metrics["headline"]) <= 120
    assert (proj / metrics["model"]).is_file() and metrics["findings"][0]["a"] == metrics["synthetic_variant"]
    assert metrics["n_test"] == 30 and metrics["seeds"] == 2
    shown = run(["dvc", "metrics", "show", "--json"], proj, env=e).stdout
    assert "accuracy_mean" in shown

    second = run(["dvc", "repro"], proj, env=e)
    assert ran_stages(second.stdout) == set(), second.stdout
    # prepare run again on unchanged data writes identical bytes (its run time goes to metrics/stages/),
    # so nothing downstream is stale
    forced = run(["dvc", "repro", "-f", "prepare"], proj, env=e)
    assert ran_stages(forced.stdout) == {"prepare"}, forced.stdout
    assert ran_stages(run(["dvc", "repro", "--dry"], proj, env=e).stdout) == set()

    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["train_classifier"]["lr"] = 0.002
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    dry = run(["dvc", "repro", "--dry"], proj, env=e)
    rerun = ran_stages(dry.stdout)
    # every classifier variant and nothing upstream; report follows them through its deps
    # on metrics/classifier, which --dry cannot see change before they are re-run
    assert rerun == {s for s in stages if s.startswith("train_classifier@")}, rerun
    assert "metrics/classifier" in (proj / "dvc.yaml").read_text().split("report:")[1]


def test_user_mistake_under_dvc_repro_is_one_message(tmp_path, tiny_fmnist, prefect_server):
    """A bad param fails the stage's flow run with the message (exit 2), no Prefect traceback."""
    proj = project_copy(tmp_path / "proj", tiny_fmnist)
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["prepare"]["labeled_per_class"] = "many"
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = run(["dvc", "repro", "prepare"], proj, check=False, env=env(**prefect_server))
    text = out.stdout + out.stderr
    assert out.returncode != 0 and "prepare.labeled_per_class: Input should be a valid integer" in text
    assert "Traceback" not in text and "exited with 2" in text
