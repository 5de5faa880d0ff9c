import math

import numpy as np
import pytest
import torch
from scipy import stats

from pipeline.core.stats import (classification_metrics, confusion_matrix, detectable_difference,
                                 expected_calibration_error, macro_f1, mean_ci, paired_difference, per_class_accuracy,
                                 summarize_seeds)


def test_mean_ci_matches_scipy_t_interval():
    v = [0.815, 0.822, 0.807, 0.811]
    out = mean_ci(v)
    low, high = stats.t.interval(0.95, df=3, loc=np.mean(v), scale=stats.sem(v))
    assert out["n"] == 4 and not out["degenerate"]
    assert out["mean"] == pytest.approx(0.81375)
    assert out["std"] == pytest.approx(np.std(v, ddof=1))
    assert out["low"] == pytest.approx(low) and out["high"] == pytest.approx(high)
    # known numbers: values 1,2,3 -> mean 2, sd 1, half-width t(0.975, 2) / sqrt(3) = 2.4841
    k = mean_ci([1.0, 2.0, 3.0])
    assert k["high"] - k["mean"] == pytest.approx(4.302652729911275 / math.sqrt(3))


def test_mean_ci_single_value_is_flagged_and_empty_is_none():
    one = mean_ci([0.8])
    assert one["low"] == one["high"] == one["mean"] == 0.8 and one["degenerate"] and one["std"] == 0.0
    assert mean_ci([])["mean"] is None


def test_paired_difference_matches_ttest_rel():
    a, b = [0.83, 0.84, 0.82, 0.85], [0.81, 0.815, 0.80, 0.83]
    out = paired_difference(a, b)
    ref = stats.ttest_rel(a, b)
    d = np.subtract(a, b)
    assert out["mean_diff"] == pytest.approx(d.mean())
    assert out["p_value"] == pytest.approx(ref.pvalue)
    low, high = stats.t.interval(0.95, df=3, loc=d.mean(), scale=stats.sem(d))
    assert (out["low"], out["high"]) == (pytest.approx(low), pytest.approx(high))
    assert out["n"] == 4


def test_paired_difference_edge_cases():
    assert paired_difference([0.8], [0.7])["p_value"] is None
    assert paired_difference([0.8, 0.9], [0.7, 0.8])["p_value"] == 0.0  # constant non-zero difference
    assert paired_difference([0.8, 0.9], [0.8, 0.9])["p_value"] == 1.0
    with pytest.raises(ValueError):
        paired_difference([1, 2], [1])


def test_confusion_matrix_and_per_class_accuracy():
    cm = confusion_matrix([0, 1, 1, 2, 0], [0, 1, 2, 2, 1], 4)
    assert cm.tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 0, 0]]
    assert per_class_accuracy(cm) == [1.0, 0.5, 0.5, None]


def test_macro_f1_known_answer():
    # class 0: tp1 fp1 fn0 -> 2/3; class 1: tp1 fp1 fn1 -> 1/2; class 2: tp1 fp0 fn1 -> 2/3
    pred, labels = [0, 1, 1, 2, 0], [0, 1, 2, 2, 1]
    assert macro_f1(pred, labels, 3) == pytest.approx((2 / 3 + 1 / 2 + 2 / 3) / 3)
    assert macro_f1([1, 1], [1, 1], 3) == pytest.approx(1.0)  # absent classes are not averaged in
    assert macro_f1(torch.tensor([0, 0]), torch.tensor([1, 1]), 2) == 0.0


def test_ece_known_answers():
    # all confident and all right -> 0; 0.9 confident and always wrong -> 0.9
    p = torch.tensor([[0.9, 0.1], [0.1, 0.9]])
    assert expected_calibration_error(p, torch.tensor([0, 1])) == pytest.approx(0.1)
    assert expected_calibration_error(torch.tensor([[1.0, 0.0]]), torch.tensor([0])) == pytest.approx(0.0)
    assert expected_calibration_error(p, torch.tensor([1, 0])) == pytest.approx(0.9)
    # two bins: {0.6 conf, right; 0.6 conf, wrong} -> |0.5-0.6|; {0.95 right, 0.95 right} -> |1-0.95|
    p2 = np.array([[0.6, 0.4], [0.6, 0.4], [0.05, 0.95], [0.05, 0.95]])
    assert expected_calibration_error(p2, [0, 1, 1, 1]) == pytest.approx(0.5 * 0.1 + 0.5 * 0.05)


def test_classification_metrics_bundle():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.2, 0.7, 0.1], [0.1, 0.2, 0.7], [0.6, 0.3, 0.1]])
    m = classification_metrics(probs, torch.tensor([0, 1, 2, 1]), 3)
    assert m["accuracy"] == 0.75 and m["n"] == 4
    assert m["confusion_matrix"][1] == [1, 1, 0]
    assert m["per_class_accuracy"] == [1.0, 0.5, 1.0]
    assert 0 <= m["ece"] <= 1 and 0 <= m["macro_f1"] <= 1


def test_summarize_seeds_flat_keys():
    out = summarize_seeds([{"accuracy": 0.8, "ece": 0.1}, {"accuracy": 0.82, "ece": 0.05}], ["accuracy", "ece"])
    assert out["accuracy_mean"] == pytest.approx(0.81) and out["aggregate"]["ece"]["n"] == 2
    assert out["accuracy_ci95_low"] == pytest.approx(mean_ci([0.8, 0.82])["low"])
    assert out["ece_ci95_high"] > out["ece_mean"]


def test_detectable_difference_matches_hand_computation():
    # (t(1 - alpha/2, n-1) + t(power, n-1)) * sd / sqrt(n), with scipy's t quantiles
    sd, n = 0.012, 5
    hand = (stats.t.ppf(0.975, 4) + stats.t.ppf(0.8, 4)) * sd / math.sqrt(5)
    assert detectable_difference(sd, n) == pytest.approx(hand)
    assert detectable_difference(sd, n) == pytest.approx(
        (2.7764451051977934 + 0.9409645772351816) * 0.012 / math.sqrt(5))
    assert detectable_difference(sd, 10, alpha=0.01, power=0.9) == pytest.approx(
        (stats.t.ppf(0.995, 9) + stats.t.ppf(0.9, 9)) * sd / math.sqrt(10))
    # more seeds detect smaller differences; a noisier difference needs a larger one
    assert detectable_difference(sd, 10) < detectable_difference(sd, 5) < detectable_difference(2 * sd, 5)
    # and the paired t-test finds that difference about 80% of the time (noncentral t, n = 30)
    df, crit = 29, stats.t.ppf(0.975, 29)
    nc = detectable_difference(sd, 30) * math.sqrt(30) / sd
    assert 1 - stats.nct.cdf(crit, df, nc) + stats.nct.cdf(-crit, df, nc) == pytest.approx(0.8, abs=0.01)


def test_detectable_difference_needs_two_pairs_and_a_finite_spread():
    assert detectable_difference(0.01, 1) is None and detectable_difference(0.01, 0) is None
    assert detectable_difference(float("nan"), 5) is None and detectable_difference(float("inf"), 5) is None
    assert detectable_difference(0.0, 5) == 0.0  # identical differences on every seed
