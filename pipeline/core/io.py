"""File I/O of stage outputs: writes go through ``core.atomic.atomic_path`` (a temporary sibling renamed
into place, so a killed run never leaves a half-written file that a later run would take as complete);
reads name the file and the stage to re-run when it is missing or damaged.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from pipeline.config import Paths
from pipeline.core.atomic import atomic_path, recover  # noqa: F401 (atomic_path: every writer imports it from here)
from pipeline.core.images import check_shapes, class_names_of, dataset_to_tensors, first_shape
from pipeline.errors import ConfigError, DataError

# each stage output whose summary records what it was made from: its summary file and the stage that writes it
OUTPUTS = {"prepared": ("prepare", "summary.json"), "pseudo": ("pseudo_label", "summary.json"),
           "generator": ("train_generator", "generator.json"), "synthetic": ("sample", "summary.json"),
           "filtered": ("filter", "summary.json")}


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
    """Save a matplotlib figure and release it from pyplot (it can still be drawn or saved again)."""
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=Path(path).suffix.lstrip(".") or "png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def save_dataset(ds, path: str | os.PathLike) -> None:
    """``save_to_disk`` into a temp folder, then swap it in."""
    with atomic_path(path, is_dir=True) as tmp:
        ds.save_to_disk(str(tmp))


@contextmanager
def reading(path: str | os.PathLike, stage: str | None) -> Iterator[Path]:
    """Read an output of an earlier ``stage`` inside this block: a missing one says which stage to
    run, a damaged one (truncated, garbage) names the file and the stage to re-run. Keep the
    block to the read itself, so that a bug elsewhere keeps its traceback."""
    path = Path(path)
    if not path.exists() and not recover(path):  # an interrupted swap of it: its previous copy put back
        raise FileNotFoundError(f"{path}: not found. " + (f"Run the {stage} stage first (dvc repro)." if stage else
                                                          "Run the stage that writes it first (dvc repro)."))
    try:
        yield path
    except (DataError, ConfigError, FileNotFoundError):
        raise
    except Exception as err:  # pyarrow, json, safetensors, torch ... each raise their own types
        why = (str(err).splitlines() or [""])[0][:200]
        raise DataError(f"{path}: damaged or unreadable ({type(err).__name__}: {why}). " +
                        (f"Re-run the {stage} stage (dvc repro -f {stage})." if stage else
                         "Delete it and re-run the stage that wrote it (dvc repro -f).")) from None


def load_dataset_dir(path: str | os.PathLike, stage: str):
    """A dataset saved by ``stage`` (``datasets.load_from_disk``), checked as in ``reading``;
    None for a saved dataset with no rows (``datasets`` cannot load those back)."""
    import datasets

    state = Path(path) / "state.json"
    if state.exists() and not read_json(state, stage).get("_data_files"):
        return None
    with reading(path, stage) as p:
        ds = datasets.load_from_disk(str(p))
    if isinstance(ds, datasets.DatasetDict):  # prepare's splits, read side by side by every later stage
        check_shapes({f"{name!r} split's": first_shape(split) for name, split in ds.items()}, str(path), stage)
    return ds


def read_json(path: str | os.PathLike, stage: str | None = None) -> dict:
    """A JSON object written by ``stage`` (checked as in ``reading``: a missing or damaged one, or one that is
    not an object, names the file and what to re-run)."""
    with reading(path, stage) as p:
        obj = json.loads(p.read_text())
        if not isinstance(obj, dict):
            raise TypeError(f"a JSON {type(obj).__name__} where an object was expected")
    return obj


def checked(record: dict, path: str | os.PathLike, stage: str, **types) -> dict:
    """``record`` (read from ``path``, written by ``stage``) with each key of ``types`` absent, None or of its
    type (a type or a tuple of types); else a DataError naming the file, the key and the stage to re-run."""
    for key, kind in types.items():
        value = record.get(key)
        if value is not None and not isinstance(value, kind):
            kinds = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
            raise DataError(f"{path}: {key} is a {type(value).__name__} ({str(value)[:60]!r}), not a {kinds}: the file "
                            f"is damaged. Re-run the {stage} stage (dvc repro -f {stage}).")
    return record


def check_writable(*paths: str | os.PathLike, need_bytes: int = 0) -> None:
    """Fail before any work when an output cannot be written, rather than after hours of training:
    the output itself when it is an existing folder (or where its symlink points) and the nearest
    existing folder above it must be writable, and (with ``need_bytes``) hold that much free space."""
    for path in map(Path, paths):
        path = Path(os.path.realpath(path))
        probe = path.parent
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        for folder in ([path] if path.is_dir() else []) + [probe]:
            if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
                raise DataError(f"{path}: cannot be written ({folder} is not a writable folder). Make it writable, "
                                "or run in a project folder you can write to (--root).")
        if need_bytes and (free := shutil.disk_usage(probe).free) < need_bytes:
            raise DataError(f"{path}: needs about {need_bytes / 2**20:.0f} MiB but only {free / 2**20:.0f} MiB are "
                            f"free on its disk. Free some space (or use a larger disk) and run again.")


def stale_inputs(paths: Paths, inputs: dict[str, str | None]) -> dict[str, tuple[str | None, str | None]]:
    """Of the stage outputs an output records having read (name -> fingerprint), those that are not
    the ones on disk now (or are themselves stale): name -> (recorded, current)."""
    out = {}
    for name, recorded in inputs.items():
        current = read_output(paths, name).get("fingerprint")
        if recorded != current:
            out[name] = (recorded, current)
    return out


def read_output(paths: Paths, name: str) -> dict:
    """The summary of stage output ``name`` (a key of ``OUTPUTS``), checked along its chain: each input
    it records having read (and theirs, down to prepare) must be the one on disk now, or the output is
    refused, naming the stage to re-run. This is what keeps a re-trained generator from being described
    beside images another generator made."""
    stage, file = OUTPUTS[name]
    folder = getattr(paths, name)
    summary = checked(read_json(folder / file, stage), folder / file, stage, inputs=dict, fingerprint=str,
                      class_names=list, labeler=dict, kept=int, num_classes=int)
    if any(not isinstance(v, (str, type(None))) for v in (summary.get("inputs") or {}).values()):
        raise DataError(f"{folder / file}: inputs holds other than fingerprints: the file is damaged. Re-run the "
                        f"{stage} stage (dvc repro -f {stage}).")
    if name != "prepared" and not isinstance(summary.get("inputs"), dict):
        raise DataError(f"{folder / file}: records no inputs (written by an older synthaug), so it cannot be "
                        f"checked against the current data. Re-run {stage} (dvc repro -f {stage}).")
    stale = stale_inputs(paths, summary.get("inputs") or {})
    if stale:
        said = "; ".join(f"{n}: {str(a)[:12]} there, {str(b)[:12]} now ({OUTPUTS[n][0]} ran since)"
                         for n, (a, b) in stale.items())
        raise DataError(f"{folder}: made from other inputs than the ones on disk now ({said}). Re-run {stage} and "
                        "the stages after it (dvc repro).")
    return summary


def load_pseudo_labels(paths: Paths) -> tuple[dict, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None]:
    """pseudo_label's output, refused when made from other prepared data: its summary and
    (images, pseudo-labels, the labeler's probabilities N,K or None), or None when it kept no pool image."""
    summary = read_output(paths, "pseudo")
    ds = load_dataset_dir(paths.pseudo / "dataset", "pseudo_label")
    if (ds is None or len(ds) == 0) and summary.get("kept"):  # it was read as "no pseudo-labels" (the pool dropped)
        raise DataError(f"{paths.pseudo / 'dataset'}: holds no image, and {paths.pseudo / 'summary.json'} says "
                        f"pseudo_label kept {summary['kept']}: the saved dataset is damaged. Re-run the pseudo_label "
                        "stage (dvc repro -f pseudo_label).")
    if ds is None or len(ds) == 0:
        return summary, None
    check_beside_train(paths.prepared, ds, "pseudo-labeled pool's", paths.pseudo / "dataset", "pseudo_label")
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
        check_beside_train(prepared, ds, "pseudo-labeled pool's", pseudo / "dataset", "pseudo_label")
        px, py = dataset_to_tensors(ds)
        rows = torch.cat([torch.nonzero(py == c).flatten()[:pool_per_class] for c in range(num_classes)])
        pool_index = list(ds["pool_index"])
        x, y = torch.cat([x, px[rows]]), torch.cat([y, py[rows]])
        origins += [("pool", pool_index[int(r)]) for r in rows]
    return x, y, origins


def check_beside_train(prepared: Path, ds, name: str, where: Path, stage: str) -> None:
    """``ds`` (``name``, written by ``stage`` at ``where``) has the shape of the images in ``prepared``'s train
    split (``check_shapes``)."""
    train = load_dataset_dir(prepared / "dataset", "prepare")["train"]
    check_shapes({"prepared train split's": first_shape(train), name: first_shape(ds)}, str(where), stage)


TIMING_KEYS = ("seconds", "seconds_per_step")


def without_timing(record: dict) -> dict:
    """``record`` without its run times: they differ on every run, so a cached output (data/, models/) that
    kept them would never be byte-identical; they go to metrics/ (``Paths.stage_timing``) instead."""
    return {k: v for k, v in record.items() if k not in TIMING_KEYS}


def fingerprint(*parts) -> str:
    """sha256 of JSON-serialisable parts (settings, seeds, other fingerprints)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=_json_default).encode()).hexdigest()


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
                     ) -> None:
    """``tensors`` as a safetensors file, written atomically and the same bytes for the same tensors and
    metadata: safetensors writes the metadata in its hash map's order, which changes from process to
    process (5 distinct files from 8 identical saves), so the header is written again with it sorted."""
    from safetensors.torch import save

    raw = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata)
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    meta = header.pop("__metadata__", None)
    head = json.dumps({**({"__metadata__": dict(sorted(meta.items()))} if meta else {}), **header},
                      separators=(",", ":"), ensure_ascii=False).encode()
    head += b" " * (-len(head) % 8)  # the data stays 8-byte aligned, as safetensors itself pads it
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(len(head).to_bytes(8, "little"))
        f.write(head)
        f.write(memoryview(raw)[8 + n:])


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


def load_pool(paths: Paths, needed_by: str) -> torch.Tensor:
    """The prepared unlabeled pool's images (uint8 N,C,H,W); a DataError when there is none."""
    dd = load_dataset_dir(paths.prepared / "dataset", "prepare")
    if "pool" not in dd or len(dd["pool"]) == 0:
        raise DataError(f"{paths.prepared / 'dataset'}: no unlabeled pool, and {needed_by} learns from one. Set "
                        "prepare.unlabeled_pool above 0 (or -1: the rest of the source) or drop that variant.")
    return dataset_to_tensors(dd["pool"], label_column=None)[0]


def load_split(paths: Paths, split: str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """One labeled split of the prepared dataset as tensors (+ class names)."""
    dd = load_dataset_dir(paths.prepared / "dataset", "prepare")
    if split not in dd:
        raise DataError(f"{paths.prepared / 'dataset'}: no {split!r} split (has {list(dd)}). Run prepare again.")
    x, y = dataset_to_tensors(dd[split])
    if y is None:
        raise DataError(f"{paths.prepared / 'dataset'}: split {split!r} has no labels")
    return x, y, class_names_of(dd[split])
