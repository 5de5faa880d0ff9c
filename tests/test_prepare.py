import gzip
import hashlib

import datasets
import numpy as np
import pytest
from PIL import Image

from pipeline import prepare
from pipeline.config import Paths
from pipeline.core import sources
from pipeline.core.io import read_json
from pipeline.core.sources import read_idx
from pipeline.core.splits import make_splits
from pipeline.errors import DataError
from tests.helpers import make_idx_dir, prepare_params


def make_folder(root, counts=(6, 6), size=(12, 10), mode="RGB"):
    rng = np.random.default_rng(1)
    for c, n in enumerate(counts):
        d = root / f"class_{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(arr).convert(mode).save(d / f"{i}.png")
    return root


def tree_hash(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode() + p.read_bytes())
    return h.hexdigest()


def test_fashion_mnist_idx_source(tmp_path):
    src = make_idx_dir(tmp_path / "fm")
    before = tree_hash(src)
    summary = prepare.run(prepare_params("fashion-mnist", src), Paths(root=tmp_path))
    dd = datasets.load_from_disk(str(tmp_path / "data/prepared/dataset"))
    assert set(dd) == {"train", "val", "test", "pool"}
    assert summary["counts_per_class"]["train"] == [2, 2, 2]
    assert len(dd["test"]) == 20 and len(dd["pool"]) == 60 - 9
    assert dd["train"][0]["image"].size == (8, 8) and dd["train"][0]["image"].mode == "L"
    assert summary["class_names"][0] == "T-shirt/top" and summary["source_fingerprint"]
    assert read_json(tmp_path / "data/prepared/summary.json")["sizes"]["train"] == 6
    assert tree_hash(src) == before  # the source is never modified


def test_idx_rgb_and_resize(tmp_path):
    src = make_idx_dir(tmp_path / "fm")
    prepare.run(prepare_params("fashion-mnist", src, image_size=16, channels=3), Paths(root=tmp_path))
    img = datasets.load_from_disk(str(tmp_path / "data/prepared/dataset"))["val"][0]["image"]
    assert img.size == (16, 16) and img.mode == "RGB"


def test_missing_and_truncated_idx(tmp_path):
    with pytest.raises(DataError, match="missing Fashion-MNIST files.*make setup"):
        prepare.run(prepare_params("fashion-mnist", tmp_path / "none"), Paths(root=tmp_path))
    src = make_idx_dir(tmp_path / "fm")
    raw = gzip.open(src / "train-images-idx3-ubyte.gz").read()
    with gzip.open(src / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(raw[:-10])
    with pytest.raises(DataError, match="truncated"):
        read_idx(src / "train-images-idx3-ubyte.gz")
    (src / "x.gz").write_bytes(b"not gzip")
    with pytest.raises(DataError, match="cannot read"):
        read_idx(src / "x.gz")


def test_imagefolder_source_and_holdout(tmp_path):
    src = make_folder(tmp_path / "imgs", counts=(10, 10))
    summary = prepare.run(prepare_params("imagefolder", src, channels=3), Paths(root=tmp_path))
    dd = datasets.load_from_disk(str(tmp_path / "data/prepared/dataset"))
    assert summary["class_names"] == ["class_0", "class_1"]
    assert summary["counts_per_class"]["test"] == [2, 2]  # stratified 20% hold-out
    assert dd["train"][0]["image"].size == (8, 8)


def test_hf_disk_source_with_custom_columns(tmp_path):
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 255, (9, 9), dtype=np.uint8)) for _ in range(16)]
    ds = datasets.Dataset.from_dict({"pic": imgs, "cls": ["cat", "dog"] * 8},
                                    features=datasets.Features({"pic": datasets.Image(),
                                                                "cls": datasets.Value("string")}))
    ds.save_to_disk(str(tmp_path / "hf"))
    summary = prepare.run(prepare_params("hf-disk", tmp_path / "hf", image_column="pic", label_column="cls"),
                          Paths(root=tmp_path))
    assert summary["class_names"] == ["cat", "dog"] and summary["sizes"]["train"] == 4
    with pytest.raises(DataError, match="no column 'image'"):
        prepare.run(prepare_params("hf-disk", tmp_path / "hf"), Paths(root=tmp_path))


def test_splits_disjoint_stratified_deterministic(tmp_path):
    src = make_idx_dir(tmp_path / "fm", n_train=90)
    source = sources.read_fashion_mnist(prepare_params("fashion-mnist", src).prepare)
    cfg = prepare_params("fashion-mnist", src, unlabeled_pool=10).prepare
    a, _ = make_splits(source, cfg, seed=3)
    b, _ = make_splits(source, cfg, seed=3)
    c, _ = make_splits(source, cfg, seed=4)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["train"], c["train"])
    used = np.concatenate([a["train"], a["val"], a["pool"]])
    assert len(used) == len(set(used.tolist()))
    assert np.bincount(source.labels[a["train"]]).tolist() == [2, 2, 2]
    assert len(a["pool"]) == 10


def test_train_test_duplicates_detected_and_dropped(tmp_path):
    src = make_idx_dir(tmp_path / "fm")
    source = sources.read_fashion_mnist(prepare_params("fashion-mnist", src).prepare)
    source.images[:5] = source.test_images[:5]
    splits, notes = make_splits(source, prepare_params("fashion-mnist", src).prepare, seed=0)
    assert notes["train_test_exact_duplicates"] == 5
    assert not set(range(5)) & set(np.concatenate([splits["train"], splits["val"], splits["pool"]]).tolist())


def test_class_too_small_names_class_and_count(tmp_path):
    src = make_folder(tmp_path / "imgs", counts=(8, 1))
    with pytest.raises(DataError, match=r"'class_1' has 1.*labeled_per_class"):
        prepare.run(prepare_params("imagefolder", src), Paths(root=tmp_path))


def test_empty_folder_and_empty_class(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class sub-folders"):
        prepare.run(prepare_params("imagefolder", tmp_path / "empty"), Paths(root=tmp_path))
    src = make_folder(tmp_path / "imgs", counts=(8, 8))
    (src / "class_2").mkdir()
    (src / "class_2" / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match=r"class_2.*no readable image"):
        prepare.run(prepare_params("imagefolder", src), Paths(root=tmp_path))


def odd_images(d):
    """Files of every awkward kind; returns the names that must be skipped."""
    Image.fromarray((np.arange(100, dtype=np.uint16) * 600).reshape(10, 10)).save(d / "a16bit.png")
    Image.new("CMYK", (10, 10), (10, 20, 30, 40)).save(d / "cmyk.jpg")
    Image.new("P", (10, 10), 3).save(d / "palette.png")
    Image.new("RGBA", (10, 10), (255, 0, 0, 128)).save(d / "alpha.png")
    Image.new("LA", (30, 12), (200, 255)).save(d / "gray_alpha_wide.png")
    good = (d / "alpha.png").read_bytes()
    (d / "truncated.png").write_bytes(good[: len(good) // 2])
    (d / "readme.txt").write_text("not an image")
    (d / "zero.png").write_bytes(b"")
    return {"truncated.png", "readme.txt", "zero.png"}


def test_bad_and_odd_images_skip_and_report(tmp_path):
    src = make_folder(tmp_path / "imgs", counts=(8, 8))
    bad = odd_images(src / "class_0")
    before = tree_hash(src)
    summary = prepare.run(prepare_params("imagefolder", src, channels=3), Paths(root=tmp_path))
    skipped = {s["path"].split("/")[-1] for s in summary["skipped_images"]}
    assert skipped == bad
    assert sum(summary["sizes"][k] for k in ("train", "val", "test", "pool")) == 16 + 5
    assert tree_hash(src) == before


def test_bad_image_fatal_when_asked(tmp_path):
    src = make_folder(tmp_path / "imgs", counts=(8, 8))
    (src / "class_1" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DataError, match=r"broken\.png.*on_bad_image"):
        prepare.run(prepare_params("imagefolder", src, on_bad_image="error"), Paths(root=tmp_path))


def test_huge_image_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    path = tmp_path / "big.png"
    Image.new("L", (100, 100)).save(path)
    with pytest.raises(DataError, match="too large"):
        sources.load_image_file(path, prepare_params("imagefolder", tmp_path).prepare)


def test_sixteen_bit_scaled_not_clipped(tmp_path):
    path = tmp_path / "deep.png"
    Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16)).save(path)
    arr = sources.load_image_file(path, prepare_params("imagefolder", tmp_path).prepare)
    assert arr.max() == 255 and arr.shape == (8, 8, 1)


def test_pool_keeps_its_source_labels_in_hidden_label_only(tmp_path):
    """The pool is unlabeled for training; its source labels ride along in ``hidden_label`` (for
    pseudo_label's accuracy diagnostic), and no labeled split has that column."""
    src = make_idx_dir(tmp_path / "fm", n_train=90)
    prepare.run(prepare_params("fashion-mnist", src, unlabeled_pool=30), Paths(root=tmp_path))
    dd = datasets.load_from_disk(str(tmp_path / "data/prepared/dataset"))
    assert dd["pool"].column_names == ["image", "hidden_label"]  # no "label": nothing trains on it
    assert all("hidden_label" not in dd[s].column_names for s in ("train", "val", "test"))
    source = sources.read_fashion_mnist(prepare_params("fashion-mnist", src).prepare)
    label_of = {source.images[i].tobytes(): int(source.labels[i]) for i in range(len(source.images))}
    pool = [np.asarray(im).tobytes() for im in dd["pool"]["image"]]
    assert len(pool) == 30 and all(b in label_of for b in pool)
    assert dd["pool"]["hidden_label"] == [label_of[b] for b in pool]
    assert len(set(dd["pool"]["hidden_label"])) == 3  # every class, not a constant
    # the same pool rows make_splits picks, in the same order
    split, _ = make_splits(source, prepare_params("fashion-mnist", src, unlabeled_pool=30).prepare, seed=0)
    assert dd["pool"]["hidden_label"] == source.labels[split["pool"]].tolist()
