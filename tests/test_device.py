"""core.device: the device policy, and every CUDA-only path (bf16 autocast, channels_last, fused
AdamW / foreach EMA, compile) exercised on CPU by forcing the CUDA policy there."""
from __future__ import annotations

import pytest
import torch
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file

from pipeline import train_generator as tg
from pipeline.config import Paths, SampleConfig
from pipeline.core.device import DevicePolicy, as_policy, policy_for
from pipeline.core.io import read_json
from pipeline.models.classifier import build_model
from pipeline.models.registry import load_generator
from pipeline.training import checkpoint
from pipeline.training import diffusion as td
from pipeline.training import gan as train_gan
from pipeline.training.classifier import batch_sources, fit, predict_proba
from tests.helpers import SIZE, fresh_backbone, make_prepared, tiny_data, tiny_params, toy_images

CUDA_LIKE = DevicePolicy.cuda_like("cpu")
SAMPLE = SampleConfig(sampler="dpm++", num_inference_steps=2, guidance_scale=2.0)
KINDS = ["unet", "dit", "cgan", "datasetgan"]


@pytest.fixture
def forced_cuda_policy(monkeypatch):
    """Every policy the pipeline asks for is the CUDA one (on the CPU)."""
    monkeypatch.setattr(DevicePolicy, "for_device",
                        classmethod(lambda cls, device, mixed_precision="auto", compile=False: cls.cuda_like(device)))
    return CUDA_LIKE


def test_policy_follows_the_device_and_params():
    cuda = DevicePolicy.for_device("cuda")  # no GPU needed to decide
    assert (cuda.bf16, cuda.channels_last, cuda.fused_optimizer, cuda.pin_memory, cuda.compile) == (
        True, False, True, True, False)  # channels_last measured slower for the UNet on an H200
    assert DevicePolicy.for_device("cuda", "no").autocast_dtype is None
    cpu = DevicePolicy.for_device("cpu", "no")
    assert (cpu.bf16, cpu.channels_last, cpu.fused_optimizer, cpu.pin_memory) == (False, False, True, False)
    assert DevicePolicy.for_device("cpu", "bf16").mixed_precision == "bf16"
    params = tiny_params(base={"mixed_precision": "bf16", "compile": True})
    assert policy_for(params.base) == DevicePolicy("cpu", bf16=True, fused_optimizer=True, compile=True)
    assert as_policy(CUDA_LIKE) is CUDA_LIKE and as_policy("cpu").device == "cpu"
    assert CUDA_LIKE.as_record() == {"device": "cpu", "precision": "bf16 autocast", "channels_last": True,
                                     "fused_optimizer": True, "compile": False, "pin_memory": False}


def test_autocast_and_layout_of_the_cuda_policy_on_cpu():
    conv = CUDA_LIKE.prepare(torch.nn.Conv2d(1, 4, 3))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and conv.weight.dtype == torch.float32
    x = CUDA_LIKE.inputs(torch.randn(2, 1, 8, 8))
    assert x.is_contiguous(memory_format=torch.channels_last)
    with CUDA_LIKE.autocast():
        assert conv(x).dtype == torch.bfloat16
    with DevicePolicy("cpu").autocast():
        assert conv(x).dtype == torch.float32
    opt = CUDA_LIKE.adamw(conv.parameters(), lr=1e-3)
    assert opt.defaults["fused"] is True


def test_resume_puts_the_ema_on_the_training_device(tmp_path):
    """Checkpoints are read onto the CPU; EMAModel.load_state_dict keeps those tensors, so resume must
    move them (on CUDA the next ema.step would mix devices: the cgan resume bug). The 'meta' device
    stands in for a GPU."""
    model = torch.nn.Linear(3, 2)
    ema = EMAModel(model.parameters(), decay=0.9)
    checkpoint.save(tmp_path, "e" * 64, 1, {"ema": ema}, torch.zeros(1), 0.0)
    fresh = EMAModel(torch.nn.Linear(3, 2).parameters(), decay=0.9)
    checkpoint.resume(tmp_path, "e" * 64, {"ema": fresh}, torch.device("meta"))
    assert [p.device.type for p in fresh.shadow_params] == ["meta", "meta"]


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_diffusion_kill_and_resume_under_the_cuda_policy(tmp_path, kind):
    cfg = tiny_params(kind=kind, steps=6).train_generator
    data = tiny_data()
    run = dict(cfg=cfg, data=data, seed=1, chash="p" * 64, policy=CUDA_LIKE)
    straight = td.train(fresh_backbone(cfg), ckpt_dir=tmp_path / "a", **run)
    td.train(fresh_backbone(cfg), ckpt_dir=tmp_path / "b", stop_at=4, **run)  # "killed" after step 4
    resumed = td.train(fresh_backbone(cfg, seed=99), ckpt_dir=tmp_path / "b", **run)
    assert resumed.resumed_from == 4 and resumed.losses == straight.losses
    a, b = straight.ema_model.state_dict(), resumed.ema_model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    saved = torch.load(sorted((tmp_path / "b").glob("ckpt-*.pt"))[-1], weights_only=True)
    assert saved["state"]["optimizer"]["param_groups"][0]["fused"] is True


CGAN = {"batch_size": 16, "cgan": {"z_dim": 8, "g_channels": 16, "d_channels": 8}}


def test_cgan_kill_and_resume_under_the_cuda_policy(tmp_path):
    params = tiny_params(kind="cgan", steps=6, **CGAN)

    def fit(ckpt_dir, init_seed=0, **kw):
        torch.manual_seed(init_seed)
        return train_gan.fit(params, tiny_data(), None, ckpt_dir, "c" * 64, CUDA_LIKE, **kw)

    straight = fit(tmp_path / "a")
    fit(tmp_path / "b", stop_at=4)
    resumed = fit(tmp_path / "b", init_seed=7)
    assert resumed.resumed_from == 4
    a, b = straight.generator.model.state_dict(), resumed.generator.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    images = resumed.generator.sample(torch.tensor([0, 1]), [0, 1])
    assert images.dtype == torch.uint8 and images.shape == (2, 1, SIZE, SIZE)


@pytest.mark.parametrize("kind", KINDS)
def test_stage_under_the_cuda_policy_writes_fp32_weights_and_samples_uint8(tmp_path, forced_cuda_policy, kind):
    make_prepared(tmp_path)
    extra = {"datasetgan": {"feature_draws": 1, "interpreter_steps": 10, "label_tries": 2, "feature_timestep": 20}} \
        if kind == "datasetgan" else {}
    if kind == "cgan":
        extra = CGAN
    meta = tg.run(tiny_params(kind=kind, steps=4, **extra), Paths(root=tmp_path))
    assert meta["policy"] == CUDA_LIKE.as_record() and meta["mixed_precision"] == "bf16"
    folder = Paths(root=tmp_path).generator
    weights = [w for f in folder.rglob("*.safetensors") for w in load_file(str(f)).values()]
    assert weights and {w.dtype for w in weights if w.is_floating_point()} == {torch.float32}
    generator = load_generator(folder, forced_cuda_policy)
    images = generator.sample(torch.tensor([0, 1, 1]), [5, 6, 7], SAMPLE)
    assert images.dtype == torch.uint8 and images.shape == (3, 1, SIZE, SIZE) and images.device.type == "cpu"
    again = load_generator(folder, forced_cuda_policy).sample(torch.tensor([0, 1, 1]), [5, 6, 7], SAMPLE)
    assert torch.equal(images, again)  # each image from its own seed, also in bf16


def test_bf16_params_reach_generator_training_and_are_recorded(tmp_path):
    make_prepared(tmp_path)
    meta = tg.run(tiny_params(base={"mixed_precision": "bf16"}, steps=3), Paths(root=tmp_path))
    assert meta["mixed_precision"] == "bf16" and meta["policy"]["precision"] == "bf16 autocast"
    assert read_json(Paths(root=tmp_path).generator / "generator.json")["policy"]["channels_last"] is False


def test_classifier_under_the_cuda_policy(forced_cuda_policy):
    """NHWC, fused AdamW; on a CPU in fp32 (for_classifiers drops bf16 there; tests/test_gpu.py runs bf16)."""
    x, y = toy_images()
    torch.manual_seed(0)
    model, hist = fit(build_model("test_resnet", 2, 1), batch_sources(8, (x, y)), (x, y), steps=6, lr=3e-3,
                                 weight_decay=0.05, seed=0, device=CUDA_LIKE, augment="classic", eval_every=3,
                                 progress=False)
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert len(hist["train_loss"]) == 2 and all(torch.isfinite(torch.tensor(hist["train_loss"])))
    p = predict_proba(model, x, 8, CUDA_LIKE)
    assert p.dtype == torch.float32 and torch.allclose(p.sum(1), torch.ones(len(x)), atol=1e-5)


def test_classifiers_train_nhwc_under_the_default_policy():
    """for_classifiers: the timm classifiers take NHWC on every device (1.3x per CPU step), the generator's
    nets keep the policy's own layout."""
    cpu = DevicePolicy.for_device("cpu", "no")
    assert not cpu.channels_last
    assert cpu.for_classifiers() == DevicePolicy("cpu", channels_last=True, fused_optimizer=True)
    # fp32 on CPU even where the generator takes bf16 (oneDNN's bf16 conv backward is unreliable on small maps)
    assert not DevicePolicy("cpu", bf16=True).for_classifiers().bf16
    assert DevicePolicy("cuda", bf16=True).for_classifiers().bf16
    x, y = toy_images()
    model, _ = fit(build_model("test_resnet", 2, 1), batch_sources(8, (x, y)), (x, y), steps=2, lr=1e-3,
                              weight_decay=0.0, seed=0, device="cpu", eval_every=2, progress=False)
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.slow
def test_compile_smoke():
    """base.compile: the classifier trains compiled (inductor, C++ on CPU) and its weights keep their
    uncompiled names. (The diffusion loop compiled is measured by bench/gpu_check.py on a GPU.)"""
    policy = DevicePolicy("cpu", compile=True)
    x, y = toy_images()
    model, hist = fit(build_model("test_resnet", 2, 1), batch_sources(8, (x, y)), (x, y), steps=2, lr=1e-3,
                                 weight_decay=0.0, seed=0, device=policy, eval_every=2, progress=False)
    assert torch.isfinite(torch.tensor(hist["train_loss"])).all()
    assert not any("_orig_mod" in k for k in model.state_dict())
