"""Faults injected for real: a killed process, a crash mid-write, determinism across runs."""
import os
import signal
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from pipeline import prepare
from pipeline.config import Paths
from pipeline.core.images import dataset_to_tensors
from pipeline.core.io import atomic_path, load_dataset_dir, write_json
from tests.helpers import TINY, held_after_first_checkpoint, make_idx_dir, make_prepared, prepare_params


def test_crash_inside_atomic_write_keeps_the_old_file_and_leaves_no_partial(tmp_path):
    target = tmp_path / "out.json"
    write_json(target, {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text('{"v": 2, "trunc')
            raise RuntimeError("killed mid-write")
    assert target.read_text().strip().endswith("}") and '"v": 1' in target.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]
    folder = tmp_path / "dir"
    with atomic_path(folder, is_dir=True) as tmp:
        (tmp / "a").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(folder, is_dir=True) as tmp:
            (tmp / "a").write_text("new")
            raise RuntimeError
    assert (folder / "a").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["dir", "out.json"]


def _train_cmd(root, params_file):
    return [sys.executable, "-m", "pipeline.train_generator", "--params", str(params_file), "--root", str(root)]


def test_generator_killed_mid_training_resumes_to_the_same_weights(tmp_path):
    """SIGKILL after the first checkpoint; the re-run resumes and ends where an uninterrupted run ends."""
    params = {"base": {"profile": "micro", "device": "cpu", "seed": 1},
              "train_generator": {**{k: list(v) if isinstance(v, tuple) else v for k, v in TINY.items()},
                                  "steps": 10, "checkpoint_every": 5}}
    pfile = tmp_path / "params.yaml"
    pfile.write_text(yaml.safe_dump(params))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    for root in (straight, killed):
        make_prepared(root)
    from pipeline import train_generator
    from pipeline.config import load_params

    train_generator.run(load_params(pfile), Paths(root=straight))  # uninterrupted, in this process

    proc = held_after_first_checkpoint(_train_cmd(killed, pfile), env, tmp_path / "checkpointed",
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert [p.name for p in Paths(root=killed).generator_checkpoints.glob("ckpt-*.pt")] != []
    assert not (Paths(root=killed).generator / "generator.json").exists()
    resumed = train_generator.run(load_params(pfile), Paths(root=killed))
    assert resumed["resumed_from_step"] == 5
    a = load_file(str(Paths(root=straight).generator / "unet/diffusion_pytorch_model.safetensors"))
    b = load_file(str(Paths(root=killed).generator / "unet/diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_prepare_is_deterministic_given_the_seed(tmp_path):
    src = make_idx_dir(tmp_path / "fm", n_train=90)
    outs = []
    for root in ("a", "b"):
        prepare.run(prepare_params("fashion-mnist", src, unlabeled_pool=10), Paths(root=tmp_path / root))
        dd = load_dataset_dir(Paths(root=tmp_path / root).prepared / "dataset", "prepare")
        outs.append({s: dataset_to_tensors(dd[s], label_column="label" if s != "pool" else "hidden_label") for s in dd})
    assert set(outs[0]) == {"train", "val", "test", "pool"}
    for split, (x, y) in outs[0].items():
        x2, y2 = outs[1][split]
        assert torch.equal(x, x2) and torch.equal(y, y2)  # the pool's hidden labels too


def test_pseudo_label_is_deterministic_given_the_seed(tmp_path):
    from pipeline import pseudo_label
    from pipeline.config import labeler_file, params_from_dict

    params = params_from_dict({"base": {"profile": "micro", "device": "cpu", "seed": 2},
                               "pseudo_label": {"steps": 3, "batch_size": 8, "per_class_cap": 6}})
    outs = []
    for root in ("a", "b"):
        make_prepared(tmp_path / root, hidden=True, pseudo=False)
        paths = Paths(root=tmp_path / root)
        summary = pseudo_label.run(params, paths)
        x, y = dataset_to_tensors(load_dataset_dir(paths.pseudo / "dataset", "pseudo_label"))
        outs.append((summary, x, y, {i: load_file(str(paths.pseudo / labeler_file(i))) for i in range(2)}))
    (s1, x1, y1, w1), (s2, x2, y2, w2) = outs
    assert s1["kept"] > 0 and s1["fingerprint"] == s2["fingerprint"]
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert all(torch.equal(w1[i][k], w2[i][k]) for i in w1 for k in w1[i])  # each seed's labeler (micro: 2)


def test_downstream_stage_without_its_input_says_what_to_run(tmp_path):
    from pipeline import sample
    from pipeline.config import params_from_dict

    with pytest.raises(FileNotFoundError, match="Run the train_generator stage first"):
        sample.run(params_from_dict({"base": {"profile": "micro"}}), Paths(root=tmp_path))
