"""training.semi: FixMatch with an EMA teacher and class-fair pseudo-labels (toy data, timm's test network)."""
from __future__ import annotations

import torch

from pipeline.config import PseudoLabelConfig
from pipeline.models.classifier import build_model
from pipeline.training.semi import ClassFairness, fit_fixmatch
from tests.helpers import toy_images


def probs(conf: list[float], label: list[int]) -> torch.Tensor:
    p = torch.zeros(len(conf), 2)
    p[torch.arange(len(conf)), torch.tensor(label)] = torch.tensor(conf)
    p[torch.arange(len(conf)), 1 - torch.tensor(label)] = 1 - torch.tensor(conf)
    return p


def test_flexmatch_lowers_the_threshold_of_classes_that_claimed_little_of_the_pool():
    fair = ClassFairness("flexmatch", 0.9, pool_size=10, prior=torch.tensor([0.5, 0.5]), device="cpu")
    _, mask = fair(probs([0.95] * 8, [0] * 8), torch.arange(8))  # warm-up: nothing claimed, thresholds 0
    assert mask.all() and (fair.claimed[:8] == 0).all() and (fair.claimed[8:] == -1).all()
    label, mask = fair(probs([0.85, 0.6], [0, 1]), torch.tensor([8, 9]))
    # class 0 claimed 8 of 10 (beta 1, threshold 0.9): 0.85 is out; class 1 claimed none (threshold 0): 0.6 is in
    assert label.tolist() == [0, 1] and mask.tolist() == [False, True]


def test_plain_fixmatch_and_distribution_alignment():
    plain = ClassFairness("none", 0.9, 4, torch.tensor([0.5, 0.5]), "cpu")
    assert plain(probs([0.95, 0.8], [0, 1]), torch.arange(2))[1].tolist() == [True, False]
    da = ClassFairness("da", 0.5, 4, torch.tensor([0.5, 0.5]), "cpu")
    da.mean_p = torch.tensor([0.9, 0.1])  # the teacher has favoured class 0 so far
    label, _ = da(probs([0.7], [0]), torch.arange(1))
    assert label.tolist() == [1]  # 0.7/0.9 < 0.3/0.1 after alignment to the labeled prior


def test_fixmatch_learns_from_the_pool_and_is_deterministic():
    x, y = toy_images()
    pool = torch.cat([x, x.flip(-1)])
    cfg = PseudoLabelConfig(arch="test_resnet", steps=6, batch_size=4, unlabeled_ratio=2, lr=3e-3)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model, hist = fit_fixmatch(build_model("test_resnet", 2, 1), (x[::4], y[::4]), pool, (x, y), cfg, seed=1,
                                   progress=False)
        runs.append(model.state_dict())
    assert not model.training and hist["method"] == "fixmatch+flexmatch" and hist["steps"] == 6
    assert all(0 <= r <= 1 for r in hist["mask_rate"]) and hist["mask_rate"][0] > 0  # warm-up: thresholds start low
    assert 0 <= hist["best_val_acc"] <= 1 and hist["best_step"] in hist["step"]
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
