"""User mistakes and damaged files: one clear message naming the key or file and what to do,
whatever the entry point; never a library traceback, never a silently wrong result."""
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
import yaml

from pipeline import prepare, pseudo_label, sample, train_classifier, train_generator
from pipeline.config import Paths, load_params, params_from_dict
from pipeline.core.io import read_json
from pipeline.errors import ConfigError, DataError
from tests.helpers import TINY, held_after_first_checkpoint, make_idx_dir, make_prepared, prepare_params, tiny_params

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def write_params(path: Path, **sections) -> Path:
    path.write_text(yaml.safe_dump({"base": {"profile": "micro", "device": "cpu"}, **sections}))
    return path


def call(cmd: list, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", PYTHONPATH=str(ROOT))
    env.pop("PREFECT_API_URL", None)
    return subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, env=env, timeout=300)


def assert_one_clear_line(out: subprocess.CompletedProcess, *needles: str) -> None:
    text = out.stdout + out.stderr
    assert out.returncode == 2, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    for needle in needles:
        assert needle in out.stderr, out.stderr[-3000:]


# ---- every entry point, as a subprocess -------------------------------------------------------

def test_python_m_stage_prints_the_message_and_exits_2(tmp_path):
    p = write_params(tmp_path / "p.yaml", prepare={"path": str(tmp_path / "nowhere")})
    out = call([BIN / "python", "-m", "pipeline.prepare", "--params", p, "--root", tmp_path], tmp_path)
    assert_one_clear_line(out, "error: ", "missing Fashion-MNIST files", "prepare.path")


def test_python_m_stage_names_a_missing_input_stage(tmp_path):
    p = write_params(tmp_path / "p.yaml")
    out = call([BIN / "python", "-m", "pipeline.sample", "--params", p, "--root", tmp_path], tmp_path)
    assert_one_clear_line(out, "generator.json: not found. Run the train_generator stage first")


def test_synthaug_cli_prints_the_message_and_exits_2(tmp_path):
    p = write_params(tmp_path / "p.yaml", train_classifier={"steps": -1})
    out = call([BIN / "synthaug", "run", "prepare", "--params", p], tmp_path)
    assert_one_clear_line(out, "train_classifier.steps", "greater than or equal to 1")


def test_prefect_flow_fails_with_the_message_and_no_traceback(tmp_path):
    p = write_params(tmp_path / "p.yaml", prepare={"path": str(tmp_path / "nowhere")})
    out = call([BIN / "python", "-m", "flows", "prepare", "--params", p, "--root", tmp_path], tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stdout + out.stderr
    assert (out.stdout + out.stderr).count("missing Fashion-MNIST files") == 1  # once, not three times
    assert "prepare stopped: DataError (its message is logged above)" in out.stdout + out.stderr


# ---- params that would fail late or silently ---------------------------------------------------

@pytest.mark.parametrize("yaml_text, needle", [
    ("base: {seed: -1}", "base.seed: Input should be greater than or equal to 0"),
    ("sample: {guidance_scale: .inf}", "sample.guidance_scale: Input should be a finite number"),
    ("train_generator: {lr: .nan}", "train_generator.lr: Input should be a finite number"),
    ("train_classifier: {variants: {}}", "variants is empty"),
    ("base: {seed: 1}\nsample: {per_class: 2}\nbase: {seed: 2}\n", "['base'] given twice"),
    ("sample:\n  per_class: 2\n  per_class: 3\n", "['per_class'] given twice"),
])
def test_params_refused_up_front(tmp_path, yaml_text, needle):
    (tmp_path / "p.yaml").write_text(yaml_text)
    with pytest.raises(ConfigError) as err:
        load_params(tmp_path / "p.yaml")
    assert needle in str(err.value)


def test_tilde_in_paths_is_expanded(tmp_path):
    (tmp_path / "p.yaml").write_text("prepare: {path: ~/fmnist}\ntrain_classifier: {pretrained: ~/w.safetensors}\n")
    p = load_params(tmp_path / "p.yaml")
    assert p.prepare.path == os.path.expanduser("~/fmnist") and not p.prepare.path.startswith("~")
    assert p.train_classifier.pretrained == os.path.expanduser("~/w.safetensors")


def test_a_timm_arch_that_cannot_take_the_image_size_fails_before_training(tmp_path, monkeypatch):
    root = tmp_path / "r"
    prepare.run(prepare_params("fashion-mnist", make_idx_dir(tmp_path / "idx")), Paths(root=root))
    called = []
    monkeypatch.setattr("pipeline.training.classifier.fit", lambda *a, **k: called.append(1))
    params = params_from_dict({"base": {"profile": "micro", "device": "cpu"},
                               "train_classifier": {"arch": "vit_tiny_patch16_224"}})
    with pytest.raises(ConfigError, match=r"train_classifier.arch: vit_tiny_patch16_224 cannot take 8x8 images"):
        train_classifier.run(params, Paths(root=root), "real")
    assert not called
    monkeypatch.setattr("pipeline.pseudo_label.train_runs", lambda *a, **k: called.append(1))
    params = params_from_dict({"base": {"profile": "micro", "device": "cpu"},
                               "pseudo_label": {"arch": "vit_tiny_patch16_224"}})
    with pytest.raises(ConfigError, match=r"pseudo_label.arch: vit_tiny_patch16_224 cannot take 8x8 images"):
        pseudo_label.run(params, Paths(root=root))  # the labeler's own key, not train_classifier's
    assert not called


def test_train_generator_before_pseudo_label_says_what_to_run(tmp_path):
    make_prepared(tmp_path, pseudo=False)
    with pytest.raises(FileNotFoundError, match=r"data/pseudo/summary.json: not found. Run the pseudo_label stage"):
        train_generator.run(tiny_params(steps=10_000), Paths(root=tmp_path))
    with pytest.raises(FileNotFoundError, match="Run the pseudo_label stage first"):
        train_generator.load_train_data(tiny_params(labels="pseudo"), Paths(root=tmp_path), "cpu")
    # labels: labeled never reads data/pseudo
    assert train_generator.load_train_data(tiny_params(labels="labeled"), Paths(root=tmp_path), "cpu").num_pseudo == 0


def test_a_single_class_dataset_is_refused(tmp_path):
    src = make_idx_dir(tmp_path / "idx", classes=1)
    with pytest.raises(DataError, match="at least two"):
        prepare.run(prepare_params("fashion-mnist", src), Paths(root=tmp_path / "r"))


# ---- outputs that cannot be written, outputs of earlier stages that are damaged ----------------

def test_an_unwritable_output_fails_before_training(tmp_path):
    make_prepared(tmp_path)
    (tmp_path / "models").write_text("a file where the models folder should be")
    with pytest.raises(DataError, match="models/generator: cannot be written"):
        train_generator.run(tiny_params(steps=10_000), Paths(root=tmp_path))  # would take minutes if it trained


def test_truncated_arrow_file_names_the_file_and_the_stage(tmp_path):
    make_prepared(tmp_path)
    arrow = next((Paths(root=tmp_path).prepared / "dataset" / "train").glob("*.arrow"))
    arrow.write_bytes(arrow.read_bytes()[:100])
    with pytest.raises(DataError, match=r"dataset: damaged or unreadable.*Re-run the prepare stage"):
        train_generator.load_train_data(tiny_params(), Paths(root=tmp_path), "cpu")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    make_prepared(root)
    train_generator.run(tiny_params(steps=2), Paths(root=root))
    return root


def sample_params(**over):
    return params_from_dict({"base": {"profile": "micro", "device": "cpu", "seed": 3}, "train_generator": TINY,
                             "sample": {"per_class": 2, "num_inference_steps": 2, **over}})


@pytest.mark.parametrize("damage, needle", [
    (lambda g: (g / "generator.json").write_text("{not json"), "generator.json: damaged or unreadable"),
    (lambda g: (g / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"\0" * 64),
     "damaged or unreadable"),
])
def test_damaged_generator_names_the_file_and_the_stage(tmp_path, trained, damage, needle):
    import shutil
    shutil.copytree(trained, tmp_path / "r")
    damage(Paths(root=tmp_path / "r").generator)
    with pytest.raises(DataError, match=f"{needle}.*Re-run the train_generator stage"):
        sample.run(sample_params(), Paths(root=tmp_path / "r"))


# ---- shards -----------------------------------------------------------------------------------

def test_a_single_run_with_shards_makes_every_shard_and_merges(tmp_path, trained):
    import shutil
    shutil.copytree(trained, tmp_path / "r")
    paths = Paths(root=tmp_path / "r")
    one = sample.run(sample_params(num_shards=2, shard_index=1, per_class=3), paths)
    assert one["complete"] and one["num_images"] == 6
    assert sorted(p.name for p in paths.synthetic_shards.iterdir() if p.is_dir()) == \
        ["shard-000-of-002", "shard-001-of-002"]
    before = read_json(paths.synthetic / "summary.json")
    # a fan-out worker makes its own shard and leaves the merged set alone
    worker = sample.run(sample_params(num_shards=3, shard_index=0, per_class=3), paths, shard_only=True)
    assert worker["complete"] is False and read_json(paths.synthetic / "summary.json") == before


# ---- hf-disk labels ---------------------------------------------------------------------------

def hf_dataset(names_train, names_test, test_labels):
    img = [torch.randint(0, 255, (8, 8), dtype=torch.uint8).numpy() for _ in range(12)]
    from PIL import Image
    pil = [Image.fromarray(a) for a in img]
    train = datasets.Dataset.from_dict({"image": pil[:8], "label": [0, 1] * 4}, features=datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=names_train)}))
    test = datasets.Dataset.from_dict({"image": pil[8:], "label": test_labels}, features=datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=names_test)}))
    return datasets.DatasetDict({"train": train, "test": test})


def test_hf_disk_test_labels_are_matched_by_name(tmp_path):
    hf_dataset(["cat", "dog"], ["dog", "cat"], [0, 0, 1, 1]).save_to_disk(str(tmp_path / "ds"))
    params = prepare_params("hf-disk", tmp_path / "ds", labeled_per_class=2, val_per_class=1)
    prepare.run(params, Paths(root=tmp_path / "r"))
    test = datasets.load_from_disk(str(Paths(root=tmp_path / "r").prepared / "dataset"))["test"]
    names = test.features["label"].names
    assert [names[i] for i in test["label"]] == ["dog", "dog", "cat", "cat"]  # not inverted


def test_hf_disk_test_label_unknown_to_train_is_a_clear_error(tmp_path):
    hf_dataset(["cat", "dog"], ["cat", "dog", "bird"], [0, 2, 1, 2]).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(DataError, match=r"split 'test' has labels \['bird'\] that the train split does not have"):
        prepare.run(prepare_params("hf-disk", tmp_path / "ds", labeled_per_class=2, val_per_class=1),
                    Paths(root=tmp_path / "r"))


# ---- deterministic outputs ---------------------------------------------------------------------

def tree_bytes(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_prepare_twice_on_the_same_data_writes_identical_bytes(tmp_path):
    src = make_idx_dir(tmp_path / "idx")
    for r in ("a", "b"):
        prepare.run(prepare_params("fashion-mnist", src), Paths(root=tmp_path / r))
    a, b = (tree_bytes(Paths(root=tmp_path / r).prepared) for r in ("a", "b"))
    assert a == b and "summary.json" in a
    assert "seconds" in read_json(Paths(root=tmp_path / "a").stage_timing / "prepare.json")


# ---- round three: the last tracebacks and silent cases ------------------------------------------

def cli_error(argv: list[str], capsys) -> str:
    """Run ``synthaug`` in-process; the one-line message it exits 2 with."""
    from pipeline.cli import main
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("error: ") and "Traceback" not in err
    return err


@pytest.mark.parametrize("args, needle", [
    (["--set", "base.seed=[1"], "--set 'base.seed=[1': the value is not valid YAML"),
    (["--set", "base.seed.x=1"], "override base.seed.x: base.seed is a value (0), not a section"),
    (["--params", "{folder}"], "is a folder, not a params file"),
    (["--params", "{latin1}"], "not UTF-8 text (byte b'\\xe9' at offset"),
])
def test_params_and_set_mistakes_are_one_line(tmp_path, capsys, args, needle):
    p = tmp_path / "p.yaml"
    p.write_text("base: {profile: micro, seed: 0}\n")
    (tmp_path / "latin1.yaml").write_bytes("report: {title: caf\xe9}\n".encode("latin-1"))
    args = [a.format(folder=tmp_path, latin1=tmp_path / "latin1.yaml") for a in args]
    assert needle in cli_error(["config", "--params", str(p), *args], capsys)


def test_non_utf8_params_under_prefect_are_one_line_before_any_server(tmp_path):
    (tmp_path / "p.yaml").write_bytes("base: {profile: micro}\nreport: {title: caf\xe9}\n".encode("latin-1"))
    out = call([BIN / "python", "-m", "flows", "prepare", "--params", tmp_path / "p.yaml", "--root", tmp_path],
               tmp_path)
    assert_one_clear_line(out, "p.yaml: not UTF-8 text")
    assert "temporary server" not in out.stdout + out.stderr  # refused before Prefect starts


def test_an_empty_params_file_says_every_default_is_used(tmp_path, caplog):
    (tmp_path / "p.yaml").write_text("")
    with caplog.at_level("WARNING", logger="pipeline.config"):
        assert load_params(tmp_path / "p.yaml").base.profile == "cpu"
    assert "p.yaml is empty: every param takes its default (profile cpu)" in caplog.text


@pytest.mark.parametrize("name", ["real/v2", "../../data/prepared", "a b", "", ".hidden", "a..b", "x;rm -rf ~"])
def test_hostile_variant_names_are_refused_where_params_are_read(name):
    with pytest.raises(ConfigError, match=r"variant name\(s\) .* use letters, digits and \+ - _ \. only"):
        params_from_dict({"train_classifier": {"variants": {name: {"data": "prepared"}}}})


def test_a_variant_name_from_the_command_line_must_be_one_of_the_params(tmp_path):
    with pytest.raises(ConfigError, match="variant '../../data/prepared' is not in train_classifier.variants"):
        train_classifier.run(params_from_dict({"base": {"profile": "micro"}}), Paths(root=tmp_path),
                             "../../data/prepared")
    assert not (tmp_path / "data").exists()  # nothing written anywhere


def test_dvc_yaml_quotes_variant_names():
    cmd = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["train_classifier"]["do"]["cmd"]
    assert cmd.endswith('--variant "${key}"')


def test_flows_train_classifier_without_a_variant_trains_every_variant(tmp_path, monkeypatch):
    import contextlib

    import flows.__main__ as entry
    import flows.stages
    monkeypatch.setattr(entry, "temporary_server", contextlib.nullcontext)  # the flows are stand-ins: no server
    monkeypatch.setattr(entry, "check_prefect", lambda: None)
    ran = []
    monkeypatch.setitem(flows.stages.STAGE_FLOWS, "train_classifier", lambda variant, **kw: ran.append(variant))
    p = write_params(tmp_path / "p.yaml")
    entry.main(["train_classifier", "--params", str(p)])
    assert ran == list(load_params(p).train_classifier.variants) and len(ran) == 6
    entry.main(["train_classifier", "--params", str(p), "--variant", "real+classic"])
    assert ran[-1] == "real+classic" and len(ran) == 7


def test_a_read_only_output_folder_is_refused_before_any_work(tmp_path, monkeypatch):
    """check_writable tests the folder itself, not only its parent (as root, chmod cannot show it)."""
    import pipeline.core.io as io
    from pipeline import report
    paths = Paths(root=tmp_path)
    paths.reports.mkdir(parents=True)
    real_access = os.access
    monkeypatch.setattr(io.os, "access", lambda p, mode: Path(p) != paths.reports.resolve() and real_access(p, mode))
    with pytest.raises(DataError, match=r"reports: cannot be written \(.*reports is not a writable folder\)"):
        report.run(params_from_dict({"base": {"profile": "micro"}}), paths)  # before it looks for any metrics


def test_a_symlinked_output_is_written_where_it_points(tmp_path):
    target = tmp_path / "elsewhere" / "prepared"
    target.mkdir(parents=True)
    paths = Paths(root=tmp_path / "r")
    paths.prepared.parent.mkdir(parents=True)
    paths.prepared.symlink_to(target, target_is_directory=True)
    prepare.run(prepare_params("fashion-mnist", make_idx_dir(tmp_path / "idx")), paths)
    assert paths.prepared.is_symlink() and (target / "summary.json").exists()
    assert read_json(paths.prepared / "summary.json")["fingerprint"]


def test_a_full_disk_is_a_clear_error_and_keeps_the_earlier_output(tmp_path, monkeypatch):
    import errno
    import shutil

    import pipeline.core.io as io
    f = tmp_path / "out.json"
    io.write_json(f, {"v": 1})

    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(DataError, match="out.json: no space left on the device while writing it .*earlier version is "
                                        "intact"):
        io.write_json(f, {"v": 2})
    monkeypatch.undo()
    assert read_json(f) == {"v": 1} and [p.name for p in tmp_path.iterdir()] == ["out.json"]
    # a rough estimate is checked before the work
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 << 30, 10 << 30, 1 << 20))
    with pytest.raises(DataError, match=r"needs about 64 MiB but only 1 MiB are free"):
        io.check_writable(tmp_path / "big", need_bytes=64 << 20)


def test_a_generator_init_folder_that_is_not_a_unet_is_a_config_error(tmp_path):
    (tmp_path / "dit").mkdir()
    (tmp_path / "dit" / "config.json").write_text('{"_class_name": "DiTTransformer2DModel", "num_layers": 2}')
    make_prepared(tmp_path)
    with pytest.raises(ConfigError, match="train_generator.init: .* holds a DiTTransformer2DModel config, not a "
                                          "diffusers UNet2DModel"):
        train_generator.run(tiny_params(init=str(tmp_path / "dit")), Paths(root=tmp_path))


def test_a_pretrained_file_with_no_matching_weights_is_refused(tmp_path):
    from safetensors.torch import save_file

    from pipeline.models.classifier import build_model
    save_file({"foo.weight": torch.zeros(3)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(ConfigError, match="no weight in .*w.safetensors has a name of 'resnet10t''s.*would train from "
                                          "scratch"):
        build_model("resnet10t", 3, 1, str(tmp_path / "w.safetensors"))


def test_tiny_source_images_enlarged_a_lot_are_noted(tmp_path, caplog):
    src = make_idx_dir(tmp_path / "idx", size=2)
    with caplog.at_level("WARNING", logger="pipeline.prepare"):
        out = prepare.run(prepare_params("fashion-mnist", src, image_size=16), Paths(root=tmp_path))
    assert out["upscaled"].startswith("the smallest source images (2px) were enlarged 8x to prepare.image_size 16")
    assert "enlarged 8x" in caplog.text
    assert "upscaled" not in prepare.run(prepare_params("fashion-mnist", make_idx_dir(tmp_path / "i8")),
                                         Paths(root=tmp_path / "b"))


def test_ctrl_c_ends_with_a_note_not_a_traceback(tmp_path):
    import signal
    make_prepared(tmp_path)
    p = write_params(tmp_path / "p.yaml", train_generator={**TINY, "steps": 100_000})
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [str(BIN / "python"), "-m", "pipeline.train_generator", "--params", str(p), "--root", str(tmp_path)]
    # interrupted while it trains (held after its first checkpoint), never while it still imports; with
    # SIGINT's default disposition, as in a terminal (a child inherits "ignored" from a parent that set it)
    proc = held_after_first_checkpoint(cmd, env, tmp_path / "checkpointed", cwd=tmp_path, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True,
                                       preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()  # never left running (it would train 100,000 steps beside the rest of the suite)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert "interrupted: every output is written atomically" in err
