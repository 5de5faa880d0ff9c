"""Batched TrivialAugmentWide (pipeline.training.augment): one draw per image, torchvision's ops
and magnitudes, deterministic under the loop's generator, and fit's use of it."""
import pytest
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

import pipeline.training.classifier as training
from pipeline.models.classifier import build_model
from pipeline.training.augment import (OPS, TRIVIAL_AUGMENT_WIDE, _tables, apply_trivial_augment,
                                       sample_trivial_augment, trivial_augment_wide)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def reference(im: torch.Tensor, name: str, m: float) -> torch.Tensor:
    """torchvision's TrivialAugmentWide step for one image, op and magnitude, through public v2.functional
    (the mapping of torchvision's _AutoAugmentBase._apply_image_or_video_transform, nearest, no fill)."""
    bound = 1.0 if im.is_floating_point() else 255.0
    affine = dict(angle=0.0, translate=[0, 0], scale=1.0, shear=[0.0, 0.0], interpolation=v2.InterpolationMode.NEAREST)
    deg = torch.rad2deg(torch.atan(torch.tensor(m, dtype=torch.float64))).item()
    return {
        "Identity": lambda: im,
        "ShearX": lambda: TF.affine(im, **{**affine, "shear": [deg, 0.0]}, center=[0, 0]),
        "ShearY": lambda: TF.affine(im, **{**affine, "shear": [0.0, deg]}, center=[0, 0]),
        "TranslateX": lambda: TF.affine(im, **{**affine, "translate": [int(m), 0]}),
        "TranslateY": lambda: TF.affine(im, **{**affine, "translate": [0, int(m)]}),
        "Rotate": lambda: TF.rotate(im, angle=m, interpolation=v2.InterpolationMode.NEAREST),
        "Brightness": lambda: TF.adjust_brightness(im, 1.0 + m),
        "Color": lambda: TF.adjust_saturation(im, 1.0 + m),
        "Contrast": lambda: TF.adjust_contrast(im, 1.0 + m),
        "Sharpness": lambda: TF.adjust_sharpness(im, 1.0 + m),
        "Posterize": lambda: TF.posterize(im, int(m)),
        "Solarize": lambda: TF.solarize(im, bound * m),
        "AutoContrast": lambda: TF.autocontrast(im),
        "Equalize": lambda: TF.equalize(im),
    }[name]()


def every_draw(bins: int = 31) -> tuple[torch.Tensor, torch.Tensor]:
    """Every (op, signed magnitude) TrivialAugmentWide can draw."""
    mags, signed = _tables(bins)
    ops, ms = [], []
    for k, _name in enumerate(OPS):
        values = sorted(set(mags[k].tolist()))
        for v in values:
            for s in ((1, -1) if signed[k] and v != 0 else (1,)):
                ops.append(k), ms.append(s * v)
    return torch.tensor(ops), torch.tensor(ms, dtype=torch.float64)


def images(n: int, c: int, h: int, w: int, seed: int, dtype=torch.uint8) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, c, h, w), generator=g).to(torch.uint8)
    x[1::3] = x[1::3] // 3 + 40  # low contrast
    x[2::3] = 7  # flat: autocontrast / equalize / contrast edge cases
    return x if dtype == torch.uint8 else x.to(dtype) / 255


def test_op_set_and_magnitudes_are_torchvisions():
    space = getattr(v2.TrivialAugmentWide, "_AUGMENTATION_SPACE", None)
    if space is None:
        pytest.skip("this torchvision keeps TrivialAugmentWide's space elsewhere")
    assert list(space) == list(OPS)
    for name, (fn, signed) in space.items():
        ours, our_signed = TRIVIAL_AUGMENT_WIDE[name]
        assert our_signed == signed, name
        theirs = fn(31, 28, 28)
        assert (theirs is None) == (ours is None), name
        if theirs is not None:
            assert torch.equal(ours(31), theirs), name


@pytest.mark.parametrize("c,dtype,size", [(1, torch.uint8, (28, 28)), (3, torch.uint8, (16, 20)),
                                          (1, torch.float32, (12, 12)), (3, torch.float32, (10, 14))])
def test_each_image_gets_what_torchvision_gives_it(c, dtype, size):
    """Every op at every magnitude and sign, applied batched, equals torchvision's per-image result
    (uint8 exactly; float up to float32 rounding of the sharpness blur)."""
    op, mag = every_draw()
    x = images(3, c, *size, seed=c, dtype=dtype)
    xb, opb, magb = x.repeat(len(op), 1, 1, 1), op.repeat_interleave(3), mag.repeat_interleave(3)
    out = apply_trivial_augment(xb, opb, magb)
    assert out.shape == xb.shape and out.dtype == xb.dtype
    for i in range(len(xb)):
        ref = reference(xb[i], OPS[opb[i]], float(magb[i]))
        if dtype == torch.uint8:
            assert torch.equal(out[i], ref), (OPS[opb[i]], float(magb[i]))
        else:
            torch.testing.assert_close(out[i], ref, rtol=0, atol=1e-6, msg=f"{OPS[opb[i]]} {float(magb[i])}")


def test_per_image_draws_differ_within_a_batch():
    x = images(1, 1, 28, 28, seed=0).expand(64, -1, -1, -1).contiguous()  # one image, 64 times
    op, mag = sample_trivial_augment(64, torch.Generator().manual_seed(0))
    assert len(set(op.tolist())) >= 10  # not one op for the whole batch (v2 on a batch tensor draws once)
    assert len(set(mag.tolist())) >= 20
    out = trivial_augment_wide(x, torch.Generator().manual_seed(0))
    assert len({tuple(o.flatten().tolist()) for o in out}) >= 30  # the copies came out differently
    assert torch.equal(out, apply_trivial_augment(x, op, mag))  # the same draws, the same images


def test_same_seed_same_augmentation_other_seed_other():
    x = images(32, 3, 16, 16, seed=1)
    a = trivial_augment_wide(x, torch.Generator().manual_seed(5))
    b = trivial_augment_wide(x, torch.Generator().manual_seed(5))
    c = trivial_augment_wide(x, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(x, images(32, 3, 16, 16, seed=1))  # the input is left as it was


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("c", [1, 3])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_shape_dtype_range_and_device(device, c, dtype):
    x = images(48, c, 28, 28, seed=2, dtype=dtype).to(device)
    out = trivial_augment_wide(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == dtype and out.device == x.device
    if dtype == torch.float32:
        assert out.min() >= 0 and out.max() <= 1
    if device == "cuda":  # the same draws give the same images as on the CPU (uint8; float up to rounding)
        ref = trivial_augment_wide(x.cpu(), torch.Generator().manual_seed(0))
        diff = (out.cpu().float() - ref.float()).abs()
        assert (diff > (1 if dtype == torch.uint8 else 1e-5)).float().mean() < 1e-3


def test_identity_draws_and_zero_magnitudes_leave_images_unchanged():
    x = images(6, 3, 12, 12, seed=3)
    ident = torch.full((6,), OPS.index("Identity"))
    assert torch.equal(apply_trivial_augment(x, ident, torch.zeros(6, dtype=torch.float64)), x)
    for name in ("ShearX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast", "Sharpness"):
        op = torch.full((6,), OPS.index(name))
        assert torch.equal(apply_trivial_augment(x, op, torch.zeros(6, dtype=torch.float64)), x), name
    bits8 = torch.full((6,), 8.0, dtype=torch.float64)
    assert torch.equal(apply_trivial_augment(x, torch.full((6,), OPS.index("Posterize")), bits8), x)


def test_translate_moves_pixels_with_zero_fill():
    x = images(2, 1, 8, 8, seed=4)
    out = apply_trivial_augment(x, torch.tensor([OPS.index("TranslateX"), OPS.index("TranslateY")]),
                                torch.tensor([3.9, -2.2], dtype=torch.float64))  # int(): 3 and -2 pixels
    assert torch.equal(out[0, ..., 3:], x[0, ..., :-3]) and not out[0, ..., :3].any()
    assert torch.equal(out[1, ..., :-2, :], x[1, ..., 2:, :]) and not out[1, ..., -2:, :].any()


def test_draws_are_uniform_over_ops_bins_and_signs():
    from scipy.stats import chisquare

    n = 14000
    g = torch.Generator().manual_seed(123)
    op, mag = sample_trivial_augment(n, g)
    counts = torch.bincount(op, minlength=len(OPS))
    assert chisquare(counts.numpy()).pvalue > 1e-3, counts.tolist()
    assert counts.min() > 0.85 * n / len(OPS)
    mags, signed = _tables(31)
    rot = op == OPS.index("Rotate")
    values, per_value = torch.unique(mag[rot].abs(), return_counts=True)
    assert torch.equal(values, torch.unique(mags[OPS.index("Rotate")]))  # every bin, nothing else
    assert chisquare(per_value.numpy()).pvalue > 1e-3
    negative = (mag[signed[op]] < 0).float().mean()
    assert 0.47 < negative < 0.53  # zero magnitudes (bin 0) cannot be negative: 0.5 * 30/31 expected
    for k, name in enumerate(OPS):  # every value drawn is in the op's own table (up to sign)
        drawn = torch.unique(mag[op == k].abs() if signed[k] else mag[op == k])
        assert bool(torch.isin(drawn, mags[k]).all()), name


def test_rejects_what_torchvision_rejects():
    with pytest.raises(ValueError, match="1 or 3 channels"):
        trivial_augment_wide(torch.zeros(2, 2, 8, 8, dtype=torch.uint8), torch.Generator())
    with pytest.raises(ValueError, match="uint8 or float"):
        trivial_augment_wide(torch.zeros(2, 1, 8, 8, dtype=torch.int64), torch.Generator())


# ---- in the training loop -----------------------------------------------------------

def _fit(augment: str, steps: int = 4):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 256, (32, 1, 8, 8), generator=g).to(torch.uint8), torch.arange(32) % 4
    torch.manual_seed(0)
    model = build_model("test_resnet", 4, 1)
    return training.fit(model, training.batch_sources(8, (x, y)), (x[:8], y[:8]), steps=steps, lr=3e-3,
                        weight_decay=0.05, seed=0, eval_every=2, progress=False, augment=augment)[1]


def test_standard_augment_never_calls_trivial_augment(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("TrivialAugmentWide ran on the standard (crop/flip only) path")

    before = _fit("standard")
    monkeypatch.setattr(training, "trivial_augment_wide", boom)
    assert _fit("standard")["train_loss"] == before["train_loss"]


def test_classic_is_standard_plus_trivial_augment_drawn_from_the_loops_generator(monkeypatch):
    calls = []

    def spy(x, gen):
        calls.append((x.shape, x.dtype, x.device.type, isinstance(gen, torch.Generator)))
        return x  # no augmentation and no draws: the loop must then be exactly the standard one

    monkeypatch.setattr(training, "trivial_augment_wide", spy)
    assert _fit("classic")["train_loss"] == _fit("standard")["train_loss"]
    assert calls and all(c == ((8, 1, 8, 8), torch.uint8, "cpu", True) for c in calls)
    monkeypatch.undo()
    classic = _fit("classic")
    assert classic["train_loss"] == _fit("classic")["train_loss"]  # deterministic given the seed
    assert classic["train_loss"] != _fit("standard")["train_loss"]


def test_bench_quick_times_both_sides(tmp_path, monkeypatch):
    from bench import augment as bench

    monkeypatch.chdir(tmp_path)  # no prepared dataset here: noise images
    res = bench.main(["--quick", "--device", "cpu", "--repeats", "1", "--out-dir", str(tmp_path)])
    assert (tmp_path / "augment-cpu.json").exists() and res["settings"]["images"].startswith("uniform noise")
    for side in ("batched", "per_image"):
        assert res["augmentation"]["batch_16"][side]["ms_per_batch"] > 0
        assert res["training"][side]["seconds_per_step"] > 0
    assert res["training"]["ratio_steps_per_second"]["best"] == pytest.approx(
        res["training"]["per_image"]["seconds_per_step"] / res["training"]["batched"]["seconds_per_step"])
