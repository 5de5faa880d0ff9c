"""Classic augmentation of whole batches on the batch's device: TrivialAugmentWide with its own
draw per image, and random crop + horizontal flip.

torchvision's ``v2.TrivialAugmentWide`` applied to a batch tensor draws ONE op and magnitude for
the whole batch; applied image by image it is a Python loop on the CPU. Here each image draws its
own op, magnitude bin and sign from the caller's generator (so the seed fixes the augmentation),
the batch is grouped by op and each group is transformed at once with per-image magnitudes: the
affine ops (shear, translate, rotate) as one ``grid_sample``, the colour ops as per-image blends,
posterize / solarize with per-image masks and thresholds, autocontrast and equalize with
torchvision's kernels (which already work image by image on a batch). The op set, the magnitude
tables and each op's arithmetic are torchvision's (nearest interpolation, fill 0), so an image gets
what torchvision's per-image transform gives it for the same op and magnitude (tested).

Images are N,C,H,W with C = 1 or 3, uint8 (0..255) or float (0..1), as torchvision takes them.
"""
from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F


def crop_flip(x: torch.Tensor, gen: torch.Generator, pad: int | None = None) -> torch.Tensor:
    """Batched random crop with zero padding + horizontal flip, one draw per image."""
    n, c, h, w = x.shape
    pad = max(1, round(h / 8)) if pad is None else pad
    dev = x.device
    padded = F.pad(x, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (n,), generator=gen).to(dev)
    ox = torch.randint(0, 2 * pad + 1, (n,), generator=gen).to(dev)
    flip = (torch.rand(n, generator=gen) < 0.5).to(dev)
    rows = oy[:, None] + torch.arange(h, device=dev)
    cols = ox[:, None] + torch.arange(w, device=dev)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    return padded[torch.arange(n, device=dev)[:, None, None, None], torch.arange(c, device=dev)[None, :, None, None],
                  rows[:, None, :, None], cols[:, None, None, :]]


# ---- TrivialAugmentWide: op set and magnitudes (torchvision's _AUGMENTATION_SPACE) -------------

def cutout(x: torch.Tensor, gen: torch.Generator, ratio: float = 0.5) -> torch.Tensor:
    """Zero one square of ``ratio`` of the side at a random centre per image (it may reach past the
    border): DiffAugment's and FixMatch's Cutout. Drawn on ``gen``'s device, applied on ``x``'s."""
    n, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    oy = (torch.randint(0, h + 1 - ch % 2, (n, 1, 1), generator=gen, device=gen.device) - ch // 2).to(x.device)
    ox = (torch.randint(0, w + 1 - cw % 2, (n, 1, 1), generator=gen, device=gen.device) - cw // 2).to(x.device)
    ys = torch.arange(h, device=x.device)[None, :, None]
    xs = torch.arange(w, device=x.device)[None, None, :]
    inside = (ys >= oy) & (ys < oy + ch) & (xs >= ox) & (xs < ox + cw)
    return x * ~inside[:, None]


def _lin(start: float, end: float):
    return lambda bins: torch.linspace(start, end, bins)


# name -> (magnitudes of the bins, or None: the op has no magnitude; signed: a random sign per draw)
TRIVIAL_AUGMENT_WIDE = {
    "Identity": (None, False),
    "ShearX": (_lin(0.0, 0.99), True),
    "ShearY": (_lin(0.0, 0.99), True),
    "TranslateX": (_lin(0.0, 32.0), True),  # pixels, whatever the image size (as torchvision)
    "TranslateY": (_lin(0.0, 32.0), True),
    "Rotate": (_lin(0.0, 135.0), True),  # degrees
    "Brightness": (_lin(0.0, 0.99), True),  # factor 1 + magnitude
    "Color": (_lin(0.0, 0.99), True),
    "Contrast": (_lin(0.0, 0.99), True),
    "Sharpness": (_lin(0.0, 0.99), True),
    "Posterize": (lambda bins: (8 - (torch.arange(bins) / ((bins - 1) / 6))).round().int(), False),  # bits
    "Solarize": (_lin(1.0, 0.0), False),  # threshold, share of the maximum value
    "AutoContrast": (None, False),
    "Equalize": (None, False),
}
OPS = tuple(TRIVIAL_AUGMENT_WIDE)
_AFFINE = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")


@lru_cache(maxsize=8)
def _tables(bins: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(magnitude of every op and bin (ops, bins) float64, 0 where the op has none; signed (ops,) bool)."""
    mags = torch.zeros(len(OPS), bins, dtype=torch.float64)
    for i, (fn, _) in enumerate(TRIVIAL_AUGMENT_WIDE.values()):
        if fn is not None:
            mags[i] = fn(bins).double()  # the float32 values torchvision reads with float(), exactly
    return mags, torch.tensor([s for _, s in TRIVIAL_AUGMENT_WIDE.values()])


def sample_trivial_augment(n: int, gen: torch.Generator, num_magnitude_bins: int = 31
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """One TrivialAugmentWide draw per image -> (op index into ``OPS`` (n,) int64, signed
    magnitude (n,) float64; 0 for ops without one). Op, bin and sign are uniform, as torchvision's."""
    op = torch.randint(len(OPS), (n,), generator=gen)
    bin_ = torch.randint(num_magnitude_bins, (n,), generator=gen)
    negative = torch.rand(n, generator=gen) <= 0.5
    mags, signed = _tables(num_magnitude_bins)
    mag = mags[op, bin_]
    return op, torch.where(signed[op] & negative, -mag, mag)


def trivial_augment_wide(x: torch.Tensor, gen: torch.Generator, num_magnitude_bins: int = 31) -> torch.Tensor:
    """TrivialAugmentWide on a batch, one op and magnitude per image, computed on ``x``'s device."""
    return apply_trivial_augment(x, *sample_trivial_augment(len(x), gen, num_magnitude_bins))


def apply_trivial_augment(x: torch.Tensor, op: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """Apply op ``op[i]`` (index into ``OPS``) with ``magnitude[i]`` to image ``i`` of ``x``."""
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"trivial_augment_wide takes N,C,H,W images with 1 or 3 channels, got shape {tuple(x.shape)}")
    if not (x.is_floating_point() or x.dtype == torch.uint8):
        raise ValueError(f"trivial_augment_wide takes uint8 or float images, got {x.dtype}")
    op, magnitude = op.cpu(), magnitude.cpu().double()
    out = x.clone()
    affine = torch.isin(op, torch.tensor([OPS.index(k) for k in _AFFINE]))
    groups = [(_affine, affine)] + [(fn, op == OPS.index(name)) for name, fn in _POINTWISE.items()]
    for fn, sel in groups:
        idx = sel.nonzero().squeeze(1)  # grouped on the CPU: no device sync per op
        if len(idx):
            i = idx.to(x.device)
            out[i] = fn(x[i], op[idx], magnitude[idx])
    return out


# ---- the ops, on a group of images with per-image magnitudes (op, mag: CPU tensors) -------------

def _bound(x: torch.Tensor) -> float:
    return 1.0 if x.is_floating_point() else 255.0


def _float(x: torch.Tensor) -> torch.dtype:
    return x.dtype if x.is_floating_point() else torch.float32


def _per_image(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.to(device=x.device, dtype=_float(x)).view(-1, 1, 1, 1)


def _affine(x: torch.Tensor, op: torch.Tensor, mag: torch.Tensor) -> torch.Tensor:
    """Shear / translate / rotate: torchvision's inverse affine matrices (float64, then the image's
    float type, as torchvision), its grid and nearest ``grid_sample`` with zero fill, in one call."""
    n, _, h, w = x.shape
    theta = torch.zeros(n, 2, 3, dtype=torch.float64)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    sx, sy = op == OPS.index("ShearX"), op == OPS.index("ShearY")
    tx, ty = op == OPS.index("TranslateX"), op == OPS.index("TranslateY")
    rot = op == OPS.index("Rotate")
    # shear about the top-left corner (torchvision's center=[0, 0]): x_in = x + m (y + h/2)
    theta[sx, 0, 1], theta[sx, 0, 2] = mag[sx], mag[sx] * h * 0.5
    theta[sy, 1, 0], theta[sy, 1, 2] = mag[sy], mag[sy] * w * 0.5
    theta[tx, 0, 2], theta[ty, 1, 2] = -mag[tx].trunc(), -mag[ty].trunc()  # int(magnitude) pixels
    r = torch.deg2rad(-(mag[rot] % 360.0))  # F.rotate: angle % 360, matrix of -angle about the center
    theta[rot, 0, 0], theta[rot, 0, 1] = r.cos(), r.sin()
    theta[rot, 1, 0], theta[rot, 1, 1] = -r.sin(), r.cos()
    dtype = _float(x)
    theta = theta.to(dtype).to(x.device)
    base = torch.empty(h, w, 3, dtype=dtype, device=x.device)
    base[..., 0] = torch.linspace((1.0 - w) * 0.5, (w - 1.0) * 0.5, w, device=x.device)
    base[..., 1] = torch.linspace((1.0 - h) * 0.5, (h - 1.0) * 0.5, h, device=x.device)[:, None]
    base[..., 2] = 1.0
    scale = torch.tensor([0.5 * w, 0.5 * h], dtype=dtype, device=x.device)
    grid = base.view(1, h * w, 3).expand(n, -1, -1).bmm(theta.transpose(1, 2) / scale).view(n, h, w, 2)
    out = F.grid_sample(x.to(dtype), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return out if x.is_floating_point() else out.round_().to(x.dtype)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """x * f + other * (1 - f), clamped, truncated back to uint8 (torchvision's _blend), f per image."""
    # addcmul rounds as torchvision's add_(other, alpha=1 - f) does (a separate mul + add does not)
    out = x.mul(_per_image(factor, x)).addcmul_(other.expand_as(x), _per_image(1.0 - factor, x)).clamp_(0, _bound(x))
    return out if x.is_floating_point() else out.to(x.dtype)


def _gray(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    gray = r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).unsqueeze(1)
    return gray if x.is_floating_point() else gray.floor_()


def _brightness(x, op, mag):
    out = x.mul(_per_image(1.0 + mag, x)).clamp_(0, _bound(x))
    return out if x.is_floating_point() else out.to(x.dtype)


def _color(x, op, mag):
    return x if x.shape[1] == 1 else _blend(x, _gray(x), 1.0 + mag)


def _contrast(x, op, mag):
    gray = _gray(x) if x.shape[1] == 3 else x.to(_float(x))
    return _blend(x, gray.mean(dim=(-3, -2, -1), keepdim=True), 1.0 + mag)


def _sharpness(x, op, mag):
    n, c, h, w = x.shape
    if h <= 2 or w <= 2:
        return x
    a, b = 1.0 / 13.0, 5.0 / 13.0
    kernel = torch.tensor([[a, a, a], [a, b, a], [a, a, a]], dtype=_float(x), device=x.device).expand(c, 1, 3, 3)
    out = x.to(_float(x), copy=True)
    blurred = F.conv2d(out, kernel, groups=c)
    if not x.is_floating_point():
        blurred = blurred.round_()
    view = out[..., 1:-1, 1:-1]  # the border keeps its pixels
    view.addcmul_(blurred.sub_(view), _per_image(1.0 - (1.0 + mag), x))
    out = out.clamp_(0, _bound(x))
    return out if x.is_floating_point() else out.to(x.dtype)


def _posterize(x, op, mag):
    bits = mag.long()
    if x.is_floating_point():
        levels = _per_image((1 << bits).double(), x)
        return x.mul(levels).floor_().clamp_(torch.zeros_like(levels), levels - 1).mul_(1.0 / levels)
    mask = (((1 << bits) - 1) << (8 - bits)).to(torch.uint8).to(x.device).view(-1, 1, 1, 1)
    return x & mask


def _solarize(x, op, mag):
    threshold = _per_image(_bound(x) * mag, x)
    inverted = 1.0 - x if x.is_floating_point() else x.bitwise_not()
    return torch.where(x >= threshold, inverted, x)


def _autocontrast(x, op, mag):
    from torchvision.transforms.v2.functional import autocontrast
    return autocontrast(x)


def _equalize(x, op, mag):
    from torchvision.transforms.v2.functional import equalize
    return equalize(x)


_POINTWISE = {"Brightness": _brightness, "Color": _color, "Contrast": _contrast, "Sharpness": _sharpness,
              "Posterize": _posterize, "Solarize": _solarize, "AutoContrast": _autocontrast, "Equalize": _equalize}
assert set(_POINTWISE) | set(_AFFINE) | {"Identity"} == set(OPS)
