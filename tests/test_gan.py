"""cgan: learning on toy data, DiffAugment, determinism, exact resume, save/load (tiny models, CPU)."""
from __future__ import annotations

import pytest
import torch

from pipeline import train_generator as tg
from pipeline.config import ConfigError, Paths, params_from_dict
from pipeline.core.curves import CURVES, read_curve
from pipeline.core.io import read_json, sha256_file
from pipeline.models import gan
from pipeline.models.registry import load_generator
from pipeline.training import checkpoint
from pipeline.training import gan as train_gan
from tests.helpers import SIZE, make_prepared, tiny_data


def gan_params(cgan: dict | None = None, **train):
    return params_from_dict({"base": {"profile": "micro", "device": "cpu", "seed": 3}, "train_generator": {
        "kind": "cgan", "batch_size": 16, "steps": 6, "ema_decay": 0.9, "checkpoint_every": 3, "log_every": 2,
        "preview_per_class": 1, "cgan": {"z_dim": 8, "g_channels": 16, "d_channels": 8, **(cgan or {})}, **train}})


def fit(params, ckpt_dir, init_seed: int = 0, **kw):
    torch.manual_seed(init_seed)  # what run() does before fit: the initial weights
    return train_gan.fit(params, tiny_data(), None, ckpt_dir, "g" * 64, **kw)


def ema_state(fitted) -> dict:
    return fitted.generator.model.state_dict()


def test_learns_the_class_conditional_toy_data(tmp_path):
    """40 steps: D loss falls from the hinge start and class 0 / 1 light their own corner."""
    fitted = fit(gan_params(steps=40, checkpoint_every=100, cgan={"lr_g": 2e-3, "lr_d": 2e-3}), tmp_path)
    d_loss = fitted.history["loss"]
    assert len(d_loss) == 40 and sum(d_loss[-5:]) / 5 < sum(d_loss[:5]) / 5 < 2.0
    assert list(fitted.history) == ["loss", "lr", "g_loss"] and fitted.history["lr"] == [2e-3] * 40
    x = fitted.generator.sample(torch.tensor([0] * 16 + [1] * 16), list(range(32)), None).float() / 255
    top_left_minus_bottom_right = x[..., :4, :4].mean((1, 2, 3)) - x[..., 4:, 4:].mean((1, 2, 3))
    assert top_left_minus_bottom_right[:16].mean() > 0.2 and top_left_minus_bottom_right[16:].mean() < -0.1


def test_diffaugment_keeps_shape_is_deterministic_and_differentiable():
    x = (torch.rand(6, 3, 12, 12) * 2 - 1).requires_grad_()
    for policy in ("color", "translation", "cutout", "color,translation,cutout"):
        a = train_gan.diff_augment(x, policy, torch.Generator().manual_seed(1))
        b = train_gan.diff_augment(x, policy, torch.Generator().manual_seed(1))
        c = train_gan.diff_augment(x, policy, torch.Generator().manual_seed(2))
        assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c), policy
    a.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert train_gan.diff_augment(x, "", torch.Generator()) is x
    cut = train_gan.diff_augment(torch.ones(4, 1, 12, 12), "cutout", torch.Generator().manual_seed(0))
    assert ((cut == 0).flatten(1).sum(1) > 0).all()  # every image lost a patch
    with pytest.raises(ConfigError, match="cgan.diffaugment"):
        train_gan.parse_policy("color,zoom")


def test_same_seed_gives_identical_weights(tmp_path):
    a, b = fit(gan_params(), tmp_path / "a"), fit(gan_params(), tmp_path / "b")
    assert a.history == b.history
    sa, sb = ema_state(a), ema_state(b)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    c = fit(gan_params(), tmp_path / "c", init_seed=1)  # another init, another run
    assert not torch.equal(ema_state(c)["fc.weight"], sa["fc.weight"])


def test_resume_equals_uninterrupted(tmp_path):
    straight = fit(gan_params(), tmp_path / "a")
    part = fit(gan_params(), tmp_path / "b", stop_at=4)
    assert part.resumed_from == 0 and len(part.history["loss"]) == 4
    # "killed" after step 4; a new process starts from a different random init and resumes
    resumed = fit(gan_params(), tmp_path / "b", init_seed=99)
    assert resumed.resumed_from == 4 and resumed.history == straight.history
    a, b = ema_state(straight), ema_state(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    files = sorted((tmp_path / "b").glob("ckpt-*.pt"))
    assert len(files) == checkpoint.KEEP_CHECKPOINTS
    saved = torch.load(files[-1], weights_only=True)
    assert set(saved) == {"config_hash", "step", "state", "losses", "seconds"} and saved["step"] == 6
    assert set(saved["state"]) == {"g", "d", "ema", "opt_g", "opt_d"}


def test_stage_save_load_round_trip(tmp_path):
    make_prepared(tmp_path)
    params = gan_params(steps=4)
    meta = tg.run(params, Paths(root=tmp_path))
    out = Paths(root=tmp_path).generator
    assert {p.name for p in out.iterdir()} == {"gan", "generator.json", CURVES, "samples.png"}
    assert {p.name for p in (out / "gan").iterdir()} == {"config.json", "generator.safetensors"}
    for name in ("loss", "lr", "g_loss"):
        curve = read_curve(out / CURVES, name)
        assert list(curve.columns) == ["step", name] and curve["step"].tolist() == [1, 2, 3, 4]
    saved = read_json(out / "generator.json")
    assert saved["kind"] == "cgan" and saved["fingerprint"] == sha256_file(out / "gan" / "generator.safetensors")
    assert saved["z_dim"] == 8 and saved["image_size_padded"] == SIZE and saved["discriminator_parameters"] > 0
    assert saved["num_parameters"] > 0 and saved["steps"] == 4

    generator = load_generator(out)
    assert isinstance(generator, gan.GanGenerator) and generator.meta["class_names"] == ["left", "right"]
    labels, seeds = torch.tensor([0, 1, 0, 1]), [5, 6, 7, 8]
    x = generator.sample(labels, seeds, params.sample)
    assert x.shape == (4, 1, SIZE, SIZE) and x.dtype == torch.uint8
    alone = generator.sample(torch.tensor([1]), [6], params.sample)  # batch composition does not matter
    assert (alone[0].int() - x[1].int()).abs().max() <= 1
    assert torch.equal(generator.sample(labels, seeds, params.sample), x)
    other_class = generator.sample(torch.tensor([1, 0, 1, 0]), seeds, params.sample)
    assert all(not torch.equal(other_class[i], x[i]) for i in range(4))  # labels are used

    again = tg.run(params, Paths(root=tmp_path))  # finished checkpoint: nothing retrained
    assert again["resumed_from_step"] == 4 and again["fingerprint"] == meta["fingerprint"]


def test_odd_image_side_is_padded_then_cropped():
    g = gan.CondGenerator(z_dim=4, num_classes=3, channels=3, image_size=6, g_channels=8)
    assert g.base * 4 == 8
    assert g(torch.randn(2, 4), torch.tensor([0, 2])).shape == (2, 3, 6, 6)
    d = gan.ProjectionDiscriminator(num_classes=3, channels=3, d_channels=8)
    assert d(torch.randn(2, 3, 6, 6), torch.tensor([0, 2])).shape == (2,)
