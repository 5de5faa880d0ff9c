"""bench/gpu_check.py rehearsed on CPU (--tiny), so the script is known to work before a GPU sees it."""
import json

import pytest

from bench import gpu_check


@pytest.mark.slow
def test_cpu_rehearsal_runs_every_part(tmp_path):
    """Every part finishes and writes what a GPU run is read for. The compile variant is left out
    (inductor's C++ build of a UNet takes minutes on CPU; tests/test_device.py compiles a classifier)."""
    rc = gpu_check.main(["--device", "cpu", "--tiny", "--no-compile", "--out-dir", str(tmp_path / "out"),
                         "--work-dir", str(tmp_path / "work"), "--data", str(tmp_path / "none.npz")])
    summary = json.loads((tmp_path / "out" / "gpu_check-summary.json").read_text())
    assert rc == 0 and {p["status"] for p in summary["parts"].values()} == {"finished"}
    assert set(summary["parts"]) == set(gpu_check.PARTS)
    part = {name: json.loads((tmp_path / "out" / f"gpu_check-{name}.json").read_text()) for name in gpu_check.PARTS}
    assert part["tests"]["exit_status"] == 0 and "1 passed" in part["tests"]["tail"][-1]
    train = part["train"]
    assert len(train["variants"]) == 3 and all(v["steps_per_second"] > 0 for v in train["variants"].values())
    assert train["flops_per_step"] > 0 and all(v["mfu_vs_measured_peak"] > 0 for v in train["variants"].values())
    sample = part["sample"]
    assert sample["unet"] == "trained by the train part"  # the weights handed over through --work-dir
    agreement = sample["agreement"]  # the same images from the same seeds, up to rounding (bf16 on AMX CPUs)
    if sample["policy"]["precision"] == "fp32":
        assert agreement["max_abs_pixel_difference"] <= 2
    assert agreement["frechet_ours_vs_stock"] < 0.01 * agreement["frechet_floor_ours_vs_ours_other_seeds"]
    assert set(part["classifier"]) >= {"batch_8"} and part["ops"]["microseconds_per_op"]["add"] > 0
