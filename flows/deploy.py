"""Flows for GPU workers: experiments through ``dvc exp run``, and two fan-outs over the
``gpu`` pool's workers: sampling shards and classifier seeds, each one flow run of a deployment.

A fan-out flow only submits runs, waits for them and merges, so it runs on a pool of its own
(``control`` in prefect.yaml) and never holds a slot its runs need. Every machine sees the same
project folder (a shared file system, at the same path): that is how the generator, the data
and the shards reach the workers and come back. The merge is recorded in ``dvc.lock`` with
``dvc commit`` and pushed when a DVC remote is set.

Retries live here, around what fails for reasons outside the code: a crashed run (its process
or its worker lost) is submitted again, and ``dvc push`` over the network.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any, Optional

from prefect import flow, get_run_logger, task, unmapped
from prefect.artifacts import create_markdown_artifact
from prefect.deployments import run_deployment
from prefect.task_runners import ThreadPoolTaskRunner

from flows.stages import run_name, run_stage, sample_flow
from pipeline.config import Paths, load_params

IN_FLIGHT = 64  # runs a fan-out submits and waits for at once (one thread each); the pool's workers take them


def _stream(cmd: list[str], cwd: str) -> None:
    logger = get_run_logger()
    logger.info("$ %s", " ".join(cmd))
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        logger.info(line.rstrip())
    if proc.wait():
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}")


@task(retries=3, retry_delay_seconds=[10, 60, 300])
def dvc_push(root: str, targets: Optional[list[str]] = None) -> None:
    _stream(["dvc", "push", *(targets or [])], root)


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


@task(retries=2, retry_delay_seconds=5)
def on_worker(deployment: str, parameters: dict) -> str:
    """One flow run of ``deployment``, waited for (``run_deployment`` polls until it ends); a crashed
    run (its process or worker lost) raises, so Prefect retries the task with a new run. Returns
    the final state's name: a failed run is not retried (it would fail the same way)."""
    run = run_deployment(deployment, parameters=parameters, poll_interval=2)
    if run.state.is_crashed():
        raise RuntimeError(f"flow run {run.name} crashed: {run.state.message}")
    return run.state.type.value


def on_workers(deployment: str, runs: list[dict]) -> None:
    """All ``runs`` (parameters) of ``deployment`` at once on the pool's workers; raises unless every one completed."""
    ends = [f.result() for f in on_worker.map(unmapped(deployment), runs)]
    failed = [f"{r}: {end}" for r, end in zip(runs, ends) if end != "COMPLETED"]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(runs)} {deployment} runs did not complete: " + "; ".join(failed))


def commit_to_dvc(stages: list[str]) -> None:
    """The merged outputs into dvc.lock (``dvc commit``: hashes of their deps, params and outs, as
    ``dvc repro`` would record them), then to the DVC remote when one is set."""
    _stream(["dvc", "commit", "--force", *stages], ".")
    if has_dvc_remote("."):
        dvc_push(".", stages)


_FANOUT = dict(persist_result=False, flow_run_name=run_name, task_runner=ThreadPoolTaskRunner(max_workers=IN_FLIGHT))


@flow(name="sample-fanout", **_FANOUT)
def sample_fanout_flow(num_shards: int = 2, deployment: str = "sample/sample-shard", commit: bool = True) -> dict:
    """The sample stage as ``num_shards`` shard runs on the pool's workers, then the merge here (the
    ``sample`` flow, which makes any shard still missing): the merged set is the one a single run
    of ``params.yaml`` gives, whatever ``num_shards``; with ``commit`` it is recorded in dvc.lock."""
    on_workers(deployment, [{"overrides": {"sample.num_shards": num_shards, "sample.shard_index": i}, "shard_only": True}
                            for i in range(num_shards)])
    get_run_logger().info("all %d shards done; merging", num_shards)
    summary = sample_flow(overrides={"sample.num_shards": num_shards})  # a failed subflow raises here
    if commit:
        commit_to_dvc(["sample"])
    return summary


@flow(name="classifier-seed", persist_result=False, flow_run_name="{variant}-seed{seed_index}-share{ratio}")
def classifier_seed_flow(variant: str, seed_index: int, ratio: Optional[float] = None) -> dict:
    """One seed of a train_classifier variant (``ratio``: one run of its ratio sweep), for the fan-out."""
    return run_stage("train_classifier", "params.yaml", None, ".", variant=variant, seed_index=seed_index, ratio=ratio)


@flow(name="classifier-fanout", **_FANOUT)
def classifier_fanout_flow(variants: Optional[list[str]] = None, deployment: str = "classifier-seed/classifier-seed",
                           commit: bool = True) -> dict:
    """train_classifier for ``variants`` (default: all of params.yaml's) as one flow run per seed on
    the pool's workers: first every ratio-sweep run (and every seed of variants without a sweep),
    then the seeds that take the sweep's choice; then each variant is gathered here into what
    ``dvc repro`` writes (``metrics/classifier/<variant>.json``, models) and, with ``commit``, recorded."""
    from pipeline.training.seed_runs import fanout_runs

    params = load_params("params.yaml")
    names = variants or list(params.train_classifier.variants)
    unknown = [v for v in names if v not in params.train_classifier.variants]
    if unknown:
        raise ValueError(f"variants {unknown} are not in params.yaml's train_classifier.variants")
    plans = {v: fanout_runs(params, v) for v in names}
    for phase in (0, 1):
        on_workers(deployment, [{"variant": v, **kw} for v in names for kw in plans[v][phase]])
    out = {}
    for v in names:
        out[v] = run_stage("train_classifier", "params.yaml", None, ".", variant=v, gather=True)
        if not isinstance(out[v], dict):  # a Failed state, with the user mistake's message
            return out[v]
    if commit:
        commit_to_dvc([f"train_classifier@{v}" for v in names])
    return {v: summary["headline"] for v, summary in out.items()}
