"""The CUDA paths on a real GPU (marked gpu: skipped without CUDA; bench/gpu_check.py runs them).

Self-contained (no tests.helpers, so no ``datasets``): a GPU box runs it with a few carried wheels.
CUDA results agree with CPU ones within float tolerance, not bit for bit; on one device a resumed
run is compared with an uninterrupted one within a tolerance.
"""
from __future__ import annotations

import pytest
import torch

from pipeline.config import SampleConfig, params_from_dict
from pipeline.core.device import DevicePolicy
from pipeline.models.diffusion import build_backbone, build_unet
from pipeline.training import diffusion as td
from pipeline.training import gan as train_gan
from pipeline.training.generator import TrainData

CUDA = torch.cuda.is_available()
SIZE = 8
SAMPLE = SampleConfig(sampler="dpm++", num_inference_steps=2, guidance_scale=2.0)
TINY = {"block_out_channels": (8, 16), "batch_size": 8, "warmup_steps": 2, "log_every": 2, "checkpoint_every": 3,
        "ema_decay": 0.9, "steps": 6, "dit": {"patch_size": 2, "num_layers": 2, "num_heads": 2, "head_dim": 8},
        "cgan": {"z_dim": 8, "g_channels": 16, "d_channels": 8}}


def params(kind: str, profile: str = "micro", **train):
    return params_from_dict({"base": {"profile": profile, "device": "cuda" if CUDA else "cpu", "seed": 3},
                             "train_generator": {**TINY, "kind": kind, **train}})


def toy_data(device: str) -> TrainData:
    x = torch.zeros(16, 1, SIZE, SIZE, dtype=torch.uint8)
    x[:8, :, :4, :4] = 255
    x[8:, :, 4:, 4:] = 255
    return TrainData(x.to(device), torch.tensor([0] * 8 + [1] * 8, device=device), 2, class_names=["a", "b"])


def close(a: dict, b: dict, tol: float = 1e-4) -> bool:
    return all(torch.allclose(a[k].float(), b[k].float(), atol=tol, rtol=tol) for k in a)


def test_policy_of_the_device():
    """Also runs on CPU (the rehearsal): the policy the pipeline picks here."""
    policy = DevicePolicy.for_device("cuda" if CUDA else "cpu")
    assert policy.fused_optimizer and policy.pin_memory == CUDA and not policy.channels_last
    assert policy.for_classifiers().channels_last
    assert policy.bf16 or not CUDA


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_diffusion_kill_resume_and_sample_on_cuda(tmp_path, kind):
    policy = DevicePolicy.for_device("cuda")
    cfg = params(kind).train_generator
    data = toy_data("cuda")

    def fresh(seed: int = 0):
        torch.manual_seed(seed)
        return build_backbone(cfg, SIZE, 1, 2)

    run = dict(cfg=cfg, data=data, seed=1, chash="g" * 64, policy=policy)
    straight = td.train(fresh(), ckpt_dir=tmp_path / "a", **run)
    td.train(fresh(), ckpt_dir=tmp_path / "b", stop_at=4, **run)
    resumed = td.train(fresh(99), ckpt_dir=tmp_path / "b", **run)
    assert resumed.resumed_from == 4
    assert close(straight.ema_model.state_dict(), resumed.ema_model.state_dict())
    from pipeline.models.diffusion import DiffusionGenerator, make_pipeline, train_scheduler

    pipe = make_pipeline(resumed.ema_model.to("cuda"), dict(train_scheduler(cfg).config), ["a", "b"], SIZE, policy)
    gen = DiffusionGenerator(pipe, {"channels": 1, "image_size": SIZE})
    images = gen.sample(torch.tensor([0, 1]), [1, 2], SAMPLE)
    assert images.dtype == torch.uint8 and images.shape == (2, 1, SIZE, SIZE) and images.device.type == "cpu"


@pytest.mark.gpu
def test_cgan_resume_on_cuda_keeps_the_ema_on_the_gpu(tmp_path):
    policy = DevicePolicy.for_device("cuda")
    p = params("cgan", batch_size=16)

    def fit(ckpt_dir, init_seed=0, **kw):
        torch.manual_seed(init_seed)
        return train_gan.fit(p, toy_data("cuda"), None, ckpt_dir, "c" * 64, policy, **kw)

    straight = fit(tmp_path / "a")
    fit(tmp_path / "b", stop_at=4)
    resumed = fit(tmp_path / "b", init_seed=7)  # crashed with mixed devices before the EMA was moved
    assert resumed.resumed_from == 4
    assert close(straight.generator.model.state_dict(), resumed.generator.model.state_dict())
    assert resumed.generator.sample(torch.tensor([0, 1]), [0, 1]).dtype == torch.uint8


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [256, 1024])
def test_gpu_profile_unet_training_step_fits(batch):
    """One bf16 training step of the gpu profile's UNet (35.7M parameters) at this batch fits in the
    memory of an 80 GB card (the JSON of bench/gpu_check.py records the peak)."""
    policy = DevicePolicy.for_device("cuda")
    cfg = params("unet", profile="gpu", batch_size=batch, block_out_channels=(128, 256, 256, 256)).train_generator
    model = policy.prepare(build_unet(cfg, 28, 1, 10)).train()
    torch.cuda.reset_peak_memory_stats()
    x0 = torch.randn(batch, 1, 32, 32, device="cuda")
    with policy.autocast():
        loss = td.noised_loss(model, td.train_scheduler(cfg), x0, torch.randint(10, (batch,), device="cuda"),
                              torch.randn_like(x0), torch.randint(1000, (batch,), device="cuda"),
                              memory_format=policy.memory_format)
    loss.backward()
    torch.cuda.synchronize()
    assert torch.isfinite(loss) and torch.cuda.max_memory_allocated() < 80 * 2 ** 30
