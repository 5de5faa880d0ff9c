"""Sampling throughput: the pipeline's sampler against the stock diffusers loop.

ours  = ``pipeline.models.sampling.generate`` -> ``pipeline.models.diffusion.DiffusionGenerator``
        -> ``ClassConditionalPipeline.__call__`` (pipeline/models/class_conditional.py): a batch
        of images per forward, conditional and unconditional halves in one forward of 2B, bf16
        autocast (on CUDA and on CPUs with AMX / AVX512-BF16), channels_last on CUDA (optionally
        torch.compile on CUDA).
stock = the loop of diffusers' class-conditional pipelines (DiT / Stable Diffusion style):
        one image at a time, ``torch.cat([latents] * 2)`` with the class and the null label in
        one forward, fp32, ``DDIMScheduler.step``.
Both: the same UNet2DModel weights, DDIM with the pipeline's scheduler configuration (eta 0), the same steps, guidance
and per-image seeds, so the images must agree (max abs pixel difference, and the Frechet
distance between the two sets, compared with the distance between two independent sets of
the same sampler: the sampling-noise floor).
"""
from __future__ import annotations

import copy

import torch

from bench.common import (alternate, compile_if, diffusion_generator, memory_method, parser, rate, ratio, save, section,
                          setup)
from pipeline.config import Paths, SampleConfig, params_from_dict
from pipeline.core.device import DevicePolicy
from pipeline.core.images import crop_images
from pipeline.core.seeding import image_seed
from pipeline.models.diffusion import DiffusionGenerator, build_unet, inference_scheduler, train_scheduler
from pipeline.models.registry import load_generator
from pipeline.models.sampling import generate, generation_plan
from pipeline.sample import AUTO_BATCH

TARGETS = {"cuda": 3.0, "cpu": 1.3}


def get_generator(device: str, arch: str):
    """(backbone, scheduler config, meta, description): the trained generator when there is one,
    else a randomly initialised UNet of the ``arch`` profile's architecture."""
    paths = Paths()
    if (paths.generator / "generator.json").exists():
        gen = load_generator(paths.generator, device)
        if not isinstance(gen, DiffusionGenerator):
            raise SystemExit(f"{paths.generator} holds a {gen.meta['kind']} generator; this benchmark "
                             "compares diffusion sampling loops (kinds unet, dit)")
        unet, sched_conf, meta = gen.pipe.backbone, gen.schedule, gen.meta
        return unet, sched_conf, meta, f"trained generator {paths.generator} ({meta.get('fingerprint', '')[:12]})"
    cfg = params_from_dict({"base": {"profile": arch}}).train_generator
    torch.manual_seed(0)
    unet = DevicePolicy.for_device(device).prepare(build_unet(cfg, 28, 1, 10)).eval()
    meta = {"null_label": 10, "image_size": 28, "channels": 1, "num_classes": 10,
            "class_names": [str(c) for c in range(10)]}
    desc = (f"randomly initialised UNet2DModel, {arch} profile architecture (block_out_channels "
            f"{tuple(cfg.block_out_channels)}, attention {cfg.attention}), 28x28x1, 10 classes; "
            f"no trained generator in {paths.generator}")
    return unet, dict(train_scheduler(cfg).config), meta, desc


@torch.no_grad()
def stock_generate(unet, sched_conf: dict, meta: dict, indices: range, per_class: int, steps: int,
                   guidance: float, base_seed: int) -> torch.Tensor:
    """The diffusers pipeline loop, one image per call, fp32; uint8 images N,C,H,W."""
    from diffusers import DDIMScheduler

    device = next(unet.parameters()).device
    scheduler = DDIMScheduler.from_config(ddim_config(sched_conf))
    c, s = unet.config.in_channels, unet.config.sample_size
    out = []
    for i in indices:
        gen = torch.Generator().manual_seed(image_seed(base_seed, i))
        latents = torch.randn((1, c, s, s), generator=gen).to(device) * scheduler.init_noise_sigma
        class_labels = torch.tensor([i // per_class], device=device)
        class_null = torch.tensor([meta["null_label"]], device=device)
        class_labels_input = torch.cat([class_labels, class_null], 0)
        scheduler.set_timesteps(steps, device=device)
        for t in scheduler.timesteps:
            latent_model_input = scheduler.scale_model_input(torch.cat([latents] * 2), t)
            noise_pred = unet(latent_model_input, t, class_labels=class_labels_input).sample
            cond, uncond = noise_pred.chunk(2)
            noise_pred = uncond + guidance * (cond - uncond)
            latents = scheduler.step(noise_pred, t, latents).prev_sample
        image = (latents / 2 + 0.5).clamp(0, 1)
        out.append(crop_images((image * 255).round().to(torch.uint8).cpu(), meta["image_size"]))
    return torch.cat(out)


def ddim_config(sched_conf: dict) -> dict:
    """The DDIM configuration the pipeline samples with (spacing, clipping, ...), so both sides
    run the same sampler."""
    return dict(inference_scheduler("ddim", sched_conf).config)


def frechet(a: torch.Tensor, b: torch.Tensor) -> float:
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric

    return float(fid_statistics_to_metric(fid_features_to_statistics(a.double()),
                                          fid_features_to_statistics(b.double()), False)[KEY_METRIC_FID])


def main(argv=None) -> dict:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=0, help="images per run of ours (0 = 32 on cpu, 1024 on cuda)")
    p.add_argument("--stock-images", type=int, default=0,
                   help="images per run of stock (0 = same as --images on cpu, 128 on cuda); its first "
                        "images are the same seeds as ours, so they are compared")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps")
    p.add_argument("--guidance", type=float, default=2.0, help="classifier-free guidance scale (> 1: cond + uncond)")
    p.add_argument("--batch-size", type=int, default=0,
                   help="ours: images per forward (0 = the stage's automatic size)")
    p.add_argument("--arch", default="cpu", choices=("micro", "cpu", "gpu"),
                   help="profile whose architecture a random UNet gets when no trained generator exists")
    p.add_argument("--compile", action="store_true", help="torch.compile ours (CUDA only)")
    p.add_argument("--fd-resolution", type=int, default=224,
                   help="input side of the efficientnet-lite0 feature space of the agreement check")
    args = p.parse_args(argv)
    device = setup(args)
    cuda = device == "cuda"
    if args.quick:
        args.images, args.stock_images, args.steps, args.fd_resolution = 4, 4, 2, 32
    n = args.images or (1024 if cuda else 32)
    n_stock = min(n, args.stock_images or (128 if cuda else n))
    batch = args.batch_size or min(n, AUTO_BATCH[cuda])
    unet, sched_conf, meta, desc = get_generator(device, args.arch)
    per_class = max(1, n // meta.get("num_classes", 10))
    stock_unet = copy.deepcopy(unet).to(memory_format=torch.contiguous_format).float().eval()
    ours_gen = diffusion_generator(compile_if(unet, device, args.compile), sched_conf, meta)
    cfg = SampleConfig(sampler="ddim", num_inference_steps=args.steps, guidance_scale=args.guidance,
                       guidance_interval=(0.0, 1.0),  # guided at every step, as the stock loop
                       per_class=per_class, batch_size=batch)
    plan = generation_plan(-(-n // per_class), per_class)  # label = i // per_class, as stock_generate

    def ours(indices=range(n), seed=0):
        return generate(ours_gen, plan, indices, cfg, seed, batch, progress=False)[0]

    def stock():
        return stock_generate(stock_unet, sched_conf, meta, range(n_stock), per_class, args.steps,
                              args.guidance, 0)

    with section(f"sampling warm-up on {device}"):
        ours(range(min(n, batch)))
        stock_generate(stock_unet, sched_conf, meta, range(1), per_class, 2, args.guidance, 0)
    with section(f"sampling: ours {n} images (batch {batch}) vs stock {n_stock} images, "
                 f"DDIM {args.steps} steps, guidance {args.guidance}"):
        secs, mem, last = alternate({"ours": ours, "stock": stock}, args.repeats, device)
    r_ours, r_stock = rate(n, secs["ours"]), rate(n_stock, secs["stock"])
    ratios = ratio(r_ours, r_stock)

    with section("agreement"):
        a, b = last["ours"][:n_stock].to(torch.int16), last["stock"].to(torch.int16)
        diff = (a - b).abs()
        other = ours(range(n_stock), seed=1)  # an independent set: the sampling-noise floor
        k = min(4, n_stock)  # ours one image per batch: isolates batch-composition rounding
        single = generate(ours_gen, plan, range(k), cfg, 0, 1, progress=False)[0].to(torch.int16)
        diff_single = (single - b[:k]).abs()
        from pipeline.quality.features import FeatureSpace
        space = FeatureSpace("efficientnet-lite0", device=device, resolution=args.fd_resolution)
        f_ours, f_stock, f_other = space(last["ours"][:n_stock]), space(last["stock"]), space(other)
        fd_pair, fd_floor = frechet(f_ours, f_stock), frechet(f_ours, f_other)
    agreement = {
        "images_compared": n_stock, "same_seeds": True,
        "max_abs_pixel_difference_uint8": int(diff.max()),
        "mean_abs_pixel_difference_uint8": float(diff.float().mean()),
        "fraction_pixels_equal": float((diff == 0).float().mean()),
        "ours_at_batch_1_vs_stock": {"images": k, "max_abs_pixel_difference_uint8": int(diff_single.max()),
                                     "note": "the same images made one per batch by ours: what is left of the "
                                             "difference above once batch-size rounding is taken out"},
        "frechet_distance_ours_vs_stock": fd_pair,
        "frechet_distance_ours_vs_ours_other_seeds": fd_floor,
        "fd_within_noise": bool(fd_pair <= fd_floor),
        "feature_space": f"efficientnet-lite0 (ImageNet) at {args.fd_resolution}px, pooled 1280-d "
                         f"(pipeline.quality.features.FeatureSpace); with {n_stock} images per set the Frechet "
                         "distance is dominated by small-sample bias, so it is judged against the floor "
                         "(two independent sets of the same sampler, same N), not against zero",
    }
    target = TARGETS[device]
    result = {
        "settings": {"images_ours": n, "images_stock": n_stock, "batch_size_ours": batch, "stock_batch": 1,
                     "sampler": "ddim (eta 0)",
                     "scheduler_config": {k: v for k, v in ddim_config(sched_conf).items()
                                          if k in ("timestep_spacing", "clip_sample", "clip_sample_range",
                                                   "prediction_type", "beta_schedule", "set_alpha_to_one",
                                                   "num_train_timesteps")}, "steps": args.steps,
                     "guidance_scale": args.guidance, "repeats": args.repeats, "order": "alternated",
                     "ours_precision": DevicePolicy.for_device(device).as_record()["precision"],
                     "stock_precision": "fp32", "compile": bool(args.compile and cuda), "quick": args.quick,
                     "generator": desc},
        "ours": {**r_ours, "images_per_second": r_ours["per_second_best"], "peak_memory_mib": max(mem["ours"])},
        "stock": {**r_stock, "images_per_second": r_stock["per_second_best"], "peak_memory_mib": max(mem["stock"])},
        "peak_memory_method": memory_method(device),
        "ratio_images_per_second": ratios,
        "target": {"ratio": target, "judged_on": "paired_median", "met": ratios["paired_median"] >= target},
        "agreement": agreement,
    }
    save("sampling", device, result, args.out_dir)
    return result


if __name__ == "__main__":
    main()
