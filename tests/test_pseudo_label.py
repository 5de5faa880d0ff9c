"""pseudo_label: the semi-supervised learner's seeds label the pool with their mean prediction; the
confident ones are kept (tiny prepared toy data, timm's test network, a few steps on CPU)."""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from pipeline import pseudo_label
from pipeline import train_generator as tg
from pipeline.config import Paths, labeler_file, params_from_dict
from pipeline.core.images import dataset_to_tensors
from pipeline.core.io import load_dataset_dir, read_json, write_json
from pipeline.errors import DataError
from pipeline.models.classifier import load_classifier
from pipeline.quality.selection import confident_per_class
from pipeline.training.classifier import predict_proba
from tests.helpers import make_prepared, tiny_params, toy_images

PREPARED_FP = "p" * 64


def pl_params(**over):
    return params_from_dict({"base": {"profile": "micro", "device": "cpu", "seed": 3},
                             "pseudo_label": {"arch": "test_resnet", "steps": 4, "batch_size": 8,
                                              "threshold": 0.0, **over}})


def prepared(root, **kw) -> Paths:
    """make_prepared's toy data (its pool: the 16 toy images, then their mirror images) with a
    fingerprint, without a data/pseudo (this stage writes it)."""
    make_prepared(root, pseudo=False, **kw)
    paths = Paths(root=root)
    write_json(paths.prepared / "summary.json", {**read_json(paths.prepared / "summary.json"),
                                                 "fingerprint": PREPARED_FP})
    return paths


def pool_of(paths):
    pool = load_dataset_dir(paths.prepared / "dataset", "prepare")["pool"]
    return dataset_to_tensors(pool, label_column="hidden_label")


def labelers(paths, seeds=2):
    """The saved labelers, one per seed (micro: 2)."""
    files = [paths.pseudo / labeler_file(i) for i in range(seeds)]
    for f in files:
        with safe_open(str(f), "pt") as meta:
            assert meta.metadata() == {"arch": "test_resnet", "num_classes": "2", "in_chans": "1"}
    assert not (paths.pseudo / labeler_file(seeds)).exists()
    return [load_classifier(f, 2, 1, "test") for f in files]


def labeler_proba(paths, pool_x):
    """The saved labelers' mean probabilities on the pool (with the default mirror-image test-time augmentation)."""
    models = labelers(paths)
    return sum(predict_proba(m, pool_x, 64, flip=True) for m in models) / len(models)


def test_stage_keeps_confident_pool_images_and_scores_them_against_the_hidden_labels(tmp_path):
    paths = prepared(tmp_path, hidden=True)
    out = pseudo_label.run(pl_params(per_class_cap=10), paths)
    pool_x, hidden = pool_of(paths)
    proba = labeler_proba(paths, pool_x)
    conf, pred = proba.max(1)
    keep = confident_per_class(proba, 0.0, 10)  # what the stage should have kept
    assert out["kept"] == len(keep) == sum(out["kept_per_class"].values()) and 0 < len(keep) <= 20
    assert list(out["kept_per_class"]) == ["left", "right"] and max(out["kept_per_class"].values()) <= 10
    # the dataset: the kept pool images, in pool order, their predicted class as label, and its probability
    ds = load_dataset_dir(paths.pseudo / "dataset", "pseudo_label")
    assert ds.column_names == ["image", "label", "confidence", "pool_index", "probabilities"]
    assert ds.features["label"].names == ["left", "right"] and list(ds["pool_index"]) == keep.tolist()
    assert torch.allclose(torch.tensor(ds["probabilities"], dtype=torch.float64), proba[keep].double(), atol=1e-6)
    x, y = dataset_to_tensors(ds)
    assert torch.equal(x, pool_x[keep]) and torch.equal(y, pred[keep])
    assert torch.allclose(torch.tensor(ds["confidence"], dtype=torch.float64), conf[keep].double(), atol=1e-6)
    # accuracy of the pseudo-labels against the pool's source labels (a diagnostic)
    right = (pred[keep] == hidden[keep]).float()
    assert out["pseudo_label_accuracy"] == pytest.approx(right.mean().item(), abs=1e-4)
    assert out["pool_accuracy_all"] == pytest.approx((pred == hidden).float().mean().item(), abs=1e-4)
    for i, c in enumerate(["left", "right"]):
        mine = pred[keep] == i
        assert out["pseudo_label_accuracy_per_class"][c] == (
            pytest.approx(right[mine].mean().item(), abs=1e-4) if mine.any() else None)
        predicted = int((pred == i).sum())
        assert out["coverage_per_class"][c] == (
            pytest.approx(out["kept_per_class"][c] / predicted, abs=1e-4) if predicted else None)
    assert out["pool_size"] == 32 and out["threshold"] == 0.0 and out["per_class_cap"] == 10
    assert out["inputs"] == {"prepared": PREPARED_FP} and len(out["fingerprint"]) == 64
    assert out["labeler"]["arch"] == "test_resnet" and out["labeler"]["n_val"] == 16
    assert out["labeler"]["seeds"] == [3000, 3001]
    hist = read_json((paths.pseudo / labeler_file(1)).with_suffix(".json"), "test")  # what the fixmatch variant reads
    assert hist["best_val_acc"] == out["labeler"]["val_accuracy_per_seed"][1] and hist["steps"] == 4
    assert f"kept {len(keep)} of 32 pool images at confidence >= 0.0" in out["headline"]
    assert "labeled right" in out["headline"]
    assert read_json(paths.pseudo / "summary.json") == out
    # train_generator learns from them: the labeled images first, then these
    data = tg.load_train_data(tiny_params(labels="pseudo"), paths, "cpu")
    assert data.num_pseudo == len(keep) and torch.equal(data.images[16:], pool_x[keep])


def test_pool_without_source_labels_has_no_accuracy_and_other_pseudo_labels_change_the_fingerprint(tmp_path):
    paths = prepared(tmp_path / "a")  # a pool without hidden_label (e.g. a real unlabeled set)
    out = pseudo_label.run(pl_params(), paths)
    assert out["kept"] == 32  # threshold 0 and no cap that bites: every pool image
    assert not {"pseudo_label_accuracy", "pseudo_label_accuracy_per_class", "pool_accuracy_all"} & set(out)
    assert "labeled right" not in out["headline"]
    capped = pseudo_label.run(pl_params(per_class_cap=1), paths)
    assert capped["kept"] == sum(capped["kept_per_class"].values()) <= 2
    assert all(n <= 1 for n in capped["kept_per_class"].values())
    assert capped["fingerprint"] != out["fingerprint"]  # other pseudo-labels: downstream stages see the change


def test_no_pool_writes_an_empty_set_and_the_generator_learns_from_the_labeled_images(tmp_path):
    paths = prepared(tmp_path, pool=False)
    out = pseudo_label.run(pl_params(), paths)
    assert out["kept"] == 0 and out["pool_size"] == 0 and out["kept_per_class"] == {"left": 0, "right": 0}
    assert "labeler" not in out and "pseudo_label_accuracy" not in out
    assert not (paths.pseudo / "labelers").exists()  # nothing to label, no labeler trained
    assert (paths.pseudo / "dataset").exists() and load_dataset_dir(paths.pseudo / "dataset", "pseudo_label") is None
    data = tg.load_train_data(tiny_params(labels="auto"), paths, "cpu")
    labeled_x, _ = toy_images()
    assert data.num_pseudo == 0 and data.weights is None and torch.equal(data.images, labeled_x)
    with pytest.raises(DataError, match=r"labels is pseudo but pseudo_label kept no pool image.*kept 0 of 0"):
        tg.load_train_data(tiny_params(labels="pseudo"), paths, "cpu")
    meta = tg.run(tiny_params(labels="auto", steps=2), paths)
    assert (meta["labels"], meta["num_labeled"], meta["num_pseudo_labeled"]) == ("labeled", 16, 0)


def test_a_threshold_nothing_reaches_is_a_clear_error(tmp_path):
    paths = prepared(tmp_path, hidden=True)
    with pytest.raises(DataError, match=r"no pool image reached confidence 1\.0.*pseudo_label\.threshold"):
        pseudo_label.run(pl_params(threshold=1.0), paths)
    assert not paths.pseudo.exists()  # nothing half-written for train_generator to pick up


# ---- confident_per_class ---------------------------------------------------------------------

PROBA = torch.tensor([[0.90, 0.10, 0.00],   # 0: class 0, 0.90
                      [0.20, 0.80, 0.00],   # 1: class 1, 0.80
                      [0.97, 0.03, 0.00],   # 2: class 0, 0.97
                      [0.40, 0.35, 0.25],   # 3: class 0, 0.40
                      [0.05, 0.05, 0.90],   # 4: class 2, 0.90
                      [0.95, 0.05, 0.00],   # 5: class 0, 0.95
                      [0.10, 0.85, 0.05]])  # 6: class 1, 0.85


def test_confident_per_class_applies_the_threshold():
    assert confident_per_class(PROBA, 0.0, 0).tolist() == list(range(7))
    assert confident_per_class(PROBA, 0.85, 0).tolist() == [0, 2, 4, 5, 6]  # >= threshold, inclusive
    assert confident_per_class(PROBA, 0.96, 0).tolist() == [2]
    assert confident_per_class(PROBA, 0.99, 0).tolist() == []


def test_confident_per_class_cap_keeps_the_most_confident_of_each_class():
    keep = confident_per_class(PROBA, 0.0, 2)
    assert keep.tolist() == [1, 2, 4, 5, 6]  # class 0: 2 (0.97) and 5 (0.95), not 0 (0.90) or 3 (0.40)
    assert confident_per_class(PROBA, 0.0, 1).tolist() == [2, 4, 6]
    assert confident_per_class(PROBA, 0.9, 1).tolist() == [2, 4]  # class 1 has none at 0.9
    assert confident_per_class(PROBA, 0.0, 100).tolist() == list(range(7))


def test_confident_per_class_returns_sorted_indices_and_breaks_ties_by_position():
    g = torch.Generator().manual_seed(0)
    proba = torch.softmax(torch.randn(200, 4, generator=g) * 3, 1)
    keep = confident_per_class(proba, 0.5, 10)
    assert keep.dtype == torch.long and torch.equal(keep, keep.sort().values) and len(set(keep.tolist())) == len(keep)
    conf, pred = proba.max(1)
    for c in range(4):
        mine = keep[pred[keep] == c]
        rest = torch.tensor([i for i in range(200) if pred[i] == c and conf[i] >= 0.5 and i not in set(keep.tolist())])
        assert len(mine) <= 10 and (len(rest) == 0 or conf[mine].min() >= conf[rest].max())
    ties = torch.tensor([[0.6, 0.4]] * 5)
    assert confident_per_class(ties, 0.5, 2).tolist() == [0, 1]  # equal confidence: the earlier rows
    assert confident_per_class(torch.zeros(0, 3), 0.5, 2).tolist() == []


def test_balance_cuts_every_class_to_the_poorest_class_most_confident_first():
    # at 0.85: class 0 has rows 2 (0.97), 5 (0.95), 0 (0.90); class 1 row 6; class 2 row 4
    assert confident_per_class(PROBA, 0.85, 0, balance=True).tolist() == [2, 4, 6]
    assert confident_per_class(PROBA, 0.0, 0, balance=True).tolist() == [2, 4, 6]  # class 2 has one row
    assert confident_per_class(PROBA, 0.99, 0, balance=True).tolist() == []


def test_fixmatch_labels_every_pool_image_with_its_seeds_mean(tmp_path):
    paths = prepared(tmp_path, hidden=True)
    params = params_from_dict({"base": {"profile": "micro", "device": "cpu", "seed": 3}, "pseudo_label": {
        "arch": "test_resnet", "steps": 4, "batch_size": 8, "unlabeled_ratio": 2}})  # the default method and keep-all
    out = pseudo_label.run(params, paths)
    assert out["kept"] == out["pool_size"] == 32 and sum(out["kept_per_class"].values()) == 32
    assert out["labeler"]["method"] == "fixmatch+flexmatch, flip TTA"
    assert "test_accuracy" not in out["labeler"]  # the fixmatch variant tests the learner, once
    assert len(out["labeler"]["seeds"]) == 2 and 0 <= out["labeler"]["val_accuracy"] <= 1
    assert out["pool_accuracy_all"] == out["pseudo_label_accuracy"]  # every pool image kept


def test_supervised_method_trains_on_the_labeled_images_alone(tmp_path):
    out = pseudo_label.run(pl_params(method="supervised"), prepared(tmp_path))
    assert out["labeler"]["method"] == "supervised, flip TTA" and len(out["labeler"]["seeds"]) == 2


def test_tta_none_labels_with_the_image_alone(tmp_path):
    paths = prepared(tmp_path, hidden=True)
    out = pseudo_label.run(pl_params(tta="none"), paths)
    pool_x, _ = pool_of(paths)
    models = labelers(paths)
    ds = load_dataset_dir(paths.pseudo / "dataset", "pseudo_label")
    single = (sum(predict_proba(m, pool_x, 64) for m in models) / 2)[torch.tensor(ds["pool_index"])]
    assert torch.allclose(torch.tensor(ds["probabilities"], dtype=torch.float64), single.double(), atol=1e-6)
    assert out["labeler"]["method"] == "fixmatch+flexmatch"
