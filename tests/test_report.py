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
from pipeline.core.io import save_dataset, write_json
from pipeline.errors import DataError
from pipeline.reporting.tables import quality_rows, variant_table, verdict

NAMES = ["a", "b"]
PREPARED_FP, FILTERED_FP = "p" * 64, "f" * 64


def variant(accs, per_class=None, synthetic=None):
    return {"n_test": 200, "inputs": {"prepared": PREPARED_FP, "synthetic": synthetic}, "per_seed": [
        {"seed": s, "accuracy": a, "macro_f1": a - 0.01, "ece": 0.05, "seconds": 1.0,
         "per_class_accuracy": dict(zip(NAMES, per_class or [a, a]))} for s, a in enumerate(accs)]}


def table(**variants):
    return variant_table(variants)


def test_verdict_says_helped_only_when_interval_above_zero():
    t = table(real=variant([0.80, 0.81, 0.82]), **{"real+synthetic": variant([0.85, 0.87, 0.86])})
    v = verdict(t)
    assert v["helped"] is True and v["text"].startswith("Yes") and "N=200" in v["text"] and "3 seeds" in v["text"]
    assert v["gain"] == pytest.approx(0.05)
    t = table(real=variant([0.80, 0.81, 0.82]), **{"real+synthetic": variant([0.79, 0.83, 0.815])})
    assert verdict(t)["helped"] is False and "includes zero" in verdict(t)["text"]
    t = table(real=variant([0.80, 0.81, 0.82]), **{"real+synthetic": variant([0.70, 0.71, 0.73])},
              **{"real+classic": variant([0.83, 0.84, 0.85])})
    text = verdict(t)["text"]
    assert text.startswith("No, synthetic data did not help") and "does not score above" in text and "real+classic" in text


def test_paired_difference_in_table_matches_seedwise_mean():
    t = table(real=variant([0.5, 0.6]), **{"real+synthetic": variant([0.6, 0.8])})
    assert t.loc["real+synthetic", "diff"] == pytest.approx(0.15)
    assert t.loc["real+synthetic", "p_value"] is not None


def test_quality_rows_read_filter_summary():
    fig = lambda v: {"value": v, "n_real": 10, "n_synthetic": 8, "feature_space": "x"}  # noqa: E731
    s = {"metrics": {"before": {"frechet_distance": fig(9.0), "kid": fig(0.1)}, "floor": {"frechet_distance": fig(1.0)}}}
    rows = quality_rows(s)
    assert [r["set"] for r in rows] == ["real vs real (floor)", "synthetic, all"]
    assert rows[1]["frechet_distance"] == 9.0 and rows[0]["kid"] is None and rows[1]["n_other"] == 8


def fake_run(root, names=NAMES):
    """Every input the report reads, tiny and made up."""
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
    scores = pd.DataFrame({"index": range(6), "label": [0, 0, 0, 1, 1, 1], "confidence": rng.random(6),
                           "accepted": [True, False, True, True, False, True],
                           "reason": ["", "low_confidence", "", "", "memorized", ""]})
    paths.filtered.mkdir(parents=True)
    scores.to_parquet(paths.filtered / "scores.parquet")
    write_json(paths.filtered / "summary.json", {"feature_space": "judge", "note": "test", "thresholds": {"min_confidence": 0.5},
                                                 "acceptance": {"generated": 6, "accepted": 4, "per_class": {"a": {"generated": 3, "accepted": 2, "rate": 0.67}},
                                                                "rejected_by_first_reason": {"low_confidence": 1, "memorized": 1}},
                                                 "clip": {"used": False, "why": "filter.clip.checkpoint not set"}, "metrics": {},
                                                 "fingerprint": FILTERED_FP})
    paths.generator.mkdir(parents=True)
    write_curves(paths.generator / CURVES, {"loss": (list(range(1, 51)), list(np.linspace(1, 0.1, 50)))})
    write_json(paths.generator / "generator.json", {"kind": "datasetgan", "num_parameters": 1_234_000, "steps": 50,
                                                    "timing": {"seconds": 12.0}, "device": "cpu",
                                                    "interpreter_val_accuracy": 0.75, "interpreter_val_n": 8})
    for name, accs in {"real": [0.7, 0.72, 0.71], "real+classic": [0.73, 0.74, 0.72],
                       "real+synthetic": [0.78, 0.79, 0.80]}.items():
        write_json(paths.classifier_metrics / f"{name}.json",
                   variant(accs, per_class=[accs[0], accs[1]], synthetic=FILTERED_FP if "synthetic" in name else None))
    return paths


def test_report_stage_writes_everything(tmp_path):
    paths = fake_run(tmp_path)
    out = report.run(params_from_dict({"base": {"profile": "micro"}}), paths)
    html = (paths.reports / "report.html").read_text()
    assert out["headline"].startswith("Yes, synthetic data helped")
    assert out["headline"] in html.replace("&#39;", "'") or "Yes, synthetic data helped" in html
    assert html.count("data:image/png;base64,") >= 8 and "http://" not in html and "https://" not in html
    assert "low_confidence x1" in html and "not used" in html
    metrics = json.loads((paths.reports / "metrics.json").read_text())
    assert metrics["helped"] is True and metrics["variants"]["real"]["accuracy"] == pytest.approx(0.71)
    assert (paths.reports / "plots/per_class_gain.csv").exists() and (paths.reports / "figures/variants.png").exists()
    assert (paths.reports / "figures/generator_loss.png").exists()  # the generator's DVCLive loss curve
    assert len(pd.read_csv(paths.reports / "plots/generator_loss.csv")) == 50
    assert "| real+synthetic |" in (paths.reports / "report.md").read_text()
    assert "Kind <b>datasetgan</b>, 1.23M parameters, 50 training steps in 12 s" in html
    assert "interpreter accuracy on val 75.0% (N=8)" in html and metrics["generator_kind"] == "datasetgan"


def test_report_reads_only_the_variants_named_in_params(tmp_path, caplog):
    paths = fake_run(tmp_path)  # metrics of real, real+classic, real+synthetic on disk
    named = {"real": {"data": "prepared"}, "real+synthetic": {"data": "filtered"},
             "synthetic-only": {"data": "filtered", "real": False}}  # synthetic-only was not run
    params = params_from_dict({"base": {"profile": "micro"}, "train_classifier": {"variants": named}})
    with caplog.at_level("WARNING", logger="pipeline.report"):
        out = report.run(params, paths)
    metrics = json.loads((paths.reports / "metrics.json").read_text())
    assert list(metrics["variants"]) == ["real", "real+synthetic"]  # real+classic is on disk but not named
    assert "synthetic-only" in caplog.text and "left out" in caplog.text
    assert out["headline"].startswith("Yes, synthetic data helped") and "real+classic" not in out["headline"]
    assert "| real+classic |" not in (paths.reports / "report.md").read_text()
    only_missing = params_from_dict({"train_classifier": {"variants": {"synthetic-only": named["synthetic-only"]}}})
    with pytest.raises(FileNotFoundError, match="Run train_classifier first"):
        report.run(only_missing, paths)


def test_report_opens_in_headless_chromium(tmp_path):
    """The page loads offline with its images and headline (screenshot in reports/)."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if not browser:
        pytest.skip("Chromium is not installed (make test installs Debian's chromium where apt is usable)")
    paths = fake_run(tmp_path)
    report.run(params_from_dict({"base": {"profile": "micro"}}), paths)
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'chrome'}"]
    url = (paths.reports / "report.html").resolve().as_uri()
    js = ("(()=>{const im=[...document.images];return JSON.stringify({n:im.length,"
          "ok:im.filter(i=>i.complete&&i.naturalWidth>0).length,h:document.getElementById('headline').innerText})})()")
    dom = subprocess.run([browser, *flags, "--virtual-time-budget=5000", "--dump-dom", url],
                         capture_output=True, text=True, timeout=120).stdout
    assert "Yes, synthetic data helped" in dom
    shot = paths.reports / "screenshot.png"
    subprocess.run([browser, *flags, f"--screenshot={shot}", "--window-size=1280,1600", url],
                   capture_output=True, timeout=120)
    assert shot.exists() and shot.stat().st_size > 10_000
    # images decode: evaluate in the page via a data: URL that reports the count of loaded images
    probe = tmp_path / "probe.html"
    probe.write_text((paths.reports / "report.html").read_text().replace(
        "</body>", f"<script>window.onload=()=>{{document.title={js}}}</script></body>"))
    title_dom = subprocess.run([browser, *flags, "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()],
                               capture_output=True, text=True, timeout=120).stdout
    stats = json.loads(title_dom.split("<title>")[1].split("</title>")[0].replace("&quot;", '"'))
    assert stats["n"] >= 8 and stats["ok"] == stats["n"] and stats["h"].startswith("Yes")


def test_report_refuses_metrics_of_another_run(tmp_path):
    """Metrics trained on other prepared data (another dataset) or on another synthetic set are not
    compared with the current ones: the report names the stale variants and what to re-run."""
    paths = fake_run(tmp_path)
    params = params_from_dict({"base": {"profile": "micro"}})
    stale = variant([0.3, 0.31, 0.32])
    stale["inputs"]["prepared"] = "o" * 64  # e.g. a 2-class dataset after switching prepare.source
    write_json(paths.classifier_metrics / "real.json", stale)
    with pytest.raises(DataError, match=r"metrics of real come from another run.*Re-run train_classifier"):
        report.run(params, paths)
    write_json(paths.classifier_metrics / "real.json", variant([0.7, 0.72, 0.71]))
    write_json(paths.classifier_metrics / "real+synthetic.json", variant([0.9, 0.9, 0.9], synthetic="x" * 64))
    with pytest.raises(DataError, match="metrics of real\\+synthetic come from another run"):
        report.run(params, paths)
    assert not (paths.reports / "metrics.json").exists()  # no verdict was written


MARKUP = "<script>document.title='pwned'</script><b>bold</b>"


def test_markup_in_title_and_class_names_is_shown_as_text(tmp_path):
    paths = fake_run(tmp_path, names=[MARKUP, "b"])
    report.run(params_from_dict({"base": {"profile": "micro"}, "report": {"title": MARKUP}}), paths)
    html = (paths.reports / "report.html").read_text()
    assert "<script>document.title" not in html and "<b>bold</b>" not in html
    assert "&lt;script&gt;document.title=&#39;pwned&#39;&lt;/script&gt;&lt;b&gt;bold&lt;/b&gt;" in html
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
