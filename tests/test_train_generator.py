"""train_generator: loss falls, exact resume, checkpoint safety, init paths (tiny UNets, CPU)."""
from __future__ import annotations

import logging

import datasets
import pytest
import torch
from diffusers import UNet2DModel

from pipeline import train_generator as tg
from pipeline.config import ConfigError, Paths, params_from_dict
from pipeline.diffusion import DiffusionGenerator, build_backbone, build_unet, padded_size
from pipeline.prepare import DataError
from pipeline.storage import read_json, tensors_to_dataset, write_json

SIZE = 8
TINY = {"block_out_channels": (8, 16), "batch_size": 8, "warmup_steps": 2, "log_every": 2,
        "checkpoint_every": 3, "preview_per_class": 1, "ema_decay": 0.9,
        "dit": {"patch_size": 2, "num_layers": 2, "num_heads": 2, "head_dim": 8}}


def toy_images(n_per_class: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Class 0: bright top-left square, class 1: bright bottom-right square."""
    x = torch.zeros(2 * n_per_class, 1, SIZE, SIZE, dtype=torch.uint8)
    x[:n_per_class, :, :4, :4] = 255
    x[n_per_class:, :, 4:, 4:] = 255
    return x, torch.tensor([0] * n_per_class + [1] * n_per_class)


def make_prepared(root, pool: bool = True) -> None:
    x, y = toy_images()
    dd = {"train": tensors_to_dataset(x, y, ["left", "right"]), "val": tensors_to_dataset(x, y, ["left", "right"]),
          "test": tensors_to_dataset(x, y, ["left", "right"])}
    if pool:
        dd["pool"] = tensors_to_dataset(torch.cat([x, x.flip(-1)]), None, None)
    prepared = Paths(root=root).prepared
    datasets.DatasetDict(dd).save_to_disk(str(prepared / "dataset"))
    write_json(prepared / "summary.json", {"class_names": ["left", "right"], "num_classes": 2,
                                           "image_size": SIZE, "channels": 1})


def tiny_params(**train):
    return params_from_dict({"base": {"profile": "micro", "device": "cpu", "seed": 3},
                             "train_generator": {**TINY, **train}})


def tiny_data() -> tg.TrainData:
    x, y = toy_images()
    return tg.TrainData(x, y, 2, class_names=["left", "right"])


def fresh_unet(cfg, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_backbone(cfg, SIZE, 1, 2)


def test_padded_size_and_lr_schedule():
    assert padded_size(28, 3) == 28 and padded_size(28, 4) == 32 and padded_size(8, 2) == 8
    cfg = tiny_params(init="pretrain", pretrain_steps=10, steps=10, warmup_steps=4).train_generator
    f = [tg.lr_factor(s, cfg) for s in range(20)]
    assert f[0] == pytest.approx(0.25) and f[3] == pytest.approx(1.0)
    assert f[9] < 0.1 and f[10] == pytest.approx(0.25)  # restarts for fine-tuning
    assert tg.total_steps(cfg) == 20


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_loss_falls(tmp_path, kind):
    cfg = tiny_params(kind=kind, steps=40, lr=3e-3, lr_schedule="constant", checkpoint_every=100).train_generator
    res = tg.train(fresh_unet(cfg), cfg, tiny_data(), seed=0, ckpt_dir=tmp_path / "ck", chash="a" * 64)
    first, last = sum(res.losses[:5]) / 5, sum(res.losses[-5:]) / 5
    assert len(res.losses) == 40 and last < 0.6 * first, (first, last)


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_resume_equals_uninterrupted(tmp_path, kind):
    cfg = tiny_params(kind=kind, steps=6, init="scratch").train_generator
    data = tiny_data()
    straight = tg.train(fresh_unet(cfg), cfg, data, seed=1, ckpt_dir=tmp_path / "a", chash="h" * 64)
    part = tg.train(fresh_unet(cfg), cfg, data, seed=1, ckpt_dir=tmp_path / "b", chash="h" * 64, stop_at=4)
    assert part.resumed_from == 0 and len(part.losses) == 4
    # "killed" after step 4; a new process starts from a different random init and resumes
    resumed = tg.train(fresh_unet(cfg, seed=99), cfg, data, seed=1, ckpt_dir=tmp_path / "b", chash="h" * 64)
    assert resumed.resumed_from == 4
    assert resumed.losses == straight.losses
    a, b = straight.ema_unet.state_dict(), resumed.ema_unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert len(list((tmp_path / "b").glob("ckpt-*.pt"))) == tg.KEEP_CHECKPOINTS


def test_checkpoint_of_other_config_is_ignored(tmp_path, caplog):
    cfg = tiny_params(steps=3).train_generator
    tg.train(fresh_unet(cfg), cfg, tiny_data(), seed=0, ckpt_dir=tmp_path, chash="1" * 64)
    with caplog.at_level(logging.WARNING):
        res = tg.train(fresh_unet(cfg), cfg, tiny_data(), seed=0, ckpt_dir=tmp_path, chash="2" * 64)
    assert res.resumed_from == 0 and "different training config" in caplog.text


def test_corrupt_checkpoint_gives_clear_error(tmp_path):
    cfg = tiny_params(steps=3).train_generator
    bad = tmp_path / f"ckpt-{'c' * 12}-00000003.pt"
    bad.write_bytes(b"PK\x03\x04 this is not a torch file")
    with pytest.raises(DataError, match=r"ckpt-cccccccccccc-00000003\.pt.*corrupt.*Delete this file"):
        tg.train(fresh_unet(cfg), cfg, tiny_data(), seed=0, ckpt_dir=tmp_path, chash="c" * 64)


def test_config_hash_ignores_logging_keys():
    d = tiny_data()
    p = tiny_params().train_generator
    assert tg.config_hash(p, 0, d, {}) == tg.config_hash(p.model_copy(update={"log_every": 7}), 0, d, {})
    assert tg.config_hash(p, 0, d, {}) != tg.config_hash(p.model_copy(update={"lr": 0.5}), 0, d, {})
    assert tg.config_hash(p, 0, d, {}) != tg.config_hash(p, 1, d, {})


def test_stage_pretrain_then_finetune_and_rerun_resumes(tmp_path):
    make_prepared(tmp_path)
    params = tiny_params(init="pretrain", pretrain_steps=3, steps=3)
    meta = tg.run(params, Paths(root=tmp_path))
    out = Paths(root=tmp_path).generator
    assert {p.name for p in out.iterdir()} == {"unet", "scheduler", "generator.json", "loss.csv", "samples.png"}
    saved = read_json(out / "generator.json")
    assert saved["fingerprint"] == meta["fingerprint"] and saved["null_label"] == 2
    assert saved["class_names"] == ["left", "right"] and saved["image_size"] == SIZE
    assert (out / "loss.csv").read_text().splitlines()[0] == "step,loss,lr"
    assert len((out / "loss.csv").read_text().splitlines()) == 1 + 6
    unet = UNet2DModel.from_pretrained(str(out / "unet"))
    assert unet.config.num_class_embeds == 3
    again = tg.run(params, Paths(root=tmp_path))  # finished checkpoint: nothing retrained
    assert again["resumed_from_step"] == 6 and again["fingerprint"] == meta["fingerprint"]
    assert again["seconds_per_step"] == pytest.approx(meta["seconds_per_step"], rel=0.5)  # kept, not 0


def test_pretrain_without_pool_is_a_clear_error(tmp_path):
    make_prepared(tmp_path, pool=False)
    with pytest.raises(DataError, match="pool"):
        tg.run(tiny_params(init="pretrain", pretrain_steps=2, steps=2), Paths(root=tmp_path))


def test_init_from_unconditional_checkpoint(tmp_path):
    cfg = tiny_params().train_generator
    uncond = UNet2DModel(sample_size=SIZE, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                         layers_per_block=1, down_block_types=("DownBlock2D",) * 2,
                         up_block_types=("UpBlock2D",) * 2, norm_num_groups=8)
    uncond.save_pretrained(tmp_path / "uncond")
    unet, missing = tg.make_unet(cfg.model_copy(update={"init": str(tmp_path / "uncond")}), tiny_data())
    assert missing == ["class_embedding.weight"] and unet.config.num_class_embeds == 3
    assert torch.equal(unet.conv_in.weight, uncond.conv_in.weight)
    x = torch.zeros(2, 1, SIZE, SIZE)
    assert unet(x, 5, class_labels=torch.tensor([0, 2])).sample.shape == x.shape


def test_init_errors_name_the_key(tmp_path):
    cfg = tiny_params().train_generator
    with pytest.raises(ConfigError, match="train_generator.init"):
        tg.make_unet(cfg.model_copy(update={"init": str(tmp_path / "nope")}), tiny_data())
    rgb = UNet2DModel(sample_size=SIZE, in_channels=3, out_channels=3, block_out_channels=(8, 16),
                      layers_per_block=1, down_block_types=("DownBlock2D",) * 2,
                      up_block_types=("UpBlock2D",) * 2, norm_num_groups=8)
    rgb.save_pretrained(tmp_path / "rgb")
    with pytest.raises(ConfigError, match="prepare.channels"):
        tg.make_unet(cfg.model_copy(update={"init": str(tmp_path / "rgb")}), tiny_data())
    big = UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                      layers_per_block=1, down_block_types=("DownBlock2D",) * 2,
                      up_block_types=("UpBlock2D",) * 2, norm_num_groups=8)
    big.save_pretrained(tmp_path / "big")
    with pytest.raises(ConfigError, match="prepare.image_size"):
        tg.make_unet(cfg.model_copy(update={"init": str(tmp_path / "big")}), tiny_data())


def test_odd_sizes_are_padded_for_the_unet_and_cropped_back(tmp_path):
    cfg = tiny_params(steps=2, block_out_channels=(8, 8, 8)).train_generator
    x = torch.randint(0, 256, (6, 1, 6, 6), dtype=torch.uint8)
    data = tg.TrainData(x, torch.tensor([0, 1] * 3), 2)
    unet = build_unet(cfg, 6, 1, 2)
    assert unet.config.sample_size == 8
    res = tg.train(unet, cfg, data, seed=0, ckpt_dir=tmp_path, chash="p" * 64)
    meta = {"null_label": 2, "image_size": 6, "channels": 1}
    grid = tg.preview(DiffusionGenerator(res.ema_unet, dict(tg.train_scheduler(cfg).config), meta), 2, 1)
    assert grid.shape == (2, 1, 6, 6) and grid.dtype == torch.uint8
