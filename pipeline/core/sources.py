"""Image sources: Fashion-MNIST IDX files, an image folder, a dataset saved by ``datasets``.

Each reader turns a source into a ``Source`` (uint8 N,H,W,C arrays in memory). The source is
only ever read. Image policy (imagefolder / hf-disk): EXIF orientation applied; 16-bit and
float images scaled to 8 bits by their type's range; palette, CMYK and other modes
converted; transparency flattened onto black; then converted to ``channels`` (L or RGB)
and resized to ``image_size`` by ``resize`` (center-crop or stretch).
"""
from __future__ import annotations

import gzip
import hashlib
import logging
import os
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from pipeline.config import PrepareConfig
from pipeline.core.io import sha256_file
from pipeline.errors import DataError

log = logging.getLogger(__name__)

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


@dataclass
class Source:
    """A labeled source in memory: uint8 N,H,W,C images, int labels, class names."""
    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    test_images: np.ndarray | None = None
    test_labels: np.ndarray | None = None
    fingerprint: str = ""
    skipped: list[dict] = field(default_factory=list)  # unreadable files: path, reason
    min_side: int | None = None  # the smallest side of any source image before resizing

    @property
    def upscale(self) -> float:
        """How far the smallest source images were enlarged to image_size (1 = not at all)."""
        return self.images.shape[1] / self.min_side if self.min_side else 1.0


def read_idx(path: Path) -> np.ndarray:
    """Read one (gzipped) IDX file; raise DataError on a truncated or foreign file."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:
        raise DataError(f"{path}: cannot read IDX file ({err}). Re-download it.") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path}: not an unsigned-byte IDX file (bad magic number). Re-download it.")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataError(f"{path}: truncated IDX file ({data.size} bytes of data, header says "
                        f"{int(np.prod(dims))}). Re-download it.")
    return data.reshape(dims)


def read_fashion_mnist(cfg: PrepareConfig) -> Source:
    root = Path(cfg.path)
    missing = [n for n in IDX_FILES.values() if not (root / n).exists()]
    if missing:
        raise DataError(
            f"{root}: missing Fashion-MNIST files {missing}. Run `make setup` (installs the Debian "
            f"package dataset-fashion-mnist), or download the four IDX .gz files from the "
            f"Fashion-MNIST project into a folder and set prepare.path to it.")
    arrays = {k: read_idx(root / n) for k, n in IDX_FILES.items()}
    for split in ("train", "test"):
        if len(arrays[f"{split}_images"]) != len(arrays[f"{split}_labels"]):
            raise DataError(f"{root}: {split} images and labels differ in count")
    fp = hashlib.sha256("".join(sha256_file(root / n) for n in IDX_FILES.values()).encode()).hexdigest()
    images = _fit_arrays(arrays["train_images"], cfg)
    test = _fit_arrays(arrays["test_images"], cfg)
    labels = arrays["train_labels"].astype(np.int64)
    names = FASHION_MNIST_CLASSES[: int(labels.max()) + 1]
    return Source(images, labels, names,
                  test, arrays["test_labels"].astype(np.int64), fp, min_side=min(arrays["train_images"].shape[1:]))


def _fit_arrays(gray: np.ndarray, cfg: PrepareConfig) -> np.ndarray:
    """N,H,W uint8 grayscale -> N,S,S,C at the configured size and channels."""
    if gray.shape[1:] != (cfg.image_size, cfg.image_size):
        gray = np.stack([np.asarray(fit_image(Image.fromarray(g), cfg).convert("L")) for g in gray])
    out = np.array(gray[..., None])  # IDX buffers are read-only
    return np.repeat(out, 3, axis=-1) if cfg.channels == 3 else out


def to_8bit(img: Image.Image) -> Image.Image:
    """Bring any PIL mode to L, RGB or RGBA, 8 bits per channel."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img).astype(np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        if img.mode == "F":
            top = max(float(arr.max()), 1.0) if arr.max() > 1 else 1.0
        img = Image.fromarray(np.clip(arr / top * 255.0, 0, 255).round().astype(np.uint8))
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("LA", "RGBA", "PA"):
        rgba = img.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        img = Image.alpha_composite(black, rgba).convert("RGB")
    if img.mode not in ("L", "RGB"):
        img = img.convert("RGB")
    return img


def fit_image(img: Image.Image, cfg: PrepareConfig, sides: list[int] | None = None) -> Image.Image:
    """Any PIL image -> image_size x image_size in the configured channel count (its smaller side
    appended to ``sides``)."""
    if sides is not None:
        sides.append(min(img.size))
    img = to_8bit(img).convert("L" if cfg.channels == 1 else "RGB")
    size = (cfg.image_size, cfg.image_size)
    if img.size == size:
        return img
    if cfg.resize == "stretch":
        return img.resize(size, Image.Resampling.BICUBIC)
    return ImageOps.fit(img, size, Image.Resampling.BICUBIC)


def load_image_file(path: Path, cfg: PrepareConfig, sides: list[int] | None = None) -> np.ndarray:
    """Open, fully decode and fit one file; raise DataError with the reason when it cannot."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.draft("RGB" if cfg.channels == 3 else "L", (cfg.image_size * 2, cfg.image_size * 2))
                img.load()
                return np.asarray(fit_image(img, cfg, sides), dtype=np.uint8).reshape(cfg.image_size, cfg.image_size,
                                                                                      cfg.channels)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise DataError(f"{path}: image too large to decode safely ({err})") from None
    except Exception as err:  # PIL raises many types for bad bytes
        raise DataError(f"{path}: unreadable image ({type(err).__name__}: {err})") from None


def read_imagefolder(cfg: PrepareConfig) -> Source:
    root = Path(cfg.path)
    if not root.is_dir():
        raise DataError(f"{root}: image folder not found. Set prepare.path to a folder with one sub-folder per class.")
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_dirs:
        raise DataError(f"{root}: no class sub-folders. Expected {root}/<class name>/<image files>.")
    images, labels, skipped, sides, h = [], [], [], [], hashlib.sha256()
    for label, d in enumerate(class_dirs):
        for f in sorted(p for p in d.rglob("*") if not p.is_dir() and not p.name.startswith(".")):
            try:
                if not f.is_file():  # never opened: a named pipe blocks, a link to /dev/zero never ends
                    raise DataError(f"{f}: {_not_a_file(f)}, not an image file")
                h.update(f"{f.relative_to(root)}:{sha256_file(f)}".encode())
                images.append(load_image_file(f, cfg, sides))
                labels.append(label)
            except DataError as err:
                if cfg.on_bad_image == "error":
                    raise DataError(f"{err}. Remove or fix the file, or set prepare.on_bad_image: skip.") from None
                log.warning("skipping %s", err)
                skipped.append({"path": str(f.relative_to(root)), "reason": str(err).split(": ", 1)[-1]})
    empty = [d.name for i, d in enumerate(class_dirs) if i not in set(labels)]
    if empty:
        raise DataError(f"{root}: class folder(s) {empty} hold no readable image. Add images or remove the folder.")
    return Source(np.stack(images), np.asarray(labels, dtype=np.int64), [d.name for d in class_dirs],
                  fingerprint=h.hexdigest(), skipped=skipped, min_side=min(sides, default=None))


def _not_a_file(path: Path) -> str:
    """What a path that is not a regular file is (what it links to, for a link)."""
    import stat

    try:
        mode = path.stat().st_mode
    except OSError:
        return f"a broken link (to {os.readlink(path)})" if path.is_symlink() else "unreadable"
    kind = ("a named pipe" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
            else "a socket" if stat.S_ISSOCK(mode) else "not a regular file")
    return f"a link to {kind} ({os.readlink(path)})" if path.is_symlink() else kind


def _is_class_label(split, column: str) -> bool:
    return hasattr(split.features[column], "names")


def _class_names(split, column: str, where: str = "") -> list[str]:
    """The ClassLabel names of a split, or its distinct label values as text. Rows without a label
    (None, or a negative number: Hugging Face's -1 for "no label") are refused, not made a class."""
    values = split[column]
    unlabeled = [v for v in values if v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and v < 0)]
    if unlabeled:
        missing, first = len(unlabeled), unlabeled[0]
        raise DataError(f"{where}: {missing} of {len(values)} rows have no label in column {column!r} ({first!r}: "
                        f"None or -1 means unlabeled in Hugging Face datasets). prepare needs a label on every row "
                        f"of a saved dataset: drop those rows (ds.filter(lambda r: r[{column!r}] not in (None, -1))) "
                        f"and save it again; prepare makes the unlabeled pool itself "
                        f"(prepare.unlabeled_pool).")
    return list(split.features[column].names) if _is_class_label(split, column) else \
        [str(v) for v in sorted(set(values))]


def read_hf_disk(cfg: PrepareConfig) -> Source:
    import datasets

    root = Path(cfg.path)
    if not root.exists():
        raise DataError(f"{root}: saved dataset not found. Set prepare.path to a folder written by save_to_disk.")
    ds = datasets.load_from_disk(str(root))
    splits = ds if isinstance(ds, datasets.DatasetDict) else {"train": ds}
    if "train" not in splits:
        raise DataError(f"{root}: a DatasetDict needs a 'train' split (has {list(splits)})")
    for name, split in splits.items():
        for col in (cfg.image_column, cfg.label_column):
            if col not in split.column_names:
                raise DataError(f"{root}: split {name!r} has no column {col!r} (columns: {split.column_names}). "
                                f"Set prepare.image_column / prepare.label_column.")
    names = _class_names(splits["train"], cfg.label_column, f"{root}: split 'train'")
    skipped: list[dict] = []
    sides: list[int] = []

    def convert(split, name):
        """Images fitted to the config; labels matched to train's classes by name, not by index."""
        own = _class_names(split, cfg.label_column, f"{root}: split {name!r}")
        unknown = sorted(set(own) - set(names))
        if unknown:
            raise DataError(f"{root}: split {name!r} has labels {unknown} that the train split does not have "
                            f"(train's classes: {names}). Fix the dataset or drop those rows.")
        to_index = {i: names.index(n) for i, n in enumerate(own)} if _is_class_label(split, cfg.label_column) \
            else {v: names.index(str(v)) for v in set(split[cfg.label_column])}
        imgs, labs = [], []
        for i, (im, lab) in enumerate(zip(split[cfg.image_column], split[cfg.label_column])):
            try:
                if im is None:
                    raise DataError("missing image")
                with warnings.catch_warnings():
                    warnings.simplefilter("error", Image.DecompressionBombWarning)
                    img = np.asarray(fit_image(im, cfg, sides), dtype=np.uint8)
                    imgs.append(img.reshape(cfg.image_size, cfg.image_size, cfg.channels))
            except Exception as err:
                if cfg.on_bad_image == "error":
                    raise DataError(f"{root}: {name}[{i}]: unreadable image ({err})") from None
                skipped.append({"path": f"{name}[{i}]", "reason": str(err)})
                continue
            labs.append(to_index[lab])
        return np.stack(imgs), np.asarray(labs, dtype=np.int64)

    x, y = convert(splits["train"], "train")
    tx, ty = convert(splits["test"], "test") if "test" in splits else (None, None)
    fp = hashlib.sha256("".join(s._fingerprint for s in splits.values()).encode()).hexdigest()
    return Source(x, y, names, tx, ty, fp, skipped, min(sides, default=None))


READERS = {"fashion-mnist": read_fashion_mnist, "imagefolder": read_imagefolder, "hf-disk": read_hf_disk}
