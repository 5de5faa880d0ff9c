"""``experiment``: ``dvc exp run -S key=value ...`` on a GPU worker, then ``dvc push`` when a DVC
remote is set (the push is retried: it fails for network reasons, not the code's). The DVC
helpers here serve the fan-outs (flows/fanout.py) too."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from flows.stages import run_name
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
def dvc_push(root: str, targets: list[str] | None = None) -> None:
    _stream(["dvc", "push", *(targets or [])], root)


def has_dvc_remote(root: str) -> bool:
    out = subprocess.run(["dvc", "remote", "list"], cwd=root, capture_output=True, text=True)
    return out.returncode == 0 and bool(out.stdout.strip())


def commit_to_dvc(stages: list[str], root: str) -> None:
    """Outputs made outside ``dvc repro`` into dvc.lock (``dvc commit``: hashes of their deps, params and
    outs, as ``dvc repro`` would record them), then to the DVC remote when one is set."""
    _stream(["dvc", "commit", "--force", *stages], root)
    if has_dvc_remote(root):
        dvc_push(root, stages)


@flow(name="experiment", persist_result=False, flow_run_name=run_name)
def experiment_flow(overrides: dict[str, Any] | None = None, root: str = ".", push: bool = True) -> dict:
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
