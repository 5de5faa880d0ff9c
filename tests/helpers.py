"""Shared test fixtures: tiny datasets and params (test modules import from here, not from each other)."""
from __future__ import annotations

import gzip
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import torch
import yaml

from pipeline.config import Paths, params_from_dict
from pipeline.core.images import tensors_to_dataset
from pipeline.core.io import write_json
from pipeline.models.diffusion import build_backbone
from pipeline.training.generator import TrainData

# ---- Fashion-MNIST-format sources -----------------------------------------------------------


def write_idx(path, arr):
    header = struct.pack(">BBBB", 0, 0, 8, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def make_idx_dir(root, n_train=60, n_test=20, classes=3, size=8, seed=0):
    """Random-pixel IDX files in Fashion-MNIST's layout (labels 0..classes-1 round robin)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        y = np.arange(n) % classes
        x = rng.integers(0, 256, size=(n, size, size))
        write_idx(root / f"{split}-images-idx3-ubyte.gz", x)
        write_idx(root / f"{split}-labels-idx1-ubyte.gz", y)
    return root


def prepare_params(source, path, **prep):
    """micro-profile params for prepare on a tiny source."""
    prep = {"source": source, "path": str(path), "image_size": 8, "labeled_per_class": 2,
            "val_per_class": 1, "unlabeled_pool": -1, **prep}
    return params_from_dict({"base": {"profile": "micro"}, "prepare": prep})


# ---- a prepared toy dataset and tiny generators ---------------------------------------------

SIZE = 8
TINY = {"block_out_channels": (8, 16), "batch_size": 8, "warmup_steps": 2, "log_every": 2,
        "checkpoint_every": 3, "preview_per_class": 1, "ema_decay": 0.9,
        "dit": {"patch_size": 2, "num_layers": 2, "num_heads": 2, "head_dim": 8}}


def toy_images(n_per_class: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Class 0: bright top-left square, class 1: bright bottom-right square."""
    x = torch.zeros(2 * n_per_class, 1, SIZE, SIZE, dtype=torch.uint8)
    x[:n_per_class, :, :4, :4] = 255
    x[n_per_class:, :, 4:, 4:] = 255
    return x, torch.tensor([0] * n_per_class + [1] * n_per_class)


def make_prepared(root, pool: bool = True, hidden: bool = False, pseudo: bool = True) -> None:
    """``data/prepared`` under ``root`` with the toy images in every split (+ a pool: the toy images
    and their mirror images; ``hidden``: with their source labels in ``hidden_label``, as prepare
    writes it) and, with ``pseudo``, an empty ``data/pseudo`` (no pseudo-labels: the generators
    learn from the labeled images alone)."""
    x, y = toy_images()
    dd = {"train": tensors_to_dataset(x, y, ["left", "right"]), "val": tensors_to_dataset(x, y, ["left", "right"]),
          "test": tensors_to_dataset(x, y, ["left", "right"])}
    if pool:
        dd["pool"] = tensors_to_dataset(torch.cat([x, x.flip(-1)]), None, None,
                                        {"hidden_label": torch.cat([y, y])} if hidden else None)
    prepared = Paths(root=root).prepared
    datasets.DatasetDict(dd).save_to_disk(str(prepared / "dataset"))
    write_json(prepared / "summary.json", {"class_names": ["left", "right"], "num_classes": 2,
                                           "image_size": SIZE, "channels": 1})
    if pseudo:
        make_pseudo(root)


def make_pseudo(root, x: torch.Tensor | None = None, y: torch.Tensor | None = None,
                prepared_fingerprint: str | None = None, class_names=("left", "right")) -> None:
    """``data/pseudo`` under ``root`` as pseudo_label writes it: pool images ``x`` with pseudo-labels
    ``y`` (none by default), made from the prepared data of ``prepared_fingerprint`` (make_prepared's: None)."""
    if x is None:
        x, y = torch.zeros(0, 1, SIZE, SIZE, dtype=torch.uint8), torch.zeros(0, dtype=torch.long)
    pseudo = Paths(root=root).pseudo
    proba = torch.nn.functional.one_hot(y, len(class_names)).double() * 0.98 + 0.02 / len(class_names)
    tensors_to_dataset(x, y, list(class_names), {"confidence": [0.99] * len(x), "pool_index": list(range(len(x))),
                                                 "probabilities": proba}).save_to_disk(str(pseudo / "dataset"))
    write_json(pseudo / "summary.json", {"inputs": {"prepared": prepared_fingerprint}, "fingerprint": f"pseudo{len(x)}",
                                         "kept": len(x), "headline": f"pseudo_label: kept {len(x)} pool images"})


def tiny_params(base: dict | None = None, **train):
    return params_from_dict({"base": {"profile": "micro", "device": "cpu", "seed": 3, **(base or {})},
                             "train_generator": {**TINY, **train}})


def tiny_data() -> TrainData:
    x, y = toy_images()
    return TrainData(x, y, 2, class_names=["left", "right"])


def fresh_backbone(cfg, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_backbone(cfg, SIZE, 1, 2)


# ---- a tiny local CLIP ----------------------------------------------------------------------


def make_tiny_clip(path):
    """A randomly initialised tiny CLIP + processor saved to ``path`` (no downloads)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz/-0123456789":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=[])
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=64, projection_dim=8,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=16, patch_size=8, projection_dim=8),
        projection_dim=8)
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(path)
    ip = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    CLIPProcessor(image_processor=ip, tokenizer=tok).save_pretrained(path)
    return path


# ---- a run held after its first checkpoint, for the kill tests -------------------------------

HOOKS = Path(__file__).resolve().parent / "hooks"  # sitecustomize.py: hold a run after its first checkpoint


def stop_process_group(*procs: subprocess.Popen, grace: float = 30) -> None:
    """Stop processes started with ``start_new_session`` and everything they started: SIGTERM to all,
    then SIGKILL for what is still there ``grace`` seconds later, one wait for all of them (a Prefect
    worker may take longer to shut down gracefully than a test should wait; the test checks what the
    run did, not that)."""
    import signal

    for proc in procs:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.time() + grace
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=30)


def held_after_first_checkpoint(cmd, env, marker: Path, **popen) -> subprocess.Popen:
    """Start ``cmd`` with the hook that holds the process that writes the first training checkpoint
    (it writes ``marker`` next and waits); return once the marker is there. The test then kills a run
    that has a checkpoint and cannot have finished, whatever the machine's speed."""
    env = {**env, "SYNTHAUG_TEST_HOLD_AFTER_CHECKPOINT": str(marker),
           "PYTHONPATH": os.pathsep.join([str(HOOKS), *filter(None, [env.get("PYTHONPATH")])])}
    proc = subprocess.Popen(cmd, env=env, **popen)
    while not marker.exists():
        if proc.poll() is not None:
            raise AssertionError(f"{cmd} ended ({proc.returncode}) before its first checkpoint")
        time.sleep(0.05)  # waiting for the marker; the run cannot move past it
    return proc


# ---- a project copy that runs the pipeline as a user does (dvc repro, Prefect workers) ------------------

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


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
    # four of the six variants: the baseline, classic augmentation, one synthetic and fixmatch (each variant is one
    # more flow process under dvc repro, about 15 s of start-up on a slow core); the report's logic for any
    # set of variants is tested in test_report
    variants = params["train_classifier"]["variants"]
    params["train_classifier"]["variants"] = {v: variants[v] for v in ("real", "real+classic", "real+synthetic+classic",
                                                                       "fixmatch")}
    (dst / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "init", "-q"], dst)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "init"], dst)
    run(["dvc", "init", "-q"], dst)
    run(["dvc", "config", "core.analytics", "false"], dst)
    return dst


def env(**extra) -> dict:
    """The environment of a command run in a project copy: the venv first on PATH, no Prefect server
    but the one in ``extra``, and one OpenMP thread (pytest-xdist runs a test per core: two torch
    processes with a thread per core each wait on each other's threads)."""
    e = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", PYTHONPATH="", OMP_NUM_THREADS="1")
    e.pop("PREFECT_API_URL", None)
    e.update(extra)
    return e


def run(cmd, cwd, check=True, **kw):
    e = {**kw.pop("env", env()), "PWD": str(cwd)}
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=e, **kw)
    if check and out.returncode:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({out.returncode}):\n"
                             f"{out.stdout[-4000:]}\n{out.stderr[-4000:]}")
    return out


def ran_stages(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")}
