"""Two fan-outs over the ``gpu`` pool's workers, each run one flow run of a deployment: sampling
shards, and a classifier variant's runs (the plan in pipeline/training/plan.py).

A fan-out flow only submits runs, waits for them and merges, so it runs on a pool of its own
(``control`` in prefect.yaml) and never holds a slot its runs need. Every machine sees the same
project folder (a shared file system, at the same path): that is how the generator, the data
and the shards reach the workers and come back. The merge is recorded in ``dvc.lock`` with
``dvc commit`` and pushed when a DVC remote is set.

Retries live here, around what fails for reasons outside the code: a crashed run (its process
or its worker lost) is submitted again, and ``dvc push`` over the network.
"""
from __future__ import annotations

from prefect import flow, get_run_logger, task, unmapped
from prefect.deployments import run_deployment
from prefect.task_runners import ThreadPoolTaskRunner

from flows.experiment import commit_to_dvc
from flows.stages import run_name, run_stage, sample_flow, train_classifier_flow
from pipeline.config import load_params
from pipeline.training.plan import plan_runs

IN_FLIGHT = 64  # runs a fan-out submits and waits for at once (one thread each); the pool's workers take them


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


_FANOUT = dict(persist_result=False, flow_run_name=run_name, task_runner=ThreadPoolTaskRunner(max_workers=IN_FLIGHT))


@flow(name="sample-fanout", **_FANOUT)
def sample_fanout_flow(num_shards: int = 2, deployment: str = "sample/sample-shard", commit: bool = True,
                       params_file: str = "params.yaml", root: str = ".") -> dict:
    """The sample stage as ``num_shards`` shard runs on the pool's workers, then the merge here (the
    ``sample`` flow, which makes any shard still missing): the merged set is the one a single run
    of ``params_file`` gives, whatever ``num_shards``; with ``commit`` it is recorded in dvc.lock."""
    shards = {"sample.num_shards": num_shards}
    load_params(params_file, shards)  # num_shards out of its range: refused here, before any run is submitted
    on_workers(deployment, [{"overrides": {**shards, "sample.shard_index": i}, "shard_only": True,
                             "params_file": params_file, "root": root} for i in range(num_shards)])
    get_run_logger().info("all %d shards done; merging", num_shards)
    summary = sample_flow(params_file=params_file, overrides=shards, root=root)  # a failed subflow raises here
    if commit:
        commit_to_dvc(["sample"], root)
    return summary


@flow(name="classifier-seed", persist_result=False, flow_run_name="{variant}-seed{seed_index}-share{ratio}")
def classifier_seed_flow(variant: str, seed_index: int, ratio: float | None = None,
                         params_file: str = "params.yaml", root: str = ".") -> dict:
    """One run of a train_classifier variant's plan: seed ``seed_index`` at share ``ratio`` (None: the
    share its finished ratio sweep chose)."""
    return run_stage("train_classifier", params_file, None, root, variant=variant, seed_index=seed_index, ratio=ratio)


@flow(name="classifier-fanout", **_FANOUT)
def classifier_fanout_flow(variants: list[str] | None = None, deployment: str = "classifier-seed/classifier-seed",
                           commit: bool = True, params_file: str = "params.yaml", root: str = ".") -> dict:
    """train_classifier for ``variants`` (default: all of ``params_file``'s) as one flow run per run of
    each variant's plan on the pool's workers, those that wait for their ratio sweep's choice last;
    then each variant is gathered here (the ``train-classifier`` flow) into what ``dvc repro`` writes
    (``metrics/classifier/<variant>.json``, models) and, with ``commit``, recorded in dvc.lock."""
    cfg = load_params(params_file).train_classifier
    names = variants or list(cfg.variants)
    unknown = [v for v in names if v not in cfg.variants]
    if unknown:
        raise ValueError(f"variants {unknown} are not in {params_file}'s train_classifier.variants")
    runs = [(v, run) for v in names for run in plan_runs(cfg, cfg.variants[v])]
    for waits in (False, True):  # the sweeps (and every seed of a variant without one), then the seeds that wait
        on_workers(deployment, [{"variant": v, "seed_index": run.seed_index, "ratio": run.share,
                                 "params_file": params_file, "root": root} for v, run in runs if run.waits == waits])
    summaries = {v: train_classifier_flow(variant=v, params_file=params_file, root=root, gather=True)
                 for v in names}  # a failed subflow raises here
    if commit:
        commit_to_dvc([f"train_classifier@{v}" for v in names], root)
    return {v: summary["headline"] for v, summary in summaries.items()}
