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

from pipeline.core.images import dataset_to_tensors
from pipeline.errors import ConfigError, DataError


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


@contextmanager
def reading(path: str | os.PathLike, stage: str) -> Iterator[Path]:
    """Read an output of an earlier ``stage`` inside this block: a missing one says which stage to
    run, a damaged one (truncated, garbage) names the file and the stage to re-run. Keep the
    block to the read itself, so that a bug elsewhere keeps its traceback."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found. Run the {stage} stage first (dvc repro).")
    try:
        yield path
    except (DataError, ConfigError, FileNotFoundError):
        raise
    except Exception as err:  # pyarrow, json, safetensors, torch ... each raise their own types
        why = (str(err).splitlines() or [""])[0][:200]
        raise DataError(f"{path}: damaged or unreadable ({type(err).__name__}: {why}). Re-run the {stage} "
                        f"stage (dvc repro -f {stage}).") from None


def load_dataset_dir(path: str | os.PathLike, stage: str):
    """A dataset saved by ``stage`` (``datasets.load_from_disk``), checked as in ``reading``;
    None for a saved dataset with no rows (``datasets`` cannot load those back)."""
    import datasets

    state = Path(path) / "state.json"
    if state.exists() and not json.loads(state.read_text()).get("_data_files"):
        return None
    with reading(path, stage) as p:
        return datasets.load_from_disk(str(p))


def read_json(path: str | os.PathLike, stage: str | None = None):
    """A JSON file; with ``stage``, one written by that earlier stage (checked as in ``reading``)."""
    if stage is None:
        return json.loads(Path(path).read_text())
    with reading(path, stage) as p:
        return json.loads(p.read_text())


def check_writable(*paths: str | os.PathLike) -> None:
    """Fail before any work when an output cannot be written (its nearest existing ancestor is not
    a writable folder), rather than after hours of training."""
    for path in map(Path, paths):
        probe = path.parent
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
            raise DataError(f"{path}: cannot be written ({probe} is not a writable folder). Make it writable, "
                            "or run in a project folder you can write to (--root).")


def check_made_from(output: str | os.PathLike, recorded: str | None, current: str | None, rerun: str) -> None:
    """An earlier stage's ``output`` records the fingerprint of what it was made from; refuse to
    combine it with other inputs (a stale output from another dataset or generator)."""
    if recorded != current:
        raise DataError(f"{output}: made from other data than the current inputs (fingerprint "
                        f"{str(recorded)[:12]} there, {str(current)[:12]} now). Re-run {rerun} (dvc repro).")


def load_pseudo_labels(folder: Path, prepared_fp: str | None
                       ) -> tuple[dict, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None]:
    """pseudo_label's output, refused when made from other prepared data: its summary and
    (images, pseudo-labels, the labeler's probabilities N,K or None), or None when it kept no pool image."""
    summary = read_json(folder / "summary.json", "pseudo_label")
    check_made_from(folder, summary.get("prepared_fingerprint"), prepared_fp, "pseudo_label")
    ds = load_dataset_dir(folder / "dataset", "pseudo_label")
    if ds is None or len(ds) == 0:
        return summary, None
    proba = torch.tensor(ds["probabilities"], dtype=torch.float32) if "probabilities" in ds.column_names else None
    return summary, (*dataset_to_tensors(ds), proba)


def load_img2img_sources(prepared: Path, pseudo: Path, pool_per_class: int, num_classes: int
                         ) -> tuple[torch.Tensor, torch.Tensor, list[tuple[str, int]]]:
    """What img2img varies: the labeled train images, then the first ``pool_per_class`` pseudo-labeled
    pool images of each class; images, labels and each one's origin (split, row in that split)."""
    x, y = dataset_to_tensors(load_dataset_dir(prepared / "dataset", "prepare")["train"])
    origins = [("train", i) for i in range(len(x))]
    if pool_per_class:
        ds = load_dataset_dir(pseudo / "dataset", "pseudo_label")
        if ds is None:
            raise DataError(f"{pseudo}: sample.pool_per_class is {pool_per_class} but pseudo_label kept no pool "
                            "image. Set sample.pool_per_class: 0 or give prepare a pool.")
        px, py = dataset_to_tensors(ds)
        rows = torch.cat([torch.nonzero(py == c).flatten()[:pool_per_class] for c in range(num_classes)])
        pool_index = list(ds["pool_index"])
        x, y = torch.cat([x, px[rows]]), torch.cat([y, py[rows]])
        origins += [("pool", pool_index[int(r)]) for r in rows]
    return x, y, origins


def fingerprint(*parts) -> str:
    """sha256 of JSON-serialisable parts (settings, seeds, other fingerprints)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=_json_default).encode()).hexdigest()


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
