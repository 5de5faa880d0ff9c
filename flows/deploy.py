"""Flows for GPU workers: experiments through ``dvc exp run`` and sampling fanned out
over several workers as shards (one flow run per shard through a deployment).

Retries live here, around what fails for reasons outside the code: a lost worker
(a crashed shard run is submitted again) and ``dvc push`` over the network.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any, Optional

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.client.schemas.objects import StateType
from prefect.deployments import run_deployment
from prefect.flow_runs import wait_for_flow_run

from flows.stages import run_name, sample_flow
from pipeline.config import Paths


def _stream(cmd: list[str], cwd: str) -> None:
    logger = get_run_logger()
    logger.info("$ %s", " ".join(cmd))
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        logger.info(line.rstrip())
    if proc.wait():
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}")


@task(retries=3, retry_delay_seconds=[10, 60, 300])
def dvc_push(root: str) -> None:
    _stream(["dvc", "push"], root)


def has_dvc_remote(root: str) -> bool:
    out = subprocess.run(["dvc", "remote", "list"], cwd=root, capture_output=True, text=True)
    return out.returncode == 0 and bool(out.stdout.strip())


@flow(name="experiment", persist_result=False, flow_run_name=run_name)
def experiment_flow(overrides: Optional[dict[str, Any]] = None, root: str = ".", push: bool = True) -> dict:
    """``dvc exp run -S key=value ...`` on this worker, then ``dvc push`` when a remote is set."""
    cmd = ["dvc", "exp", "run", *[f"--set-param={k}={json.dumps(v) if not isinstance(v, str) else v}"
                                  for k, v in (overrides or {}).items()]]
    _stream(cmd, root)
    if push and has_dvc_remote(root):
        dvc_push(root)
    metrics_file = Paths(root=Path(root)).reports / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else {}
    headline = metrics.get("headline", "experiment finished")
    create_markdown_artifact(key="synthaug-experiment", markdown=f"### experiment {overrides or {}}\n\n{headline}\n"
                             f"\nReport: `{Paths(root=Path(root)).reports / 'report.html'}`\n")
    return {"headline": headline, "overrides": overrides or {}}


@flow(name="sample-fanout", persist_result=False, flow_run_name=run_name)
def sample_fanout_flow(num_shards: int = 2, deployment: str = "sample/sample-shard",
                       params_file: str = "params.yaml", overrides: Optional[dict[str, Any]] = None,
                       root: str = ".", max_resubmits: int = 2) -> dict:
    """One ``sample`` flow run per shard on the pool's workers, then a local merge.

    Shards write to the shared ``data/synthetic_shards`` (a shared file system or a DVC
    remote between machines); the merged dataset equals a single-worker run.
    """
    logger = get_run_logger()
    shard_overrides = [{**(overrides or {}), "sample.num_shards": num_shards, "sample.shard_index": i}
                       for i in range(num_shards)]

    def submit(i: int):
        return run_deployment(deployment, parameters={"params_file": params_file, "overrides": shard_overrides[i],
                                                      "root": root, "shard_only": True}, timeout=0, as_subflow=True)

    pending = {i: submit(i) for i in range(num_shards)}
    tries = dict.fromkeys(pending, 0)
    while pending:
        for i, run in list(pending.items()):
            state = wait_for_flow_run(run.id, timeout=None, log_states=True).state
            if state.type == StateType.COMPLETED:
                del pending[i]
            elif state.type == StateType.CRASHED and tries[i] < max_resubmits:  # worker lost: transient
                tries[i] += 1
                logger.warning("shard %d crashed (%s); submitting again (%d/%d)", i, state.message, tries[i], max_resubmits)
                pending[i] = submit(i)
            else:
                raise RuntimeError(f"shard {i} ended {state.type.value}: {state.message}")
    logger.info("all %d shards done; merging", num_shards)
    return sample_flow(params_file=params_file, overrides=shard_overrides[0], root=root)
