"""No output lost (issue 45, items 1 and 2): variant names whose paths would collide are refused where
params are read, ``atomic_path`` never removes an output of another kind, and a folder swap cut between
its two renames is put back by the next stage that writes or reads that output."""

import hashlib
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import params_from_dict, variant_outputs
from pipeline.core.atomic import atomic_path
from pipeline.core.io import load_dataset_dir, read_json, save_dataset, write_json
from pipeline.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parent.parent


def checksums(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def variants(*names):
    return {"train_classifier": {"variants": {n: {"data": "prepared"} for n in names}}}


@pytest.mark.parametrize("a, b", [("x", "x.json"), ("real", "Real"), ("a+b", "A+B.JSON"), ("v1", "v1.")])
def test_variant_names_whose_outputs_share_a_path_are_refused_naming_both(a, b):
    with pytest.raises(ConfigError) as err:
        params_from_dict(variants(a, b, "other"))
    said = str(err.value)
    assert f"'{a}'" in said and f"'{b}'" in said and "'other'" not in said and "Rename one" in said
    assert "metrics/classifier/x.json" in said if a == "x" else "case" in said


def test_variant_names_that_only_look_alike_are_kept():
    params = params_from_dict(variants("real", "real.v2", "real+classic", "x.json.v2", "x"))
    assert len(params.train_classifier.variants) == 5
    assert variant_outputs("x")["metrics/classifier/x.json"] == "metrics file"


def test_a_folder_where_a_file_output_goes_is_an_error_and_is_kept(tmp_path):
    """The probe's data loss: variant x's metrics file over variant x.json's curves folder deleted the folder."""
    folder = tmp_path / "metrics/classifier/x.json"
    write_json(folder / "plots/metrics/seed0/val_acc.tsv", {"kept": True})
    before = checksums(folder)
    with pytest.raises(DataError, match=r"x\.json: a folder stands where this stage writes a file.*left as it is"):
        write_json(folder, {"accuracy": 0.5})
    assert checksums(folder) == before
    assert sorted(p.name for p in folder.parent.iterdir()) == ["x.json"]  # no temporary left either


def test_a_file_where_a_folder_output_goes_is_an_error_and_is_kept(tmp_path):
    target = tmp_path / "metrics/classifier/x.json"
    write_json(target, {"accuracy": 0.5})
    before = target.read_bytes()
    with pytest.raises(DataError, match="a file stands where this stage writes a folder"):
        with atomic_path(target, is_dir=True) as tmp:
            (tmp / "curve.tsv").write_text("step\tvalue\n")
    assert target.read_bytes() == before and sorted(p.name for p in target.parent.iterdir()) == ["x.json"]


CRASH_BETWEEN_RENAMES = """
import os, sys
from pathlib import Path
from pipeline.core import atomic

real, calls = os.replace, []
def replace(src, dst):  # the process dies right after the first rename of the swap
    calls.append(src)
    if len(calls) == 2:
        os._exit(9)
    real(src, dst)
atomic.os.replace = replace
with atomic.atomic_path(Path(sys.argv[1]), is_dir=True) as tmp:
    (tmp / "summary.json").write_text('{"run": "new"}')
"""


def crash_mid_swap(output: Path) -> None:
    """Replace ``output`` in a process killed (os._exit) between the swap's two renames."""
    proc = subprocess.run([sys.executable, "-c", CRASH_BETWEEN_RENAMES, str(output)], cwd=ROOT)
    assert proc.returncode == 9
    assert not output.exists()  # what the probe saw: the output gone, two hidden folders beside it
    assert {p.name.split(".")[2][:3] for p in output.parent.iterdir()} == {"old", "tmp"}


def previous_output(root: Path) -> Path:
    import datasets

    out = root / "data/prepared"
    save_dataset(datasets.Dataset.from_dict({"x": [1, 2, 3]}), out / "dataset")
    write_json(out / "summary.json", {"run": "previous"})
    return out


def test_a_swap_killed_between_its_renames_is_put_back_by_the_next_reader(tmp_path, caplog):
    out = previous_output(tmp_path)
    before = checksums(out)
    crash_mid_swap(out)
    with caplog.at_level(logging.WARNING, logger="pipeline.core.atomic"):
        assert read_json(out / "summary.json", "prepare") == {"run": "previous"}
    assert checksums(out) == before and [p.name for p in out.parent.iterdir()] == ["prepared"]
    assert "restored the previous copy" in caplog.text and "unfinished new copy" in caplog.text
    assert list(load_dataset_dir(out / "dataset", "prepare")["x"]) == [1, 2, 3]


def test_a_swap_killed_between_its_renames_is_put_back_before_the_next_write(tmp_path, caplog):
    out = previous_output(tmp_path)
    before = checksums(out)
    crash_mid_swap(out)
    with caplog.at_level(logging.WARNING, logger="pipeline.core.atomic"):
        with pytest.raises(RuntimeError):  # the next run fails too, before its swap: the previous copy stays
            with atomic_path(out, is_dir=True):
                raise RuntimeError("failed again")
    assert checksums(out) == before and [p.name for p in out.parent.iterdir()] == ["prepared"]
    assert "restored the previous copy" in caplog.text
    with atomic_path(out, is_dir=True) as tmp:
        (tmp / "summary.json").write_text("new")
    assert checksums(out) == {"summary.json": hashlib.sha256(b"new").hexdigest()}
    assert [p.name for p in out.parent.iterdir()] == ["prepared"]


def test_an_error_between_the_renames_puts_the_previous_folder_back_at_once(tmp_path, monkeypatch):
    out = previous_output(tmp_path)
    before = checksums(out)
    real, calls = __import__("os").replace, []

    def replace(src, dst):
        calls.append(src)
        if len(calls) == 2:
            raise OSError("injected: the second rename fails")
        real(src, dst)

    monkeypatch.setattr("pipeline.core.atomic.os.replace", replace)
    with pytest.raises(OSError, match="injected"):
        with atomic_path(out, is_dir=True) as tmp:
            (tmp / "summary.json").write_text("new")
    monkeypatch.undo()
    assert checksums(out) == before and [p.name for p in out.parent.iterdir()] == ["prepared"]


def test_what_a_finished_swap_left_is_removed_by_the_next_write(tmp_path, caplog):
    out = previous_output(tmp_path)
    for leftover in (".prepared.old4242", ".prepared.del4243"):  # killed while removing the previous copy
        write_json(tmp_path / "data" / leftover / "summary.json", {"run": "older"})
    with caplog.at_level(logging.WARNING, logger="pipeline.core.atomic"):
        with atomic_path(out, is_dir=True) as tmp:
            write_json(tmp / "summary.json", {"run": "newer"})
    assert [p.name for p in out.parent.iterdir()] == ["prepared"] and "removing .prepared.old4242" in caplog.text
    assert read_json(out / "summary.json") == {"run": "newer"}
