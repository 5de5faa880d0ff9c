"""Kind cgan: a class-conditional GAN that draws an image in one forward pass.

Generator (DCGAN style): a latent z ~ N(0, I) joined with a learned class embedding goes
through a linear layer to a g_channels x s/4 x s/4 map (s = the image side padded up to a
multiple of 4, so 28 stays 28), two blocks of 4x4 stride-2 transposed convolution +
BatchNorm + ReLU that double the side, a 3x3 convolution and tanh to [-1, 1]; the result
is cropped back to the image side.

Discriminator: a projection discriminator (Miyato & Koyama 2018). Spectral-normalised
convolutions with LeakyReLU (two 4x4 stride-2 ones halve the side twice, then a 3x3 one)
and global sum pooling give a feature h; the output is linear(h) + <embed(y), h>: the
class enters as an inner product with the image features, not as an input channel.

Training: hinge loss (D: relu(1 - D(real)) + relu(1 + D(fake)); G: -D(fake)), Adam with
betas (0, 0.99), one D step then one G step on the same fakes. DiffAugment (Zhao et al.
2020) applies random differentiable color / translation / cutout to real and fake images
alike before D sees them, which keeps D from memorising a small training set. The saved
and sampled generator is an EMA of the generator's weights whose BatchNorm statistics are
re-estimated at the end ("standing statistics"). Every random draw of step k comes from
``step_generator(seed, 0, k)``, so a resumed run ends with the weights of an
uninterrupted one.
"""
from __future__ import annotations

import copy
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from pipeline.config import ConfigError, Params, SampleConfig
from pipeline.diffusion import crop_images, padded_size, seeded_noise, to_uint8, to_unit
from pipeline.generators import Fitted
from pipeline.prepare import DataError
from pipeline.storage import read_json, write_json
from pipeline.train_generator import TrainData, generator_meta, load_checkpoint, save_checkpoint, step_generator

log = logging.getLogger(__name__)
BN_BATCHES = 8  # batches that re-estimate the EMA generator's BatchNorm statistics


class CondGenerator(nn.Module):
    def __init__(self, z_dim: int, num_classes: int, channels: int, image_size: int, g_channels: int):
        super().__init__()
        self.z_dim, self.image_size, c = z_dim, image_size, g_channels
        self.base = padded_size(image_size, 3) // 4
        self.embed = nn.Embedding(num_classes, z_dim)
        self.fc = nn.Linear(2 * z_dim, c * self.base ** 2)

        def up(i: int, o: int) -> list[nn.Module]:  # 2x upsampling
            return [nn.ConvTranspose2d(i, o, 4, 2, 1, bias=False), nn.BatchNorm2d(o), nn.ReLU()]

        self.net = nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), *up(c, c // 2), *up(c // 2, c // 4),
                                 nn.Conv2d(c // 4, channels, 3, padding=1), nn.Tanh())

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.fc(torch.cat([z, self.embed(y)], 1)).view(len(z), -1, self.base, self.base)
        return crop_images(self.net(h), self.image_size)


class ProjectionDiscriminator(nn.Module):
    def __init__(self, num_classes: int, channels: int, d_channels: int):
        super().__init__()
        c = d_channels
        self.net = nn.Sequential(
            spectral_norm(nn.Conv2d(channels, c, 4, 2, 1)), nn.LeakyReLU(0.2),
            spectral_norm(nn.Conv2d(c, 2 * c, 4, 2, 1)), nn.LeakyReLU(0.2),
            spectral_norm(nn.Conv2d(2 * c, 4 * c, 3, 1, 1)), nn.LeakyReLU(0.2))
        self.linear = spectral_norm(nn.Linear(4 * c, 1))
        self.embed = spectral_norm(nn.Embedding(num_classes, 4 * c))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.net(x).sum((2, 3))
        return self.linear(h).squeeze(1) + (self.embed(y) * h).sum(1)


# ---- DiffAugment: one random draw per image, from the step's generator ------------------

def _u(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return torch.rand(len(x), 1, 1, 1, generator=gen, device=x.device)


def _color(x, gen):
    x = x + (_u(x, gen) - 0.5)  # brightness
    m = x.mean(1, keepdim=True)
    x = (x - m) * (_u(x, gen) * 2) + m  # saturation (nothing to do on one channel)
    m = x.mean((1, 2, 3), keepdim=True)
    return (x - m) * (_u(x, gen) + 0.5) + m  # contrast


def _translation(x, gen, ratio: float = 0.125):
    """Shift by up to ratio of the side; uncovered pixels are 0 (as in the paper's code)."""
    n, _, h, w = x.shape
    dy, dx = int(h * ratio + 0.5), int(w * ratio + 0.5)
    ty = torch.randint(-dy, dy + 1, (n, 1, 1), generator=gen, device=x.device)
    tx = torch.randint(-dx, dx + 1, (n, 1, 1), generator=gen, device=x.device)
    iy = (torch.arange(h, device=x.device)[None, :, None] + ty).clamp(-1, h) + 1
    ix = (torch.arange(w, device=x.device)[None, None, :] + tx).clamp(-1, w) + 1
    padded = F.pad(x, (1, 1, 1, 1))
    return padded.permute(0, 2, 3, 1)[torch.arange(n, device=x.device)[:, None, None], iy, ix].permute(0, 3, 1, 2)


def _cutout(x, gen, ratio: float = 0.5):
    """Zero one square of ratio of the side at a random center (may reach past the border)."""
    n, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    oy = torch.randint(0, h + 1 - ch % 2, (n, 1, 1), generator=gen, device=x.device) - ch // 2
    ox = torch.randint(0, w + 1 - cw % 2, (n, 1, 1), generator=gen, device=x.device) - cw // 2
    ys = torch.arange(h, device=x.device)[None, :, None]
    xs = torch.arange(w, device=x.device)[None, None, :]
    inside = (ys >= oy) & (ys < oy + ch) & (xs >= ox) & (xs < ox + cw)
    return x * ~inside[:, None]


AUGMENTS = {"color": _color, "translation": _translation, "cutout": _cutout}


def parse_policy(policy: str) -> list[str]:
    names = [p.strip() for p in policy.split(",") if p.strip()]
    bad = [p for p in names if p not in AUGMENTS]
    if bad:
        raise ConfigError(f"train_generator.cgan.diffaugment: unknown policy {bad} (allowed: {', '.join(AUGMENTS)})")
    return names


def diff_augment(x: torch.Tensor, policy: str, gen: torch.Generator) -> torch.Tensor:
    """DiffAugment (Zhao et al. 2020): comma-separated policies, differentiable in x."""
    for name in parse_policy(policy):
        x = AUGMENTS[name](x, gen)
    return x


# ---- training -----------------------------------------------------------------------------

def draw_real(data: TrainData, batch_size: int, hflip: bool, gen: torch.Generator):
    dev = data.images.device
    idx = torch.randint(len(data.images), (batch_size,), generator=gen, device=dev)
    x = to_unit(data.images[idx])
    if hflip:
        x = torch.where((torch.rand(batch_size, generator=gen, device=dev) < 0.5)[:, None, None, None], x.flip(-1), x)
    return x, data.labels[idx]


@torch.no_grad()
def standing_stats(g: CondGenerator, num_classes: int, batch_size: int, gen: torch.Generator) -> CondGenerator:
    """Re-estimate BatchNorm statistics of ``g`` (EMA weights) from its own samples; eval mode."""
    bns = [m for m in g.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
    g.train()
    dev = next(g.parameters()).device
    for _ in range(BN_BATCHES):
        g(torch.randn(batch_size, g.z_dim, generator=gen, device=dev),
          torch.randint(num_classes, (batch_size,), generator=gen, device=dev))
    for m in bns:
        m.momentum = 0.1
    return g.eval()


def fit(params: Params, data: TrainData, accelerator, ckpt_dir: Path, chash: str, *,
        stop_at: int | None = None) -> Fitted:
    """Train (or resume) the GAN. ``stop_at`` ends early after that step's checkpoint (tests)."""
    cfg, gc, seed = params.train_generator, params.train_generator.cgan, params.base.seed
    device = accelerator.device if accelerator is not None else data.images.device
    parse_policy(gc.diffaugment)
    if cfg.init != "scratch":
        log.warning("train_generator.init=%s is ignored by kind cgan (it trains from scratch on train)", cfg.init)
    arch = {"z_dim": gc.z_dim, "num_classes": data.num_classes, "channels": data.channels,
            "image_size": data.image_size, "g_channels": gc.g_channels}
    g = CondGenerator(**arch).to(device).train()
    d = ProjectionDiscriminator(data.num_classes, data.channels, gc.d_channels).to(device).train()
    ema = copy.deepcopy(g)
    opt_g = torch.optim.Adam(g.parameters(), lr=gc.lr_g, betas=(0.0, 0.99))
    opt_d = torch.optim.Adam(d.parameters(), lr=gc.lr_d, betas=(0.0, 0.99))
    n_g, n_d = (sum(p.numel() for p in m.parameters()) for m in (g, d))
    log.info("train_generator: cgan, G %.2fM + D %.2fM params, %d steps of batch %d on %s, diffaugment %r",
             n_g / 1e6, n_d / 1e6, cfg.steps, cfg.batch_size, device, gc.diffaugment)
    losses = torch.zeros(2, cfg.steps, device=device)  # rows: D loss, G loss
    state, path = load_checkpoint(Path(ckpt_dir), chash)
    start, seconds_before = 0, 0.0
    if state is not None:
        try:
            g.load_state_dict(state["model"]["g"])
            d.load_state_dict(state["model"]["d"])
            ema.load_state_dict(state["ema"])
            opt_g.load_state_dict(state["optimizer"]["g"])
            opt_d.load_state_dict(state["optimizer"]["d"])
        except (RuntimeError, KeyError, ValueError, TypeError) as err:
            raise DataError(f"{path}: checkpoint does not fit this model ({str(err).splitlines()[0][:200]}). "
                            "Delete this file and run again.") from None
        start, seconds_before = int(state["step"]), float(state.get("seconds", 0.0))
        losses[:, :start] = state["losses"].to(device)
        torch.set_rng_state(state["rng"]["torch"])
        log.info("resuming from %s (step %d of %d)", path, start, cfg.steps)
    t0 = time.perf_counter()
    for step in range(start, cfg.steps):
        gen = step_generator(seed, 0, step, device)
        real, y = draw_real(data, cfg.batch_size, cfg.hflip, gen)
        fake = g(torch.randn(len(y), gc.z_dim, generator=gen, device=device), y)
        out = d(diff_augment(torch.cat([real, fake.detach()]), gc.diffaugment, gen), torch.cat([y, y]))
        d_loss = F.relu(1 - out[:len(y)]).mean() + F.relu(1 + out[len(y):]).mean()
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()
        d.requires_grad_(False)  # the G step needs gradients through D, not for it
        g_loss = -d(diff_augment(fake, gc.diffaugment, gen), y).mean()
        opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        opt_g.step()
        d.requires_grad_(True)
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))  # warm-up as diffusers' EMAModel
        with torch.no_grad():
            for e, p in zip(ema.parameters(), g.parameters()):
                e.lerp_(p, 1 - decay)
        losses[0, step], losses[1, step] = d_loss.detach(), g_loss.detach()
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            recent = losses[:, max(0, done - cfg.log_every):done].mean(1).tolist()
            log.info("step %d/%d d_loss %.4f g_loss %.4f  %.3f s/step", done, cfg.steps, *recent,
                     (time.perf_counter() - t0) / (done - start))
        if done % cfg.checkpoint_every == 0 or done == cfg.steps or done == stop_at:
            save_checkpoint(Path(ckpt_dir), chash, {
                "step": done, "model": {"g": g.state_dict(), "d": d.state_dict()}, "ema": ema.state_dict(),
                "optimizer": {"g": opt_g.state_dict(), "d": opt_d.state_dict()}, "lr_scheduler": {},
                "losses": losses[:, :done].cpu(), "seconds": seconds_before + time.perf_counter() - t0,
                "rng": {"torch": torch.get_rng_state()}})
        if stop_at is not None and done >= stop_at:
            break
    n_done = min(cfg.steps, stop_at or cfg.steps)
    ema = standing_stats(ema, data.num_classes, cfg.batch_size, step_generator(seed, 0, cfg.steps, device))

    def save(folder: Path) -> Path:
        write_json(folder / "gan" / "config.json", arch)
        weights = folder / "gan" / "generator.safetensors"
        save_file({k: v.detach().contiguous().cpu() for k, v in ema.state_dict().items()}, str(weights))
        return weights

    extra = {"z_dim": gc.z_dim, "image_size_padded": g.base * 4, "discriminator_parameters": n_d}
    history = {"loss": losses[0, :n_done].tolist(), "lr": [gc.lr_g] * n_done, "g_loss": losses[1, :n_done].tolist()}
    return Fitted(GanGenerator(ema, {**generator_meta(cfg, data), **extra}), save, history,
                  (seconds_before + time.perf_counter() - t0) / max(1, n_done), start, n_g, extra)


# ---- sampling -----------------------------------------------------------------------------

class GanGenerator:
    """The EMA generator behind the sample stage's interface (sampler, steps, guidance unused)."""

    def __init__(self, model: CondGenerator, meta: dict):
        self.model, self.meta = model.eval(), meta

    @torch.no_grad()
    def sample(self, labels: torch.Tensor, seeds: list[int], cfg: SampleConfig | None = None) -> torch.Tensor:
        """uint8 images (N,C,H,W, CPU); image i from z seeded by seeds[i] and class labels[i]."""
        dev = next(self.model.parameters()).device
        z = seeded_noise(seeds, (self.model.z_dim,), dev)
        return to_uint8(self.model(z, labels.to(dev))).cpu()


def load(folder: Path, meta: dict, device: str) -> GanGenerator:
    """The generator written by train_generator for kind cgan."""
    folder = Path(folder)
    model = CondGenerator(**read_json(folder / "gan" / "config.json"))
    model.load_state_dict(load_file(str(folder / "gan" / "generator.safetensors")))
    return GanGenerator(model.to(device), meta)
