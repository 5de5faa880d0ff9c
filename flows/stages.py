"""One Prefect flow per stage, and ``augment``, which runs them all in order.

Each flow loads params (file + overrides), calls ``pipeline.<stage>.run`` and posts a
markdown artifact with the stage's headline. No retries here: a stage that fails has a
bug or bad input, and running it again would fail the same way.
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run
from prefect.states import Failed

from pipeline import STAGE_ORDER
from pipeline.config import Paths, load_params
from pipeline.errors import USER_ERRORS


def run_name() -> str:
    """e.g. ``train-classifier-cpu-real`` or ``sample-gpu-sample.shard_index=1``: says which experiment."""
    p = flow_run.parameters or {}
    try:
        profile = load_params(p.get("params_file", "params.yaml"), p.get("overrides")).base.profile
    except Exception:
        profile = "invalid-params"
    extra = [p["variant"]] if p.get("variant") else []
    extra += [f"{k}={v}" for k, v in (p.get("overrides") or {}).items()]
    return "-".join([flow_run.flow_name, profile, *extra])


def run_stage(stage: str, params_file: str, overrides: dict[str, Any] | None, root: str, **kwargs):
    """Run ``pipeline.<stage>.run``; a user mistake fails the flow run with its message (a Failed
    state carrying the error, no traceback in the logs); a bug keeps its traceback."""
    logger = get_run_logger()
    try:
        params = load_params(params_file, overrides)
        logger.info("%s: profile %s, device %s, root %s", stage, params.base.profile, params.base.device, root)
        summary = importlib.import_module(f"pipeline.{stage}").run(params, Paths(root=Path(root)), **kwargs)
    except USER_ERRORS as err:  # logged once here; the state says where to look (the message is its data)
        logger.error("%s", err)
        return Failed(message=f"{stage} stopped: {type(err).__name__} (its message is logged above)", data=err)
    headline = (summary or {}).get("headline") or f"{stage} finished"
    create_markdown_artifact(key=f"synthaug-{stage.replace('_', '-')}", description=f"{stage} headline",
                             markdown=f"### {stage}{' ' + kwargs['variant'] if 'variant' in kwargs else ''}"
                                      f"\n\n{headline}\n")
    logger.info("%s: %s", stage, headline)
    return json.loads(json.dumps(summary or {}, default=str))


_COMMON = dict(persist_result=False, flow_run_name=run_name)


@flow(name="prepare", **_COMMON)
def prepare_flow(params_file: str = "params.yaml", overrides: dict[str, Any] | None = None, root: str = ".") -> dict:
    return run_stage("prepare", params_file, overrides, root)


@flow(name="pseudo-label", **_COMMON)
def pseudo_label_flow(params_file: str = "params.yaml", overrides: dict[str, Any] | None = None,
                      root: str = ".") -> dict:
    return run_stage("pseudo_label", params_file, overrides, root)


@flow(name="train-generator", **_COMMON)
def train_generator_flow(params_file: str = "params.yaml", overrides: dict[str, Any] | None = None,
                         root: str = ".") -> dict:
    return run_stage("train_generator", params_file, overrides, root)


@flow(name="sample", **_COMMON)
def sample_flow(params_file: str = "params.yaml", overrides: dict[str, Any] | None = None, root: str = ".",
                shard_only: bool = False) -> dict:
    """Every missing shard, then the merge; ``shard_only``: one fan-out worker's shard alone."""
    return run_stage("sample", params_file, overrides, root, shard_only=shard_only)


@flow(name="filter", **_COMMON)
def filter_flow(params_file: str = "params.yaml", overrides: dict[str, Any] | None = None, root: str = ".") -> dict:
    return run_stage("filter", params_file, overrides, root)


@flow(name="train-classifier", **_COMMON)
def train_classifier_flow(variant: str = "real", params_file: str = "params.yaml",
                          overrides: dict[str, Any] | None = None, root: str = ".", gather: bool = False) -> dict:
    """``gather``: test and write the runs a fan-out's workers trained (flows/fanout.py) instead of training."""
    return run_stage("train_classifier", params_file, overrides, root, variant=variant, gather=gather)


@flow(name="report", **_COMMON)
def report_flow(params_file: str = "params.yaml", overrides: dict[str, Any] | None = None, root: str = ".") -> dict:
    return run_stage("report", params_file, overrides, root)


STAGE_FLOWS = {"prepare": prepare_flow, "pseudo_label": pseudo_label_flow, "train_generator": train_generator_flow,
               "sample": sample_flow, "filter": filter_flow, "train_classifier": train_classifier_flow,
               "report": report_flow}
assert tuple(STAGE_FLOWS) == STAGE_ORDER


@flow(name="augment", **_COMMON)
def augment_flow(params_file: str = "params.yaml", overrides: dict[str, Any] | None = None, root: str = ".") -> dict:
    """The whole pipeline in one flow run (without DVC's caching; `dvc repro` is the cached way)."""
    params = load_params(params_file, overrides)
    out = {}
    for stage, stage_flow in STAGE_FLOWS.items():
        if stage == "train_classifier":
            for variant in params.train_classifier.variants:
                out[f"{stage}:{variant}"] = stage_flow(variant=variant, params_file=params_file,
                                                       overrides=overrides, root=root)
        else:
            out[stage] = stage_flow(params_file=params_file, overrides=overrides, root=root)
    return {"headline": (out.get("report") or {}).get("headline", "done")}
