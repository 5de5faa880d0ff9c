"""train_generator: loss falls, exact resume, checkpoint safety, init paths (tiny UNets, CPU)."""
from __future__ import annotations

import json
import logging

import pytest
import torch
from diffusers import DDIMScheduler, DiffusionPipeline, UNet2DModel
from PIL import Image

from pipeline import train_generator as tg
from pipeline.config import ConfigError, Paths
from pipeline.core.curves import CURVES, read_curve
from pipeline.core.io import read_json
from pipeline.errors import DataError
from pipeline.models.class_conditional import ClassConditionalPipeline
from pipeline.models.diffusion import (PIPELINE_FILE, DiffusionGenerator, build_unet, inference_scheduler, padded_size,
                                       train_scheduler)
from pipeline.training import checkpoint
from pipeline.training import diffusion as td
from pipeline.training.gan import draw_real
from pipeline.training.generator import TrainData, generator_meta, hashed_config, preview
from tests.helpers import SIZE, fresh_backbone, make_prepared, make_pseudo, tiny_data, tiny_params, toy_images


def test_padded_size_and_lr_schedule():
    assert padded_size(28, 3) == 28 and padded_size(28, 4) == 32 and padded_size(8, 2) == 8
    cfg = tiny_params(init="pretrain", pretrain_steps=10, steps=10, warmup_steps=4).train_generator
    f = [td.lr_factor(s, cfg) for s in range(20)]
    assert f[0] == pytest.approx(0.25) and f[3] == pytest.approx(1.0)
    assert f[9] < 0.1 and f[10] == pytest.approx(0.25)  # restarts for fine-tuning
    assert td.total_steps(cfg) == 20


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_loss_falls(tmp_path, kind):
    cfg = tiny_params(kind=kind, steps=40, lr=3e-3, lr_schedule="constant", checkpoint_every=100).train_generator
    res = td.train(fresh_backbone(cfg), cfg, tiny_data(), seed=0, ckpt_dir=tmp_path / "ck", chash="a" * 64)
    first, last = sum(res.losses[:5]) / 5, sum(res.losses[-5:]) / 5
    assert len(res.losses) == 40 and last < 0.6 * first, (first, last)


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_resume_equals_uninterrupted(tmp_path, kind):
    cfg = tiny_params(kind=kind, steps=6, init="scratch").train_generator
    data = tiny_data()
    straight = td.train(fresh_backbone(cfg), cfg, data, seed=1, ckpt_dir=tmp_path / "a", chash="h" * 64)
    part = td.train(fresh_backbone(cfg), cfg, data, seed=1, ckpt_dir=tmp_path / "b", chash="h" * 64, stop_at=4)
    assert part.resumed_from == 0 and len(part.losses) == 4
    # "killed" after step 4; a new process starts from a different random init and resumes
    resumed = td.train(fresh_backbone(cfg, seed=99), cfg, data, seed=1, ckpt_dir=tmp_path / "b", chash="h" * 64)
    assert resumed.resumed_from == 4
    assert resumed.losses == straight.losses
    a, b = straight.ema_model.state_dict(), resumed.ema_model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    files = sorted((tmp_path / "b").glob("ckpt-*.pt"))
    assert len(files) == checkpoint.KEEP_CHECKPOINTS
    saved = torch.load(files[-1], weights_only=True)
    assert set(saved) == {"config_hash", "step", "state", "losses", "seconds"} and saved["step"] == 6  # no RNG state
    assert set(saved["state"]) == {"model", "optimizer", "lr_scheduler", "ema"}


def test_checkpoint_of_other_config_is_ignored(tmp_path, caplog):
    cfg = tiny_params(steps=3).train_generator
    td.train(fresh_backbone(cfg), cfg, tiny_data(), seed=0, ckpt_dir=tmp_path, chash="1" * 64)
    with caplog.at_level(logging.WARNING):
        res = td.train(fresh_backbone(cfg), cfg, tiny_data(), seed=0, ckpt_dir=tmp_path, chash="2" * 64)
    assert res.resumed_from == 0 and "different training config" in caplog.text


def test_corrupt_checkpoint_gives_clear_error(tmp_path):
    cfg = tiny_params(steps=3).train_generator
    bad = tmp_path / f"ckpt-{'c' * 12}-00000003.pt"
    bad.write_bytes(b"PK\x03\x04 this is not a torch file")
    with pytest.raises(DataError, match=r"ckpt-cccccccccccc-00000003\.pt.*corrupt.*Delete this file"):
        td.train(fresh_backbone(cfg), cfg, tiny_data(), seed=0, ckpt_dir=tmp_path, chash="c" * 64)


def test_config_hash_ignores_logging_keys():
    d = tiny_data()
    p = tiny_params().train_generator

    def chash(cfg, seed):
        return checkpoint.config_hash(hashed_config(cfg), seed, [d.images, d.labels, d.unlabeled], {})

    assert chash(p, 0) == chash(p.model_copy(update={"log_every": 7}), 0)
    assert chash(p, 0) != chash(p.model_copy(update={"lr": 0.5}), 0)
    assert chash(p, 0) != chash(p, 1)


def test_stage_pretrain_then_finetune_and_rerun_resumes(tmp_path):
    make_prepared(tmp_path)
    params = tiny_params(init="pretrain", pretrain_steps=3, steps=3)
    meta = tg.run(params, Paths(root=tmp_path))
    out = Paths(root=tmp_path).generator
    assert {p.name for p in out.iterdir()} == {"model_index.json", PIPELINE_FILE, "unet", "scheduler",
                                               "generator.json", CURVES, "samples.png"}
    assert read_json(out / "scheduler" / "scheduler_config.json")["_class_name"] == "DPMSolverMultistepScheduler"
    saved = read_json(out / "generator.json")
    assert saved["fingerprint"] == meta["fingerprint"] and saved["null_label"] == 2
    assert saved["class_names"] == ["left", "right"] and saved["image_size"] == SIZE
    loss, lr = read_curve(out / CURVES, "loss"), read_curve(out / CURVES, "lr")
    assert list(loss.columns) == ["step", "loss"] and list(lr.columns) == ["step", "lr"]
    assert loss["step"].tolist() == lr["step"].tolist() == [1, 2, 3, 4, 5, 6]
    unet = UNet2DModel.from_pretrained(str(out / "unet"))
    assert unet.config.num_class_embeds == 3
    again = tg.run(params, Paths(root=tmp_path))  # finished checkpoint: nothing retrained
    assert again["resumed_from_step"] == 6 and again["fingerprint"] == meta["fingerprint"]
    assert again["seconds_per_step"] > 0  # the first run's time is kept, not 0 (benchmarks time, tests do not)


def test_generator_folder_is_a_plain_diffusers_pipeline(tmp_path):
    """The folder loads with diffusers alone (its own pipeline code), takes any scheduler, samples by name."""
    make_prepared(tmp_path)
    tg.run(tiny_params(kind="unet", steps=4), Paths(root=tmp_path))
    folder = Paths(root=tmp_path).generator
    index = json.loads((folder / "model_index.json").read_text())
    assert index["class_names"] == ["left", "right"] and index["image_size"] == SIZE
    pipe = DiffusionPipeline.from_pretrained(str(folder), trust_remote_code=True)
    assert type(pipe).__name__ == "ClassConditionalPipeline" and isinstance(pipe.unet, UNet2DModel)
    assert type(pipe).__module__.endswith(PIPELINE_FILE[:-3])  # the folder's own copy of the code, not pipeline.*
    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(["left", "right"], num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                  output_type="pil").images
    assert len(images) == 2 and all(isinstance(im, Image.Image) and im.size == (SIZE, SIZE) for im in images)
    with pytest.raises(ValueError, match=r"unknown class 'up'.*\['left', 'right'\]"):
        pipe(["left", "up"], num_inference_steps=2, output_type="pil")


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
    unet, missing = td.make_backbone(cfg.model_copy(update={"init": str(tmp_path / "uncond")}), tiny_data())
    assert missing == ["class_embedding.weight"] and unet.config.num_class_embeds == 3
    assert torch.equal(unet.conv_in.weight, uncond.conv_in.weight)
    x = torch.zeros(2, 1, SIZE, SIZE)
    assert unet(x, 5, class_labels=torch.tensor([0, 2])).sample.shape == x.shape


def test_init_errors_name_the_key(tmp_path):
    cfg = tiny_params().train_generator
    with pytest.raises(ConfigError, match="train_generator.init"):
        td.make_backbone(cfg.model_copy(update={"init": str(tmp_path / "nope")}), tiny_data())
    rgb = UNet2DModel(sample_size=SIZE, in_channels=3, out_channels=3, block_out_channels=(8, 16),
                      layers_per_block=1, down_block_types=("DownBlock2D",) * 2,
                      up_block_types=("UpBlock2D",) * 2, norm_num_groups=8)
    rgb.save_pretrained(tmp_path / "rgb")
    with pytest.raises(ConfigError, match="prepare.channels"):
        td.make_backbone(cfg.model_copy(update={"init": str(tmp_path / "rgb")}), tiny_data())
    big = UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                      layers_per_block=1, down_block_types=("DownBlock2D",) * 2,
                      up_block_types=("UpBlock2D",) * 2, norm_num_groups=8)
    big.save_pretrained(tmp_path / "big")
    with pytest.raises(ConfigError, match="prepare.image_size"):
        td.make_backbone(cfg.model_copy(update={"init": str(tmp_path / "big")}), tiny_data())


def test_odd_sizes_are_padded_for_the_unet_and_cropped_back(tmp_path):
    cfg = tiny_params(steps=2, block_out_channels=(8, 8, 8)).train_generator
    x = torch.randint(0, 256, (6, 1, 6, 6), dtype=torch.uint8)
    data = TrainData(x, torch.tensor([0, 1] * 3), 2)
    unet = build_unet(cfg, 6, 1, 2)
    assert unet.config.sample_size == 8
    res = td.train(unet, cfg, data, seed=0, ckpt_dir=tmp_path, chash="p" * 64)
    meta = {"null_label": 2, "image_size": 6, "channels": 1}
    pipe = ClassConditionalPipeline(scheduler=inference_scheduler("dpm++", dict(train_scheduler(cfg).config)),
                                    class_names=["a", "b"], image_size=6, unet=res.ema_model)
    grid = preview(DiffusionGenerator(pipe, meta), 2, 1)
    assert grid.shape == (2, 1, 6, 6) and grid.dtype == torch.uint8


# ---- labeled + pseudo-labeled images ----------------------------------------------------------

def test_draw_follows_the_weights():
    x, y = toy_images()  # 16 images: say the first 4 labeled, the other 12 pseudo-labeled
    heavy = TrainData(x, y, 2, weights=torch.tensor([100.0] * 4 + [1.0] * 12), num_pseudo=12)
    idx = heavy.draw(4000, torch.Generator().manual_seed(0))
    assert idx.shape == (4000,) and idx.dtype == torch.long and 0 <= idx.min() and idx.max() < 16
    share = (idx < 4).float().mean().item()
    assert share == pytest.approx(400 / 412, abs=0.02)  # labeled drawn 100x as often: they dominate
    assert torch.equal(idx, heavy.draw(4000, torch.Generator().manual_seed(0)))  # the generator decides
    even = TrainData(x, y, 2, weights=torch.tensor([1.0] * 4 + [1.0] * 12)).draw(4000, torch.Generator().manual_seed(0))
    assert (even < 4).float().mean().item() == pytest.approx(4 / 16, abs=0.03)
    uniform = TrainData(x, y, 2).draw(4000, torch.Generator().manual_seed(0))  # no weights: every image alike
    assert (uniform < 4).float().mean().item() == pytest.approx(4 / 16, abs=0.03)
    assert set(uniform.tolist()) == set(range(16))
    only = TrainData(x, y, 2, weights=torch.tensor([0.0] * 15 + [1.0])).draw(50, torch.Generator().manual_seed(1))
    assert set(only.tolist()) == {15}
    # the diffusion and GAN training batches come from draw: class 0 with weight 0 never appears
    right_only = TrainData(x, y, 2, weights=(y == 1).float())
    cfg = tiny_params(batch_size=64, p_uncond=0.0).train_generator
    _, labels = td.draw_batch(right_only, cfg, 0, torch.Generator().manual_seed(0), SIZE)
    assert labels.tolist() == [1] * 64
    assert draw_real(right_only, 64, True, torch.Generator().manual_seed(0))[1].tolist() == [1] * 64


def test_weighted_draws_resume_exactly_and_are_part_of_the_config_hash(tmp_path):
    cfg = tiny_params(steps=6).train_generator
    x, y = toy_images()
    data = TrainData(x, y, 2, weights=torch.tensor([4.0] * 4 + [1.0] * 12), num_pseudo=12)
    straight = td.train(fresh_backbone(cfg), cfg, data, seed=1, ckpt_dir=tmp_path / "a", chash="w" * 64)
    td.train(fresh_backbone(cfg), cfg, data, seed=1, ckpt_dir=tmp_path / "b", chash="w" * 64, stop_at=4)
    resumed = td.train(fresh_backbone(cfg, seed=99), cfg, data, seed=1, ckpt_dir=tmp_path / "b", chash="w" * 64)
    assert resumed.resumed_from == 4 and resumed.losses == straight.losses
    uniform = td.train(fresh_backbone(cfg), cfg, tiny_data(), seed=1, ckpt_dir=tmp_path / "c", chash="u" * 64)
    assert uniform.losses != straight.losses  # the weights change which images each step sees

    def chash(weights):
        return checkpoint.config_hash(hashed_config(cfg), 1, [x, y, None, weights], {})

    assert chash(None) != chash(data.weights) != chash(data.weights * 2)  # other weights: a new run, not resumed


def test_load_train_data_adds_the_pseudo_labeled_pool_after_the_labeled_images(tmp_path):
    make_prepared(tmp_path)
    px, py = toy_images(3)
    make_pseudo(tmp_path, px.flip(-1), py)
    paths = Paths(root=tmp_path)
    data = tg.load_train_data(tiny_params(labels="auto", labeled_weight=4.0), paths, "cpu")
    labeled_x, labeled_y = toy_images()
    assert data.num_pseudo == 6 and len(data.images) == 16 + 6
    assert torch.equal(data.images[:16], labeled_x) and torch.equal(data.images[16:], px.flip(-1))
    assert torch.equal(data.labels, torch.cat([labeled_y, py]))
    assert data.weights.tolist() == [4.0] * 16 + [1.0] * 6
    meta = generator_meta(tiny_params().train_generator, data)
    assert (meta["labels"], meta["num_labeled"], meta["num_pseudo_labeled"]) == ("pseudo", 16, 6)
    assert tg.load_train_data(tiny_params(labels="pseudo"), paths, "cpu").num_pseudo == 6
    labeled = tg.load_train_data(tiny_params(labels="labeled"), paths, "cpu")
    assert labeled.num_pseudo == 0 and labeled.weights is None and torch.equal(labeled.images, labeled_x)
    # datasetgan labels its own samples: it never reads the pseudo-labels
    assert tg.load_train_data(tiny_params(kind="datasetgan"), paths, "cpu").num_pseudo == 0


def test_labels_pseudo_needs_pseudo_labels_of_this_prepared_data(tmp_path):
    make_prepared(tmp_path)  # and an empty data/pseudo: pseudo_label had no pool image to keep
    paths = Paths(root=tmp_path)
    auto = tg.load_train_data(tiny_params(labels="auto"), paths, "cpu")
    assert auto.num_pseudo == 0 and auto.weights is None and len(auto.images) == 16  # the labeled set alone
    with pytest.raises(DataError, match=r"data/pseudo: train_generator.labels is pseudo but pseudo_label kept no"):
        tg.load_train_data(tiny_params(labels="pseudo"), paths, "cpu")
    px, py = toy_images(2)
    make_pseudo(tmp_path, px, py, prepared_fingerprint="o" * 64)  # pseudo-labels of another prepared dataset
    with pytest.raises(DataError, match=r"data/pseudo: made from other inputs.*Re-run pseudo_label"):
        tg.load_train_data(tiny_params(labels="auto"), paths, "cpu")
    assert tg.load_train_data(tiny_params(labels="labeled"), paths, "cpu").num_pseudo == 0  # not read at all


def test_stage_with_pseudo_labels_records_them_in_generator_json(tmp_path):
    make_prepared(tmp_path)
    px, py = toy_images(2)
    make_pseudo(tmp_path, px.flip(-1), py)
    meta = tg.run(tiny_params(labels="pseudo", steps=2), Paths(root=tmp_path))
    saved = read_json(Paths(root=tmp_path).generator / "generator.json")
    assert (saved["labels"], saved["num_labeled"], saved["num_pseudo_labeled"]) == ("pseudo", 16, 4)
    assert saved["params"]["train_generator"]["labels"] == "pseudo" and meta["num_pseudo_labeled"] == 4
    make_pseudo(tmp_path)  # pseudo_label re-ran and kept nothing: auto learns from the labeled set
    saved = tg.run(tiny_params(labels="auto", steps=2), Paths(root=tmp_path))
    assert (saved["labels"], saved["num_labeled"], saved["num_pseudo_labeled"]) == ("labeled", 16, 0)


def test_v_prediction_with_zero_terminal_snr_and_min_snr_weighting(tmp_path):
    cfg = tiny_params(prediction_type="v_prediction", zero_terminal_snr=True, snr_gamma=5.0).train_generator
    sched = train_scheduler(cfg)
    assert float(sched.alphas_cumprod[-1]) == 0.0  # the last noise level is pure noise
    x0, labels = toy_images()[0].float() / 127.5 - 1, torch.zeros(16, dtype=torch.long)

    class Zero(torch.nn.Module):  # predicts 0: the loss is the target's energy, weighted
        def forward(self, x, t, class_labels=None):
            return type("Out", (), {"sample": torch.zeros_like(x)})()
    plain = td.diffusion_loss(Zero(), sched, x0, labels, torch.Generator().manual_seed(0))
    weighted = td.diffusion_loss(Zero(), sched, x0, labels, torch.Generator().manual_seed(0), snr_gamma=5.0)
    assert torch.isfinite(weighted) and 0 < weighted < plain  # min(snr, 5) / (snr + 1) < 1
    res = td.train(fresh_backbone(cfg), cfg, tiny_data(), seed=0, ckpt_dir=tmp_path / "ck", chash="b" * 64)
    assert all(torch.isfinite(torch.tensor(res.losses)))


def test_zero_terminal_snr_needs_v_prediction():
    with pytest.raises(ConfigError, match="v_prediction"):
        tiny_params(prediction_type="epsilon")  # zero terminal SNR is the default
    assert tiny_params(prediction_type="epsilon", zero_terminal_snr=False).train_generator.snr_gamma >= 0
