"""The two fan-outs (flows/fanout.py) over two process workers of a real Prefect server on loopback,
in one project copy both tests share (the session's tiny Fashion-MNIST-format dataset)."""
import json
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.helpers import BIN, env, project_copy, ran_stages, run, stop_process_group

pytestmark = pytest.mark.slow

# The fan-outs (flows/fanout.py): a `gpu` pool with two process workers (one slot each) and a
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
def fanout(tmp_path_factory, tiny_fmnist, prefect_server):
    """What both fan-out tests start from: a project copy where `dvc repro sample` has run (generator
    trained, samples made by one process, both recorded in dvc.lock), the fan-out deployments and
    their workers. ``single_run``: that sample run's data files. A test may re-make sample's output
    only as these same bytes (the sample fan-out checks that its merge is)."""
    tmp = tmp_path_factory.mktemp("fanout")
    proj = project_copy(tmp / "proj", tiny_fmnist)
    params = yaml.safe_load((proj / "params.yaml").read_text())
    # one variant with a ratio sweep (2 shares on the first seed) and a second seed that takes its choice
    params["train_classifier"].update(seeds=2, sweep_seeds=1, synthetic_ratio=0.25, ratio_sweep=[0.0],
                                      variants={"real+synthetic": {"data": "synthetic"}})
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # workers look for runs every second (Prefect's default is 10 s)
    e = env(**prefect_server, PREFECT_WORKER_QUERY_SECONDS="1")
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
        stop_process_group(*workers)


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
