"""The verdict (pure): each question the report answers is a ``Finding`` (a pair of variants, the
difference of their test accuracy paired by seed, its interval and p, whether it held); what to use
follows from the findings; the words are one template per finding and one headline per outcome.

Every choice is made on validation, never on test: the variant with synthetic data to weigh is the
best of them on validation, and so is the one without it (``strongest_without``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from pipeline.config import VariantSpec
from pipeline.core.stats import detectable_difference
from pipeline.reporting.tables import budgets, paired, pct

# question -> how its row reads; {a} and {b} are the two variants, {a} minus {b}
QUESTIONS = {
    "best_without": "{a} vs {b}: the best with synthetic data against the best without",
    "real": "{a} vs {b}: against real images alone",
    "classic": "{a} vs {b}: against classic augmentation",
    "pool": "{a} vs {b}: what the generator adds beyond self-training on the pool",
    "classic_alone": "{a} vs {b}: classic augmentation alone",
    "oracle": "{a} vs {b}: truly labeled pool images in place of synthetic ones, the ceiling of any synthetic set",
}


@dataclass(frozen=True)
class Finding:
    """One question answered: ``a`` minus ``b`` in test accuracy, paired by seed (95% interval)."""
    question: str  # a key of QUESTIONS
    a: str
    b: str
    diff: float
    low: float
    high: float
    p_value: float | None
    n: int  # seeds paired
    std_diff: float | None
    budget: str  # whether the two trained with the same learner, network, steps and batch

    @property
    def held(self) -> bool:
        """``a`` beat ``b``: the whole interval lies above 0."""
        return bool(self.low > 0)

    def record(self) -> dict:
        """The finding as the report's JSON and tables show it."""
        return {"question": self.question, "text": QUESTIONS[self.question].format(a=self.a, b=self.b),
                "a": self.a, "b": self.b, "diff": self.diff, "low": self.low, "high": self.high,
                "p_value": self.p_value, "n": self.n, "held": self.held, "budget": self.budget}


@dataclass(frozen=True)
class Verdict:
    """What the findings decide: the model to use and whether synthetic data helped (None: not asked)."""
    recommend: str
    findings: tuple[Finding, ...]
    synthetic: str | None  # the variant with synthetic data best on validation
    used: bool  # it trained on synthetic images (validation may choose a share of 0)
    helped: bool | None
    baseline: str | None
    seeds: int
    n_test: int | None
    mde: float | None  # smallest difference the findings could detect (80% power)

    def finding(self, question: str) -> Finding | None:
        return next((f for f in self.findings if f.question == question), None)


def baseline_of(specs: dict[str, VariantSpec], names) -> str | None:
    """The variant every gain is measured against: real images alone with standard augmentation
    (``real`` by default, whatever its name); None when no variant of ``names`` is one."""
    return next((v for v, s in specs.items() if v in names and s.real and not s.adds_images and not s.pseudo
                 and s.augment == "standard" and s.learner == "supervised"), None)


def best_on_val(table: pd.DataFrame, names) -> str | None:
    """The variant of ``names`` with the best validation accuracy (mean over its seeds)."""
    return max((v for v in names if v in table.index), key=lambda v: table.loc[v, "val_accuracy"], default=None)


def strongest_without(table: pd.DataFrame, specs: dict[str, VariantSpec]) -> str | None:
    """The best variant on validation that needs no generator (an oracle needs hidden labels: never one)."""
    return best_on_val(table, [v for v, s in specs.items() if not s.uses_synthetic and not s.oracle])


def supervised(specs: dict[str, VariantSpec], table: pd.DataFrame, *, synthetic: bool, pseudo: bool,
               augment: str) -> str | None:
    """The supervised variant on real images with (or without) synthetic and pseudo-labeled ones and
    ``augment``, best on validation."""
    return best_on_val(table, [v for v, s in specs.items() if s.real and s.uses_synthetic == synthetic and not s.oracle
                               and s.pseudo == pseudo and s.augment == augment and s.learner == "supervised"])


def finding(variants: dict[str, dict], question: str, a: str, b: str) -> Finding:
    c = paired(variants, a, b)
    return Finding(question, a, b, c["diff"], c["low"], c["high"], c["p_value"], c["n"], c["std_diff"],
                   budgets(variants, a, b))


def decide(table: pd.DataFrame, variants: dict[str, dict], specs: dict[str, VariantSpec],
           baseline: str | None = "real") -> Verdict:
    """Ask each question that this run's variants can answer; use the variant with synthetic data only
    when it trained on some and beat every variant it was weighed against."""
    baseline = baseline if baseline in table.index else None
    syn = best_on_val(table, [v for v, s in specs.items() if s.real and s.uses_synthetic])
    opp = strongest_without(table, specs)
    classic = supervised(specs, table, synthetic=False, pseudo=False, augment="classic")
    aug = specs[syn].augment if syn else "standard"
    pool = supervised(specs, table, synthetic=False, pseudo=True, augment=aug)
    pool_syn = supervised(specs, table, synthetic=True, pseudo=True, augment=aug)
    learner = specs[syn].learner if syn else None
    oracles = [v for v, s in specs.items() if s.oracle and s.real]  # the synthetic variant's learner's first
    oracle = best_on_val(table, [v for v in oracles if specs[v].learner == learner] or oracles)
    pairs = {"best_without": (syn, opp), "real": (syn, baseline), "classic": (syn, classic),
             "pool": (pool_syn, pool), "classic_alone": (classic, baseline), "oracle": (oracle, opp)}
    seen, findings = set(), []
    for q, (a, b) in pairs.items():
        if a and b and a != b and (a, b) not in seen and a in table.index and b in table.index:
            seen.add((a, b))
            findings.append(finding(variants, q, a, b))
    used = bool(syn and table.loc[syn, "synthetic_ratio"] != 0)  # 0: validation chose none: its twin without
    weighed = [f for f in findings if f.a == syn]
    helped = (used and all(f.held for f in weighed)) if weighed else None
    seeds = int(table["seeds"].min())
    sds = [f.std_diff for f in findings if f.std_diff is not None]
    return Verdict(
        recommend=syn if helped else opp or best_on_val(table, [v for v in table.index if not specs[v].oracle])
        or str(table["val_accuracy"].idxmax()),
        findings=tuple(findings),
        synthetic=syn, used=used, helped=helped, baseline=baseline, seeds=seeds,
        n_test=int(table["n_test"].dropna().iloc[0]) if table["n_test"].notna().any() else None,
        mde=detectable_difference(float(np.sqrt(np.mean(np.square(sds)))), seeds) if sds else None)


def points(diff: float) -> str:
    return f"{100 * diff:+.1f}"


def accuracy(table: pd.DataFrame, v: str) -> str:
    """Mean test accuracy and the half-width of its 95% interval over seeds."""
    r = table.loc[v]
    half = (r["accuracy_high"] - r["accuracy_low"]) / 2
    return f"{pct(r['accuracy'])}%" + (f" ± {100 * half:.1f}" if half > 0 else f", {int(r['seeds'])} seed")


def headline(d: Verdict, table: pd.DataFrame) -> str:
    """What to use and what synthetic data did, in one line."""
    use = f"Use {d.recommend} ({accuracy(table, d.recommend)})"
    top = d.finding("best_without") or next((f for f in d.findings if f.a == d.synthetic), None)
    if d.synthetic is None:
        return f"{use}: no variant trained on synthetic data, so this run cannot say whether it helps."
    if not d.used:
        return f"{use}: validation chose no synthetic data for {d.synthetic} (a share of 0)."
    if top is None:
        return f"{use}: no variant without synthetic data to weigh {d.synthetic} against."
    gain = f"synthetic data added {points(top.diff)} points [{points(top.low)}, {points(top.high)}]"
    return f"{use}: {gain} over {top.b}." if d.helped else f"{use}: {gain}, no help here."


def remarks(d: Verdict, table: pd.DataFrame, variants: dict[str, dict], specs: dict[str, VariantSpec]) -> list[str]:
    """What the headline and the findings table leave out: few seeds, a share of 0, how to read them."""
    out = []
    if d.seeds < 3:
        out.append(f"Only {d.seeds} seed{'s' if d.seeds != 1 else ''} per variant: "
                   + ("no interval can be computed from one seed" if d.seeds == 1 else
                      "a 95% interval over 2 seeds uses t = 12.7, so intervals are very wide")
                   + "; use train_classifier.seeds of 3 or more (5 to detect differences of about 1 point).")
    zero = [v for v, s in specs.items() if v in table.index and s.real and s.uses_synthetic
            and table.loc[v, "synthetic_ratio"] == 0]
    if zero:
        rule = next((variants[v].get("ratio_rule") for v in zero if variants[v].get("ratio_rule")), None)
        out.append(f"Validation chose no synthetic data for {', '.join(zero)}"
                   + (f" ({rule})" if rule else "") + ": those rows are the result without synthetic images.")
    if d.baseline is None:
        out.append("No variant trains on real images alone with standard augmentation (data: prepared, no pseudo, "
                   "augment: standard), so no gain over real images alone is measured.")
    return out


def verdict(table: pd.DataFrame, variants: dict[str, dict], specs: dict[str, VariantSpec],
            baseline: str | None = "real") -> dict:
    """``decide``, then say it: the headline, the recommended variant's best seed on validation (its
    model file), the findings, and the notes."""
    d = decide(table, variants, specs, baseline)
    per_seed = variants[d.recommend]["per_seed"]
    real = d.finding("real")
    return {"headline": headline(d, table), "recommend": d.recommend,
            "recommend_seed_index": int(np.argmax([r["best_val_accuracy"] for r in per_seed])),
            "recommend_accuracy": float(table.loc[d.recommend, "accuracy"]),
            "best_variant": str(table["val_accuracy"].idxmax()), "synthetic_variant": d.synthetic,
            "helped": d.helped, "baseline": d.baseline, "n_test": d.n_test, "seeds": d.seeds,
            "findings": [f.record() for f in d.findings], "detectable_difference": d.mde,
            "strongest_without_synthetic": strongest_without(table, specs),
            **({"gain": real.diff, "gain_low": real.low, "gain_high": real.high} if real else {}),
            "points": remarks(d, table, variants, specs)}


POOL_LABELS = {"hard": "the labeler's class of each", "soft": "the labeler's probabilities of each clean image",
               "teacher": "the labeler's prediction of the very augmented view it saw (consistent distillation)"}


def synthetic_sets(variants: dict[str, dict], specs: dict[str, VariantSpec]) -> list[str]:
    """Each synthetic set the variants trained on, said once: its size per class, and how often each
    variant saw an image of it (an oracle's truly labeled pool images are no synthetic set)."""
    sets: dict[tuple, list[str]] = {}
    for v, m in variants.items():
        if m.get("synthetic_per_class") and m.get("synthetic_ratio") and not specs[v].oracle:
            sets.setdefault((m["n_synthetic"], tuple(m["synthetic_per_class"].items())), []).append(v)
    out = []
    for (n, per_class), names in sets.items():
        counts = ", ".join(f"{c} {k}" for c, k in per_class)
        seen = "; ".join(f"{v} {variants[v]['synthetic_seen_per_image']:.0f}x at share "
                         f"{variants[v]['synthetic_ratio']:g}" for v in names)
        out.append(f"Synthetic set: {n} images ({counts}); each seen about {seen}.")
    return out


def caveats(variants: dict[str, dict], specs: dict, missing: list[str], outputs: dict[str, dict]) -> list[str]:
    """What limits this run's conclusions, said in the report rather than only in a log."""
    out = []
    if missing:
        accepted = ((outputs.get("filtered") or {}).get("n") or {}).get("accepted")
        why = (" (the filter accepted none of the synthetic images, so the variants that train on them stop)"
               if accepted == 0 and any(specs[v].data == "filtered" for v in missing) else
               " (train_classifier was not run for them, or stopped)")
        out.append(f"No metrics for {', '.join(missing)}{why}: this report compares the other variants only.")
    pseudo = outputs.get("pseudo") or {}
    if pseudo and not pseudo.get("pool_size"):
        out.append("No unlabeled pool (prepare.unlabeled_pool: 0): no semi-supervised learner could be trained, "
                   "so no variant was weighed against one.")
    if (outputs.get("prepared") or {}).get("upscaled"):
        out.append(f"Data: {outputs['prepared']['upscaled']}.")
    out += [f"{v} learned the {m['n_pseudo_labeled']:,} pool images from {POOL_LABELS[m['pseudo']['labels']]}."
            for v, m in variants.items() if (m.get("pseudo") or {}).get("labels") in POOL_LABELS]
    out += synthetic_sets(variants, specs)
    absent = sorted({c for m in variants.values() for c in m.get("test_classes_missing") or []})
    if absent:
        out.append(f"The test split has no image of {', '.join(absent)}: accuracies are over the other classes only.")
    return out


def conclude(table: pd.DataFrame, variants: dict[str, dict], specs: dict[str, VariantSpec], baseline: str | None,
             outputs: dict[str, dict], missing: list[str], notes: list[str]) -> dict:
    """The ``verdict``, then what limits it: the ``caveats`` and ``notes``."""
    answer = verdict(table, variants, specs, baseline)
    return answer | {"points": answer["points"] + caveats(variants, specs, missing, outputs) + notes}
