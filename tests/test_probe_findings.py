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
                               features=datasets.Features({"image": datasets.Image(),
                                                           "label": datasets.Value("string")})
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


# ---- round five: bounds on every number, keys a method ignores ------------------------------------

def numbers(model, prefix=""):
    """(dotted key, name, field) of every number in a params section, its sections and entries included."""
    from typing import Annotated, get_args, get_origin

    from pydantic import BaseModel

    def types(tp):
        tp = get_args(tp)[0] if get_origin(tp) is Annotated else tp
        return {tp} | {t for arg in get_args(tp) for t in types(arg)}

    for name, field in model.model_fields.items():
        tp = field.annotation
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            yield from numbers(tp, f"{prefix}{name}.")
        elif get_origin(tp) is dict:
            yield from numbers(get_args(tp)[1], f"{prefix}{name}.<entry>.")
        elif types(tp) & {int, float} and tp is not bool:
            yield f"{prefix}{name}", name, field


def test_every_number_in_params_has_a_range_and_a_reason():
    """Each int or float key (a tuple's items, an optional's value, a variant's keys included) has a lower and an
    upper bound and says why, so an out-of-range value's message can give both."""
    from pipeline.config import Params, allowed_range

    found = {key: allowed_range(name, field) for key, name, field in numbers(Params)}
    assert len(found) > 80 and "pseudo_label.unlabeled_ratio" in found and "sample.strengths" in found
    assert "train_classifier.variants.<entry>.synthetic_ratio" in found and "train_classifier.workers" in found
    unbounded = {k: r for k, r in found.items() if r.count("<") != 2 or not r.endswith(")")}
    assert not unbounded


@pytest.mark.parametrize("key, value, allowed", [
    ("pseudo_label.unlabeled_ratio", 10**9, "1 <= unlabeled_ratio <= 64 (a step holds batch_size x"),  # MemoryError
    ("pseudo_label.unlabeled_ratio", 1000, "1 <= unlabeled_ratio <= 64"),  # a step drew 80x the pool
    ("train_classifier.seeds", 1001, "1 <= seeds <= 1,000 (seed k of a run is base.seed x 1,000 + k"),
    ("train_classifier.lr", float("nan"), "0 < lr <= 1 (a peak learning rate"),
    ("train_generator.block_out_channels", [0, 32], "1 <= block_out_channels <= 4,096"),
    ("sample.strengths", [1.5], "0 < strengths <= 1 (a noise level"),
], ids=["ratio-1e9", "ratio-1000", "seeds", "lr-nan", "channels-0", "strength"])
def test_a_number_out_of_range_names_its_range_and_why(tmp_path, key, value, allowed):
    section, name = key.split(".")
    with pytest.raises(ConfigError) as err:
        params_from_dict({section: {name: value}}, "params.yaml")
    assert f"; allowed: {allowed}" in str(err.value) and f"  {key}" in str(err.value)


def test_datasetgan_feature_timestep_is_a_trained_noise_level():
    with pytest.raises(ConfigError, match="feature_timestep 1000 must be below num_train_timesteps 1000"):
        params_from_dict({"train_generator": {"kind": "datasetgan", "datasetgan": {"feature_timestep": 1000}}})
    params_from_dict({"train_generator": {"kind": "unet", "datasetgan": {"feature_timestep": 1000}}})  # not read


def test_keys_the_pseudo_label_method_or_the_sample_mode_ignore_are_named(caplog):
    """pseudo_label.method: supervised with FixMatch keys set said nothing (train_generator's kind already warned)."""
    with caplog.at_level("WARNING", logger="pipeline.config"):
        params_from_dict({"pseudo_label": {"method": "supervised", "unlabeled_ratio": 7, "fixmatch_threshold": 0.8,
                                           "ema_decay": 0.99}})  # ema_decay at its default: changes nothing
        params_from_dict({"sample": {"mode": "generate", "strengths": [0.25, 0.5, 0.75, 1.0], "variations": 2}})
        params_from_dict({"base": {"profile": "micro"}, "pseudo_label": {"method": "supervised"}})  # the profile's
        params_from_dict({"pseudo_label": {"method": "fixmatch", "unlabeled_ratio": 7}})
    assert caplog.messages == [
        "<params>: pseudo_label.method supervised ignores pseudo_label.fixmatch_threshold, unlabeled_ratio (they apply "
        "to method fixmatch only); remove them or set pseudo_label.method to one of those",
        "<params>: sample.mode generate ignores sample.variations (they apply to mode img2img only); remove them or "
        "set sample.mode to one of those"]


def test_a_step_drawing_more_than_the_pool_is_named(caplog):
    from pipeline.config import PseudoLabelConfig
    from pipeline.training.tasks import fixmatch

    cfg = PseudoLabelConfig(batch_size=16, unlabeled_ratio=7)
    with caplog.at_level("WARNING", logger="pipeline.training.tasks"):
        fixmatch(cfg, torch.tensor([0, 1]), 200, 2, "cpu")
        fixmatch(cfg, torch.tensor([0, 1]), 50, 2, "cpu")
    assert caplog.messages == ["pseudo_label.unlabeled_ratio 7 x batch_size 16 = 112 pool images in each step, more "
                               "than the pool's 50: each step draws pool images more than once. A smaller "
                               "unlabeled_ratio (or a larger prepare.unlabeled_pool) costs less"]


@pytest.mark.parametrize("argv, message", [
    (["--seed_index", "0", "--ratio", "7"], "--ratio 7.0: variant 'real+synthetic' trains seed 0 at share 0.5"),
    (["--seed_index", "0", "--ratio", "nan"], "--ratio nan: variant 'real+synthetic' trains seed 0 at share 0.5"),
    (["--seed_index", "0", "--ratio", "-1"], "--ratio -1.0: variant"),
    (["--ratio", "0.5"], "--ratio 0.5: it says at which share --seed_index trains one seed run, and was given "
                         "without --seed_index"),
], ids=["seven", "nan", "minus-one", "without-seed-index"])
def test_fanout_ratio_outside_the_plan_is_refused(tmp_path, capsys, argv, message):
    """--ratio 7 failed inside training; nan or -1 trained without synthetic images into seed0-sharenan; --ratio
    without --seed_index was ignored without a word."""
    import pipeline.train_classifier as tc
    from tests.test_train_classifier import micro_params, write_project

    paths, _ = write_project(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(micro_params().resolved()))
    with pytest.raises(SystemExit) as end:
        tc.main(["--variant", "real+synthetic", "--params", str(tmp_path / "params.yaml"), "--root", str(tmp_path),
                 *argv])
    assert end.value.code == 2 and message in capsys.readouterr().err
    assert not paths.classifier_seeds.exists() and not paths.classifier.exists()


def test_sample_fanout_refuses_a_shard_count_out_of_range_before_submitting():
    from flows.fanout import sample_fanout_flow

    with pytest.raises(ConfigError, match=r"sample.num_shards: Input should be greater than or equal to 1 \(got 0\); "
                                          r"allowed: 1 <= num_shards <= 10,000"):
        sample_fanout_flow.fn(num_shards=0, params_file=str(ROOT / "params.yaml"))


# ---- round five: image shapes across the sets a stage reads side by side ----------------------------

def rgb_images(n: int, size: int = 6) -> torch.Tensor:
    return torch.randint(0, 255, (n, 3, size, size), generator=torch.Generator().manual_seed(0)).to(torch.uint8)


def test_a_pool_of_other_images_than_train_is_refused_before_any_work(tmp_path):
    """A pool of RGB images beside grayscale train images reached FixMatch's forward (a RuntimeError there)."""
    import pipeline.pseudo_label as pl
    import pipeline.train_classifier as tc
    from pipeline.core.images import tensors_to_dataset
    from pipeline.core.io import save_dataset
    from tests.test_train_classifier import CLASSES, micro_params, toy, write_project

    paths, _ = write_project(tmp_path)
    (x, y), (vx, vy), (tx, ty) = toy(40, 1), toy(16, 2), toy(40, 3)
    save_dataset(datasets.DatasetDict({"train": tensors_to_dataset(x, y, CLASSES),
                                       "val": tensors_to_dataset(vx, vy, CLASSES),
                                       "test": tensors_to_dataset(tx, ty, CLASSES),
                                       "pool": tensors_to_dataset(rgb_images(30), None, None)}),
                 paths.prepared / "dataset")
    shown = (r"the 'train' split's images are 1 x 8 x 8 and the 'pool' split's images 3 x 6 x 6 \(channels x height "
             r"x width\); images read side by side must have one shape. Re-run prepare \(dvc repro -f prepare\)")
    with pytest.raises(DataError, match=shown):
        pl.run(micro_params(), paths)
    with pytest.raises(DataError, match=shown):  # any stage that reads the prepared splits
        tc.run(micro_params(), paths, "real")
    assert not paths.pseudo.exists() and not paths.classifier.exists()


def test_pseudo_labels_or_synthetic_images_of_another_shape_are_refused(tmp_path):
    from pipeline import filter as filter_stage
    from pipeline.core.images import tensors_to_dataset
    from pipeline.core.io import load_img2img_sources, load_pseudo_labels, save_dataset
    from tests.test_train_classifier import CLASSES, micro_params, write_project, write_pseudo

    paths, _ = write_project(tmp_path)
    write_pseudo(paths)
    save_dataset(tensors_to_dataset(rgb_images(12), torch.arange(12) % 4, CLASSES, {"pool_index": list(range(12))}),
                 paths.pseudo / "dataset")
    pseudo = r"the prepared train split's images are 1 x 8 x 8 and the pseudo-labeled pool's images 3 x 6 x 6 .*Re-run "
    with pytest.raises(DataError, match=pseudo + "pseudo_label"):  # train_generator, train_classifier (pseudo: true)
        load_pseudo_labels(paths)
    with pytest.raises(DataError, match=pseudo + "pseudo_label"):  # sample's img2img sources
        load_img2img_sources(paths.prepared, paths.pseudo, 2, len(CLASSES))
    save_dataset(tensors_to_dataset(rgb_images(8), torch.arange(8) % 4, CLASSES, {"seed": list(range(8))}),
                 paths.synthetic / "dataset")
    with pytest.raises(DataError, match=r"the prepared train split's images are 1 x 8 x 8 and the synthetic images "
                                        r"3 x 6 x 6 .* Re-run sample"):
        filter_stage.load_inputs(paths, micro_params().filter)


# ---- round five: damaged intermediate files, one of each kind ---------------------------------------

def truncate(path: Path, keep: int = 40) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def test_a_truncated_labeler_or_classifier_names_the_file_and_the_stage(tmp_path):
    from pipeline.config import labeler_file
    from pipeline.models.classifier import build_model, load_classifier, save_classifier
    from pipeline.training.seed_runs import load_labelers
    from tests.test_train_classifier import CLASSES, write_project, write_pseudo

    paths, _ = write_project(tmp_path)
    write_pseudo(paths)
    truncate(paths.pseudo / labeler_file(0))
    with pytest.raises(DataError, match=r"labeler.*safetensors: damaged or unreadable \(.*\)\. Re-run the "
                                        r"pseudo_label stage \(dvc repro -f pseudo_label\)"):
        load_labelers(paths, CLASSES, 1, "train_classifier.pseudo_labels: teacher")
    weights = tmp_path / "model.safetensors"
    save_classifier(build_model("test_resnet", 4, 1), weights, "test_resnet", 4, 1)
    truncate(weights, 200)
    with pytest.raises(DataError, match=r"model.safetensors: damaged or unreadable .* Re-run the train_classifier"):
        load_classifier(weights, 4, 1, "--gather", "train_classifier")


def test_a_truncated_state_json_of_a_saved_dataset_names_it(tmp_path):
    from pipeline.core.io import load_dataset_dir
    from tests.test_train_classifier import write_project

    paths, _ = write_project(tmp_path)
    truncate(paths.filtered / "dataset" / "state.json", 10)
    with pytest.raises(DataError, match=r"dataset/state.json: damaged or unreadable \(JSONDecodeError.*Re-run the "
                                        r"filter stage"):
        load_dataset_dir(paths.filtered / "dataset", "filter")


def test_a_pseudo_dataset_listing_no_data_file_is_not_read_as_nothing_kept(tmp_path):
    """Its state.json listing no data file was read as "no pseudo-labels": the generator trained without the pool."""
    import json

    from pipeline.core.io import load_pseudo_labels
    from tests.test_train_classifier import write_project, write_pseudo

    paths, _ = write_project(tmp_path)
    write_pseudo(paths, n=12)
    state = paths.pseudo / "dataset" / "state.json"
    state.write_text(json.dumps({**json.loads(state.read_text()), "_data_files": []}))
    with pytest.raises(DataError, match=r"holds no image, and .*summary.json says pseudo_label kept 12: the saved "
                                        r"dataset is damaged. Re-run the pseudo_label stage"):
        load_pseudo_labels(paths)
    write_pseudo(paths, n=0)  # nothing kept, and the summary says so: no pseudo-labels, no error
    assert load_pseudo_labels(paths)[1] is None


@pytest.mark.parametrize("file, content, shown", [
    ("data/prepared/summary.json", {"fingerprint": 5}, "fingerprint is a int .*Re-run the prepare"),
    ("data/prepared/summary.json", ["not", "an", "object"], r"damaged or unreadable \(TypeError: a JSON list where"),
    ("data/pseudo/summary.json", {"inputs": {"prepared": "p" * 64}, "kept": "twelve"}, "kept is a str .*pseudo_label"),
    ("data/filtered/summary.json", {"inputs": {"synthetic": ["x"]}}, "inputs holds other than fingerprints.*filter"),
], ids=["prepared-fingerprint-int", "prepared-list", "pseudo-kept-str", "filtered-inputs"])
def test_a_summary_json_with_wrong_types_names_the_file_and_the_stage(tmp_path, file, content, shown):
    import json

    from pipeline.core.io import read_output
    from tests.test_train_classifier import write_project, write_pseudo

    paths, _ = write_project(tmp_path)
    write_pseudo(paths)
    (tmp_path / file).write_text(json.dumps(content))
    with pytest.raises(DataError, match=shown):
        read_output(paths, Path(file).parent.name)


def test_a_generator_json_with_wrong_types_names_the_file_and_the_stage(tmp_path):
    import json

    from pipeline.models.registry import load_generator

    (tmp_path / "generator.json").write_text(json.dumps({"kind": "unet", "num_classes": "ten", "image_size": 28}))
    with pytest.raises(DataError, match=r"generator.json: num_classes is a str \('ten'\), not a int: the file is "
                                        r"damaged. Re-run the train_generator stage"):
        load_generator(tmp_path)


def test_classifier_metrics_that_are_not_an_object_name_the_file_and_the_stage(tmp_path):
    from pipeline.core.io import read_json

    (tmp_path / "real.json").write_text("[1, 2]")
    with pytest.raises(DataError, match=r"real.json: damaged or unreadable \(TypeError: a JSON list where an object "
                                        r"was expected\). Re-run the train_classifier stage"):
        read_json(tmp_path / "real.json", "train_classifier")
