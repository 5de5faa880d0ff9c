"""bench/pool_study.py's pure parts: disjoint class-balanced splits, balanced picks, the paired summary."""
import numpy as np
import pytest
import torch

from bench.pool_study import BASE, LABELER, TAUGHT, balanced, make_splits, markdown, plan, rows, summarize


def test_splits_are_disjoint_class_balanced_and_fixed_by_the_seed():
    y = np.repeat(np.arange(3), 20)
    x = np.arange(60)[:, None]  # each image is its own row number
    sizes = {"labeled": 2, "val": 3, "pool": 5, "dev": 4}
    parts = make_splits(x, y, sizes)
    rows_of = {k: set(v[0].ravel().tolist()) for k, v in parts.items()}
    assert sum(map(len, rows_of.values())) == len(set().union(*rows_of.values())) == 3 * 14  # disjoint
    for name, n in sizes.items():
        assert np.bincount(parts[name][1], minlength=3).tolist() == [n] * 3
        assert (y[parts[name][0].ravel()] == parts[name][1]).all()  # labels travel with their images
    assert all((make_splits(x, y, sizes)[k][0] == parts[k][0]).all() for k in sizes)


def test_balanced_takes_the_first_kept_images_of_each_class():
    y = torch.tensor([0, 1, 0, 1, 0, 1, 2, 2])
    x = torch.arange(8)
    keep = torch.tensor([True, True, False, True, True, True, True, False])
    bx, by = balanced(x, y, 20, keep)  # 2 per class wanted
    assert bx.tolist() == [0, 4, 1, 3, 6] and by.tolist() == [0, 0, 1, 1, 2]  # class 2 has one kept image


def test_rows_name_what_they_train_on():
    r = rows([500, 10000], 0.5)
    assert r[BASE] == {} and r["real+pseudo+classic"] == {"pseudo": True}
    assert r["real+oracle (true pool labels) n=10000"] == {"source": "oracle", "n": 10000}
    assert r["synthetic-only (DPT, generate) n=10000"]["real"] is False
    assert all(s["min_conf"] == 0.5 for s in r.values() if s.get("gen"))
    assert r[TAUGHT] == {"pseudo": True, "taught": ["pseudo"]}  # the labeler labels each augmented view
    assert r["real+pseudo+synthetic (DPT, generate), teacher n=10000"]["taught"] == ["pseudo", "synthetic"]
    assert r["real+pseudo+oracle, teacher n=10000"] == {"source": "oracle", "n": 10000, "pseudo": True,
                                                         "taught": ["pseudo"]}  # the ceiling of the row above


def test_summary_pairs_rows_by_seed_and_gives_per_class_gains():
    def run(row, seed, dev):
        return {"row": row, "seed": seed, "dev": dev, "dev_per_class": [dev] * 10}
    doc = {"runs": [run(BASE, s, a) for s, a in enumerate([0.80, 0.81, 0.82])]
           + [run(LABELER, s, a) for s, a in enumerate([0.83, 0.83, 0.85])]
           + [run("x", s, a) for s, a in ((0, 0.81), (2, 0.84))] + [{"row": "y", "error": "boom"}]}
    s = summarize(doc)
    assert set(s) == {BASE, LABELER, "x"}  # a failed run is left out
    assert s[LABELER]["vs real+classic"]["mean_diff"] == pytest.approx(0.0267, abs=1e-4)
    assert s["x"]["vs real+classic"]["n"] == 2 and s["x"]["vs real+classic"]["mean_diff"] == pytest.approx(0.015)
    assert s["x"]["per_class_gain_vs_base"] == [pytest.approx(0.015)] * 10


def test_markdown_shows_each_row_with_its_intervals_and_the_findings():
    def run(row, seed, dev):
        return {"row": row, "seed": seed, "dev": dev, "dev_per_class": [dev] * 10}
    doc = {"device_name": "cpu", "device": "cpu", "date": "2026-12-04T00:00:00Z", "findings": ["it did not help"],
           "splits": {"sizes_per_class": {"labeled": 5, "val": 5, "pool": 20, "dev": 10}},
           "runs": [run(BASE, s, a) for s, a in enumerate([0.80, 0.81])] + [run(LABELER, s, a) for s, a in enumerate([0.83, 0.85])]}
    doc["summary"] = summarize(doc)
    md = markdown(doc)
    assert "dev split of 100" in md and "- it did not help" in md
    assert f"| {LABELER} | 2 | 84.00 | +3.50 [" in md and "Per-class gain over real+classic" in md


def test_plan_puts_generators_first_and_a_resumed_run_does_only_what_is_missing():
    specs = {BASE: {}, "syn": {"gen": "dpt"}, "lab": {"gen": "labeled"}}
    ready, later = plan(specs, [0, 1], labeler_scale=4)
    assert ready == [("gen", "dpt", None), ("gen", "labeled", None), ("labeler", LABELER, 0), ("labeler", LABELER, 1),
                     ("classifier", BASE, 0), ("classifier", BASE, 1), ("labeler", f"{LABELER}, steps x4", 0),
                     ("labeler", f"{LABELER}, steps x4", 1)]
    assert later == {"dpt": [("classifier", "syn", 0), ("classifier", "syn", 1)],
                     "labeled": [("classifier", "lab", 0), ("classifier", "lab", 1)]}
    done = {(BASE, 0), (BASE, 1), (LABELER, 0), ("lab", 0), ("lab", 1), ("syn", 0)}
    ready, later = plan(specs, [0, 1], labeler_scale=1, done=done)
    assert ready == [("gen", "dpt", None), ("labeler", LABELER, 1)]  # no labeled-only generator: its rows are done
    assert later == {"dpt": [("classifier", "syn", 1)]}


def test_plan_without_labelers_runs_only_the_classifier_rows():
    ready, later = plan({BASE: {}, "syn": {"gen": "dpt"}}, [0], labeler_scale=4, labelers=False)
    assert ready == [("gen", "dpt", None), ("classifier", BASE, 0)] and later == {"dpt": [("classifier", "syn", 0)]}
