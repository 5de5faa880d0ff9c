"""Resumable training: checkpoints tied to the training config by a hash, written atomically.

Every generator family saves and restores through ``save`` / ``resume`` with a dict of
named objects that have ``state_dict`` / ``load_state_dict`` (models, optimizers, LR
schedulers, EMA), written by the main process only. No random number generator state is
saved: every step's random draws come from ``core.seeding.step_rng``, so a killed run
resumes from the latest checkpoint of its own config, on any number of processes, and ends
with the weights of an uninterrupted run. Checkpoints of another config are left alone.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers.training_utils import EMAModel

from pipeline.core.io import atomic_path, sha256_tensor
from pipeline.errors import DataError

log = logging.getLogger(__name__)
KEEP_CHECKPOINTS = 2
NEEDED = {"config_hash", "step", "state", "losses", "seconds"}


def config_hash(conf: dict, seed: int, tensors: list[torch.Tensor | None], extra: dict) -> str:
    """Hash of everything that decides the trained weights (config, seed, data, run facts)."""
    data_fp = [sha256_tensor(t) if t is not None else None for t in tensors]
    blob = json.dumps({"cfg": conf, "seed": seed, "data": data_fp, **extra}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _files(ckpt_dir: Path, chash: str) -> tuple[list[Path], list[Path]]:
    files = sorted(ckpt_dir.glob("ckpt-*.pt")) if ckpt_dir.exists() else []
    own = [f for f in files if f.name.startswith(f"ckpt-{chash[:12]}-")]
    return own, [f for f in files if f not in own]


def save(ckpt_dir: Path, chash: str, step: int, objects: dict, losses: torch.Tensor, seconds: float) -> Path:
    """Write the state of ``objects`` after ``step``; keeps the newest KEEP_CHECKPOINTS of this config."""
    ckpt_dir = Path(ckpt_dir)
    path = ckpt_dir / f"ckpt-{chash[:12]}-{step:08d}.pt"
    with atomic_path(path) as tmp:
        torch.save({"config_hash": chash, "step": step, "state": {k: o.state_dict() for k, o in objects.items()},
                    "losses": losses.detach().cpu(), "seconds": seconds}, tmp)
    own, _ = _files(ckpt_dir, chash)
    for old in own[:-KEEP_CHECKPOINTS]:
        old.unlink(missing_ok=True)
    return path


@dataclass
class Resumed:
    step: int = 0  # the step the checkpoint was written after (0 = fresh start)
    seconds: float = 0.0  # training time of the runs before this one
    losses: torch.Tensor | None = None  # per-step losses up to ``step``


def _read(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, pickle garbage, wrong file ...
        first = str(err).splitlines()[0][:200] if str(err) else ""
        raise DataError(f"{path}: checkpoint is corrupt and cannot be read ({type(err).__name__}: {first}). "
                        "Delete this file and run again (training resumes from an older checkpoint or "
                        "starts over).") from None
    if not isinstance(state, dict) or not NEEDED <= set(state):
        missing = sorted(NEEDED - set(state) if isinstance(state, dict) else NEEDED)
        raise DataError(f"{path}: not a train_generator checkpoint (missing {missing}). Delete this file "
                        "and run again.")
    return state


def resume(ckpt_dir: Path, chash: str, objects: dict, device: str | torch.device) -> Resumed:
    """Load the latest checkpoint of ``chash`` into ``objects``; a fresh ``Resumed()`` when there
    is none. Damage is a DataError naming the file. Checkpoints are read onto the CPU; models and
    optimizers copy the values onto their own device, EMA weights are moved to ``device`` here
    (diffusers' ``EMAModel.load_state_dict`` keeps the tensors it is given)."""
    own, foreign = _files(Path(ckpt_dir), chash)
    if foreign:
        log.warning("ignoring %d checkpoint(s) in %s written with a different training config "
                    "(e.g. %s); not resuming from them", len(foreign), ckpt_dir, foreign[-1].name)
    if not own:
        return Resumed()
    path = own[-1]
    state = _read(path)
    if state["config_hash"] != chash:
        log.warning("%s: written with a different training config; ignored", path)
        return Resumed()
    try:
        for name, obj in objects.items():
            obj.load_state_dict(state["state"][name])
    except (RuntimeError, KeyError, ValueError, TypeError) as err:
        raise DataError(f"{path}: checkpoint does not fit this model ({str(err).splitlines()[0][:200]}). "
                        "Delete this file and run again.") from None
    for obj in objects.values():
        if isinstance(obj, EMAModel):
            obj.to(device)
    log.info("resuming from %s (step %d)", path, state["step"])
    return Resumed(int(state["step"]), float(state["seconds"]), state["losses"])
