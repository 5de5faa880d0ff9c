"""End to end: `dvc repro` on the micro profile, a deployment run through a real Prefect
server and process worker on loopback, and the two fan-outs over two process workers. Each
uses a copy of the project in a temp dir with a tiny Fashion-MNIST-format dataset written by
the test."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import make_idx_dir, stop_process_group

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


def project_copy(dst: Path, data: Path) -> Path:
    # prefect.toml: the project's Prefect settings (read from the project root, where the flows run)
    for name in ("pipeline", "flows", "dvc.yaml", "params.yaml", "prefect.yaml", "prefect.toml"):
        src = ROOT / name
        (shutil.copytree(src, dst / name, ignore=shutil.ignore_patterns("__pycache__"))
         if src.is_dir() else shutil.copy(src, dst / name))
    params = yaml.safe_load((dst / "params.yaml").read_text())
    params["base"]["profile"] = "micro"
    params["prepare"].update(path=str(data), labeled_per_class=10, val_per_class=5)
    # random-pixel data and a 20-step generator: let every sample through so each variant runs
    params["filter"].update(min_confidence=0.0, require_realism=False, memorization_ratio=0.0)
    # three of the six variants: the baseline, classic augmentation and one synthetic (each variant is one
    # more flow process under dvc repro, about 15 s of start-up on a slow core); the report's logic for any
    # set of variants is tested in test_report
    variants = params["train_classifier"]["variants"]
    params["train_classifier"]["variants"] = {v: variants[v] for v in ("real", "real+classic", "real+synthetic+classic")}
    (dst / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "init", "-q"], dst)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "init"], dst)
    run(["dvc", "init", "-q"], dst)
    run(["dvc", "config", "core.analytics", "false"], dst)
    return dst


def env(**extra) -> dict:
    e = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", PYTHONPATH="", **extra)
    e.pop("PREFECT_API_URL", None)
    e.update(extra)
    return e


def run(cmd, cwd, check=True, **kw):
    e = {**kw.pop("env", env()), "PWD": str(cwd)}
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=e, **kw)
    if check and out.returncode:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({out.returncode}):\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}")
    return out


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return make_idx_dir(tmp_path_factory.mktemp("fmnist"), n_train=120, n_test=30, classes=3, size=28)


def ran_stages(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")}


def test_dvc_repro_end_to_end_then_cached_then_partial(tmp_path, tiny_data, prefect_server):
    proj = project_copy(tmp_path / "proj", tiny_data)
    e = env(**prefect_server)
    first = run(["dvc", "repro"], proj, env=e)
    stages = ran_stages(first.stdout)
    assert {"prepare", "pseudo_label", "train_generator", "sample", "filter", "report", "train_classifier@real"} <= stages
    html = (proj / "reports/report.html").read_text()
    metrics = json.loads((proj / "reports/metrics.json").read_text())
    assert metrics["synthetic_variant"] in html and "data:image/png;base64," in html
    assert metrics["headline"].startswith("Use ") and "the synthetic variant best on validation" in metrics["answer"][0]
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


def test_deployment_runs_through_process_worker(tmp_path, tiny_data, prefect_server):
    proj = project_copy(tmp_path / "proj", tiny_data)
    e = env(**prefect_server)
    run(["prefect", "work-pool", "create", "test-gpu", "--type", "process"], proj, env=e)
    run(["prefect", "--no-prompt", "deploy", "--name", "augment", "--pool", "test-gpu"], proj, env=e)
    worker = subprocess.Popen([BIN / "prefect", "worker", "start", "--pool", "test-gpu", "--limit", "1"],
                              cwd=proj, env=e, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        script = ("from prefect.deployments import run_deployment\n"
                  "r = run_deployment('augment/augment', timeout=900, poll_interval=2)\n"
                  "print(r.state.type.value)\n")
        out = run([BIN / "python", "-c", script], proj, env=e, timeout=1000)
        assert out.stdout.strip().splitlines()[-1] == "COMPLETED", out.stdout + out.stderr
    finally:
        stop_process_group(worker)
    assert (proj / "reports/report.html").exists()  # ran in the deployed project, with its micro params
    assert (proj / "metrics/classifier/real.json").exists()
    assert json.loads((proj / "data/prepared/summary.json").read_text())["sizes"]["test"] == 30


def test_user_mistake_under_dvc_repro_is_one_message(tmp_path, tiny_data, prefect_server):
    """A bad param fails the stage's flow run with the message (exit 2), no Prefect traceback."""
    proj = project_copy(tmp_path / "proj", tiny_data)
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["prepare"]["labeled_per_class"] = "many"
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = run(["dvc", "repro", "prepare"], proj, check=False, env=env(**prefect_server))
    text = out.stdout + out.stderr
    assert out.returncode != 0 and "prepare.labeled_per_class: Input should be a valid integer" in text
    assert "Traceback" not in text and "exited with 2" in text


# The fan-outs (flows/deploy.py): a `gpu` pool with two process workers (one slot each) and a
# `control` pool for the fan-out flows, all on loopback, in one project copy both tests share.
FANOUT_DEPLOYMENTS = ("sample-shard", "sample-fanout", "classifier-seed", "classifier-fanout")

# Starts a run of deployment `name`; with "kill", SIGKILLs the process of the first run of deployment
# `child` as soon as it is running; waits for the first run to end and prints what happened as JSON.
WATCH = """
import json, os, signal, sys, time
from prefect import get_client
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
from prefect.deployments import run_deployment

name, params, kill, child = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3] == "kill", sys.argv[4]
parent = run_deployment(name, parameters=params, timeout=0)
killed = None
with get_client(sync_client=True) as client:
    def children():
        return client.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[child])))
    deadline = time.time() + 300
    while kill and killed is None and time.time() < deadline:
        running = [r for r in children() if r.state.is_running() and r.infrastructure_pid]
        if running:
            killed = running[0]
            os.kill(int(killed.infrastructure_pid.rsplit(":", 1)[-1]), signal.SIGKILL)
        time.sleep(0.2)
    while not (end := client.read_flow_run(parent.id)).state.is_final():
        time.sleep(1)
    print(json.dumps({"parent": end.state.type.value, "message": end.state.message,
                      "killed": str(killed.id) if killed else None,
                      "children": [{"id": str(r.id), "state": r.state.type.value, "parameters": r.parameters}
                                   for r in children()]}))
"""


@pytest.fixture(scope="module")
def fanout(tmp_path_factory, tiny_data, prefect_server):
    """What both fan-out tests start from: a project copy where `dvc repro sample` has run (generator
    trained, samples made by one process, both recorded in dvc.lock), the fan-out deployments and
    their workers. ``single_run``: that sample run's data files. A test may re-make sample's output
    only as these same bytes (the sample fan-out checks that its merge is)."""
    tmp = tmp_path_factory.mktemp("fanout")
    proj = project_copy(tmp / "proj", tiny_data)
    params = yaml.safe_load((proj / "params.yaml").read_text())
    # one variant with a ratio sweep (2 shares on the first seed) and a second seed that takes its choice
    params["train_classifier"].update(seeds=2, sweep_seeds=1, synthetic_ratio=0.25, ratio_sweep=[0.0],
                                      variants={"real+synthetic": {"data": "synthetic"}})
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # workers look for runs every second (Prefect's default is 10 s)
    e = env(**prefect_server, OMP_NUM_THREADS="1", PREFECT_WORKER_QUERY_SECONDS="1")
    run(["dvc", "repro", "sample"], proj, env=e)
    single_run = dataset_files(proj / "data/synthetic/dataset")
    for pool in ("gpu", "control"):
        run(["prefect", "work-pool", "create", pool, "--type", "process", "--overwrite"], proj, env=e)
    run(["prefect", "--no-prompt", "deploy", *[f"--name={d}" for d in FANOUT_DEPLOYMENTS]], proj, env=e)
    workers, logs = [], {}
    for name, pool in (("w1", "gpu"), ("w2", "gpu"), ("ctl", "control")):
        logs[name] = tmp / f"{name}.log"
        workers.append(subprocess.Popen([BIN / "prefect", "worker", "start", "--pool", pool, "--name", name,
                                         "--limit", "1" if pool == "gpu" else "4"], cwd=proj, env=e,
                                        stdout=logs[name].open("w"), stderr=subprocess.STDOUT, start_new_session=True))
    try:
        yield {"proj": proj, "env": e, "logs": logs, "single_run": single_run}
    finally:
        for w in workers:
            stop_process_group(w)


def watch(fanout, deployment: str, params: dict, child: str, kill: bool = False) -> dict:
    out = run([BIN / "python", "-c", WATCH, deployment, json.dumps(params), "kill" if kill else "-", child],
              fanout["proj"], env=fanout["env"], timeout=900)
    return json.loads(out.stdout.strip().splitlines()[-1])


def ran_on(fanout, runs: list[dict]) -> set[str]:
    """The gpu workers whose logs name one of these flow runs."""
    return {w for w in ("w1", "w2") if any(r["id"] in fanout["logs"][w].read_text() for r in runs)}


def dataset_files(folder: Path) -> dict[str, bytes]:
    # state.json holds the datasets library's cache key (_fingerprint), new in every save; the data is the rest
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != "state.json"}


def test_sample_fanout_over_two_workers_retries_a_killed_shard_and_merges_as_one_run(fanout):
    proj, e = fanout["proj"], fanout["env"]
    got = watch(fanout, "sample-fanout/sample-fanout", {"num_shards": 2}, "sample-shard", kill=True)
    assert got["parent"] == "COMPLETED", got
    shards = got["children"]
    assert got["killed"] and {r["id"]: r["state"] for r in shards}[got["killed"]] == "CRASHED", shards
    done = sorted(r["parameters"]["overrides"]["sample.shard_index"] for r in shards if r["state"] == "COMPLETED")
    assert len(shards) == 3 and done == [0, 1], shards  # the killed shard ran again, to completion
    assert ran_on(fanout, shards) == {"w1", "w2"}
    assert {p.name for p in (proj / "data/synthetic_shards").iterdir() if p.is_dir()} >= \
        {"shard-000-of-002", "shard-001-of-002"}
    # recorded: dvc sees sample up to date, and the merged set is what one process made (the fixture's run)
    assert json.loads((proj / "data/synthetic/summary.json").read_text())["num_shards"] == 2
    assert ran_stages(run(["dvc", "repro", "--dry", "sample"], proj, env=e).stdout) == set()
    assert dataset_files(proj / "data/synthetic/dataset") == fanout["single_run"]


def without_timing(d):
    if isinstance(d, dict):
        return {k: without_timing(v) for k, v in d.items() if k not in ("seconds", "seconds_per_step")}
    return [without_timing(v) for v in d] if isinstance(d, list) else d


def test_classifier_fanout_over_two_workers_gathers_what_one_process_writes(fanout):
    proj, e = fanout["proj"], fanout["env"]
    variant, stage = "real+synthetic", "train_classifier@real+synthetic"
    got = watch(fanout, "classifier-fanout/classifier-fanout", {"variants": [variant]}, "classifier-seed")
    assert got["parent"] == "COMPLETED", got
    runs = got["children"]
    # the sweep (shares 0.25 and 0 on seed 0), then seed 1 at the share it chose
    assert sorted((r["parameters"]["seed_index"], r["parameters"].get("ratio")) for r in runs) == \
        [(0, 0.0), (0, 0.25), (1, None)], runs
    assert {r["state"] for r in runs} == {"COMPLETED"} and ran_on(fanout, runs) == {"w1", "w2"}
    assert ran_stages(run(["dvc", "repro", "--dry", stage], proj, env=e).stdout) == set()  # recorded
    metrics = proj / "metrics/classifier" / f"{variant}.json"
    gathered = json.loads(metrics.read_text())
    assert len(gathered["per_seed"]) == 2 and set(gathered["ratio_sweep"]) == {"0.25", "0.0"}
    assert ran_stages(run(["dvc", "repro", "-f", "-s", stage], proj, env=e).stdout) == {stage}  # one process
    assert without_timing(json.loads(metrics.read_text())) == without_timing(gathered)
    for i in range(2):
        seed = proj / "models/classifier" / variant / f"seed{i}"
        assert without_timing(json.loads((seed / "metrics.json").read_text()))["accuracy"] == \
            gathered["per_seed"][i]["accuracy"]
