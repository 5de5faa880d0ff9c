"""Images as tensors: PIL <-> uint8 arrays, HF datasets <-> tensors, value ranges, padding, hashes.

Images are uint8 N,C,H,W tensors everywhere; networks see them scaled to [-1, 1]
(``to_unit``: ``(x/255 - 0.5)/0.5``, the classifiers' and generators' convention alike).
"""
from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.errors import DataError


def to_unit(x_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 -> float in [-1, 1]."""
    return x_uint8.float() / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float in [-1, 1] -> uint8."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def pad_images(x: torch.Tensor, size: int) -> torch.Tensor:
    """Center-pad N,C,H,W images in [-1, 1] to size x size with -1 (black)."""
    extra = size - x.shape[-1]
    if extra == 0:
        return x
    lo = extra // 2
    return F.pad(x, (lo, extra - lo, lo, extra - lo), value=-1.0)


def crop_images(x: torch.Tensor, image_size: int) -> torch.Tensor:
    """The centered image_size x image_size part of padded N,C,S,S images."""
    lo = (x.shape[-1] - image_size) // 2
    return x[..., lo:lo + image_size, lo:lo + image_size]


def image_hashes(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """sha1 of each image's bytes: equal hashes = exact pixel duplicates."""
    arr = images.cpu().contiguous().numpy() if isinstance(images, torch.Tensor) else np.ascontiguousarray(images)
    return np.array([hashlib.sha1(a.tobytes()).hexdigest() for a in arr])


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
    y = (torch.as_tensor(ds[label_column], dtype=torch.long) if label_column and label_column in ds.column_names
         else None)
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
        kind = "string" if isinstance(sample, str) else "float64" if isinstance(sample, (float, list)) else "int64"
        features[name] = datasets.Sequence(datasets.Value(kind)) if isinstance(sample, list) else datasets.Value(kind)
    return datasets.Dataset.from_dict(cols, features=datasets.Features(features))


def class_names_of(ds, label_column: str = "label") -> list[str]:
    feat = ds.features.get(label_column)
    return list(feat.names) if hasattr(feat, "names") else [str(i) for i in sorted(set(ds[label_column]))]


def make_grid_image(images: torch.Tensor, nrow: int) -> Image.Image:
    """uint8 N,C,H,W -> one PIL grid."""
    from torchvision.utils import make_grid

    grid = make_grid(images.float() / 255.0, nrow=nrow, padding=1, pad_value=1.0)
    return array_to_pil((grid * 255).round().clamp(0, 255).to(torch.uint8).numpy())


def first_shape(ds, image_column: str = "image") -> tuple[int, int, int] | None:
    """(C, H, W) of a dataset's first image (one image decoded), None when it has no row or no image column."""
    if not len(ds) or image_column not in ds.column_names:
        return None
    h, w, c = pil_to_array(ds[0][image_column]).shape
    return c, h, w


def check_shapes(shapes: Mapping[str, Sequence[int] | None], where: str, rerun: str) -> None:
    """Images that a stage reads side by side (the prepared splits, the pseudo-labeled pool, synthetic images:
    name -> (C, H, W), None for an empty set) have one shape. Another (a pool of 16 px RGB images beside 28 px
    grayscale train images reached FixMatch's forward and failed there) is a DataError naming both sets, their
    shapes and the stage to re-run, before any work."""
    known = [(name, tuple(int(v) for v in shape)) for name, shape in shapes.items() if shape is not None]
    show = lambda s: " x ".join(map(str, s))  # noqa: E731
    for name, shape in known[1:]:
        if shape != known[0][1]:
            raise DataError(f"{where}: the {known[0][0]} images are {show(known[0][1])} and the {name} images "
                            f"{show(shape)} (channels x height x width); images read side by side must have one "
                            f"shape. Re-run {rerun} (dvc repro -f {rerun}), so that every set is made with the same "
                            "prepare.image_size and prepare.channels.")
