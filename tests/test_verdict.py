import numpy as np
import pytest

from pipeline.config import TrainClassifierConfig, VariantSpec
from pipeline.core.stats import detectable_difference
from pipeline.reporting.tables import variant_table
from pipeline.reporting.verdict import caveats, decide, verdict

NAMES = ["a", "b"]
# the default variants (real, real+classic, real+synthetic+classic, synthetic-only, fixmatch, fixmatch+synthetic),
# the self-training students and one synthetic variant without classic augmentation
SPECS = {**TrainClassifierConfig().variants, "real+synthetic": VariantSpec(data="filtered"),
         "fixmatch+oracle": VariantSpec(data="filtered", oracle=True, learner="fixmatch", augment="classic"),
         "real+oracle": VariantSpec(data="filtered", oracle=True),
         "real+pseudo+classic": VariantSpec(data="prepared", pseudo=True, augment="classic"),
         "real+pseudo+synthetic+classic": VariantSpec(data="filtered", pseudo=True, augment="classic")}
BUDGET = "equal: supervised, test_resnet, 1500 steps of 64"
REAL, CLASSIC = [0.80, 0.81, 0.82], [0.81, 0.82, 0.83]


def variant(accs, val=None, ratio=None, synthetic=False, **kw):
    """Metrics as train_classifier writes them; ``val`` = each seed's best validation accuracy
    (default: the test accuracy), ``ratio`` = the synthetic share chosen on validation."""
    val = val or accs
    return {"n_test": 200, "synthetic_ratio": (0.25 if synthetic else 0.0) if ratio is None else ratio,
            "learner": "supervised", "arch": "test_resnet", "steps": 1500, "batch_size": 64, **kw,
            "per_seed": [{"seed": s, "accuracy": a, "best_val_accuracy": v, "macro_f1": a - 0.01, "ece": 0.05,
                          "per_class_accuracy": dict(zip(NAMES, [a, a]))} for s, (a, v) in enumerate(zip(accs, val))]}


def syn(accs, **kw):
    """A variant trained with the synthetic set (share 0.25 unless ``ratio`` says otherwise)."""
    return variant(accs, synthetic=True, **kw)


def semi(accs, **kw):
    """A variant of the semi-supervised learner (its own budget)."""
    return {**variant(accs, **kw), "learner": "fixmatch+flexmatch", "steps": 4500}


def judge(**variants):
    return verdict(variant_table(variants), variants, SPECS)


def pairs(v):
    return {(f["a"], f["b"]): f for f in v["findings"]}


def test_synthetic_data_helps_only_when_it_beats_every_variant_it_is_weighed_against():
    v = judge(real=variant(REAL), **{"real+classic": variant(CLASSIC),
                                     "real+synthetic+classic": syn([0.85, 0.87, 0.86])})
    assert v["helped"] is True and v["recommend"] == v["synthetic_variant"] == "real+synthetic+classic"
    assert v["headline"] == ("Use real+synthetic+classic (86.0% ± 2.5): synthetic data added +4.0 points [+1.5, +6.5] "
                             "over real+classic.")
    f = pairs(v)
    assert [x["question"] for x in v["findings"]] == ["best_without", "real", "classic_alone"]  # classic = best without
    assert f[("real+synthetic+classic", "real+classic")]["diff"] == pytest.approx(0.04)
    assert f[("real+synthetic+classic", "real")]["held"] and f[("real+classic", "real")]["diff"] == pytest.approx(0.01)
    assert f[("real+synthetic+classic", "real")]["budget"] == BUDGET and f[("real+classic", "real")]["n"] == 3
    assert v["gain"] == pytest.approx(0.05) and v["gain_low"] > 0 and v["points"] == []
    # above real (interval > 0) but not above classic augmentation: no help; use classic augmentation
    v = judge(real=variant(REAL), **{"real+classic": variant([0.84, 0.86, 0.85]),
                                     "real+synthetic+classic": syn([0.85, 0.86, 0.86])})
    assert v["gain_low"] > 0 and v["helped"] is False and v["recommend"] == "real+classic"
    assert v["headline"] == ("Use real+classic (85.0% ± 2.5): synthetic data added +0.7 points [-0.8, +2.1], "
                             "no help here.")
    assert [x["held"] for x in v["findings"]] == [False, True, True]
    # without a classic variant the question is real alone
    v = judge(real=variant(REAL), **{"real+synthetic+classic": syn([0.85, 0.87, 0.86])})
    assert v["helped"] is True and v["headline"].endswith("over real.") and len(v["findings"]) == 1


def test_the_synthetic_variant_weighed_is_the_best_on_validation_not_on_test():
    # real+synthetic is best on test but worse on validation: real+synthetic+classic answers (and did not help)
    v = judge(real=variant(REAL), **{"real+classic": variant(CLASSIC),
                                     "real+synthetic": syn([0.90, 0.91, 0.92], val=[0.70, 0.70, 0.70]),
                                     "real+synthetic+classic": syn([0.80, 0.815, 0.82], val=[0.9, 0.9, 0.9])})
    assert v["synthetic_variant"] == "real+synthetic+classic" and v["helped"] is False
    assert v["best_variant"] == "real+synthetic+classic"  # best on validation, not real+synthetic (best on test)
    assert v["recommend"] == "real+classic"  # the best without synthetic data, as it did not help
    t = variant_table({"real+synthetic": syn([0.9, 0.8], val=[0.6, 0.7])})
    assert t.loc["real+synthetic", "val_accuracy"] == pytest.approx(0.65)  # mean of the seeds' best val accuracy


def test_the_semi_supervised_learner_with_and_without_synthetic_data_at_equal_budget():
    base = {"real": variant(REAL), "real+classic": variant(CLASSIC), "fixmatch": semi([0.84, 0.85, 0.86])}
    v = judge(**base, **{"fixmatch+synthetic": semi([0.87, 0.89, 0.88], synthetic=True)})
    assert v["headline"] == ("Use fixmatch+synthetic (88.0% ± 2.5): synthetic data added +3.0 points [+0.5, +5.5] "
                             "over fixmatch.")
    top = v["findings"][0]
    assert (top["a"], top["b"], top["question"]) == ("fixmatch+synthetic", "fixmatch", "best_without")
    assert top["budget"] == "equal: fixmatch+flexmatch, test_resnet, 4500 steps of 64"
    # a supervised synthetic variant against the learner: the budgets differ, and the finding says so
    v = judge(**base, **{"real+synthetic+classic": syn([0.85, 0.86, 0.85])})
    assert v["strongest_without_synthetic"] == v["recommend"] == "fixmatch" and v["helped"] is False
    assert pairs(v)[("real+synthetic+classic", "fixmatch")]["budget"] == (
        "unequal: learner supervised vs fixmatch+flexmatch, steps 1500 vs 4500")


def test_what_the_generator_adds_beyond_the_pool_is_a_finding_of_its_own():
    base = {"real": variant(REAL), "real+classic": variant(CLASSIC), "real+pseudo+classic": variant([0.84, 0.85, 0.86]),
            "real+synthetic+classic": syn([0.85, 0.86, 0.85])}
    v = judge(**base, **{"real+pseudo+synthetic+classic": syn([0.88, 0.89, 0.89], val=[0.95] * 3)})
    assert v["synthetic_variant"] == v["recommend"] == "real+pseudo+synthetic+classic" and v["helped"] is True
    f = pairs(v)[("real+pseudo+synthetic+classic", "real+pseudo+classic")]
    assert f["question"] == "best_without" and f["diff"] == pytest.approx(0.0367, abs=1e-4) and f["held"]
    assert len(v["headline"]) <= 120  # the longest default-like names still fit
    # the pool + generator row answers "beyond the pool" also when another synthetic variant is weighed
    plain = judge(**base, **{"real+pseudo+synthetic+classic": syn([0.88, 0.89, 0.89], val=[0.5] * 3)})
    assert plain["synthetic_variant"] == "real+synthetic+classic"
    assert pairs(plain)[("real+pseudo+synthetic+classic", "real+pseudo+classic")]["question"] == "pool"


def test_a_share_of_0_chosen_on_validation_is_no_synthetic_data():
    rule = "the rule the variant recorded"
    v = judge(real=variant(REAL), **{"real+classic": variant(CLASSIC),
                                     "real+synthetic+classic": syn(CLASSIC, ratio=0.0, val=[0.9] * 3, ratio_rule=rule)})
    assert v["helped"] is False and v["recommend"] == "real+classic"
    assert v["headline"] == ("Use real+classic (82.0% ± 2.5): validation chose no synthetic data for "
                             "real+synthetic+classic (a share of 0).")
    assert v["points"] == [f"Validation chose no synthetic data for real+synthetic+classic ({rule}): those rows are "
                           "the result without synthetic images."]
    v = judge(real=variant(REAL), **{"real+classic": variant(CLASSIC),
                                     "real+synthetic+classic": syn([0.82, 0.83, 0.84], ratio=0.5)})
    assert v["points"] == []


def test_smallest_detectable_difference_pools_the_findings():
    v = judge(real=variant(REAL), **{"real+classic": variant([0.81, 0.83, 0.83]),
                                     "real+synthetic+classic": syn([0.85, 0.87, 0.86])})
    sds = [np.std(np.subtract(a, b), ddof=1) for a, b in (([0.85, 0.87, 0.86], [0.81, 0.83, 0.83]),
                                                          ([0.85, 0.87, 0.86], REAL), ([0.81, 0.83, 0.83], REAL))]
    expected = detectable_difference(float(np.sqrt(np.mean(np.square(sds)))), 3)
    assert v["detectable_difference"] == pytest.approx(expected) and expected > 0


def test_without_a_synthetic_variant_or_a_baseline_the_verdict_says_what_it_cannot_answer():
    v = judge(real=variant(REAL), **{"real+classic": variant(CLASSIC, val=[0.9] * 3)})
    assert v["helped"] is None and "gain" not in v and v["recommend"] == v["best_variant"] == "real+classic"
    assert v["headline"] == ("Use real+classic (82.0% ± 2.5): no variant trained on synthetic data, so this run cannot "
                             "say whether it helps.")
    assert [f["question"] for f in v["findings"]] == ["classic_alone"]
    one = judge(**{"real+classic": variant([0.8]), "real+synthetic+classic": syn([0.9])})
    assert one["headline"].startswith("Use real+synthetic+classic (90.0%, 1 seed):")
    assert one["points"][0].startswith("Only 1 seed per variant: no interval") and "gain" not in one
    assert one["points"][1].startswith("No variant trains on real images alone")
    d = decide(variant_table({"real": variant(REAL)}), {"real": variant(REAL)}, SPECS)
    assert d.synthetic is None and d.helped is None and d.findings == ()


def test_the_recommended_model_is_its_seed_best_on_validation():
    v = judge(real=variant(REAL, val=[0.7, 0.9, 0.8]), **{"real+classic": variant(CLASSIC, val=[0.6, 0.5, 0.55])})
    assert v["recommend"] == "real" and v["recommend_seed_index"] == 1


def test_each_synthetic_set_is_said_once_with_how_often_each_variant_saw_an_image():
    m = {**syn([0.8]), "n_synthetic": 30, "synthetic_per_class": {"a": 10, "b": 20}, "synthetic_seen_per_image": 12.5}
    only = {**m, "synthetic_ratio": 1.0, "synthetic_seen_per_image": 50.0}
    assert caveats({"real+synthetic+classic": m, "synthetic-only": only, "real": variant([0.8])}, SPECS, [], {}) == [
        "Synthetic set: 30 images (a 10, b 20); each seen about real+synthetic+classic 12x at share 0.25; "
        "synthetic-only 50x at share 1."]
    assert caveats({"real+synthetic+classic": {**m, "synthetic_ratio": 0.0}}, SPECS, [], {}) == []  # none used
    assert caveats({"real+oracle": m}, SPECS, [], {}) == []  # truly labeled pool images: no synthetic set
    pool = {**variant([0.8]), "n_pseudo_labeled": 1200,
            "pseudo": {"share": None, "labels": "teacher", "temperature": 1.0}}
    assert caveats({"real+pseudo+classic": pool}, SPECS, [], {}) == [
        "real+pseudo+classic learned the 1,200 pool images from the labeler's prediction of the very augmented view "
        "it saw (consistent distillation)."]
    assert "no semi-supervised learner" in caveats({}, SPECS, [], {"pseudo": {"pool_size": 0}})[0]
    assert caveats({}, SPECS, [], {"pseudo": {"pool_size": 5}}) == []


def test_the_oracle_is_the_ceiling_never_the_model_to_use():
    """An oracle (truly labeled pool images in place of the synthetic ones) needs labels a user does not have: it
    is weighed against the best without synthetic data, and is neither that opponent, nor the baseline, nor used."""
    v = judge(real=variant(REAL), **{"real+classic": variant(CLASSIC), "fixmatch": semi([0.84, 0.85, 0.86]),
                                     "fixmatch+synthetic": semi([0.84, 0.86, 0.85], synthetic=True),
                                     "real+oracle": variant([0.95, 0.95, 0.96], val=[0.99] * 3),
                                     "fixmatch+oracle": semi([0.90, 0.91, 0.92], val=[0.97] * 3)})
    assert v["recommend"] == v["strongest_without_synthetic"] == "fixmatch" and v["helped"] is False
    oracle = pairs(v)[("fixmatch+oracle", "fixmatch")]  # the oracle of the synthetic variant's learner
    assert oracle["question"] == "oracle" and oracle["diff"] == pytest.approx(0.06) and oracle["held"]
    assert not any("real+oracle" in (f["a"], f["b"]) for f in v["findings"])
    alone = judge(**{"real+oracle": variant([0.9, 0.9, 0.9]), "real+classic": variant(CLASSIC)})
    assert alone["baseline"] is None and alone["recommend"] == "real+classic"
