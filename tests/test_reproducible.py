"""Byte-reproducible outputs (issue 45, item 5): a stage run twice on the same inputs and params writes
the same bytes into data/ and models/ (DVC's cache then hits and nothing after it re-runs); run times go
to metrics/; safetensors headers are written in a fixed order; weight files get every output's permissions."""

import hashlib
import json
import os
import stat
from pathlib import Path

import datasets
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import pipeline.train_classifier as tc
from pipeline import pseudo_label
from pipeline.config import Paths, params_from_dict
from pipeline.core.atomic import DIR_MODE, FILE_MODE, atomic_path
from pipeline.core.images import tensors_to_dataset
from pipeline.core.io import TIMING_KEYS, save_dataset, write_json
from pipeline.models.classifier import build_model, load_classifier, save_classifier
from pipeline.report import read_stage_seconds
from pipeline.reporting.summary import stage_seconds

NAMES = ["top", "bottom"]
PARAMS = {
    "base": {"profile": "micro", "device": "cpu", "seed": 3},
    "pseudo_label": {"steps": 4, "eval_every": 2, "batch_size": 8, "threshold": 0.0},
    "train_classifier": {
        "steps": 4,
        "eval_every": 2,
        "batch_size": 8,
        "eval_batch_size": 16,
        "variants": {
            "real": {"data": "prepared"},
            "fixmatch": {"data": "prepared", "learner": "fixmatch", "augment": "classic"},
        },
    },
}


def checksums(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def without_timing(obj):
    if isinstance(obj, dict):
        return {k: without_timing(v) for k, v in obj.items() if k not in TIMING_KEYS}
    return [without_timing(v) for v in obj] if isinstance(obj, list) else obj


def timing_keys(obj) -> list[str]:
    if isinstance(obj, dict):
        return [k for k in obj if k in TIMING_KEYS] + [k for v in obj.values() for k in timing_keys(v)]
    return [k for v in obj for k in timing_keys(v)] if isinstance(obj, list) else []


def noise(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """8 px noise images whose class (0: top, 1: bottom) sets which half is bright."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = torch.randint(0, 80, (n, 1, 8, 8), generator=g).to(torch.uint8)
    for i, c in enumerate(y.tolist()):
        x[i, :, 4 * c : 4 * c + 4, :] += 150
    return x, y


def prepared(root: Path) -> Paths:
    paths = Paths(root=root)
    (x, y), (vx, vy), (tx, ty), (px, py) = noise(16, 1), noise(8, 2), noise(8, 3), noise(24, 4)
    save_dataset(
        datasets.DatasetDict(
            {
                "train": tensors_to_dataset(x, y, NAMES),
                "val": tensors_to_dataset(vx, vy, NAMES),
                "test": tensors_to_dataset(tx, ty, NAMES),
                "pool": tensors_to_dataset(px, None, None, {"hidden_label": py}),
            }
        ),
        paths.prepared / "dataset",
    )
    write_json(paths.prepared / "summary.json", {"class_names": NAMES, "fingerprint": "p" * 64})
    return paths


def test_pseudo_label_and_train_classifier_run_twice_write_the_same_bytes(tmp_path):
    paths, params = prepared(tmp_path), params_from_dict(PARAMS)
    runs = []
    for _ in range(2):
        pseudo_label.run(params, paths)
        metrics = {v: tc.run(params, paths, variant=v) for v in ("real", "fixmatch")}
        runs.append(
            {
                "pseudo": checksums(paths.pseudo),
                "classifier": checksums(paths.classifier),
                "curves": checksums(paths.classifier_metrics),  # each variant's folder and metrics file
                "metrics": [
                    without_timing(json.loads((paths.classifier_metrics / f"{v}.json").read_text())) for v in metrics
                ],
            }
        )
        for v in metrics:  # the metrics files keep the run times (metrics/, not cached: dvc.yaml cache: false)
            runs[-1]["curves"].pop(f"{v}.json")
    assert runs[0] == runs[1]  # summary.json had its run time; the safetensors headers came in varying order
    assert "labelers/seed1.safetensors" in runs[0]["pseudo"] and "real/seed1/model.safetensors" in runs[0]["classifier"]
    for f in [*paths.pseudo.rglob("*.json"), *paths.classifier.rglob("*.json")]:
        assert timing_keys(json.loads(f.read_text())) == [], f
    timing = json.loads((paths.stage_timing / "pseudo_label.json").read_text())
    assert timing["seconds"] > 0 and len(timing["labelers"]) == 2
    # the learner's variant tests pseudo_label's labelers: their training times come from that record
    assert [r["seconds"] for r in metrics["fixmatch"]["per_seed"]] == timing["labelers"]
    # the report still shows pseudo_label's time, now from metrics/stages/
    recorded = read_stage_seconds(paths)
    assert recorded == {"pseudo_label": timing["seconds"]}
    assert stage_seconds({"pseudo": {}}, {}, recorded)["pseudo_label"] == timing["seconds"]
    assert stage_seconds({"pseudo": {"seconds": 3.0}}, {}, {"prepare": 2.0}) == {
        "prepare": 2.0,
        "pseudo_label": 3.0,
        "train_classifier": None,
    }  # an older run's


def test_safetensors_files_of_the_same_weights_are_the_same_bytes(tmp_path):
    torch.manual_seed(0)
    model = build_model("test_resnet", 2, 1)
    files = [tmp_path / f"{i}.safetensors" for i in range(8)]
    for f in files:
        save_classifier(model, f, "test_resnet", 2, 1)
    assert len({f.read_bytes() for f in files}) == 1  # 5 distinct files from 8 saves before
    head = files[0].read_bytes()
    n = int.from_bytes(head[:8], "little")
    assert n % 8 == 0 and list(json.loads(head[8 : 8 + n])["__metadata__"]) == ["arch", "in_chans", "num_classes"]
    with safe_open(str(files[0]), "pt") as f:
        assert f.metadata() == {"arch": "test_resnet", "num_classes": "2", "in_chans": "1"}
    again = load_classifier(files[0], 2, 1, "test")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_weight_files_get_the_permissions_of_every_other_output(tmp_path):
    """safetensors wrote its files 0600, where every other output is 0644 (under umask 022): another
    user's workers in a shared checkout could not read the weights."""

    def mode(p: Path) -> int:
        return stat.S_IMODE(os.stat(p).st_mode)

    write_json(tmp_path / "other.json", {})
    save_classifier(build_model("test_resnet", 2, 1), tmp_path / "model.safetensors", "test_resnet", 2, 1)
    with atomic_path(tmp_path / "generator", is_dir=True) as tmp:  # a writer we do not control (diffusers)
        (tmp / "unet").mkdir()
        save_file({"w": torch.zeros(2)}, str(tmp / "unet/weights.safetensors"))
        assert mode(tmp / "unet/weights.safetensors") == 0o600
    assert mode(tmp_path / "other.json") == FILE_MODE
    assert mode(tmp_path / "model.safetensors") == mode(tmp_path / "generator/unet/weights.safetensors") == FILE_MODE
    assert mode(tmp_path / "generator") == mode(tmp_path / "generator/unet") == DIR_MODE  # mkdtemp's was 0700
