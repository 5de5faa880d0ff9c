"""The pipeline as a Prefect deployment (prefect.yaml), run through a real Prefect server and a process
worker on loopback, in a copy of the project with the session's tiny Fashion-MNIST-format dataset."""
import json
import subprocess

import pytest

from tests.helpers import BIN, env, project_copy, run, stop_process_group

pytestmark = pytest.mark.slow


def test_deployment_runs_through_process_worker(tmp_path, tiny_fmnist, prefect_server):
    proj = project_copy(tmp_path / "proj", tiny_fmnist)
    e = env(**prefect_server, PREFECT_WORKER_QUERY_SECONDS="1")  # the worker looks for runs every second (10 s)
    run(["prefect", "work-pool", "create", "test-gpu", "--type", "process"], proj, env=e)
    run(["prefect", "--no-prompt", "deploy", "--name", "augment", "--pool", "test-gpu"], proj, env=e)
    worker = subprocess.Popen([BIN / "prefect", "worker", "start", "--pool", "test-gpu", "--limit", "1"],
                              cwd=proj, env=e, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        script = ("from prefect.deployments import run_deployment\n"
                  "r = run_deployment('augment/augment', timeout=900, poll_interval=1)\n"
                  "print(r.state.type.value)\n")
        out = run([BIN / "python", "-c", script], proj, env=e, timeout=1000)
        assert out.stdout.strip().splitlines()[-1] == "COMPLETED", out.stdout + out.stderr
    finally:
        stop_process_group(worker)
    assert (proj / "reports/report.html").exists()  # ran in the deployed project, with its micro params
    assert (proj / "metrics/classifier/real.json").exists()
    assert json.loads((proj / "data/prepared/summary.json").read_text())["sizes"]["test"] == 30
