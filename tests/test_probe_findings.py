"""Bad input found by an independent probe: each gets one clear message (a ConfigError or DataError,
which every entry point turns into one line and exit 2) or is recorded, never a traceback or a silent
wrong result. One test each; docs/reliability.md has a row each."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from pipeline import prepare
from pipeline.config import MAX_VALUES, BaseParams, Paths, load_params, params_from_dict, resolve_device
from pipeline.errors import ConfigError, DataError
from tests.helpers import prepare_params

ROOT = Path(__file__).resolve().parent.parent


def image_folder(root: Path, counts: dict[str, int]) -> Path:
    rng = np.random.default_rng(0)
    for name, n in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (10, 10), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def hf_dataset(path: Path, labels: list, class_label: bool = False) -> Path:
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (9, 9), dtype=np.uint8)) for _ in labels]
    label = datasets.ClassLabel(names=["cat", "dog"]) if class_label else datasets.Value("int64")
    datasets.Dataset.from_dict({"image": images, "label": labels},
                               features=datasets.Features({"image": datasets.Image(), "label": label})
                               ).save_to_disk(str(path))
    return path


# ---- hf-disk: rows without a label ----------------------------------------------------------------

@pytest.mark.parametrize("labels, class_label, shown", [
    ([0, 1] * 7 + [-1, -1], False, "-1"),   # Hugging Face's "no label" in a plain int column: not a class '-1'
    ([0, 1] * 7 + [-1, 0], True, "-1"),     # -1 in a ClassLabel column: was KeyError: -1
], ids=["int-minus-one", "classlabel-minus-one"])
def test_hf_disk_rows_without_a_label_are_refused_by_count(tmp_path, labels, class_label, shown):
    src = hf_dataset(tmp_path / "hf", labels, class_label)
    with pytest.raises(DataError, match=rf"split 'train': {labels.count(-1)} of {len(labels)} rows have no label "
                                        rf"in column 'label' \({shown}") as err:
        prepare.run(prepare_params("hf-disk", src), Paths(root=tmp_path))
    assert "ds.filter" in str(err.value) and not (tmp_path / "data/prepared").exists()


def test_hf_disk_none_label_is_refused(tmp_path):
    """A None label (was TypeError in sorting the class names)."""
    images = [Image.fromarray(np.zeros((9, 9), dtype=np.uint8))] * 6
    datasets.Dataset.from_dict({"image": images, "label": ["cat", "dog", None, "cat", "dog", "cat"]},
                               features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("string")})
                               ).save_to_disk(str(tmp_path / "hf"))
    with pytest.raises(DataError, match=r"1 of 6 rows have no label in column 'label' \(None"):
        prepare.run(prepare_params("hf-disk", tmp_path / "hf"), Paths(root=tmp_path))


# ---- a dead or wrong PREFECT_API_URL ---------------------------------------------------------------

def test_dead_prefect_api_url_is_one_message_and_exit_2(tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = tmp_path / "p.yaml"
    p.write_text(yaml.safe_dump({"base": {"profile": "micro", "device": "cpu"}, "prepare": {"path": str(tmp_path)}}))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
           "PREFECT_HOME": str(tmp_path / "prefect")}
    out = subprocess.run([sys.executable, "-m", "flows", "prepare", "--params", str(p), "--root", str(tmp_path)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    text = out.stdout + out.stderr
    assert out.returncode == 2, text[-3000:]
    assert "Traceback" not in text and text.count("\n") <= 3, text[-3000:]
    assert f"PREFECT_API_URL=http://127.0.0.1:{port}/api: the Prefect server does not answer" in out.stderr
    assert "unset PREFECT_API_URL" in out.stderr


# ---- params: a bounded message, a YAML alias bomb refused --------------------------------------

def test_a_huge_bad_value_is_shown_cut_short():
    with pytest.raises(ConfigError) as err:
        params_from_dict({"report": {"title": ["x" * 10_000] * 1_000}})
    message = str(err.value)
    assert "report.title: Input should be a valid string" in message and len(message) < 1_000


def test_yaml_alias_bomb_is_refused_before_it_expands(tmp_path):
    """1 KB of YAML whose aliases repeat each other 9 levels deep: 9^9 values if expanded (it was a
    70 s MemoryError in the error formatter); refused after counting MAX_VALUES of them."""
    lines = ['  a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"  a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    bomb = tmp_path / "params.yaml"
    bomb.write_text("anchors:\n" + "\n".join(lines) + "\nreport:\n  title: *a8\n")
    assert bomb.stat().st_size < 1_000
    with pytest.raises(ConfigError, match=f"expand to more than {MAX_VALUES:,} values") as err:
        load_params(bomb)
    assert len(str(err.value)) < 500


# ---- base.profile: gpu without a GPU, base.seed's bound ----------------------------------------

def test_gpu_profile_without_a_gpu_is_refused_unless_cpu_is_asked_for(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="base.profile: gpu sizes every model for a GPU.*no CUDA device"):
        resolve_device(BaseParams(profile="gpu"))
    with caplog.at_level("WARNING"):
        assert resolve_device(BaseParams(profile="gpu", device="cpu")) == "cpu"
    assert "expect days" in caplog.text
    assert resolve_device(BaseParams(profile="gpu"), compute=False) == "cpu"  # the report of a gpu run renders
    assert resolve_device(BaseParams(profile="cpu")) == "cpu"


def test_seed_has_an_upper_bound_that_sampling_seeds_fit_in():
    with pytest.raises(ConfigError, match="base.seed: Input should be less than or equal to 4294967295"):
        params_from_dict({"base": {"seed": 18_000_000_000}})
    top = params_from_dict({"base": {"seed": 2**32 - 1}}).base.seed
    torch.Generator().manual_seed(top * 1_000_000_007 + 10**6)  # sample's seed rule, a million images in: fits


# ---- image folders: files that are not files, a class 10x the others -----------------------------

def test_named_pipe_and_link_to_a_device_are_listed_as_skipped(tmp_path):
    src = image_folder(tmp_path / "imgs", {"a": 6, "b": 6})
    os.mkfifo(src / "a" / "pipe.png")  # opening it would block for ever
    (src / "b" / "zero.png").symlink_to("/dev/zero")  # reading it would never end
    summary = prepare.run(prepare_params("imagefolder", src), Paths(root=tmp_path))
    skipped = {s["path"]: s["reason"] for s in summary["skipped_images"]}
    assert skipped == {"a/pipe.png": "a named pipe, not an image file",
                       "b/zero.png": "a link to a device (/dev/zero), not an image file"}
    assert "2 unreadable files skipped" in summary["headline"]
    with pytest.raises(DataError, match="pipe.png: a named pipe, not an image file. Remove or fix the file"):
        prepare.run(prepare_params("imagefolder", src, on_bad_image="error"), Paths(root=tmp_path / "strict"))


def test_a_class_ten_times_the_others_is_remarked_and_the_pool_counted(tmp_path, caplog):
    src = image_folder(tmp_path / "imgs", {"big": 60, "small": 6})
    with caplog.at_level("WARNING", logger="pipeline.prepare"):
        summary = prepare.run(prepare_params("imagefolder", src, labeled_per_class=1, val_per_class=1,
                                             unlabeled_pool=-1), Paths(root=tmp_path))
    assert summary["source_counts_per_class"] == {"big": 60, "small": 6}
    assert summary["class_imbalance"].startswith("class 'big' has 60 source images, 10x the 6 of 'small'")
    assert "class 'big' has 60" in caplog.text
    pool = datasets.load_from_disk(str(tmp_path / "data/prepared/dataset"))["pool"]["hidden_label"]
    assert summary["pool_counts_per_class"] == np.bincount(pool, minlength=2).tolist()
    assert summary["pool_counts_per_class"][0] > 5 * summary["pool_counts_per_class"][1] > 0
    balanced = prepare.run(prepare_params("imagefolder", image_folder(tmp_path / "even", {"a": 9, "b": 6})),
                           Paths(root=tmp_path / "even_run"))
    assert "class_imbalance" not in balanced and balanced["pool_counts_per_class"] is not None
