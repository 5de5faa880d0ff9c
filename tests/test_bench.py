"""Smoke tests of the benchmarks: tiny sizes, results written where asked."""
import json

import pytest

from bench import cpu_policy, e2e, features, generators, sampling, seeds
from bench.common import rate, ratio
from pipeline.config import params_from_dict
from pipeline.models.diffusion import build_backbone
from tests.helpers import make_idx_dir


def test_sampling_quick_writes_ratios_and_agreement(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no trained generator here: a random UNet is used
    res = sampling.main(["--quick", "--device", "cpu", "--repeats", "1", "--arch", "micro",
                         "--out-dir", str(tmp_path)])
    doc = json.loads((tmp_path / "sampling-cpu.json").read_text())
    assert doc["benchmark"] == "sampling" and doc["device"] == "cpu"
    assert doc["packages"]["torch"] and doc["date"]
    assert "randomly initialised" in doc["settings"]["generator"]
    assert doc["ours"]["images_per_second"] > 0 and doc["stock"]["images_per_second"] > 0
    assert doc["settings"]["images_ours"] == doc["agreement"]["images_compared"] == 4  # --quick: 4 images each
    assert len(doc["ours"]["seconds"]) == len(doc["stock"]["seconds"]) == 1  # --repeats 1
    if doc["settings"]["ours_precision"] == "fp32":  # same seeds, same fp32 weights: only batch-size rounding differs
        assert res["agreement"]["mean_abs_pixel_difference_uint8"] < 1.0
        assert res["agreement"]["fraction_pixels_equal"] > 0.9
        # one image per batch, as the stock loop makes them: the same pixels up to one level of rounding
        assert res["agreement"]["ours_at_batch_1_vs_stock"]["max_abs_pixel_difference_uint8"] <= 1
    else:  # bf16 autocast on a CPU with AMX / AVX512-BF16 (the stock loop is fp32): the same images up to bf16 rounding
        assert doc["settings"]["ours_precision"] == "bf16 autocast"
        assert res["agreement"]["mean_abs_pixel_difference_uint8"] < 8
    assert res["agreement"]["fd_within_noise"]


def test_e2e_reads_stage_times_from_outputs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models/generator").mkdir(parents=True)
    (tmp_path / "models/generator/generator.json").write_text(json.dumps({"steps": 10, "seconds_per_step": 0.5}))
    (tmp_path / "metrics/classifier").mkdir(parents=True)
    (tmp_path / "metrics/classifier/real.json").write_text(json.dumps({"per_seed": [{"seconds": 3}, {"seconds": 4}]}))
    (tmp_path / "metrics/classifier/real+classic.json").write_text(  # seeds side by side: the variant's wall time
        json.dumps({"per_seed": [{"seconds": 3}, {"seconds": 4}], "seconds": 5}))
    res = e2e.main(["--device", "cpu", "--out-dir", str(tmp_path)])
    assert res["stages"]["train_generator"]["seconds"] == pytest.approx(5.0)
    assert res["stages"]["train_classifier"]["per_variant"] == {"real": 7, "real+classic": 5}
    assert res["stages"]["train_classifier"]["seconds"] == pytest.approx(12.0)
    assert res["stages"]["sample"]["seconds"] is None and "sample" in res["stages_without_timing"]
    assert (tmp_path / "e2e-cpu.json").exists()


def test_generators_quick_times_every_kind_side_by_side(tmp_path):
    res = generators.main(["--quick", "--device", "cpu", "--repeats", "1", "--out-dir", str(tmp_path)])
    doc = json.loads((tmp_path / "generators-cpu.json").read_text())
    assert set(doc["kinds"]) == set(generators.KINDS) and doc["settings"]["weights"].startswith("random")
    assert all(v["images_per_second"] > 0 and v["parameters"] > 0 for v in doc["kinds"].values())
    # the sizes are those of the models the pipeline builds for the micro profile (the reference)
    cfg = params_from_dict({"base": {"profile": "micro"}, "train_generator": {"kind": "unet"}}).train_generator
    assert doc["kinds"]["unet"]["parameters"] == sum(p.numel() for p in build_backbone(cfg, 28, 1, 10).parameters())
    assert res["settings"]["images"] == 4 and doc["settings"]["profile"] == "micro"


def test_rates_and_ratios_against_hand_computed_values():
    """bench.common's throughput arithmetic, on timings whose answers are known."""
    ours, ref = rate(8, [2.0, 1.0, 4.0]), rate(4, [1.0, 1.0, 2.0])
    assert ours["per_second_best"] == 8.0 and ours["per_second_median"] == 4.0
    assert ref["per_second_best"] == 4.0 and ref["per_second_median"] == 4.0
    r = ratio(ours, ref)  # per repeat: (8/2)/(4/1) = 1, (8/1)/(4/1) = 2, (8/4)/(4/2) = 1
    assert r["best"] == 2.0 and r["median"] == 1.0
    assert r["paired"] == [1.0, 1.0, 2.0] and r["paired_median"] == 1.0


@pytest.mark.slow
def test_gpu_budget_counts_the_gpu_profile(tmp_path):
    from bench import gpu_budget

    res = gpu_budget.main(["--quick", "--threads", "1", "--out-dir", str(tmp_path)])
    unet = res["per_model"]["unet"]
    assert unet["parameters"] > 30e6 and 11e9 < unet["forward_flops_per_image"] < 12e9  # 11.5 GFLOP at 32 px
    assert unet["train_flops_per_image"] == pytest.approx(3 * unet["forward_flops_per_image"], rel=0.01)
    assert res["per_model"]["img2img_backbone_rows_per_image_by_strength"] == {0.5: 24.0}  # 12 steps, cond + uncond
    assert res["settings"]["classifier_runs"] == 30  # 6 variants x 5 seeds (the gpu profile sweeps no share)
    for s in res["scenarios"].values():  # each step the longer of its compute and its host time
        assert s["minutes"]["train_generator"] >= res["stages"]["train_generator"]["flops"] / (990e12 * 0.35) / 60
        assert s["workers_for_classifier_under_generator"] >= 1
    assert (tmp_path / "gpu_budget-cpu.json").exists()


def test_seeds_quick_times_both_sides_on_the_same_runs(tmp_path):
    src = make_idx_dir(tmp_path / "fmnist", n_train=120, classes=10, size=28)
    res = seeds.main(["--quick", "--device", "cpu", "--repeats", "1", "--fashion-mnist", str(src),
                      "--out-dir", str(tmp_path)])
    assert set(res["runs"]) == {"side by side", "one after another"} and res["ratio_runs_per_second"]["best"] > 0
    assert all(len(v) == res["settings"]["seeds"] == 2 for v in res["best_val_accuracy"].values())
    assert json.loads((tmp_path / "seeds-cpu.json").read_text())["benchmark"] == "seeds"


def test_cpu_policy_times_the_classifier_policy_against_each_switch(tmp_path):
    out = tmp_path / "policy.json"
    cpu_policy.main(["--tiny", "--parts", "classifier", "--out", str(out)])
    doc = json.loads(out.read_text())
    assert "train" not in doc and "sample" not in doc  # only the parts asked for
    sides = doc["classifier"]
    assert sides["classifier policy"]["policy"]["channels_last"]
    assert sides["classifier policy"]["policy"]["fused_optimizer"]
    assert not sides["contiguous"]["policy"]["channels_last"]
    assert not sides["unfused AdamW"]["policy"]["fused_optimizer"]
    assert sides["classifier policy"]["speedup_of_classifier_policy"] == 1.0
    assert all(len(side["seconds_per_step"]) == sides["repeats"] and min(side["seconds_per_step"]) > 0
               for name, side in sides.items() if isinstance(side, dict))


def test_features_times_each_batch_size_on_the_same_images(tmp_path):
    doc = features.main(["--quick", "--device", "cpu", "--repeats", "1", "--batch-sizes", "2", "4",
                         "--resolution", "32", "--out-dir", str(tmp_path)])
    assert json.loads((tmp_path / "features-cpu.json").read_text())["images"] == doc["images"] == 8
    assert set(doc["images_per_second"]) == {"batch 2", "batch 4"}
    assert doc["images_per_second"]["batch 4"]["speedup_vs_largest_batch"] == 1.0
    assert all(v["per_second_median"] > 0 and len(v["seconds"]) == 1 for v in doc["images_per_second"].values())
    assert max(doc["max_feature_difference_vs_first_batch_size"].values()) < 1e-4  # same features at any batch
