"""One short GPU run: the CUDA tests, then each part measured with a cap, JSON per part.

    python -m bench.gpu_check --out-dir DIR [--wheels .gpu/wheels] [--data .gpu/fmnist.npz]
    python -m bench.gpu_check --device cpu --tiny   # the rehearsal (a slow test runs it)

It runs on a GPU machine's own Python and torch, from a working tree, plus the wheels that
``make gpu-wheels`` puts in ``.gpu/`` (the packages such a machine lacks) and a Fashion-MNIST subset.
Parts (each in its own process, killed at its cap; the JSON says which finished):

- ``tests``: ``pytest -m gpu tests/test_gpu.py`` (micro runs of every generator kind on the device);
- ``train``: the gpu profile's UNet (35.7M parameters, 32 px, batch 256): the pipeline's training step
  (draw, noise, loss, backward, clip, fused AdamW, foreach EMA) in steps/s and MFU (FLOPs counted by
  ``FlopCounterMode`` over the peak measured by a bf16 matmul), bf16 with channels_last on and off,
  compile on and off; peak memory at batch 256 and 1024;
- ``sample``: our sampler (``ClassConditionalPipeline``, batch 256 and 1024) against the stock diffusers
  loop (one image per call, fp32) on the UNet just trained: images/s, and the Frechet distance between
  the two sets (efficientnet-lite0 features) against the floor of two sets of our own from other seeds;
- ``classifier``: ``fit`` steps/s (resnet10t, batch 64 and 256, classic augmentation);
- ``ops``: microseconds per small op (eager dispatch + launch), to calibrate ``bench/gpu_budget.py``.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from bench.common import cpu_model

ROOT = Path(__file__).resolve().parents[1]
PARTS = {"tests": 90, "train": 240, "sample": 90, "classifier": 45, "ops": 20}  # caps in seconds on a GPU (x3 on CPU)


# ---- shared ------------------------------------------------------------------------------

def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int = 1) -> float:
    """Seconds of ``fn()`` (the median of ``repeats`` runs), the device synchronised around it."""
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def peak_reset(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_mib(device: str) -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated() / 2 ** 20, 1) if device.startswith("cuda") else None


def part_file(args, name: str) -> Path:
    return Path(args.out_dir) / f"gpu_check-{name}.json"


def write_part(args, name: str, result: dict) -> None:
    """The part's JSON so far (a part stopped at its cap keeps what it measured)."""
    part_file(args, name).write_text(json.dumps(result, indent=2, default=str) + "\n")


def frechet(a, b) -> float:
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric

    return float(fid_statistics_to_metric(fid_features_to_statistics(a.double()),
                                          fid_features_to_statistics(b.double()), False)[KEY_METRIC_FID])


def load_images(args, n: int):
    """uint8 N,1,28,28 images and labels: the carried Fashion-MNIST subset, else toy blobs."""
    import numpy as np
    import torch

    if args.data and Path(args.data).exists():
        d = np.load(args.data)
        x, y = torch.from_numpy(d["x"][:n]), torch.from_numpy(d["y"][:n]).long()
        return x.reshape(len(x), 1, 28, 28), y, f"Fashion-MNIST train subset ({len(x)} images)"
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % 10
    x = (torch.rand(n, 1, 28, 28, generator=g) * 60).to(torch.uint8)
    for c in range(10):  # class c: a bright bar at row 2c
        x[y == c, :, 2 * c + 4:2 * c + 8, 4:24] = 230
    return x, y, f"toy images ({n}), no --data given"


def unet_cfg(args):
    from pipeline.config import params_from_dict

    cfg = params_from_dict({"base": {"profile": "micro" if args.tiny else "gpu"}}).train_generator
    return cfg.model_copy(update={"batch_size": 8 if args.tiny else 256, "init": "scratch"})  # conditional steps


def matmul_peak(device: str, tiny: bool) -> float:
    """Measured dense bf16 matmul rate in FLOP/s (the MFU denominator)."""
    import torch

    n = 256 if tiny or not device.startswith("cuda") else 8192
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    sec = timed(lambda: [a @ b for _ in range(10)], device) / 10
    return 2 * n ** 3 / sec


# ---- parts -------------------------------------------------------------------------------

def part_tests(args, device: str) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_gpu.py"]
    cmd += ["-m", "gpu"] if device.startswith("cuda") else ["-m", "gpu or not gpu", "-k", "policy"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
    return {"command": " ".join(cmd[1:]), "exit_status": proc.returncode, "tail": tail}


def train_steps(cfg, data, policy, steps: int, warmup: int):
    """(seconds per step after ``warmup`` steps, seconds of the warm-up, the model with the EMA weights)
    of the pipeline's training step."""
    import torch
    from diffusers.training_utils import EMAModel

    from pipeline.core.seeding import step_rng
    from pipeline.models.diffusion import build_unet, train_scheduler
    from pipeline.training.diffusion import draw_batch, draw_noise, noised_loss

    torch.manual_seed(0)
    model = policy.prepare(build_unet(cfg, 28, 1, 10)).train()
    forward = policy.compiled(model)
    opt = policy.adamw(model.parameters(), lr=cfg.lr)
    ema = EMAModel(model.parameters(), decay=cfg.ema_decay, foreach=policy.fused_optimizer)
    sched = train_scheduler(cfg)

    def step(k: int):
        rng = step_rng(0, 0, k, policy.device)
        x0, labels = draw_batch(data, cfg, k, rng, model.config.sample_size)
        noise, t = draw_noise(x0, sched, rng)
        with policy.autocast():
            loss = noised_loss(forward, sched, x0, labels, noise, t, cfg.snr_gamma, policy.memory_format)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip, foreach=policy.fused_optimizer)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.step(model.parameters())

    warm = timed(lambda: [step(k) for k in range(warmup)], policy.device)
    per = timed(lambda: [step(k) for k in range(warmup, warmup + steps)], policy.device) / steps
    ema.copy_to(model.parameters())
    return per, warm, model


def part_train(args, device: str) -> dict:
    import dataclasses

    import torch
    from safetensors.torch import save_file
    from torch.utils.flop_counter import FlopCounterMode

    from pipeline.core.device import DevicePolicy
    from pipeline.core.tensors import num_parameters
    from pipeline.models.diffusion import build_unet, train_scheduler
    from pipeline.training.diffusion import draw_batch, draw_noise, noised_loss
    from pipeline.training.generator import TrainData

    cfg = unet_cfg(args)
    x, y, source = load_images(args, 512 if args.tiny else 12000)
    data = TrainData(x.to(device), y.to(device), 10)
    base = DevicePolicy.for_device(device)
    steps, warmup = (2, 1) if args.tiny else (30, 5)
    # FLOPs of one step (forward + backward) at the benchmark's batch, counted on the device
    model = build_unet(cfg, 28, 1, 10).to(device)
    sched = train_scheduler(cfg)
    x0, labels = draw_batch(data, cfg, 0, torch.Generator(device).manual_seed(0), model.config.sample_size)
    counter = FlopCounterMode(display=False)
    with counter:
        noised_loss(model, sched, x0, labels, *draw_noise(x0, sched, torch.Generator(device).manual_seed(1))).backward()
    flops, n_params = float(counter.get_total_flops()), num_parameters(model)
    del model
    peak = matmul_peak(device, args.tiny)
    flips = [base, dataclasses.replace(base, channels_last=not base.channels_last),
             dataclasses.replace(base, bf16=not base.bf16)]  # the device's policy, then one switch flipped each
    out = {**environment(device), "unet_parameters": n_params, "batch_size": cfg.batch_size, "data": source,
           "flops_per_step": flops, "matmul_peak_flops_measured": peak, "steps_timed": steps, "warmup_steps": warmup,
           "variants": {}}

    def measure(policy) -> tuple[dict, torch.nn.Module]:
        peak_reset(device)
        per, warm, model = train_steps(cfg, data, policy, steps, warmup)
        rec = policy.as_record()
        name = f"{rec['precision']}, {'channels_last' if policy.channels_last else 'NCHW'}" + \
            (", compile" if policy.compile else "")
        out["variants"][name] = {"policy": rec, "steps_per_second": round(1 / per, 3),
                                 "seconds_per_step": round(per, 5), "warmup_seconds": round(warm, 2),
                                 "mfu_vs_measured_peak": round(flops / per / peak, 4),
                                 "mfu_vs_990_tflops": (round(flops / per / 990e12, 4)
                                                       if device.startswith("cuda") else None),
                                 "peak_memory_mib": peak_mib(device)}
        print(name, out["variants"][name], flush=True)
        write_part(args, "train", out)
        return out["variants"][name], model

    first, model = measure(base)
    weights = {k: v.detach().float().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(weights, str(args.work_dir / "unet.safetensors"))  # EMA weights, for the sampling part
    for policy in flips[1:]:
        measure(policy)
    big = cfg.model_copy(update={"batch_size": 16 if args.tiny else 1024})
    peak_reset(device)
    train_steps(big, data, base, 1, 1)
    out["peak_memory_mib_at_batch"] = {str(cfg.batch_size): first["peak_memory_mib"],
                                       str(big.batch_size): peak_mib(device)}
    write_part(args, "train", out)
    if not args.no_compile:  # last: its compilation is the slowest thing here
        measure(dataclasses.replace(base, compile=True))
    return out


def part_sample(args, device: str) -> dict:
    import torch
    from safetensors.torch import load_file

    from pipeline.config import SampleConfig
    from pipeline.core.device import DevicePolicy
    from pipeline.core.seeding import image_seed
    from pipeline.models.diffusion import DiffusionGenerator, build_unet, make_pipeline, train_scheduler
    from pipeline.quality.features import FeatureSpace

    cfg = unet_cfg(args)
    policy = DevicePolicy.for_device(device)
    unet = build_unet(cfg, 28, 1, 10)
    weights = args.work_dir / "unet.safetensors"
    trained = weights.exists()
    if trained:
        unet.load_state_dict(load_file(str(weights)))
    unet = policy.prepare(unet).eval()
    schedule = dict(train_scheduler(cfg).config)
    meta = {"null_label": 10, "image_size": 28, "channels": 1, "num_classes": 10}
    gen = DiffusionGenerator(make_pipeline(unet, schedule, [str(c) for c in range(10)], 28, policy), meta)
    steps = 2 if args.tiny else 20
    sc = SampleConfig(sampler="ddim", num_inference_steps=steps, guidance_scale=2.0, guidance_interval=(0.0, 1.0))
    n_stock = 8 if args.tiny else 64

    def ours(n: int, batch: int, seed0: int = 0) -> torch.Tensor:
        out = []
        for i in range(0, n, batch):
            idx = list(range(i, min(n, i + batch)))
            out.append(gen.sample(torch.tensor([j % 10 for j in idx]), [image_seed(seed0, j) for j in idx], sc))
        return torch.cat(out)

    res = {**environment(device), "unet": "trained by the train part" if trained else "random weights", "steps": steps,
           "sampler": "ddim", "guidance_scale": 2.0, "policy": policy.as_record(), "ours": {}}
    for batch in ((8, 16) if args.tiny else (256, 1024)):
        n = 2 * batch
        ours(batch, batch)  # warm-up
        peak_reset(device)
        sec = timed(lambda: ours(n, batch), device)
        res["ours"][str(batch)] = {"images": n, "images_per_second": round(n / sec, 1),
                                   "peak_memory_mib": peak_mib(device)}
        print("ours", batch, res["ours"][str(batch)], flush=True)
        write_part(args, "sample", res)
    # the same images both ways: image i of class i % 10 from seed i; the stock loop one per call, fp32
    t0 = time.perf_counter()
    stock = torch.cat([_stock_one(unet, schedule, meta, i, steps) for i in range(n_stock)])
    stock_sec = time.perf_counter() - t0
    mine = ours(n_stock, n_stock)
    floor_set = ours(n_stock, n_stock, seed0=1)
    space = FeatureSpace("efficientnet-lite0", device=device, batch_size=64, resolution=64 if args.tiny else 224)
    f_stock, f_mine, f_floor = space(stock), space(mine), space(floor_set)
    res["stock"] = {"images": n_stock, "images_per_second": round(n_stock / stock_sec, 2), "batch": 1,
                    "precision": "fp32"}
    res["agreement"] = {"images": n_stock, "feature_space": "efficientnet-lite0 (ImageNet; not Inception FID)",
                        "frechet_ours_vs_stock": round(frechet(f_mine, f_stock), 3),
                        "frechet_floor_ours_vs_ours_other_seeds": round(frechet(f_mine, f_floor), 3),
                        "max_abs_pixel_difference": int((mine.int() - stock.int()).abs().max())}
    res["ratio_images_per_second"] = round(max(v["images_per_second"] for v in res["ours"].values())
                                           / res["stock"]["images_per_second"], 1)
    return res


def _stock_one(unet, schedule, meta, i: int, steps: int):
    """Image i of the stock loop with class i % 10 (as ``ours``), fp32."""
    import torch

    from pipeline.core.images import crop_images
    from pipeline.core.seeding import image_seed
    from pipeline.models.diffusion import inference_scheduler

    device = next(unet.parameters()).device
    scheduler = inference_scheduler("ddim", schedule)  # the DDIM configuration the pipeline samples with
    c, s = unet.config.in_channels, unet.config.sample_size
    with torch.no_grad():
        gen = torch.Generator().manual_seed(image_seed(0, i))
        latents = torch.randn((1, c, s, s), generator=gen).to(device) * scheduler.init_noise_sigma
        labels = torch.tensor([i % 10, meta["null_label"]], device=device)
        scheduler.set_timesteps(steps, device=device)
        for t in scheduler.timesteps:
            pred = unet(scheduler.scale_model_input(torch.cat([latents] * 2), t), t, class_labels=labels).sample
            cond, uncond = pred.chunk(2)
            latents = scheduler.step(uncond + 2.0 * (cond - uncond), t, latents).prev_sample
        image = (latents / 2 + 0.5).clamp(0, 1)
    return crop_images((image * 255).round().to(torch.uint8).cpu(), meta["image_size"])


def part_classifier(args, device: str) -> dict:
    import torch

    from pipeline.core.device import DevicePolicy
    from pipeline.models.classifier import build_model
    from pipeline.training.classifier import batch_sources, fit

    x, y, source = load_images(args, 512 if args.tiny else 5000)
    policy = DevicePolicy.for_device(device)
    steps = 4 if args.tiny else 300
    out = {"arch": "resnet10t", "augment": "classic", "data": source, "steps": steps, "policy": policy.as_record()}
    for batch in ((8,) if args.tiny else (64, 256)):
        torch.manual_seed(0)
        model = build_model("resnet10t", 10, 1)
        fit(model, batch_sources(batch, (x, y)), (x[:64], y[:64]), steps=2, lr=1e-3, weight_decay=0.05, seed=0,
                       device=policy, augment="classic", eval_every=2, progress=False)  # warm-up
        _, hist = fit(model, batch_sources(batch, (x, y)), (x[:64], y[:64]), steps=steps, lr=1e-3,
                                 weight_decay=0.05, seed=0, device=policy, augment="classic", eval_every=steps,
                                 progress=False)
        out[f"batch_{batch}"] = {"steps_per_second": round(1 / hist["seconds_per_step"], 2),
                                 "images_per_second": round(batch / hist["seconds_per_step"], 1)}
        print(batch, out[f"batch_{batch}"], flush=True)
    return out


def part_ops(args, device: str) -> dict:
    import torch

    n = 200 if args.tiny else 5000
    a = torch.randn(64, 64, device=device)
    res = {}
    for name, fn in {"add": lambda: a + 1.0, "mul_add_chain": lambda: (a * 2.0).add_(1.0),
                     "matmul_64": lambda: a @ a}.items():
        for _ in range(50):
            fn()
        sec = timed(lambda: [fn() for _ in range(n)], device, repeats=3)
        res[name] = round(sec / n * 1e6, 2)
    return {"microseconds_per_op": res, "ops_timed": n,
            "note": "eager dispatch of tiny tensors: host overhead per op (gpu_budget.py assumes 5/10/20 us)"}


# ---- driver ------------------------------------------------------------------------------

def environment(device: str) -> dict:
    import platform

    import torch

    return {"device": device, "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else cpu_model(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda if device.startswith("cuda") else None, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def run_part(name: str, args, device: str) -> dict:
    """One part in its own process, killed at its cap; its JSON, or what stopped it."""
    cap = PARTS[name] * (3 if not device.startswith("cuda") else 1)
    cmd = [sys.executable, "-m", "bench.gpu_check", "--part", name, "--device", device, "--out-dir", str(args.out_dir),
           "--work-dir", str(args.work_dir)]
    cmd += ["--tiny"] * args.tiny + ["--no-compile"] * args.no_compile + (["--data", args.data] if args.data else [])
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, timeout=cap, capture_output=True, text=True)
        status = "finished" if proc.returncode == 0 else f"failed (exit status {proc.returncode})"
        log = proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as err:
        status, log = f"stopped at its cap of {cap} s", (err.stdout or b"").decode() + (err.stderr or b"").decode()
    seconds = round(time.perf_counter() - t0, 1)
    path = part_file(args, name)
    result = json.loads(path.read_text()) if path.exists() else {}  # also what a stopped part measured
    result.update(part=name, status=status, seconds=seconds)
    if status != "finished":
        result["log_tail"] = log.strip().splitlines()[-20:]
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"[{name}] {status} in {seconds} s", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", help="auto = cuda when available")
    p.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results" / "gpu")
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/synthaug-gpu-check"),
                   help="scratch folder (the trained UNet handed from the train part to the sample part)")
    p.add_argument("--data", default=str(ROOT / ".gpu" / "fmnist.npz"), help="Fashion-MNIST subset (.npz: x, y)")
    p.add_argument("--tiny", action="store_true", help="tiny sizes: the CPU rehearsal of every part")
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile variant")
    p.add_argument("--part", choices=PARTS, help="run one part in this process (the driver's worker)")
    p.add_argument("--parts", default=",".join(PARTS), help="comma-separated parts to run")
    args = p.parse_args(argv)
    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    args.out_dir.mkdir(parents=True, exist_ok=True)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    if args.part:
        from pipeline.core.env import offline_defaults

        offline_defaults()
        part_file(args, args.part).unlink(missing_ok=True)
        write_part(args, args.part, {**environment(device), **globals()[f"part_{args.part}"](args, device)})
        return 0
    t0 = time.perf_counter()
    results = {name: run_part(name, args, device) for name in args.parts.split(",")}
    summary = {**environment(device), "tiny": args.tiny, "total_seconds": round(time.perf_counter() - t0, 1),
               "parts": {k: {"status": v["status"], "seconds": v["seconds"]} for k, v in results.items()}}
    (args.out_dir / "gpu_check-summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0 if all(v["status"] == "finished" for v in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
