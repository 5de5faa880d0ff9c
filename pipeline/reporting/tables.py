"""The report's numbers (pure): variant table with paired differences, the verdict (decided, then
put into words), per-class gain, set-quality rows."""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd

from pipeline.config import VariantSpec
from pipeline.core.stats import detectable_difference, mean_ci, paired_difference

METRICS = ("accuracy", "macro_f1", "ece")


def seed_values(variant: dict, key: str) -> dict[int, float]:
    return {int(r["seed"]): float(r[key]) for r in variant["per_seed"]}


def baseline_of(specs: dict[str, VariantSpec], names) -> str | None:
    """The variant every gain is measured against: real images alone with standard augmentation
    (``real`` by default, whatever its name); None when no variant of ``names`` is one."""
    return next((v for v, s in specs.items() if v in names and s.real and not s.uses_synthetic and not s.pseudo
                 and s.augment == "standard" and s.learner == "supervised"), None)


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


def _said(c: dict) -> str:
    p = "n/a" if c["p_value"] is None else f"{c['p_value']:.2g}"
    return (f"{c['a']} vs {c['b']}: {100 * c['diff']:+.1f} points [{100 * c['low']:+.1f}, {100 * c['high']:+.1f}], "
            f"p={p}")


def _find(specs: dict[str, VariantSpec], table: pd.DataFrame, *, synthetic: bool, pseudo: bool,
          augment: str | None = None) -> str | None:
    """The variant trained on real images with (or without) synthetic and pseudo-labeled ones;
    of several, the same augmentation first, then the best on validation."""
    names = [v for v, s in specs.items() if v in table.index and s.real and s.uses_synthetic == synthetic
             and s.pseudo == pseudo and s.learner == "supervised"]
    names.sort(key=lambda v: (specs[v].augment != augment, -table.loc[v, "val_accuracy"]))
    return names[0] if names else None


def _use(rec: str, comparisons: list[dict | None], classic: str | None) -> str:
    named = {classic: f"classic augmentation ({classic})"}
    gains = [f"{100 * c['diff']:+.1f} points over {named.get(c['b'], c['b'])} [{100 * c['low']:+.1f}, {100 * c['high']:+.1f}]"
             for c in {c["b"]: c for c in comparisons if c}.values()]
    return f"Use {rec}" + (f": {', '.join(gains)}" if gains else "")


def strongest_without(table: pd.DataFrame, specs: dict[str, VariantSpec]) -> str | None:
    """The best variant on validation that needs no generator (mean over its seeds)."""
    plain = [v for v, s in specs.items() if v in table.index and not s.uses_synthetic]
    return max(plain, key=lambda v: table.loc[v, "val_accuracy"], default=None)


def budgets(variants: dict[str, dict], a: str, b: str) -> str:
    """Whether ``a`` and ``b`` had the same training budget, and what it was."""
    ba, bb = budget(variants[a]), budget(variants[b])
    return f"equal budget: {ba}" if ba == bb else f"unequal budget: {a} {ba}; {b} {bb}"


@dataclass(frozen=True)
class Decision:
    """What the verdict decided, every choice on validation, before any word of it is written. With
    no synthetic variant or no baseline (``syn`` None) only the fields before ``syn`` are set."""
    best: str  # the best variant on validation
    best_accuracy: float
    baseline: str | None
    n_test: int | None
    seeds: int
    measured: bool = False  # the baseline is among the variants
    syn: str | None = None  # the synthetic variant best on validation
    syn_pseudo: bool = False  # it also uses the pseudo-labeled pool
    syn_used: bool = False  # validation gave it a share above 0
    classic: str | None = None  # classic augmentation without synthetic data
    pool: str | None = None  # the pool without synthetic data (self-training)
    opponent: str | None = None  # the strongest variant without synthetic data (``strongest_without``)
    versus: dict | None = None  # ``syn`` against it, paired by seed, with whether their budgets were equal
    cmp: dict = field(default_factory=dict)  # (a, b) -> ``paired``
    gain: dict | None = None  # ``syn`` against the baseline
    beats_baseline: bool = False
    beats_classic: bool = True  # also when there is no classic variant
    helped: bool | None = None
    lead: bool = False  # the opponent is neither baseline nor classic: weighed in a point of its own
    recommend: str | None = None  # what to use
    gains: list = field(default_factory=list)  # the comparisons that support ``recommend``
    beyond_pool: bool | None = None  # did the generator add accuracy beyond the pool
    beyond_cited: list = field(default_factory=list)  # the comparisons that show it, not said already
    zero: list = field(default_factory=list)  # synthetic variants validation gave a share of 0
    mde: float | None = None  # smallest detectable difference


def decide(table: pd.DataFrame, variants: dict[str, dict], specs: dict[str, VariantSpec],
           baseline: str | None = "real") -> Decision:
    """The verdict's choices and numbers (``words`` says them)."""
    n_test = int(table["n_test"].dropna().iloc[0]) if table["n_test"].notna().any() else None
    seeds = int(table["seeds"].min())
    best = str(table["val_accuracy"].idxmax())
    d = Decision(best, table.loc[best, "accuracy"], baseline, n_test, seeds, measured=baseline in table.index)
    syn = max((v for v, s in specs.items() if v in table.index and s.real and s.uses_synthetic),
              key=lambda v: table.loc[v, "val_accuracy"], default=None)
    if not d.measured or syn is None:
        return d
    aug = specs[syn].augment
    classic = _find(specs, table, synthetic=False, pseudo=False, augment="classic")
    classic = classic if classic and specs[classic].augment == "classic" else None
    pool = _find(specs, table, synthetic=False, pseudo=True, augment=aug)
    pool_syn = _find(specs, table, synthetic=True, pseudo=True, augment=aug)
    opp = strongest_without(table, specs)
    pairs = [(syn, opp), (syn, baseline), (syn, classic), (classic, baseline), (syn, pool), (pool_syn, pool)]
    cmp = {(a, b): paired(variants, a, b) | {"budget": budgets(variants, a, b)} for a, b in pairs if a and b and a != b}
    gain = cmp[(syn, baseline)]
    vs = cmp.get((syn, opp))
    above = {b: c["low"] > 0 for (a, b), c in cmp.items() if a == syn}
    syn_used = table.loc[syn, "synthetic_ratio"] != 0  # 0: validation chose none, it is its twin without them
    helped = bool(above[baseline] and above.get(classic, True) and (vs is None or vs["low"] > 0) and syn_used)
    lead = bool(vs and opp not in (baseline, classic))
    rec = syn if helped else opp or baseline
    gains = [gain, cmp.get((syn, classic)), vs] if helped else [paired(variants, rec, baseline)] if rec != baseline else []
    pool_syn_used = pool_syn is not None and table.loc[pool_syn, "synthetic_ratio"] != 0  # 0: it is the pool alone
    beyond = (cmp.get((pool_syn, pool)) if pool_syn_used else None) or (cmp.get((syn, pool)) if syn_used else None)
    cited = [cmp[k] for k in dict.fromkeys(((syn, pool), (pool_syn, pool))) if k in cmp
             and (k[0] != pool_syn or pool_syn_used) and (k[0] != syn or syn_used)
             and not (lead and k == (syn, opp))]
    sds = [c["std_diff"] for c in cmp.values() if c["std_diff"] is not None]
    return replace(
        d, syn=syn, syn_pseudo=specs[syn].pseudo, syn_used=syn_used, classic=classic, pool=pool, opponent=opp,
        versus=vs, cmp=cmp, gain=gain, beats_baseline=above[baseline], beats_classic=above.get(classic, True),
        helped=helped, lead=lead, recommend=rec, gains=gains,
        beyond_pool=None if beyond is None else bool(beyond["low"] > 0), beyond_cited=cited if beyond else [],
        zero=[v for v, s in specs.items() if v in table.index and s.real and s.uses_synthetic
              and table.loc[v, "synthetic_ratio"] == 0],
        mde=detectable_difference(float(np.sqrt(np.mean(np.square(sds)))), seeds) if sds else None)


def words(d: Decision) -> dict:
    """The decision in words: a headline (what to use), the points that support it and their
    ``text``, beside the decision's numbers."""
    s = "s" if d.seeds != 1 else ""
    few = (f"Only {d.seeds} seed{s} per variant: " +
           ("no interval can be computed from one seed" if d.seeds == 1 else
            "a 95% interval over 2 seeds uses t = 12.7, so intervals are very wide") +
           "; use train_classifier.seeds of 3 or more (5 to detect differences of about 1 point).") if d.seeds < 3 else None
    tail = (f"Best variant on validation: {d.best} ({pct(d.best_accuracy)}% test accuracy; "
            f"{d.seeds} seed{s}, N={d.n_test} real test images).")
    out = {"best_variant": d.best, "baseline": d.baseline, "n_test": d.n_test, "seeds": d.seeds, "helped": d.helped,
           "comparisons": [{k: c[k] for k in ("a", "b", "diff", "low", "high", "p_value", "budget")}
                           for c in d.cmp.values()]}
    if d.syn is None:
        headline = (f"No synthetic variant was compared with {d.baseline}, so this run cannot say whether synthetic "
                    "data helps." if d.measured else
                    "No variant trains on the real images alone with standard augmentation (data: prepared, "
                    "no pseudo, augment: standard), so this run has no baseline to measure a gain against.")
        points = [p for p in (few, tail) if p]
        return out | {"points": points, "headline": headline, "text": " ".join([headline, *points])}
    syn, base, classic, opp, cmp = d.syn, d.baseline, d.classic, d.opponent, d.cmp
    what = f"{base} and classic augmentation ({classic})" if classic else base
    who = (f"{syn} (the synthetic variant best on validation"
           f"{'; it also uses the pseudo-labeled pool' if d.syn_pseudo else ''})")
    if d.helped:
        answer = f"Yes: {who} beat {what}{' and ' + opp if d.lead else ''}. "
    elif not d.syn_used:
        answer = f"No: {who} trained on no synthetic image: validation chose a share of 0. "
    elif d.beats_baseline and d.beats_classic:
        answer = f"Partly: {who} beat {what} but not {opp}. "
    elif d.beats_baseline:
        answer = f"Partly: {who} beat {base} but not {classic}. "
    else:
        answer = f"No: {who} did not beat {what}{'; the interval includes zero' if d.gain['diff'] > 0 else ''}. "
    if d.versus:  # the first line: the best with synthetic data against the best without, both chosen on validation
        v, p = d.versus, "n/a" if d.versus["p_value"] is None else f"{d.versus['p_value']:.2g}"
        said = (f"{100 * v['diff']:+.1f} points [{100 * v['low']:+.1f}, {100 * v['high']:+.1f}] over {opp} (p={p}, "
                f"{v['n']} seeds paired; {v['budget']})")
        headline = (f"Synthetic data helped: use {syn}, {said}." if d.helped else
                    f"Synthetic data did not help: {syn}, the best with it on validation, {said}. Use {d.recommend}.")
    else:
        headline = _use(d.recommend, d.gains, classic if d.helped else None) + "." + (
            "" if d.helped else " Synthetic data did not help here.")
    points = [answer + "; ".join(_said(cmp[k]) for k in ((syn, base), (syn, classic)) if k in cmp) + "."]
    if d.beyond_pool is not None:
        points.append(f"Beyond using the pool directly (self-training, {d.pool}): the generator "
                      f"{'added accuracy' if d.beyond_pool else 'added nothing significant'}"
                      + (f"; {'; '.join(map(_said, d.beyond_cited))}." if d.beyond_cited else " (the first line)."))
    if (classic, base) in cmp:
        points.append(f"Classic augmentation alone: {_said(cmp[(classic, base)])}.")
    if d.zero:
        points.append(f"Validation chose no synthetic data for {', '.join(d.zero)} (a share above 0 is used only when "
                      "it beats no synthetic data on validation with every sweep seed): those rows are the result "
                      "without synthetic images.")
    if d.mde is not None:
        points.append(f"Smallest difference this run can detect: {100 * d.mde:.1f} points (80% power, paired t-test at "
                      f"5%, {d.seeds} seeds).")
    points += [p for p in (few, tail) if p]
    vs = d.versus
    return out | {"points": points, "synthetic_variant": syn, "headline": headline, "text": " ".join(points),
                  "generator_beyond_pool": d.beyond_pool, "strongest_without_synthetic": opp,
                  "versus_strongest": vs and {k: vs[k] for k in ("a", "b", "diff", "low", "high", "p_value", "n")},
                  "gain": float(d.gain["diff"]), "gain_low": float(d.gain["low"]), "gain_high": float(d.gain["high"]),
                  "detectable_difference": d.mde}


def verdict(table: pd.DataFrame, variants: dict[str, dict], specs: dict[str, VariantSpec],
            baseline: str | None = "real") -> dict:
    """What to use, in one line, then the answers that support it, each with its interval. The line: the
    best variant with synthetic data against the best without, both chosen on validation, paired by seed,
    with whether their training budgets were equal; then: did it beat real and classic augmentation; did
    the generator add anything beyond using the pool directly. Every choice is made on validation, never
    on test; without a significant gain the line recommends the strongest variant without synthetic data."""
    return words(decide(table, variants, specs, baseline))


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
                       ("floor_at_accepted_n", "real vs real at the accepted N (floor)"), ("after", "synthetic, accepted")):
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


POOL_LABELS = {"hard": "the labeler's class of each", "soft": "the labeler's probabilities of each clean image",
               "teacher": "the labeler's prediction of the very augmented view it saw (consistent distillation)"}


def caveats(variants: dict[str, dict], specs: dict, missing: list[str], outputs: dict[str, dict]) -> list[str]:
    """What limits this run's conclusions, said in the report rather than only in a log."""
    out = []
    if missing:
        accepted = ((outputs.get("filtered") or {}).get("n") or {}).get("accepted")
        why = (" (the filter accepted none of the synthetic images, so the variants that train on them stop)"
               if accepted == 0 and any(specs[v].data == "filtered" for v in missing) else
               " (train_classifier was not run for them, or stopped)")
        out.append(f"No metrics for {', '.join(missing)}{why}: this report compares the other variants only.")
    if (outputs.get("prepared") or {}).get("upscaled"):
        out.append(f"Data: {outputs['prepared']['upscaled']}.")
    for v, m in variants.items():
        if (m.get("pseudo") or {}).get("labels") in POOL_LABELS:
            out.append(f"{v} learned the {m['n_pseudo_labeled']:,} pool images from "
                       f"{POOL_LABELS[m['pseudo']['labels']]}.")
        if m.get("synthetic_per_class") and m.get("synthetic_ratio"):
            counts = ", ".join(f"{c} {n}" for c, n in m["synthetic_per_class"].items())
            out.append(f"{v} trained on {m['n_synthetic']} synthetic images ({counts}), each seen about "
                       f"{m['synthetic_seen_per_image']:g} times (share {m['synthetic_ratio']:g} of each batch).")
    absent = sorted({c for m in variants.values() for c in m.get("test_classes_missing") or []})
    if absent:
        out.append(f"The test split has no image of {', '.join(absent)}: accuracies are over the other classes only.")
    return out


def pool_point(pseudo: dict) -> str | None:
    """Without a pool: that no semi-supervised learner could be trained."""
    if pseudo and not pseudo.get("pool_size"):
        return ("No unlabeled pool (prepare.unlabeled_pool: 0): no semi-supervised learner could be trained, "
                "so no variant was weighed against one.")
    return None


def conclude(table: pd.DataFrame, variants: dict[str, dict], specs: dict[str, VariantSpec], baseline: str | None,
             outputs: dict[str, dict], missing: list[str], notes: list[str]) -> dict:
    """The ``verdict``, then what limits it: a missing pool, the ``caveats``, ``notes``."""
    pseudo = outputs.get("pseudo") or {}
    answer = verdict(table, variants, specs, baseline)
    labeler = pool_point(pseudo)
    points = ([labeler] if labeler else []) + caveats(variants, specs, missing, outputs) + notes
    return answer | {"points": answer["points"] + points, "text": " ".join([answer["text"], *points])}
