"""Which device policy pays on this CPU: the cpu profile's generator step, sampler and classifier step.

    python -m bench.cpu_policy [--threads N] [--generator models/generator] [--parts train,sample,classifier]

Training: the pipeline's step (bench/gpu_check.train_steps) of the cpu profile's UNet (32, 64, 64) at
batch 64 under the CPU's own policy, then with channels_last, compile, both (and bf16 where the CPU
has bf16 matrix units), the own policy measured again last so drift shows. Sampling: the sample
stage's sampler (DPM-Solver++, guidance 2, batch 64) with the same switches, and with fewer solver
steps; with ``--generator`` (a trained unet folder) each step count's Frechet distance to the
20-step images (efficientnet-lite0 features) is set beside two 20-step sets of other seeds.
Classifier: the cpu profile's classifier step (test_resnet, batch 64: forward, backward, AdamW) under the
classifier policy (``DevicePolicy.for_classifiers``: NHWC, fused AdamW) against the contiguous layout and
the unfused optimizer, alternated ``--repeats`` times (the variants' seeds run at one thread each: pass
``--threads 1``). Writes ``bench/results/cpu_policy-cpu.json`` (``--out``).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.common import alternate
from bench.gpu_check import environment, frechet, load_images, timed, train_steps
from pipeline.config import SampleConfig, params_from_dict
from pipeline.core.device import DevicePolicy, bf16_matmul_units
from pipeline.core.io import write_json
from pipeline.core.seeding import image_seed
from pipeline.models.diffusion import DiffusionGenerator, build_unet, load_pipeline, make_pipeline, train_scheduler
from pipeline.training.generator import TrainData

ROOT = Path(__file__).resolve().parents[1]


def variants(base: DevicePolicy) -> dict[str, DevicePolicy]:
    out = {"own policy": base, "channels_last": dataclasses.replace(base, channels_last=True),
           "compile": dataclasses.replace(base, compile=True),
           "compile + channels_last": dataclasses.replace(base, compile=True, channels_last=True)}
    if bf16_matmul_units():
        out["bf16"] = dataclasses.replace(base, bf16=True)
    return out


def bench_train(cfg, data, base: DevicePolicy, steps: int) -> dict:
    res = {}
    for name, policy in [*variants(base).items(), ("own policy again", base)]:
        per, warm, _ = train_steps(cfg, data, policy, steps, 2)
        res[name] = {"seconds_per_step": round(per, 4), "warmup_seconds": round(warm, 1)}
        print("train", name, res[name], flush=True)
    own = (res["own policy"]["seconds_per_step"] + res["own policy again"]["seconds_per_step"]) / 2
    for r in res.values():
        r["speedup_vs_own"] = round(own / r["seconds_per_step"], 2)
    return res


def bench_sample(pipe_for, base: DevicePolicy, n: int, step_counts: list[int], generator: bool) -> dict:
    def make(policy, steps: int, seed0: int = 0):
        gen = DiffusionGenerator(pipe_for(policy), {"channels": 1, "image_size": 28})
        sc = SampleConfig(sampler="dpm++", num_inference_steps=steps, guidance_scale=2.0)
        return lambda: gen.sample(torch.arange(n) % 10, [image_seed(seed0, i) for i in range(n)], sc)

    res = {}
    for name, policy in variants(base).items():
        fn = make(policy, 20)
        fn()  # warm-up (compilation)
        sec = timed(fn, "cpu")
        res[f"{name}, 20 steps"] = {"images_per_second": round(n / sec, 2)}
        print("sample", name, res[f"{name}, 20 steps"], flush=True)
    ref = make(base, 20)()
    for steps in step_counts:
        fn = make(base, steps)
        images = fn()
        sec = timed(fn, "cpu")
        res[f"own policy, {steps} steps"] = {"images_per_second": round(n / sec, 2)}
        if generator:
            res[f"own policy, {steps} steps"]["images"] = images
    if generator:  # fewer steps at equal quality: the distance to the 20-step images against a seed floor
        from pipeline.quality.features import FeatureSpace

        space = FeatureSpace("efficientnet-lite0", device="cpu", batch_size=64)
        f_ref, f_floor = space(ref), space(make(base, 20, seed0=1)())
        res["frechet_floor_20_steps_other_seeds"] = round(frechet(f_ref, f_floor), 2)
        for steps in step_counts:
            r = res[f"own policy, {steps} steps"]
            r["frechet_to_20_steps"] = round(frechet(f_ref, space(r.pop("images"))), 2)
    own = res["own policy, 20 steps"]["images_per_second"]
    for r in res.values():
        if isinstance(r, dict):
            r["speedup_vs_own"] = round(r["images_per_second"] / own, 2)
    return res


def bench_classifier(base: DevicePolicy, arch: str, batch: int, steps: int, repeats: int) -> dict:
    from timm.optim import create_optimizer_v2

    from pipeline.models.classifier import build_model

    own = base.for_classifiers()
    policies = {"classifier policy": own, "contiguous": dataclasses.replace(own, channels_last=False),
                "unfused AdamW": dataclasses.replace(own, fused_optimizer=False)}
    x, y = torch.rand(batch, 1, 28, 28), torch.randint(0, 10, (batch,))

    def training(policy: DevicePolicy):
        """``steps`` steps of one model under ``policy``, warmed up by one step."""
        torch.manual_seed(0)
        model = policy.prepare(build_model(arch, 10, 1)).train()
        opt = create_optimizer_v2(model, opt="adamw", lr=1e-3, weight_decay=0.05, fused=policy.fused_optimizer or None)
        xb = policy.inputs(x)

        def step():
            loss = F.cross_entropy(model(xb), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        step()
        return lambda: [step() for _ in range(steps)]

    seconds, _, _ = alternate({name: training(p) for name, p in policies.items()}, repeats, "cpu")
    median = {name: statistics.median(ss) for name, ss in seconds.items()}
    res = {name: {"policy": policies[name].as_record(), "seconds_per_step": [round(s / steps, 5) for s in ss],
                  "speedup_of_classifier_policy": round(median[name] / median["classifier policy"], 2)}
           for name, ss in seconds.items()}
    print("classifier", {k: v["speedup_of_classifier_policy"] for k, v in res.items()}, flush=True)
    return {"arch": arch, "batch_size": batch, "steps": steps, "repeats": repeats, "order": "alternated", **res}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--steps", type=int, default=8, help="timed training steps per variant")
    p.add_argument("--images", type=int, default=64, help="images per timed sampling run (one batch)")
    p.add_argument("--generator", type=Path, help="a trained unet generator folder: FD at fewer solver steps")
    p.add_argument("--data", default=str(ROOT / ".gpu" / "fmnist.npz"))
    p.add_argument("--parts", default="train,sample,classifier", help="comma-separated: train, sample, classifier")
    p.add_argument("--repeats", type=int, default=3, help="alternated repeats of the classifier sides")
    p.add_argument("--tiny", action="store_true", help="micro profile, 2 steps: a smoke run")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "cpu_policy-cpu.json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    params = params_from_dict({"base": {"profile": "micro" if args.tiny else "cpu"}})
    cfg, parts = params.train_generator, set(args.parts.split(","))
    base = DevicePolicy.for_device("cpu")
    steps = 2 if args.tiny else args.steps
    result = {**environment("cpu"), "cpu_bf16_matrix_units": bf16_matmul_units(),
              "torch_threads": torch.get_num_threads()}
    if parts & {"train", "sample"}:
        x, y, source = load_images(args, 2000)
        schedule = dict(train_scheduler(cfg).config)
        if args.generator:
            pipe_for = lambda policy: load_pipeline(args.generator, "unet", policy)  # noqa: E731
        else:
            torch.manual_seed(0)
            unet = build_unet(cfg, 28, 1, 10).eval()
            pipe_for = lambda policy: make_pipeline(policy.compiled(policy.prepare(unet)), schedule,  # noqa: E731
                                                    [str(c) for c in range(10)], 28, policy)
        result.update(unet=f"cpu profile, block_out_channels {tuple(cfg.block_out_channels)}, batch {cfg.batch_size}",
                      data=source, generator=str(args.generator) if args.generator else "random weights (speed only)")
    if "train" in parts:
        result["train"] = bench_train(cfg, TrainData(x, y, 10), base, steps)
    if "sample" in parts:
        result["sample"] = bench_sample(pipe_for, base, 8 if args.tiny else args.images,
                                        [10, 15] if not args.tiny else [1], args.generator is not None)
    if "classifier" in parts:
        tc = params.train_classifier
        result["classifier"] = bench_classifier(base, tc.arch, tc.batch_size, steps if args.tiny else 10 * args.steps,
                                                1 if args.tiny else args.repeats)
    write_json(args.out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
