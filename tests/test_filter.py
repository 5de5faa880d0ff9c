"""Filter stage: duplicates, the judge, the selection policy and a stage smoke run."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.config import Paths, params_from_dict
from pipeline.core.images import tensors_to_dataset
from pipeline.core.io import write_json
from pipeline.errors import ConfigError, DataError
from pipeline.filter import run
from pipeline.quality.judge import judge_scores, train_judge
from pipeline.quality.selection import REASONS, duplicate_flags, select
from tests.helpers import make_tiny_clip

NAMES = ["top", "bottom", "left"]


def pattern(c: int, n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    """Separable classes: a bright top half, bottom half or left half, plus noise."""
    g = torch.Generator().manual_seed(seed * 10 + c)
    x = torch.randint(0, 60, (n, 1, size, size), generator=g)
    h = size // 2
    region = [(slice(0, h), slice(None)), (slice(h, None), slice(None)), (slice(None), slice(0, h))][c]
    x[:, :, region[0], region[1]] += 180
    return x.clamp(0, 255).to(torch.uint8)


def labeled(per_class: int, seed: int):
    x = torch.cat([pattern(c, per_class, seed=seed) for c in range(len(NAMES))])
    return x, torch.arange(len(NAMES)).repeat_interleave(per_class)


def micro(**filter_overrides):
    return params_from_dict({"base": {"profile": "micro", "device": "cpu"},
                             "filter": {"feature_space": "judge", "judge_arch": "test_resnet", "judge_steps": 40,
                                        "max_real": 30, "kid_subsets": 5, "batch_size": 32, "judge_batch_size": 32,
                                        **filter_overrides}})


def test_exact_copies_are_flagged():
    train, test = pattern(0, 4, seed=1), pattern(1, 4, seed=2)
    syn = torch.cat([pattern(2, 3, seed=3), train[1:2], test[3:4]])
    syn = torch.cat([syn, syn[:1]])  # index 5 repeats index 0
    flags = duplicate_flags(syn, train, test)
    assert flags["duplicate"].tolist() == [False, False, False, False, False, True]
    assert flags["copy_of_train"].tolist() == [False, False, False, True, False, False]
    assert flags["copy_of_test"].tolist() == [False, False, False, False, True, False]


def test_judge_trained_on_separable_data_rejects_an_off_class_image():
    cfg = micro(judge_steps=60, min_confidence=0.5).filter
    judge, hist = train_judge(cfg, labeled(16, 0), labeled(6, 1), len(NAMES), seed=0, device="cpu")
    assert hist["best_val_acc"] == 1.0
    syn = torch.cat([pattern(0, 4, seed=5), pattern(1, 1, seed=6)])  # last one looks like "bottom"
    y = torch.zeros(5, dtype=torch.long)  # ... but is labeled "top"
    s = judge_scores(judge, syn, y, 8, "cpu")
    assert (s["confidence"][:4] > 0.5).all() and s["confidence"][4] < 0.5 and s["predicted"][4] == 1
    assert np.allclose(s["margin"] >= 0, True)
    df = _scores(5, confidence=s["confidence"])
    out = select(df, cfg.model_copy(update={"balance": False}), len(NAMES), 0.0)
    assert out["accepted"].tolist() == [True] * 4 + [False] and out["reason"][4] == "low_confidence"


def _scores(n, **cols):
    base = {"index": np.arange(n), "label": np.zeros(n, int), "seed": np.arange(n), "confidence": np.ones(n),
            "margin": np.ones(n), "realism": np.ones(n), "inside_manifold": np.ones(n, bool),
            "nn_train_distance": np.ones(n), "clip_score": np.full(n, np.nan), "duplicate": np.zeros(n, bool),
            "copy_of_train": np.zeros(n, bool), "copy_of_test": np.zeros(n, bool)}
    base.update(cols)
    return pd.DataFrame(base)


def test_selection_policy_reasons_top_fraction_and_balance():
    cfg = micro(min_confidence=0.3, require_realism=True, memorization_ratio=0.5, keep_top_fraction=0.75,
                balance=True).filter  # micro turns realism off
    conf = np.array([0.9, 0.8, 0.7, 0.2, 0.95, 0.9, 0.6, 0.5, 0.4, 0.99])
    df = _scores(10, label=np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 2]), confidence=conf,
                 duplicate=np.eye(10, dtype=bool)[1], inside_manifold=~np.eye(10, dtype=bool)[5],
                 nn_train_distance=np.where(np.arange(10) == 6, 0.01, 1.0))
    out = select(df, cfg, 3, memorization_threshold=0.1)
    # class 0: 1 duplicate, 3 low confidence, top 75% of 4 = 3 -> 0 and 2 survive
    # class 1: 5 unrealistic, 6 memorised, top ceil(3.75)=4 of 5 drops 8 (lowest), 4 and 7 survive
    # class 2: 9 survives; balance -> 1 per class: the most confident of each class
    assert out["reason"].tolist() == ["", "duplicate", "balance", "low_confidence", "", "unrealistic",
                                      "memorized", "balance", "below_top_fraction", ""]
    assert set(out["reason"]) <= set(REASONS) | {""}
    no_balance = select(df, cfg.model_copy(update={"balance": False, "require_realism": False}), 3, 0.1)
    assert no_balance["accepted"].sum() == 6 and no_balance["reason"][5] == ""
    clip = micro(clip={"checkpoint": "x", "min_score": 25.0}).filter
    out = select(_scores(3, clip_score=np.array([30.0, 10.0, 25.0])), clip.model_copy(update={"balance": False}), 3, 0)
    assert out["reason"].tolist() == ["", "low_clip_score", ""]


def write_contract_data(root, with_pool=True):
    """Tiny prepared + synthetic datasets in the contract layout under ``root``."""
    import datasets

    paths = Paths(root=root)
    (tx, ty), (vx, vy), (ex, ey) = labeled(12, 0), labeled(6, 1), labeled(10, 2)
    dd = {"train": tensors_to_dataset(tx, ty, NAMES), "val": tensors_to_dataset(vx, vy, NAMES),
          "test": tensors_to_dataset(ex, ey, NAMES)}
    if with_pool:
        dd["pool"] = tensors_to_dataset(labeled(5, 3)[0], None, None)
    datasets.DatasetDict(dd).save_to_disk(str(paths.prepared / "dataset"))
    sx, sy = labeled(6, 4)
    sx[0] = tx[0]  # a copy of a training image
    sx[7] = sx[6]  # a duplicate within the synthetic set
    n = len(sx)
    syn = tensors_to_dataset(sx, sy, NAMES, extra={
        "seed": list(range(100, 100 + n)), "guidance": [2.0] * n, "steps": [4] * n, "sampler": ["ddim"] * n,
        "generator": ["abc123"] * n})
    syn.save_to_disk(str(paths.synthetic / "dataset"))
    write_json(paths.prepared / "summary.json", {"class_names": NAMES, "fingerprint": "p" * 64})
    write_json(paths.generator / "generator.json", {"fingerprint": "g" * 64, "inputs": {"prepared": "p" * 64}})
    write_json(paths.synthetic / "summary.json", {"inputs": {"generator": "g" * 64}, "fingerprint": "s" * 64})
    return paths, n


def test_stage_smoke(tmp_path):
    import datasets

    paths, n = write_contract_data(tmp_path)
    summary = run(micro(min_confidence=0.0, require_realism=False, balance=False), paths)
    scores = pd.read_parquet(paths.filtered / "scores.parquet")
    kept = datasets.load_from_disk(str(paths.filtered / "dataset"))
    syn = datasets.load_from_disk(str(paths.synthetic / "dataset"))
    assert len(scores) == n and scores["index"].tolist() == list(range(n))
    assert list(scores.columns) == ["index", "label", "seed", "confidence", "margin", "predicted", "realism",
                                    "inside_manifold", "nn_train_distance", "clip_score", "duplicate", "copy_of_train",
                                    "copy_of_test", "strength", "source_split", "source_index", "source_distance",
                                    "near_copy_of_source", "reason", "accepted"]
    assert scores.loc[0, "reason"] == "copy_of_train" and scores.loc[7, "reason"] == "duplicate"
    assert scores["clip_score"].isna().all() and scores["seed"].tolist() == syn["seed"]
    assert len(kept) == int(scores["accepted"].sum()) == n - 2 and kept.column_names == syn.column_names
    assert kept["seed"] == [s for s, a in zip(syn["seed"], scores["accepted"]) if a]
    on_disk = json.loads((paths.filtered / "summary.json").read_text())
    assert list(on_disk) == ["feature_space", "feature_space_param", "note", "n", "acceptance", "near_copies_of_source",
                             "thresholds", "judge", "clip", "metrics", "inputs", "fingerprint", "timing", "params"]
    assert on_disk["clip"] == summary["clip"] and on_disk["clip"]["used"] is False
    assert "filter.clip.checkpoint not set" in on_disk["clip"]["why"]
    m = on_disk["metrics"]
    assert m["floor_at_accepted_n"]["frechet_distance"]["n_synthetic"] == n - 2
    for part in ("before", "after", "floor"):
        assert m[part]["frechet_distance"]["feature_space"].startswith("judge")
    assert m["before"]["frechet_distance"]["n_synthetic"] == n and m["after"]["kid"]["n_synthetic"] == n - 2
    assert set(m["per_class"]["before"]) == set(NAMES)
    assert on_disk["acceptance"]["rejected_by_first_reason"]["duplicate"] == 1
    assert on_disk["acceptance"]["per_class"]["top"] == {"generated": 6, "accepted": 5, "rate": 5 / 6}
    assert any(p.name.startswith("judge-") for p in paths.feature_cache.iterdir())  # judge + features cached
    # the second run takes the judge and the real features from the cache and gives the same scores
    run(micro(min_confidence=0.0, require_realism=False, balance=False), paths)
    again = pd.read_parquet(paths.filtered / "scores.parquet")
    assert np.allclose(again["confidence"], scores["confidence"]) and again["reason"].equals(scores["reason"])


def test_stage_clip_threshold_and_missing_checkpoint(tmp_path):
    paths, n = write_contract_data(tmp_path, with_pool=False)
    ckpt = str(make_tiny_clip(tmp_path / "clip"))
    summary = run(micro(min_confidence=0.0, require_realism=False, balance=False,
                        clip={"checkpoint": ckpt, "min_score": 100.0}), paths)
    scores = pd.read_parquet(paths.filtered / "scores.parquet")
    assert summary["clip"]["used"] and scores["clip_score"].between(0, 100).all()
    assert not scores["accepted"].any() and (scores["reason"].iloc[1:7] == "low_clip_score").all()
    with pytest.raises(ConfigError, match="not found"):
        run(micro(clip={"checkpoint": str(tmp_path / "nope")}), paths)


def test_stage_refuses_synthetic_images_made_from_other_data(tmp_path):
    paths, _ = write_contract_data(tmp_path)
    write_json(paths.generator / "generator.json", {"fingerprint": "g" * 64, "inputs": {"prepared": "o" * 64}})
    with pytest.raises(DataError, match=r"generator: made from other inputs than the ones on disk now \(prepared: "
                                        r"oooooooooooo there, pppppppppppp now \(prepare ran since\)\)\. Re-run "
                                        r"train_generator and the stages after it"):
        run(micro(), paths)
    write_json(paths.generator / "generator.json", {"fingerprint": "h" * 64, "inputs": {"prepared": "p" * 64}})
    with pytest.raises(DataError, match=r"synthetic: made from other inputs.*\(generator: gggggggggggg there, "
                                        r"hhhhhhhhhhhh now \(train_generator ran since\)\)\. Re-run sample"):
        run(micro(), paths)  # the generator was re-trained, sample not re-run
    assert not paths.filtered.exists()


def test_nearest_leaves_out_each_images_own_source():
    from pipeline.quality.metrics import nearest
    ref = torch.tensor([[0.0, 0.0], [10.0, 0.0]])
    query = torch.tensor([[0.1, 0.0], [9.0, 0.0]])
    assert nearest(query, ref).tolist() == pytest.approx([0.1, 1.0])
    # a variation of ref row 0 is not a copy of it: its nearest other train image is row 1
    assert nearest(query, ref, exclude=torch.tensor([0, -1])).tolist() == pytest.approx([9.9, 1.0])
