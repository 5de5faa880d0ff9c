"""Generator kinds side by side: sampling speed and memory of unet, dit, cgan, datasetgan.

The speed axis of the generative trilemma, measured fairly: every kind at the same
profile's architecture (randomly initialised: speed does not depend on the weights), the
same images, sampler settings and device, timed alternately in one run (unet, dit, cgan,
datasetgan, unet, ...). Quality and usefulness come from real runs (``synthaug compare``).
Ratios are against unet. Output: ``bench/results/generators-<device>.json``.
"""
from __future__ import annotations

import torch

from bench.common import alternate, diffusion_generator, parser, rate, ratio, save, section, setup
from pipeline.config import params_from_dict
from pipeline.core.images import pad_images
from pipeline.models.diffusion import build_backbone, build_unet, train_scheduler

KINDS = ("unet", "dit", "cgan", "datasetgan")


def random_generator(kind: str, profile: str, device: str, image_size: int = 28, channels: int = 1,
                     num_classes: int = 10):
    """A randomly initialised generator of ``kind`` with the ``profile``'s architecture, and its size."""
    from pipeline.models import datasetgan, gan

    cfg = params_from_dict({"base": {"profile": profile}, "train_generator": {"kind": kind}}).train_generator
    meta = {"kind": kind, "num_classes": num_classes, "null_label": num_classes, "image_size": image_size,
            "channels": channels, "class_names": [str(c) for c in range(num_classes)],
            "label_tries": cfg.datasetgan.label_tries, "feature_timestep": cfg.datasetgan.feature_timestep}
    torch.manual_seed(0)
    sched = dict(train_scheduler(cfg).config)
    if kind in ("unet", "dit"):
        model = build_backbone(cfg, image_size, channels, num_classes).to(device).eval()
        return diffusion_generator(model, sched, meta), sum(p.numel() for p in model.parameters())
    if kind == "cgan":
        model = gan.CondGenerator(cfg.cgan.z_dim, num_classes, channels, image_size, cfg.cgan.g_channels)
        return gan.GanGenerator(model.to(device).eval(), meta), sum(p.numel() for p in model.parameters())
    unet = build_unet(cfg, image_size, channels, num_classes).to(device).eval()
    probe = pad_images(torch.zeros(1, channels, image_size, image_size, device=device), unet.config.sample_size)
    dim = datasetgan.unet_features(unet, train_scheduler(cfg), probe, 10, [0], num_classes).shape[1]
    interpreter = datasetgan.Interpreter(dim, num_classes).to(device).eval()
    n = sum(p.numel() for p in unet.parameters()) + sum(p.numel() for p in interpreter.parameters())
    meta = {**meta, "feature_dim": dim}
    return datasetgan.DatasetGanGenerator(diffusion_generator(unet, sched, meta), interpreter, meta), n


def main(argv=None) -> dict:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=0, help="images per timed run (0 = 64 on cpu, 1024 on cuda)")
    p.add_argument("--profile", default="", choices=("", "micro", "cpu", "gpu"),
                   help="architecture and sampler settings (default: cpu on cpu, gpu on cuda)")
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    args = p.parse_args(argv)
    device = setup(args)
    profile = args.profile or ("gpu" if device == "cuda" else "cpu")
    if args.quick:
        args.images, profile = 4, "micro"
    n = args.images or (1024 if device == "cuda" else 64)
    scfg = params_from_dict({"base": {"profile": profile}}).sample
    labels, seeds = torch.arange(n) % 10, list(range(n))
    gens, sizes = {}, {}
    for k in args.kinds:
        gens[k], sizes[k] = random_generator(k, profile, device)
    with section(f"warm-up on {device}"):
        for g in gens.values():
            g.sample(labels[:2], seeds[:2], scfg)
    with section(f"sampling {n} images per kind ({scfg.sampler}, {scfg.num_inference_steps} steps, "
                 f"guidance {scfg.guidance_scale}), alternated"):
        secs, mem, _ = alternate({k: (lambda g=g: g.sample(labels, seeds, scfg)) for k, g in gens.items()},
                                 args.repeats, device)
    rates = {k: rate(n, secs[k]) for k in gens}
    result = {
        "settings": {"profile": profile, "images": n, "image_size": 28, "channels": 1, "classes": 10,
                     "sampler": scfg.sampler, "steps": scfg.num_inference_steps, "guidance": scfg.guidance_scale,
                     "repeats": args.repeats, "order": "alternated", "weights": "random (speed only)",
                     "quick": args.quick},
        "kinds": {k: {"parameters": sizes[k], "images_per_second": rates[k]["per_second_best"], **rates[k],
                      "peak_memory_mib": max(mem[k])} for k in gens},
        "ratio_images_per_second_vs_unet": {k: ratio(rates[k], rates["unet"]) for k in gens if "unet" in gens},
        "notes": {"dit": "diffusion with the same sampler and guidance as unet",
                  "cgan": "one forward pass per image: sampler settings do not apply",
                  "datasetgan": "unconditional (one pass per step, no guidance) but label_tries candidates "
                                "per image plus one feature pass each"},
    }
    save("generators", device, result, args.out_dir)
    return result


if __name__ == "__main__":
    main()
