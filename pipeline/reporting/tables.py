"""The report's numbers (pure): variant table with paired differences, the verdict, per-class
gain, set-quality rows."""
from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline.core.stats import mean_ci, paired_difference

SYNTHETIC_VARIANTS = ("real+synthetic", "real+synthetic+classic")  # the ones that answer the question
METRICS = ("accuracy", "macro_f1", "ece")


def seed_values(variant: dict, key: str) -> dict[int, float]:
    return {int(r["seed"]): float(r[key]) for r in variant["per_seed"]}


def variant_table(variants: dict[str, dict], baseline: str = "real") -> pd.DataFrame:
    """One row per variant: mean and 95% CI of each metric, paired difference to ``baseline``."""
    rows = []
    base = variants.get(baseline)
    for name, v in variants.items():
        row = {"variant": name, "seeds": len(v["per_seed"]), "n_test": v.get("n_test")}
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


def verdict(table: pd.DataFrame) -> dict:
    """The answer in one sentence, said plainly when synthetic data did not help."""
    n_test = int(table["n_test"].dropna().iloc[0]) if table["n_test"].notna().any() else None
    seeds = int(table["seeds"].min())
    best = str(table["accuracy"].idxmax())
    candidates = [v for v in SYNTHETIC_VARIANTS if v in table.index and "diff" in table and pd.notna(table.loc[v, "diff"])]
    out = {"best_variant": best, "n_test": n_test, "seeds": seeds, "helped": None}
    if not candidates:
        out["text"] = (f"No synthetic variant was trained, so this run cannot say whether synthetic data helps. "
                       f"Best variant: {best} ({pct(table.loc[best, 'accuracy'])}% accuracy).")
        return out
    syn = max(candidates, key=lambda v: table.loc[v, "diff"])
    r = table.loc[syn]
    helped = bool(r["diff_low"] > 0)
    p = "n/a" if pd.isna(r["p_value"]) else f"{r['p_value']:.3g}"
    gain = (f"{syn} vs real: {100 * r['diff']:+.1f} points accuracy (95% CI [{100 * r['diff_low']:+.1f}, "
            f"{100 * r['diff_high']:+.1f}], paired t-test p={p}; {seeds} seeds, N={n_test} real test images)")
    if helped:
        text = f"Yes, synthetic data helped. {gain}."
    elif r["diff"] > 0:
        text = f"Not shown: synthetic data did not significantly help. {gain}; the interval includes zero."
    else:
        text = f"No, synthetic data did not help. {gain}."
    if "real+classic" in table.index:
        classic = table.loc["real+classic", "accuracy"]
        beats = table.loc[syn, "accuracy"] > classic
        text += (f" Classic augmentation alone (real+classic) reaches {pct(classic)}%; the best synthetic variant "
                 f"{'scores above' if beats else 'does not score above'} it (not tested for significance).")
    text += f" Best variant overall: {best} ({pct(table.loc[best, 'accuracy'])}%)."
    out.update({"helped": helped, "synthetic_variant": syn, "gain": float(r["diff"]),
                "gain_low": float(r["diff_low"]), "gain_high": float(r["diff_high"]), "text": text})
    return out


def per_class_gain(variants: dict[str, dict], variant: str, class_names: list[str], baseline: str = "real") -> pd.DataFrame:
    def mean_per_class(v):
        rows = [[r["per_class_accuracy"].get(n) for n in class_names] for r in v["per_seed"]]
        return np.nanmean(np.array(rows, dtype=float), axis=0)
    gain = mean_per_class(variants[variant]) - mean_per_class(variants[baseline])
    return pd.DataFrame({"class": class_names, "gain": gain, "variant": variant})


QUALITY = ("frechet_distance", "kid", "precision", "recall")


def quality_rows(filter_summary: dict) -> list[dict]:
    """Set-level quality before / after filtering beside the real-vs-real floor."""
    m = filter_summary.get("metrics") or {}
    rows = []
    for key, label in (("floor", "real vs real (floor)"), ("before", "synthetic, all"),
                       ("floor_at_accepted_n", "real vs real at the accepted N (floor)"), ("after", "synthetic, accepted")):
        if key in m:
            first = next(v for v in m[key].values() if isinstance(v, dict) and "n_real" in v)
            rows.append({"set": label, **{q: (m[key].get(q) or {}).get("value") for q in QUALITY},
                         "n_real": first["n_real"], "n_other": first["n_synthetic"]})
    return rows
