import html
import json
import shutil
import subprocess

import datasets
import numpy as np
import pandas as pd
import pytest
import torch

from pipeline import report
from pipeline.config import Paths, params_from_dict
from pipeline.core.curves import CURVES, write_curves
from pipeline.core.images import tensors_to_dataset
from pipeline.core.io import read_json, save_dataset, write_json
from pipeline.errors import DataError
from pipeline.reporting.summary import stage_seconds
from pipeline.reporting.tables import quality_rows, variant_table

NAMES = ["a", "b"]
PREPARED_FP, FILTERED_FP, PSEUDO_FP, SYNTHETIC_FP, GENERATOR_FP = "p" * 64, "f" * 64, "s" * 64, "y" * 64, "g" * 64
MICRO = params_from_dict({"base": {"profile": "micro"}})


def variant(accs, per_class=None, synthetic=None, val=None, ratio=None, pseudo=None, names=NAMES):
    """Metrics as train_classifier writes them; ``val`` = each seed's best validation accuracy
    (default: the test accuracy), ``ratio`` = the synthetic share chosen on validation."""
    val = val or accs
    return {"n_test": 200, "synthetic_ratio": (0.25 if synthetic else 0.0) if ratio is None else ratio,
            "learner": "supervised", "arch": "test_resnet", "steps": 1500, "batch_size": 64,
            "inputs": {"prepared": PREPARED_FP, **({"filtered": synthetic} if synthetic else {}),
                       **({"pseudo": pseudo} if pseudo else {})}, "per_seed": [
                {"seed": s, "accuracy": a, "best_val_accuracy": v, "macro_f1": a - 0.01, "ece": 0.05, "seconds": 1.0,
                 "per_class_accuracy": dict(zip(names, per_class or [a, a]))}
                for s, (a, v) in enumerate(zip(accs, val))]}


def table(**variants):
    return variant_table(variants)


def test_paired_difference_in_table_matches_seedwise_mean():
    t = table(real=variant([0.5, 0.6]), **{"real+synthetic": variant([0.6, 0.8])})
    assert t.loc["real+synthetic", "diff"] == pytest.approx(0.15)
    assert t.loc["real+synthetic", "p_value"] is not None


def test_quality_rows_read_filter_summary():
    fig = lambda v: {"value": v, "n_real": 10, "n_synthetic": 8, "feature_space": "x"}  # noqa: E731
    s = {"metrics": {"before": {"frechet_distance": fig(9.0), "kid": fig(0.1)},
                     "floor": {"frechet_distance": fig(1.0)}}}
    rows = quality_rows(s)
    assert [r["set"] for r in rows] == ["real vs real (floor)", "synthetic, all"]
    assert rows[1]["frechet_distance"] == 9.0 and rows[0]["kid"] is None and rows[1]["n_other"] == 8


def trained(name, accs, params=MICRO, **kw):
    """Metrics of variant ``name`` as train_classifier writes them with ``params``, on the current inputs
    (``kw`` overrides them)."""
    kw = {"per_class": accs[:2], "synthetic": FILTERED_FP if "synthetic" in name else None,
          "pseudo": PSEUDO_FP if "pseudo" in name or name == "fixmatch" else None, **kw}
    return {**variant(accs, **kw), "params": params.made_with("train_classifier", name)}


def fake_run(root, names=NAMES, params=MICRO):
    """Every input the report reads, tiny and made up; the classifiers trained with ``params``."""
    paths = Paths(root=root)
    rng = np.random.default_rng(0)
    img = lambda n: torch.from_numpy(rng.integers(0, 255, (n, 1, 8, 8), dtype=np.uint8))  # noqa: E731
    labels = torch.tensor([0, 1] * 4)
    dd = datasets.DatasetDict({s: tensors_to_dataset(img(8), labels, names) for s in ("train", "val", "test")})
    save_dataset(dd, paths.prepared / "dataset")
    write_json(paths.prepared / "summary.json", {"class_names": names, "source": "test", "sizes": {"train": 8},
                                                 "image_size": 8, "channels": 1, "source_fingerprint": "abc" * 8,
                                                 "fingerprint": PREPARED_FP})
    syn = tensors_to_dataset(img(6), [0, 0, 0, 1, 1, 1], names, {"seed": list(range(6))})
    save_dataset(syn, paths.synthetic / "dataset")
    write_json(paths.synthetic / "summary.json", {"fingerprint": SYNTHETIC_FP, "inputs": {"generator": GENERATOR_FP},
                                                  "images_per_second": 3.5, "timing": {"seconds": 2.0},
                                                  "params": MICRO.resolved()})
    scores = pd.DataFrame({"index": range(6), "label": [0, 0, 0, 1, 1, 1], "confidence": rng.random(6),
                           "accepted": [True, False, True, True, False, True],
                           "reason": ["", "low_confidence", "", "", "memorized", ""]})
    paths.filtered.mkdir(parents=True)
    scores.to_parquet(paths.filtered / "scores.parquet")
    write_json(paths.filtered / "summary.json", {
        "feature_space": "judge", "note": "test", "thresholds": {"min_confidence": 0.5},
        "acceptance": {"generated": 6, "accepted": 4, "per_class": {"a": {"generated": 3, "accepted": 2, "rate": 0.67}},
                       "rejected_by_first_reason": {"low_confidence": 1, "memorized": 1}},
        "clip": {"used": False, "why": "filter.clip.checkpoint not set"}, "metrics": {},
        "fingerprint": FILTERED_FP,
        "inputs": {"synthetic": SYNTHETIC_FP, "prepared": PREPARED_FP}})
    paths.generator.mkdir(parents=True)
    write_curves(paths.generator / CURVES, {"loss": (list(range(1, 51)), list(np.linspace(1, 0.1, 50)))})
    write_json(paths.generator / "generator.json", {"kind": "datasetgan", "num_parameters": 1_234_000, "steps": 50,
                                                    "timing": {"seconds": 12.0}, "device": "cpu",
                                                    "interpreter_val_accuracy": 0.75, "interpreter_val_n": 8,
                                                    "fingerprint": GENERATOR_FP, "inputs": {"prepared": PREPARED_FP}})
    write_json(paths.pseudo / "summary.json", {
        "fingerprint": PSEUDO_FP, "inputs": {"prepared": PREPARED_FP}, "pool_size": 20, "threshold": 0.9, "kept": 12,
        "kept_per_class": dict(zip(names, [7, 5])), "coverage_per_class": dict(zip(names, [0.7, 0.5])),
        "pseudo_label_accuracy": 0.75, "pseudo_label_accuracy_per_class": dict(zip(names, [0.8571, 0.6])),
        "labeler": {"arch": "test_resnet", "method": "fixmatch+flexmatch", "seeds": [0, 1, 2], "val_accuracy": 0.6,
                    "best_step": [10, 10, 10], "n_val": 8, "seconds": [2.0, 2.0, 2.0]},
        "headline": "pseudo_label: kept 12 of 20 pool images at confidence >= 0.9", "seconds": 3.0})
    for name, accs in {"real": [0.7, 0.72, 0.71], "real+classic": [0.73, 0.74, 0.72],
                       "fixmatch": [0.74, 0.75, 0.74], "real+synthetic+classic": [0.78, 0.79, 0.80]}.items():
        if name in params.train_classifier.variants:
            write_json(paths.classifier_metrics / f"{name}.json", trained(name, accs, params, names=names))
    return paths


def test_report_stage_writes_everything(tmp_path):
    paths = fake_run(tmp_path)
    out = report.run(params_from_dict({"base": {"profile": "micro"}}), paths)
    html = (paths.reports / "report.html").read_text()
    assert out["headline"] == ("Use real+synthetic+classic (79.0% ± 2.5): synthetic data added +4.7 points "
                               "[+1.8, +7.5] over fixmatch.")
    metrics = json.loads((paths.reports / "metrics.json").read_text())
    assert metrics["headline"] == out["headline"] and metrics["recommend"] == "real+synthetic+classic"
    assert metrics["model"] == "models/classifier/real+synthetic+classic/seed2/model.safetensors"  # best seed on val
    assert metrics["strongest_without_synthetic"] == "fixmatch" and metrics["findings"][0]["b"] == "fixmatch"
    assert metrics["findings"][0]["diff"] == pytest.approx(0.047, abs=1e-3) and metrics["findings"][0]["held"]
    assert out["headline"] in html.replace("&#39;", "'").replace("&gt;", ">")
    md = (paths.reports / "report.md").read_text()
    assert md.splitlines()[2] == f"**{out['headline']}**"
    assert md.splitlines()[4].startswith(f"Model: `{metrics['model']}`")
    assert html.count("data:image/png;base64,") >= 8 and "http://" not in html and "https://" not in html
    assert "low_confidence x1" in html and "not used" in html
    assert metrics["helped"] is True and metrics["variants"]["real"]["accuracy"] == pytest.approx(0.71)
    assert (paths.reports / "plots/per_class_gain.csv").exists() and (paths.reports / "figures/variants.png").exists()
    assert (paths.reports / "figures/generator_loss.png").exists()  # the generator's DVCLive loss curve
    assert len(pd.read_csv(paths.reports / "plots/generator_loss.csv")) == 50
    md = (paths.reports / "report.md").read_text()
    assert "| real+synthetic+classic |" in md and "| real+synthetic+classic vs real+classic: against classic" in md
    assert metrics["synthetic_variant"] == "real+synthetic+classic" and metrics["detectable_difference"] > 0
    # every variant the verdict names is a row of the variant table and a bar of the chart (plots: the same rows)
    named = {metrics["recommend"]} | {f[k] for f in metrics["findings"] for k in ("a", "b")}
    assert named <= set(metrics["variants"]) and all(f"<tr><td>{v}</td>" in html for v in named)
    assert {(c["a"], c["b"]) for c in metrics["findings"]} == {
        ("real+synthetic+classic", "real"), ("real+synthetic+classic", "real+classic"), ("real+classic", "real"),
        ("real+synthetic+classic", "fixmatch")}
    assert metrics["variants"]["real+synthetic+classic"]["synthetic_ratio"] == 0.25
    assert metrics["variants"]["real"]["val_accuracy"] == pytest.approx(0.71)
    # the pseudo-label section: its headline, the labeler, kept and right per class
    assert metrics["pseudo_labels"] == {"kept": 12, "pool_size": 20, "pseudo_label_accuracy": 0.75, "threshold": 0.9,
                                        "pseudo_label_accuracy_per_class": {"a": 0.8571, "b": 0.6},
                                        "labeler": read_json(paths.pseudo / "summary.json")["labeler"]}
    assert "fixmatch+flexmatch, the mean of 3 seeds, 60.0% on val (N=8)." in (paths.reports / "report.md").read_text()
    assert "## Pseudo-labels" in md and "kept 12 of 20 pool images" in md and "a 7 (85.7% right)" in md
    assert 'id="pseudo-per-class"' in html
    assert "Labeler: test_resnet, fixmatch+flexmatch, the mean of 3 seeds, 60.0% on val (N=8)." in html
    assert metrics["stage_seconds"]["pseudo_label"] == 3.0
    assert "Kind <b>datasetgan</b>, 1.23M parameters, 50 training steps in 12 s" in html
    assert "interpreter accuracy on val 75.0% (N=8)" in html and metrics["generator_kind"] == "datasetgan"


def test_report_reads_only_the_variants_named_in_params(tmp_path, caplog):
    paths = fake_run(tmp_path)  # metrics of real, real+classic, real+synthetic on disk
    named = {"real": {"data": "prepared"}, "real+synthetic+classic": {"data": "filtered", "augment": "classic"},
             "synthetic-only": {"data": "filtered", "real": False}}  # synthetic-only was not run
    params = params_from_dict({"base": {"profile": "micro"}, "train_classifier": {"variants": named}})
    with caplog.at_level("WARNING", logger="pipeline.report"):
        out = report.run(params, paths)
    metrics = json.loads((paths.reports / "metrics.json").read_text())
    assert list(metrics["variants"]) == ["real", "real+synthetic+classic"]  # real+classic is on disk but not named
    assert "synthetic-only" in caplog.text and "left out" in caplog.text
    assert out["headline"] == ("Use real+synthetic+classic (79.0% ± 2.5): synthetic data added +8.0 points "
                               "[+5.5, +10.5] over real.")
    assert "| real+classic |" not in (paths.reports / "report.md").read_text()
    only_missing = params_from_dict({"train_classifier": {"variants": {"synthetic-only": named["synthetic-only"]}}})
    with pytest.raises(FileNotFoundError, match="Run train_classifier first"):
        report.run(only_missing, paths)


def test_report_opens_in_headless_chromium(tmp_path):
    """The page loads offline in a browser: its verdict reads what the report decided, the first screen
    (1280 x 800) shows the headline, the model's path and the findings table, and the sample grids (real,
    accepted, rejected per class, as the scores say) are in the page and decode."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if not browser:
        pytest.skip("Chromium is not installed (make test installs Debian's chromium where apt is usable)")
    paths = fake_run(tmp_path)
    out = report.run(params_from_dict({"base": {"profile": "micro"}}), paths)
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--window-size=1280,800", f"--user-data-dir={tmp_path / 'chrome'}"]
    # read in the page, once loaded, by a script appended to a copy of it; the result comes back as the title
    js = ("(()=>{const g=[...document.querySelectorAll('img.grid')];return JSON.stringify({"
          "verdict:document.getElementById('headline').innerText,"
          "first:['headline','model','findings'].map(id=>document.getElementById(id).getBoundingClientRect().bottom),"
          "width:window.innerWidth,"
          "grids:g.map(i=>i.alt),decoded:g.filter(i=>i.complete&&i.naturalWidth>0).length,"
          "images:document.images.length})})()")
    probe = tmp_path / "probe.html"
    probe.write_text((paths.reports / "report.html").read_text().replace(
        "</body>", f"<script>window.onload=()=>{{document.title={js}}}</script></body>"))
    dom = subprocess.run([browser, *flags, "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    page = json.loads(html.unescape(dom.split("<title>")[1].split("</title>")[0]))
    assert page["verdict"] == out["headline"] and page["verdict"].startswith("Use real+synthetic+classic (")
    assert 0 < max(page["first"]) <= 800, page  # all on the first screen of 1280 x 800
    # fake_run: 2 classes, each with real images, accepted and rejected samples (scores.parquet)
    scores = pd.read_parquet(paths.filtered / "scores.parquet")
    expected = {f"{kind} {name}" for c, name in enumerate(NAMES) for kind, rows in
                (("real", [1]), ("accepted", scores[(scores.label == c) & scores.accepted]),
                 ("rejected", scores[(scores.label == c) & ~scores.accepted])) if len(rows)}
    assert sorted(page["grids"]) == sorted(expected) and len(expected) == 6
    assert page["decoded"] == len(expected) and page["images"] > len(expected)  # and the figures


def test_report_refuses_metrics_of_another_run(tmp_path):
    """Metrics trained on other prepared data (another dataset) or on another synthetic set are not
    compared with the current ones: the report names the stale variants and what to re-run."""
    paths = fake_run(tmp_path)
    params = MICRO
    stale = trained("real", [0.3, 0.31, 0.32])
    stale["inputs"]["prepared"] = "o" * 64  # e.g. a 2-class dataset after switching prepare.source
    write_json(paths.classifier_metrics / "real.json", stale)
    with pytest.raises(DataError, match=r"(?s)real: prepared changed since \(prepare ran again\).*Re-run them: dvc "
                                        r"repro \(or python -m flows train_classifier --variant real\)"):
        report.run(params, paths)
    write_json(paths.classifier_metrics / "real.json", trained("real", [0.7, 0.72, 0.71]))
    write_json(paths.classifier_metrics / "real+synthetic+classic.json",
               trained("real+synthetic+classic", [0.9, 0.9, 0.9], synthetic="x" * 64))
    with pytest.raises(DataError, match=r"real\+synthetic\+classic: filtered changed since \(filter ran again\)"):
        report.run(params, paths)
    write_json(paths.classifier_metrics / "real+synthetic+classic.json", trained("real+synthetic+classic", [0.9] * 3))
    # the fixmatch variant is pseudo_label's models: older ones (pseudo_label re-ran since) are refused
    write_json(paths.classifier_metrics / "fixmatch.json", trained("fixmatch", [0.8] * 3, pseudo="o" * 64))
    with pytest.raises(DataError, match=r"fixmatch: pseudo changed since"):
        report.run(params, paths)
    assert not (paths.reports / "metrics.json").exists()  # no verdict was written
    write_json(paths.classifier_metrics / "fixmatch.json", trained("fixmatch", [0.8] * 3))
    assert report.run(params, paths)["headline"]  # every input current again: the report is written


def test_report_refuses_variants_trained_with_other_classifier_settings(tmp_path):
    """The probe's -47-point verdict: change train_classifier.steps and arch, re-run only real, then
    report. Every other variant was trained with the old settings: refused, each one named."""
    old = MICRO
    new = params_from_dict({"base": {"profile": "micro"}, "train_classifier": {"steps": 7, "arch": "resnet10t"}})
    paths = fake_run(tmp_path, params=old)
    write_json(paths.classifier_metrics / "real.json", trained("real", [0.9, 0.91, 0.92], new))
    with pytest.raises(DataError) as err:
        report.run(new, paths)
    msg = str(err.value)
    for v in ("real+classic", "fixmatch", "real+synthetic+classic"):
        assert f"  {v}: trained with other settings (" in msg and f"--variant {v}" in msg
    assert "train_classifier.arch: 'test_resnet' -> 'resnet10t'" in msg and "train_classifier.steps:" in msg
    assert "  real:" not in msg  # the one trained with the current settings is not stale
    assert not (paths.reports / "metrics.json").exists()
    # a variant's own spec changed (e.g. augment) is stale too, the others are not
    respec = params_from_dict({"base": {"profile": "micro"}, "train_classifier": {"variants": {
        **{k: v.model_dump() for k, v in MICRO.train_classifier.variants.items()},
        "real+classic": {"data": "prepared", "augment": "standard"}}}})
    with pytest.raises(DataError, match=r"(?s)real\+classic: trained with other settings \(train_classifier.variants"
                                        r".real\+classic.augment: 'classic' -> 'standard'\)") as err:
        report.run(respec, fake_run(tmp_path / "again", params=old))
    assert "  real:" not in str(err.value) and "real+synthetic+classic:" not in str(err.value)
    # metrics from before this record existed are refused too, not trusted
    paths = fake_run(tmp_path / "older")
    write_json(paths.classifier_metrics / "real.json", variant([0.7, 0.72, 0.71]))
    with pytest.raises(DataError, match="real: no record of its settings"):
        report.run(MICRO, paths)


def test_report_refuses_a_filtered_set_of_older_samples(tmp_path):
    """Re-train the generator and re-sample without re-running filter: the classifier metrics name
    the current filtered set, but that set was made from the older samples. The report names filter."""
    paths = fake_run(tmp_path)
    summary = json.loads((paths.synthetic / "summary.json").read_text())
    write_json(paths.synthetic / "summary.json", {**summary, "fingerprint": "n" * 64})  # sample ran again
    with pytest.raises(DataError, match=r"data/filtered: made from other inputs than the ones on disk now \(synthetic: "
                                        r"yyyyyyyyyyyy there, nnnnnnnnnnnn now \(sample ran since\)\)\. Re-run filter"):
        report.run(MICRO, paths)


def test_a_stale_output_no_compared_variant_used_is_left_out_with_a_note(tmp_path):
    params = params_from_dict({"base": {"profile": "micro"}, "train_classifier": {"variants": {
        "real": {"data": "prepared"}, "real+classic": {"data": "prepared", "augment": "classic"}}}})
    paths = fake_run(tmp_path, params=params)
    summary = json.loads((paths.synthetic / "summary.json").read_text())
    write_json(paths.synthetic / "summary.json", {**summary, "fingerprint": "n" * 64})  # filter is now stale
    report.run(params, paths)
    metrics = json.loads((paths.reports / "metrics.json").read_text())
    assert any(p.startswith("The filter output is left out of this report: ") and "Re-run filter" in p
               for p in metrics["notes"])
    assert metrics["generator_quality"] is None  # not described beside results it did not make


def test_report_shows_the_params_outputs_were_made_with(tmp_path):
    """Change sample.guidance_scale after sampling: "params in force" shows what the images were made
    with, and a line says params.yaml has changed since."""
    paths = fake_run(tmp_path)
    now = params_from_dict({"base": {"profile": "micro"}, "sample": {"guidance_scale": 7.5}})
    report.run(now, paths)
    html = (paths.reports / "report.html").read_text()
    shown = json.loads(html.split("<summary>params in force</summary><pre>")[1].split("</pre>")[0]
                       .replace("&#34;", '"').replace("&quot;", '"'))
    assert shown["sample"]["guidance_scale"] == MICRO.sample.guidance_scale != 7.5
    metrics = json.loads((paths.reports / "metrics.json").read_text())
    assert any(p.startswith("synthetic was made with other params than params.yaml's now (sample.guidance_scale: "
                            f"{MICRO.sample.guidance_scale!r} -> 7.5)") for p in metrics["notes"])


VARIANT_SETS = {
    "no variant named real": {"baseline": {"data": "prepared"}, "baseline+synthetic": {"data": "filtered"}},
    "a single variant": {"real": {"data": "prepared"}},
    "no synthetic variant": {"real": {"data": "prepared"}, "real+classic": {"data": "prepared", "augment": "classic"}},
    "no baseline": {"real+classic": {"data": "prepared", "augment": "classic"},
                    "real+synthetic+classic": {"data": "filtered", "augment": "classic"}},
}


@pytest.mark.parametrize("case", [*VARIANT_SETS, "only real has metrics", "filter kept nothing"])
def test_report_renders_for_any_valid_set_of_variants(tmp_path, case):
    """Each renders, and says what it can and cannot conclude (the probe's jinja UndefinedError)."""
    root = tmp_path
    if case in VARIANT_SETS:
        params = params_from_dict({"base": {"profile": "micro"}, "train_classifier": {"variants": VARIANT_SETS[case]}})
        paths = fake_run(root, params=params)
        for name in VARIANT_SETS[case]:
            accs = [0.8, 0.83, 0.84] if "synthetic" in name else [0.7, 0.72, 0.75]
            write_json(paths.classifier_metrics / f"{name}.json", trained(name, accs, params))
    else:  # the default variants, of which only real has metrics (the others not run, or stopped)
        params = MICRO
        paths = fake_run(root)
        for f in paths.classifier_metrics.glob("*.json"):
            if f.name != "real.json":
                f.unlink()
        if case == "filter kept nothing":
            s = json.loads((paths.filtered / "summary.json").read_text())
            write_json(paths.filtered / "summary.json", {**s, "n": {"synthetic": 6, "accepted": 0}})
    out = report.run(params, paths)
    metrics = json.loads((paths.reports / "metrics.json").read_text())
    md = (paths.reports / "report.md").read_text()
    assert md.splitlines()[2] == f"**{out['headline']}**" and (paths.reports / "report.html").exists()
    expected = {"no variant named real": "Use baseline+synthetic (",  # the plain real variant is the baseline
                "a single variant": "Use real (",
                "no synthetic variant": "Use real (",
                "no baseline": "Use real+synthetic+classic (",
                "only real has metrics": "Use real (",
                "filter kept nothing": "Use real ("}[case]
    assert out["headline"].startswith(expected) and len(out["headline"]) <= 120
    if case != "no variant named real":
        assert out["headline"].endswith(
            "no variant trained on synthetic data, so this run cannot say whether it helps.") or case == "no baseline"
    if case == "no variant named real":
        assert metrics["baseline"] == "baseline" and "| vs baseline (points) |" in md
        assert metrics["variants"]["baseline+synthetic"]["diff"] == pytest.approx(0.1)
        assert out["headline"].endswith("synthetic data added +10.0 points [+7.5, +12.5] over baseline.")
    if case == "filter kept nothing":
        assert any("the filter accepted none of the synthetic images" in p for p in metrics["notes"])
    if case == "only real has metrics":
        assert any(p.startswith("No metrics for real+classic, ") for p in metrics["notes"])


@pytest.mark.parametrize("damage, needle", [
    (lambda p: (p.filtered / "scores.parquet").write_bytes(b"PAR1 truncated"), "scores.parquet: damaged or unreadable"),
    (lambda p: write_text(p.stage_timing / "prepare.json", "{garbage"), "prepare.json: damaged or unreadable"),
    (lambda p: write_text(p.classifier_metrics / "real.json", "[1,"), "real.json: damaged or unreadable"),
    (lambda p: write_json(p.classifier_metrics / "real.json", {**read_json(p.classifier_metrics / "real.json"),
                                                                "per_seed": [{"seed": 0, "accuracy": "high"}]}),
     "real.json: accuracy is a str"),
    (lambda p: write_json(p.classifier_metrics / "real.json", {**read_json(p.classifier_metrics / "real.json"),
                                                                "per_seed": []}), "real.json: no per-seed results"),
])
def test_damaged_report_inputs_name_the_file(tmp_path, damage, needle):
    paths = fake_run(tmp_path)
    damage(paths)
    with pytest.raises(DataError, match=needle + r".*Re-run the \w+ stage"):
        report.run(MICRO, paths)


def write_text(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_report_notes_few_seeds_and_missing_test_classes(tmp_path):
    params = params_from_dict({"base": {"profile": "micro"}, "train_classifier": {"seeds": 2}})
    paths = fake_run(tmp_path, params=params)
    for name in ("real", "real+classic", "fixmatch", "real+synthetic+classic"):
        m = trained(name, [0.7, 0.75], params)
        write_json(paths.classifier_metrics / f"{name}.json", {**m, "test_classes_missing": ["b"]})
    report.run(params, paths)
    answer = json.loads((paths.reports / "metrics.json").read_text())["notes"]
    assert any(p.startswith("Only 2 seeds per variant: a 95% interval over 2 seeds uses t = 12.7") for p in answer)
    assert "The test split has no image of b: accuracies are over the other classes only." in answer


MARKUP = "<script>document.title='pwned'</script><b>bold</b>"


def test_markup_in_title_and_class_names_is_shown_as_text(tmp_path):
    paths = fake_run(tmp_path, names=[MARKUP, "b"])
    report.run(params_from_dict({"base": {"profile": "micro"}, "report": {"title": MARKUP}}), paths)
    html = (paths.reports / "report.html").read_text()
    assert "<script>document.title" not in html and "<b>bold</b>" not in html
    assert "&lt;script&gt;document.title=&#39;pwned&#39;&lt;/script&gt;&lt;b&gt;bold&lt;/b&gt;" in html
    md = (paths.reports / "report.md").read_text()  # a Markdown viewer renders HTML tags: report.md escapes them too
    assert "<script>" not in md and "<b>" not in md and md.startswith("# &lt;script&gt;document.title='pwned'")
    assert "&lt;script&gt;document.title='pwned'&lt;/script&gt;&lt;b&gt;bold&lt;/b&gt; 7" in md  # the class name
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if not browser:
        pytest.skip("Chromium is not installed (make test installs Debian's chromium where apt is usable)")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'chrome'}", "--virtual-time-budget=3000", "--dump-dom"]
    dom = subprocess.run([browser, *flags, (paths.reports / "report.html").resolve().as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    title = dom.split("<title>")[1].split("</title>")[0]
    assert title != "pwned" and title.startswith("&lt;script&gt;")  # the script never ran: its text is the title
    h1 = dom.split("<h1>")[1].split("</h1>")[0]
    assert h1 == "&lt;script&gt;document.title='pwned'&lt;/script&gt;&lt;b&gt;bold&lt;/b&gt;"  # text, not elements


def test_stage_seconds_take_each_variants_wall_time_where_it_has_one():
    side_by_side = {**variant([0.7, 0.7]), "seconds": 1.5}  # two seeds of 1 s each side by side: 1.5 s of wall time
    older = variant([0.7, 0.7])  # no wall time: its seeds' training times summed
    assert stage_seconds({}, {"a": side_by_side, "b": older}, {"prepare": 2.0}) == {
        "prepare": 2.0, "train_classifier": 3.5}
