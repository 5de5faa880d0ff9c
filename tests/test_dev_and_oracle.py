"""prepare's dev split (studies score on it) and the oracle variant (truly labeled pool images in place of a
synthetic set), at micro scale."""
import hashlib
import json

import datasets
import numpy as np
import pytest
import torch

import pipeline.train_classifier as tc
import pipeline.training.classifier as training
from pipeline import prepare
from pipeline.config import Paths, PrepareConfig, VariantSpec, params_from_dict
from pipeline.core.images import tensors_to_dataset
from pipeline.core.io import save_dataset, write_json
from pipeline.core.sources import Source
from pipeline.core.splits import make_splits
from pipeline.errors import ConfigError, DataError
from tests.helpers import make_idx_dir, prepare_params

CLASSES = ["top", "upper", "lower", "bottom"]


def source(holdout: bool) -> Source:
    rng = np.random.default_rng(7)
    images, labels = rng.integers(0, 256, (90, 4, 4, 1), dtype=np.uint8), np.arange(90) % 3
    if holdout:
        return Source(images, labels, ["a", "b", "c"])
    return Source(images, labels, ["a", "b", "c"], rng.integers(0, 256, (12, 4, 4, 1), dtype=np.uint8),
                  np.arange(12) % 3)


def digest(splits: dict) -> str:
    return hashlib.sha256(json.dumps({k: v.tolist() for k, v in sorted(splits.items())}).encode()).hexdigest()[:16]


# make_splits' indices before the dev split existed (computed with that code): dev_per_class 0 must keep them
BEFORE = {(False, -1): "7f7ca8655a7cdc34", (False, 20): "506d073bd064c760",
          (True, -1): "383246823501d457", (True, 20): "2c911191d0f40c29"}


@pytest.mark.parametrize("holdout,pool", list(BEFORE))
def test_no_dev_split_keeps_the_splits_as_they_were(holdout, pool):
    cfg = PrepareConfig(labeled_per_class=3, val_per_class=2, unlabeled_pool=pool)
    splits, _ = make_splits(source(holdout), cfg, 5)
    assert "dev" not in splits and digest(splits) == BEFORE[(holdout, pool)]


@pytest.mark.parametrize("holdout", [False, True])
def test_dev_split_is_disjoint_balanced_and_moves_no_other_split(holdout):
    src = source(holdout)
    cfg = PrepareConfig(labeled_per_class=3, val_per_class=2, unlabeled_pool=20)
    without, _ = make_splits(src, cfg, 5)
    splits, _ = make_splits(src, cfg.model_copy(update={"dev_per_class": 4}), 5)
    assert all(np.array_equal(splits[k], without[k]) for k in without)  # drawn last: the others stay
    assert np.bincount(src.labels[splits["dev"]], minlength=3).tolist() == [4, 4, 4]
    taken = [splits[k] for k in ("train", "val", "pool")] + ([splits["test"]] if holdout else [])
    for other in taken:  # indices into src.images (test too, for a hold-out)
        assert not set(splits["dev"]) & set(other)
    with pytest.raises(DataError, match="dev_per_class is 4.*Lower prepare.unlabeled_pool"):
        make_splits(src, cfg.model_copy(update={"dev_per_class": 4, "unlabeled_pool": -1}), 5)


def test_prepare_writes_the_dev_split_and_keeps_the_data_fingerprint_without_it(tmp_path):
    src = make_idx_dir(tmp_path / "fm", n_train=60)
    plain = prepare.run(prepare_params("fashion-mnist", src, unlabeled_pool=20), Paths(root=tmp_path / "a"))
    dev = prepare.run(prepare_params("fashion-mnist", src, unlabeled_pool=20, dev_per_class=3),
                      Paths(root=tmp_path / "b"))
    dd = datasets.load_from_disk(str(tmp_path / "b/data/prepared/dataset"))
    assert set(dd) == {"train", "val", "dev", "test", "pool"} and dev["counts_per_class"]["dev"] == [3, 3, 3]
    assert dev["sizes"] == {**plain["sizes"], "dev": 9}
    assert "dev" not in plain["sizes"] and plain["fingerprint"] != dev["fingerprint"]
    same = prepare.run(prepare_params("fashion-mnist", src, unlabeled_pool=20, dev_per_class=0),
                       Paths(root=tmp_path / "c"))
    assert same["fingerprint"] == plain["fingerprint"]


# ---- train_classifier: the dev score and the oracle ------------------------------------------------------


def toy(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise images where the class sets which horizontal band is bright."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 4
    x = torch.randint(0, 60, (n, 1, 8, 8), generator=g).to(torch.uint8)
    for i, c in enumerate(y.tolist()):
        x[i, :, c * 2:(c + 1) * 2, :] += 180
    return x, y


def write_project(root, hidden: bool = True, dev: bool = True, filtered: bool = True):
    """data/prepared (train, val, test, a pool of 40 with true labels, a dev split) and a filtered set of
    10 images: 4, 3, 2, 1 of the four classes."""
    paths = Paths(root=root)
    (x, y), (vx, vy), (tx, ty), (px, py), (dx, dy) = toy(16, 1), toy(8, 2), toy(16, 3), toy(40, 6), toy(8, 7)
    splits = {"train": (x, y), "val": (vx, vy), "test": (tx, ty)} | ({"dev": (dx, dy)} if dev else {})
    dd = {k: tensors_to_dataset(a, b, CLASSES) for k, (a, b) in splits.items()}
    dd["pool"] = tensors_to_dataset(px, None, None, {"hidden_label": py} if hidden else None)
    save_dataset(datasets.DatasetDict(dd), paths.prepared / "dataset")
    write_json(paths.prepared / "summary.json", {"class_names": CLASSES, "fingerprint": "p" * 64,
                                                 "sizes": {k: len(v) for k, v in dd.items()}})
    if filtered:
        sy = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 2, 3])
        sx = toy(10, 4)[0]
        save_dataset(tensors_to_dataset(sx, sy, CLASSES), paths.filtered / "dataset")
        write_json(paths.filtered / "summary.json", {"inputs": {"prepared": "p" * 64}, "fingerprint": "f" * 64})
    return paths, px, py


def micro_params(**variants):
    return params_from_dict({"base": {"profile": "micro", "device": "cpu", "seed": 3}, "train_classifier": {
        "arch": "test_resnet", "steps": 4, "batch_size": 8, "eval_every": 2, "seeds": 2, "eval_batch_size": 16,
        "variants": {"real": {"data": "prepared"}, **variants}}})


ORACLE = {"real+oracle": {"data": "filtered", "oracle": True, "synthetic_ratio": 0.5}}


def test_an_oracle_variant_trains_on_truly_labeled_pool_images_counted_like_the_synthetic_set(tmp_path, monkeypatch):
    paths, px, py = write_project(tmp_path)
    calls, real_fit = [], training.fit

    def fit(model, sources, val, **kw):
        calls.append({s.name: s for s in sources})
        return real_fit(model, sources, val, **{**kw, "progress": False})

    monkeypatch.setattr(training, "fit", fit)
    out = tc.run(micro_params(**ORACLE), paths, variant="real+oracle")
    drawn = calls[0]["synthetic"]
    assert drawn.per_batch == 4 and calls[0]["real"].per_batch == 4  # the synthetic share of the labeled stream
    assert torch.bincount(drawn.y, minlength=4).tolist() == [4, 3, 2, 1]  # per class like the filtered set
    pool = {bytes(im.numpy()): int(label) for im, label in zip(px, py)}
    assert all(pool[bytes(im.numpy())] == int(label) for im, label in zip(drawn.x, drawn.y))  # pool images, true labels
    assert out["oracle_per_class"] == dict(zip(CLASSES, [4, 3, 2, 1])) and out["n_synthetic"] == 10
    assert out["inputs"] == {"prepared": "p" * 64, "filtered": "f" * 64}  # a new filtered set re-draws it
    # the dev split is scored beside val and test, and said which is which
    assert all(0 <= r["dev_accuracy"] <= 1 for r in out["per_seed"]) and "dev_accuracy" in out["aggregate"]
    assert set(out["scored_on"]) == {"accuracy", "best_val_accuracy", "dev_accuracy"}
    spec = VariantSpec(data="filtered", oracle=True)
    assert spec.oracle and not spec.uses_synthetic and spec.adds_images


def test_without_a_dev_split_no_dev_score(tmp_path, monkeypatch):
    paths, _, _ = write_project(tmp_path, dev=False)
    real_fit = training.fit
    monkeypatch.setattr(training, "fit", lambda *a, **kw: real_fit(*a, **{**kw, "progress": False}))
    out = tc.run(micro_params(), paths, variant="real")
    assert "dev_accuracy" not in out["per_seed"][0] and "dev_accuracy" not in out["scored_on"]


def test_oracle_refusals(tmp_path):
    with pytest.raises(ConfigError, match="oracle: true draws"):
        micro_params(bad={"data": "prepared", "oracle": True})
    paths, _, _ = write_project(tmp_path / "unlabeled", hidden=False)
    with pytest.raises(DataError, match="the pool has no labels.*'real\\+oracle' \\(oracle: true\\)"):
        tc.run(micro_params(**ORACLE), paths, variant="real+oracle")
    paths, _, _ = write_project(tmp_path / "unfiltered", filtered=False)
    with pytest.raises(DataError, match="'real\\+oracle' \\(oracle: true\\).*there is none: run filter first"):
        tc.run(micro_params(**ORACLE), paths, variant="real+oracle")
    paths, _, _ = write_project(tmp_path / "small")
    big = {"real+oracle": {"data": "filtered", "oracle": True}}
    save_dataset(tensors_to_dataset(toy(12, 4)[0], torch.zeros(12, dtype=torch.long), CLASSES),
                 paths.filtered / "dataset")  # 12 of class 'top', and the pool has 10
    with pytest.raises(DataError, match="'top' needs 12, has 10"):
        tc.run(micro_params(**big), paths, variant="real+oracle")
