"""Small statistics used to compare classifiers: intervals, paired tests, calibration, F1.

Pure functions on numbers, arrays or tensors; nothing here reads or writes files.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def _np(a) -> np.ndarray:
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    return np.asarray(a)


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> dict:
    """Mean, sample std (ddof=1) and a Student-t confidence interval of the mean.

    With one value the interval has width 0 and ``degenerate`` is True (no spread to
    estimate); with none every number is None. Kept: scipy's ``ttest_1samp(...).confidence_interval()`` and
    ``t.interval`` differ in the last digit for some inputs and give NaN below two values.
    """
    from scipy import stats

    v = _np(values).astype(np.float64).ravel()
    n = int(v.size)
    if n == 0:
        return {"mean": None, "std": None, "low": None, "high": None, "n": 0, "confidence": confidence,
                "degenerate": True}
    mean = float(v.mean())
    if n == 1:
        return {"mean": mean, "std": 0.0, "low": mean, "high": mean, "n": 1, "confidence": confidence,
                "degenerate": True}
    std = float(v.std(ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2, df=n - 1) * std / math.sqrt(n))
    return {"mean": mean, "std": std, "low": mean - half, "high": mean + half, "n": n,
            "confidence": confidence, "degenerate": False}


def paired_difference(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> dict:
    """Mean of ``a - b`` over pairs (e.g. the same seed), its t-interval and the two-sided
    paired t-test p-value (``scipy.stats.ttest_rel``). Fewer than two pairs: p_value None.
    Kept: ``ttest_rel(...).confidence_interval()`` differs from ``mean_ci(a - b)`` in the last digit, 2 inputs in 3."""
    from scipy import stats

    a, b = _np(a).astype(np.float64).ravel(), _np(b).astype(np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"paired_difference: need as many values in a as in b (got {a.size} and {b.size})")
    ci = mean_ci(a - b, confidence)
    p = None
    if a.size >= 2:
        d = a - b
        if np.allclose(d, d[0]):  # no spread: the t statistic is undefined
            p = 1.0 if d[0] == 0 else 0.0
        else:
            p = float(stats.ttest_rel(a, b).pvalue)
    return {"mean_diff": ci["mean"], "std_diff": ci["std"], "low": ci["low"], "high": ci["high"],
            "p_value": p, "n": int(a.size), "confidence": confidence}


def detectable_difference(std_diff: float, n: int, alpha: float = 0.05, power: float = 0.8) -> float | None:
    """Smallest true mean difference a two-sided paired t-test at ``alpha`` finds with probability
    ``power``, given ``n`` pairs whose differences have standard deviation ``std_diff``."""
    from scipy import stats

    if n < 2 or std_diff is None or not np.isfinite(std_diff):
        return None
    df = n - 1
    return float((stats.t.ppf(1 - alpha / 2, df) + stats.t.ppf(power, df)) * std_diff / math.sqrt(n))


def confusion_matrix(pred, labels, num_classes: int) -> np.ndarray:
    """K x K counts; row = true class, column = predicted class."""
    pred, labels = _np(pred).astype(np.int64).ravel(), _np(labels).astype(np.int64).ravel()
    return np.bincount(labels * num_classes + pred,
                       minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def per_class_accuracy(cm: np.ndarray) -> list[float | None]:
    """Recall of each class from a confusion matrix (None for a class with no examples)."""
    rows = cm.sum(1)
    return [float(cm[i, i] / rows[i]) if rows[i] else None for i in range(len(cm))]


def macro_f1(pred, labels, num_classes: int | None = None) -> float:
    """Unweighted mean of per-class F1 over classes present in labels or predictions
    (same as sklearn's f1_score(average='macro') with zero_division=0)."""
    pred, labels = _np(pred).astype(np.int64).ravel(), _np(labels).astype(np.int64).ravel()
    k = num_classes or int(max(pred.max(initial=0), labels.max(initial=0)) + 1)
    cm = confusion_matrix(pred, labels, k).astype(np.float64)
    tp = np.diag(cm)
    support, predicted = cm.sum(1), cm.sum(0)
    present = (support + predicted) > 0
    denom = support + predicted
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    return float(f1[present].mean()) if present.any() else 0.0


def expected_calibration_error(probs, labels, n_bins: int = 15) -> float:
    """ECE of the top-1 prediction: equal-width confidence bins over (0, 1],
    sum over bins of (bin share) * |accuracy - mean confidence| (Guo et al. 2017)."""
    probs, labels = _np(probs).astype(np.float64), _np(labels).astype(np.int64).ravel()
    if len(labels) == 0:
        return 0.0
    conf, pred = probs.max(1), probs.argmax(1)
    correct = (pred == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        in_bin = (conf > lo) & (conf <= hi)
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - conf[in_bin].mean())
    return float(ece)


def classification_metrics(probs, labels, num_classes: int, n_bins: int = 15) -> dict:
    """Accuracy, macro-F1, ECE, per-class accuracy and confusion matrix of ``probs`` (N,K)."""
    probs, labels = _np(probs), _np(labels).astype(np.int64).ravel()
    pred = probs.argmax(1)
    cm = confusion_matrix(pred, labels, num_classes)
    return {
        "accuracy": float((pred == labels).mean()) if len(labels) else float("nan"),
        "macro_f1": macro_f1(pred, labels, num_classes),
        "ece": expected_calibration_error(probs, labels, n_bins),
        "per_class_accuracy": per_class_accuracy(cm),
        "confusion_matrix": cm.tolist(),
        "n": int(len(labels)),
    }


def summarize_seeds(per_seed: list[dict], keys: Sequence[str], confidence: float = 0.95) -> dict:
    """For each metric in ``keys``: mean_ci over the per-seed results, nested under
    ``aggregate`` and also as flat scalars (``accuracy_mean``, ``accuracy_ci95_low`` ...)
    that ``dvc metrics show`` lists."""
    agg, flat = {}, {}
    tag = f"ci{round(confidence * 100)}"
    for m in keys:
        ci = mean_ci([r[m] for r in per_seed], confidence)
        agg[m] = ci
        flat.update({f"{m}_mean": ci["mean"], f"{m}_std": ci["std"],
                     f"{m}_{tag}_low": ci["low"], f"{m}_{tag}_high": ci["high"]})
    return {"aggregate": agg, **flat}
