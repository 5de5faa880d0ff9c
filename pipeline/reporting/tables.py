"""The report's numbers (pure): the variant table with paired differences, per-class gain, set-quality
rows. What they add up to is ``verdict``'s."""
from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline.config import VariantSpec
from pipeline.core.stats import mean_ci, paired_difference

METRICS = ("accuracy", "macro_f1", "ece")


def seed_values(variant: dict, key: str) -> dict[int, float]:
    return {int(r["seed"]): float(r[key]) for r in variant["per_seed"]}


def budget(v: dict) -> str:
    """How a variant was trained: learner, network, steps and batch."""
    return f"{v.get('learner', 'supervised')}, {v.get('arch')}, {v.get('steps')} steps of {v.get('batch_size')}"


def variant_table(variants: dict[str, dict], baseline: str | None = "real") -> pd.DataFrame:
    """One row per variant: mean and 95% CI of each metric, paired difference to ``baseline``
    (NaN where there is none)."""
    rows = []
    base = variants.get(baseline)
    for name, v in variants.items():
        row = {"variant": name, "seeds": len(v["per_seed"]), "training": budget(v), "n_test": v.get("n_test"),
               "val_accuracy": float(np.mean(list(seed_values(v, "best_val_accuracy").values()))),
               "synthetic_ratio": v.get("synthetic_ratio"),
               "diff": np.nan, "diff_low": np.nan, "diff_high": np.nan, "p_value": np.nan}
        for m in METRICS:
            ci = mean_ci(list(seed_values(v, m).values()))
            row.update({f"{m}": ci["mean"], f"{m}_low": ci["low"], f"{m}_high": ci["high"]})
        if base is not None and name != baseline:
            a, b = seed_values(v, "accuracy"), seed_values(base, "accuracy")
            common = sorted(set(a) & set(b))
            d = paired_difference([a[s] for s in common], [b[s] for s in common])
            row.update({"diff": d["mean_diff"], "diff_low": d["low"], "diff_high": d["high"], "p_value": d["p_value"]})
        rows.append(row)
    return pd.DataFrame(rows).set_index("variant")


def pct(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{100 * x:.1f}"


def paired(variants: dict[str, dict], a: str, b: str) -> dict:
    """Accuracy of ``a`` minus ``b``, paired by seed: mean, 95% interval, p."""
    va, vb = seed_values(variants[a], "accuracy"), seed_values(variants[b], "accuracy")
    common = sorted(set(va) & set(vb))
    d = paired_difference([va[s] for s in common], [vb[s] for s in common])
    return {"a": a, "b": b, "diff": d["mean_diff"], "low": d["low"], "high": d["high"], "p_value": d["p_value"],
            "std_diff": d["std_diff"], "n": d["n"]}


BUDGET = {"learner": "supervised", "arch": None, "steps": None, "batch_size": None}  # key -> its value in older metrics


def budgets(variants: dict[str, dict], a: str, b: str) -> str:
    """Whether ``a`` and ``b`` had the same training budget: the same one, or what differs (``a``'s vs ``b``'s)."""
    va, vb = ({k: variants[v].get(k, d) for k, d in BUDGET.items()} for v in (a, b))
    differ = [f"{k.replace('_size', '')} {va[k]} vs {vb[k]}" for k in BUDGET if va[k] != vb[k]]
    return "unequal: " + ", ".join(differ) if differ else f"equal: {budget(variants[a])}"


def per_class_gain(variants: dict[str, dict], variant: str, class_names: list[str], baseline: str = "real"
                   ) -> pd.DataFrame:
    def mean_per_class(v):
        rows = [[r["per_class_accuracy"].get(n) for n in class_names] for r in v["per_seed"]]
        return np.nanmean(np.array(rows, dtype=float), axis=0)
    gain = mean_per_class(variants[variant]) - mean_per_class(variants[baseline])
    return pd.DataFrame({"class": class_names, "gain": gain, "variant": variant, "baseline": baseline})


QUALITY = ("frechet_distance", "kid", "precision", "recall")


def quality_rows(filter_summary: dict) -> list[dict]:
    """Set-level quality before / after filtering beside the real-vs-real floor."""
    m = filter_summary.get("metrics") or {}
    rows = []
    for key, label in (("floor", "real vs real (floor)"), ("before", "synthetic, all"),
                       ("floor_at_accepted_n", "real vs real at the accepted N (floor)"),
                       ("after", "synthetic, accepted")):
        if key in m:
            first = next(v for v in m[key].values() if isinstance(v, dict) and "n_real" in v)
            rows.append({"set": label, **{q: (m[key].get(q) or {}).get("value") for q in QUALITY},
                         "n_real": first["n_real"], "n_other": first["n_synthetic"]})
    return rows


def filter_quality(filter_summary: dict) -> dict:
    """The filter's verdict on a synthetic set, flat: Frechet distance of all and of the accepted
    images beside their real-vs-real floors, judge agreement, acceptance, img2img near-copies."""
    m = filter_summary.get("metrics") or {}
    fd = {k: ((m.get(k) or {}).get("frechet_distance") or {}).get("value")
          for k in ("before", "after", "floor", "floor_at_accepted_n")}
    n = filter_summary.get("n") or {}
    return {"feature_space": filter_summary.get("feature_space"),
            "frechet_distance_all": fd["before"], "frechet_distance_all_floor": fd["floor"],
            "frechet_distance_accepted": fd["after"], "frechet_distance_accepted_floor": fd["floor_at_accepted_n"],
            "judge_agreement": (filter_summary.get("judge") or {}).get("synthetic_agreement"),
            "generated": n.get("synthetic"), "accepted": n.get("accepted"),
            "acceptance": (filter_summary.get("acceptance") or {}).get("rate"),
            "near_copies_of_source": filter_summary.get("near_copies_of_source")}


def generator_quality(filter_summary: dict, table: pd.DataFrame, specs: dict[str, VariantSpec]) -> dict:
    """The generator's quality in one place for metrics.json: ``filter_quality`` and the accuracy of
    classifiers trained on synthetic images alone (the Classification Accuracy Score)."""
    only = [v for v, s in specs.items() if v in table.index and not s.real]
    return {**filter_quality(filter_summary), "synthetic_only_variant": only[0] if only else None,
            "synthetic_only_accuracy": float(table.loc[only[0], "accuracy"]) if only else None}
