"""Atomic file I/O: every output is written to a temporary sibling and renamed into place.

A killed run never leaves a half-written file that a later run would take as complete.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch


def _mkdtemp(path: Path) -> Path:
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    tmp.chmod(0o755)
    return tmp


@contextmanager
def atomic_path(path: str | os.PathLike, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _mkdtemp(path) if is_dir else \
        path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        if path.is_dir() and not path.is_symlink():
            old = path.with_name(f".{path.name}.old{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def write_json(path: str | os.PathLike, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def read_json(path: str | os.PathLike):
    return json.loads(Path(path).read_text())


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, (np.ndarray, torch.Tensor)):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def save_figure(fig, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=Path(path).suffix.lstrip(".") or "png", dpi=110, bbox_inches="tight")


def save_dataset(ds, path: str | os.PathLike) -> None:
    """``save_to_disk`` into a temp folder, then swap it in."""
    with atomic_path(path, is_dir=True) as tmp:
        ds.save_to_disk(str(tmp))


def load_dataset_dir(path: str | os.PathLike, what: str):
    import datasets

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: {what} not found. Run the stage that writes it first (dvc repro).")
    return datasets.load_from_disk(str(path))


def save_png(img, path: str | os.PathLike) -> None:
    """A PIL image, written atomically."""
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_tensor(x: torch.Tensor | np.ndarray) -> str:
    arr = x.cpu().numpy() if isinstance(x, torch.Tensor) else x
    return hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()
