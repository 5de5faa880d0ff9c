"""Generator training on several processes: ``train_generator.num_processes: 2`` makes the stage
start itself under torchrun (gloo on CPU) and optimise exactly as one process does on the same
global batch (also with gradient accumulation); a 2-process run started by dvc.yaml's command
(``python -m flows train_generator``) and killed mid-way resumes on one process and ends as an
uninterrupted run."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.torch import load_file

from pipeline import train_generator as tg
from pipeline.config import ConfigError, Paths
from pipeline.core.curves import CURVES, read_curve
from pipeline.training import checkpoint
from pipeline.training import diffusion as td
from pipeline.training.generator import hashed_config
from tests.helpers import fresh_backbone, held_after_first_checkpoint, make_prepared, tiny_data, tiny_params

ROOT = Path(__file__).resolve().parent.parent
STEPS = 10
RUN = dict(steps=STEPS, batch_size=8, checkpoint_every=5, labels="labeled", preview_per_class=0)
FP32 = {"mixed_precision": "no"}  # 1 and N processes compared in fp32 (bf16 on AMX CPUs would round apart)


def stage(root: Path, **extra) -> dict:
    """Run the stage in ``root`` (a fresh toy prepared set); its generator.json, loss curve and EMA weights."""
    if not (root / "data").exists():
        make_prepared(root)
    meta = tg.run(tiny_params(FP32, **RUN, **extra), Paths(root=root))
    return result(root, meta)


def result(root: Path, meta: dict) -> dict:
    out = Paths(root=root).generator
    return {"meta": meta, "loss": read_curve(out / CURVES, "loss")["loss"].to_numpy(),
            "weights": load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))}


def assert_same_optimisation(a: dict, b: dict) -> None:
    """Loss curves equal to fp32 rounding; weights within 0.1% (relative norm over the model). Not
    bitwise: summation order differs, and a bias followed by GroupNorm has a true gradient of zero,
    which Adam turns from rounding noise into +-lr steps, so single entries may differ by ~lr."""
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5, atol=1e-6)
    wa, wb = a["weights"], b["weights"]
    diff = sum((wa[k] - wb[k]).pow(2).sum() for k in wa).sqrt() / sum(wa[k].pow(2).sum() for k in wa).sqrt()
    assert diff < 1e-3, diff


def test_gradient_accumulation_takes_the_same_steps():
    cfg = tiny_params(FP32, **RUN).train_generator
    one = td.train(fresh_backbone(cfg), cfg, tiny_data(), seed=0, ckpt_dir=Path("/nonexistent"), chash="a" * 64,
                   stop_at=10)
    acc = cfg.model_copy(update={"gradient_accumulation_steps": 4})  # 4 passes of 2 images
    four = td.train(fresh_backbone(cfg), acc, tiny_data(), seed=0, ckpt_dir=Path("/nonexistent"), chash="a" * 64,
                    stop_at=10)
    np.testing.assert_allclose(one.losses, four.losses, rtol=1e-5, atol=1e-6)


def test_process_count_and_accumulation_are_checked_and_not_hashed():
    with pytest.raises(ConfigError, match=r"batch_size 8 must be a multiple of num_processes x "
                                          r"gradient_accumulation_steps = 6"):
        tiny_params(batch_size=8, num_processes=2, gradient_accumulation_steps=3)
    with pytest.raises(ConfigError, match="kind cgan trains in one process"):
        tiny_params(kind="cgan", num_processes=2)
    d = tiny_data()

    def chash(**kw):
        return checkpoint.config_hash(hashed_config(tiny_params(**kw).train_generator), 0, [d.images, d.labels], {})

    assert chash() == chash(num_processes=2) == chash(num_processes=4, gradient_accumulation_steps=2)
    assert chash() != chash(batch_size=16)  # the global batch decides the weights


@pytest.mark.slow
def test_two_processes_optimise_as_one(tmp_path):
    one = stage(tmp_path / "one")
    two = stage(tmp_path / "two", num_processes=2)  # torchrun, 2 gloo processes of 4 images each
    assert one["meta"]["processes"] == 1 and two["meta"]["processes"] == 2
    assert one["meta"]["config_hash"] == two["meta"]["config_hash"]  # either resumes the other's checkpoints
    assert_same_optimisation(one, two)


def worker_pids(root: Path) -> list[int]:
    """Processes (ours: the stage and its torchrun workers) whose command line names ``root``."""
    pids = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and str(root).encode() in (d / "cmdline").read_bytes():
                pids.append(int(d.name))
        except OSError:
            pass
    return pids


@pytest.mark.slow
def test_two_process_run_killed_then_resumed_on_one_process_ends_as_uninterrupted(tmp_path, prefect_server):
    reference = stage(tmp_path / "reference")
    root = tmp_path / "killed"
    make_prepared(root)
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_params(FP32, **RUN, num_processes=2).resolved()))
    ckpts = Paths(root=root).generator_checkpoints
    env = {**os.environ, "OMP_NUM_THREADS": "1", **prefect_server}  # the session's server (conftest)
    with open(tmp_path / "killed.log", "w") as log:
        # held once rank 0 has written the first checkpoint (tests/hooks): the run cannot finish first
        proc = held_after_first_checkpoint([sys.executable, "-m", "flows", "train_generator", "--params", str(params),
                                            "--root", str(root)], env, tmp_path / "checkpointed", cwd=ROOT,
                                           stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            os.kill(proc.pid, signal.SIGTERM)  # the flow run is killed; it stops torchrun, which stops its workers
            proc.wait(timeout=120)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # whatever of ours is left
            except ProcessLookupError:
                pass
    deadline = time.time() + 60
    while worker_pids(root) and time.time() < deadline:
        time.sleep(0.2)
    assert not worker_pids(root), "torchrun's workers outlived the killed stage"
    log_text = (tmp_path / "killed.log").read_text()
    assert list(ckpts.glob("ckpt-*.pt")), log_text[-3000:]
    assert not Paths(root=root).generator.exists(), "the run finished before it was killed: " + log_text[-2000:]

    resumed = stage(root)  # the same params on one process
    assert 0 < resumed["meta"]["resumed_from_step"] < STEPS
    assert resumed["meta"]["config_hash"] == reference["meta"]["config_hash"]
    assert_same_optimisation(reference, resumed)
