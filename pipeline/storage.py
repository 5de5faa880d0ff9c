"""Atomic file I/O and the conversions between HF datasets and tensors.

Every output is written to a temporary sibling and renamed into place, so a killed
run never leaves a half-written file that a later run would take as complete.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image


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


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_tensor(x: torch.Tensor | np.ndarray) -> str:
    arr = x.cpu().numpy() if isinstance(x, torch.Tensor) else x
    return hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()


# ---- images <-> tensors ------------------------------------------------------------

def pil_to_array(img: Image.Image) -> np.ndarray:
    """PIL image -> uint8 HWC array (C = 1 or 3)."""
    arr = np.asarray(img, dtype=np.uint8)
    return arr[..., None] if arr.ndim == 2 else arr


def array_to_pil(arr: np.ndarray) -> Image.Image:
    arr = np.asarray(arr, dtype=np.uint8)
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = arr.transpose(1, 2, 0)
    return Image.fromarray(arr[..., 0] if arr.ndim == 3 and arr.shape[-1] == 1 else arr)


def dataset_to_tensors(ds, image_column: str = "image", label_column: str | None = "label"
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """HF dataset with an Image column -> (uint8 N,C,H,W, int64 N or None)."""
    images = [pil_to_array(im) for im in ds[image_column]]
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous() if images else \
        torch.zeros(0, 1, 1, 1, dtype=torch.uint8)
    y = torch.as_tensor(ds[label_column], dtype=torch.long) if label_column and label_column in ds.column_names else None
    return x, y


def tensors_to_dataset(images: torch.Tensor, labels: torch.Tensor | Sequence[int] | None,
                       class_names: Sequence[str] | None, extra: dict | None = None):
    """uint8 N,C,H,W (+ labels, extra columns) -> HF dataset with an Image column."""
    import datasets

    arr = images.permute(0, 2, 3, 1).cpu().numpy() if isinstance(images, torch.Tensor) else images
    cols = {"image": [array_to_pil(a) for a in arr]}
    features = {"image": datasets.Image()}
    if labels is not None:
        cols["label"] = [int(v) for v in labels]
        features["label"] = datasets.ClassLabel(names=list(class_names)) if class_names else datasets.Value("int64")
    for name, values in (extra or {}).items():
        values = values.tolist() if isinstance(values, (torch.Tensor, np.ndarray)) else list(values)
        cols[name] = values
        sample = values[0] if values else 0
        features[name] = datasets.Value("string" if isinstance(sample, str) else
                                        "float64" if isinstance(sample, float) else "int64")
    return datasets.Dataset.from_dict(cols, features=datasets.Features(features))


def class_names_of(ds, label_column: str = "label") -> list[str]:
    feat = ds.features.get(label_column)
    return list(feat.names) if hasattr(feat, "names") else [str(i) for i in sorted(set(ds[label_column]))]


def make_grid_image(images: torch.Tensor, nrow: int) -> Image.Image:
    """uint8 N,C,H,W -> one PIL grid."""
    from torchvision.utils import make_grid

    grid = make_grid(images.float() / 255.0, nrow=nrow, padding=1, pad_value=1.0)
    return array_to_pil((grid * 255).round().clamp(0, 255).to(torch.uint8).numpy())


def save_png(img: Image.Image, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
