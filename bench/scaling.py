"""How sample + filter cost grows with the number of synthetic images.

At each N: sample N images with a micro UNet (``pipeline.models.sampling.generate``, DDIM, few steps),
then the filter's work on them, each piece timed on its own, all in-process and on tensors:
judge scoring (``predict_proba``), features in the judge space (``FeatureSpace("judge")``),
k-NN realism against a fixed real reference (``realism``), nearest labeled-train distance
(``nearest``), exact-duplicate hashing (``duplicate_flags``) and the set metrics
(``set_metrics``: Frechet distance, KID, precision/recall). The real references are fixed, so
linear code has a constant cost per image; the exponent of cost ~ N^a over the sizes and the
per-image cost ratio (largest / smallest N) flag any quadratic step.
"""
from __future__ import annotations

import math
import time

import torch

from bench.common import diffusion_generator, parser, save, section, setup
from pipeline.config import Paths, SampleConfig, params_from_dict

LINEAR_TOLERANCE = 1.5  # per-image cost at the largest N within this factor of the smallest N's


def timed(fn, device):
    from bench.common import sync
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def main(argv=None) -> dict:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 20000], help="numbers of synthetic images")
    p.add_argument("--steps", type=int, default=2, help="DDIM steps")
    p.add_argument("--blocks", type=int, nargs="+", default=[16, 32], help="UNet block_out_channels")
    p.add_argument("--batch-size", type=int, default=0, help="sampling batch (0 = 256 cpu, 1024 cuda)")
    p.add_argument("--max-real", type=int, default=1000, help="real reference size (the filter's max_real)")
    p.add_argument("--no-set-metrics", action="store_true", help="skip set_metrics (FD, KID, precision/recall)")
    p.add_argument("--kid-subsets", type=int, default=0, help="KID subsets of set_metrics (0 = the filter's default)")
    args = p.parse_args(argv)
    device = setup(args)
    if args.quick:
        args.sizes, args.steps, args.blocks, args.max_real = [20, 40], 1, [8, 16], 50
    if len(set(args.sizes)) < 2:
        p.error("--sizes: give at least two different sizes")
    batch = args.batch_size or (1024 if device == "cuda" else 256)

    from pipeline.core.images import dataset_to_tensors
    from pipeline.core.io import load_dataset_dir
    from pipeline.models.classifier import build_model
    from pipeline.models.diffusion import build_unet, train_scheduler
    from pipeline.models.sampling import generate, generation_plan
    from pipeline.quality.features import FeatureSpace
    from pipeline.quality.judge import judge_scores
    from pipeline.quality.metrics import nearest, realism, set_metrics
    from pipeline.quality.selection import duplicate_flags

    gcfg = params_from_dict({"base": {"profile": "micro"},
                             "train_generator": {"block_out_channels": tuple(args.blocks)}}).train_generator
    fcfg = params_from_dict({"base": {"profile": "cpu"}}).filter
    dd = load_dataset_dir(Paths().prepared / "dataset", "prepare")
    train_x, train_y = dataset_to_tensors(dd["train"])
    val_x, _ = dataset_to_tensors(dd["val"])
    test_x, _ = dataset_to_tensors(dd["test"])
    num_classes = len(dd["train"].features["label"].names)
    torch.manual_seed(0)
    unet = build_unet(gcfg, train_x.shape[-1], train_x.shape[1], num_classes).to(device).eval()
    if device == "cuda":
        unet = unet.to(memory_format=torch.channels_last)
    sched_conf = dict(train_scheduler(gcfg).config)
    meta = {"null_label": num_classes, "image_size": int(train_x.shape[-1]), "channels": int(train_x.shape[1]),
            "class_names": list(dd["train"].features["label"].names)}
    generator = diffusion_generator(unet, sched_conf, meta)
    judge = build_model(fcfg.judge_arch, num_classes, int(train_x.shape[1])).to(device).eval()
    space = FeatureSpace("judge", device=device, batch_size=fcfg.batch_size, judge=judge,
                         judge_in_chans=int(train_x.shape[1]))
    labeled_x = torch.cat([train_x, val_x])
    kid_subsets = args.kid_subsets or fcfg.kid_subsets
    with section("real references (fixed; not timed)"):
        f_train = space(train_x)
        f_manifold = space(labeled_x[: args.max_real])
        f_ref = space(test_x[: args.max_real])

    rows = []
    for n in args.sizes:
        with section(f"scaling: N = {n}"):
            per_class = math.ceil(n / num_classes)
            cfg = SampleConfig(sampler="ddim", num_inference_steps=args.steps, guidance_scale=2.0,
                               per_class=per_class, batch_size=batch)
            t = {}
            t["sample"], (syn_x, _, _) = timed(
                lambda: generate(generator, generation_plan(num_classes, per_class), range(n), cfg, 0, batch,
                                 progress=False), device)
            syn_y = torch.arange(n) // per_class
            t["judge_scores"], _ = timed(lambda: judge_scores(judge, syn_x, syn_y, fcfg.batch_size, device), device)
            t["features"], f_syn = timed(lambda: space(syn_x), device)
            t["realism_knn"], _ = timed(lambda: realism(f_syn, f_manifold, k=fcfg.realism_k), device)
            t["nearest_train"], _ = timed(lambda: nearest(f_syn, f_train), device)
            t["duplicate_hashing"], _ = timed(lambda: duplicate_flags(syn_x, labeled_x, test_x), device)
            if not args.no_set_metrics:
                t["set_metrics"], _ = timed(lambda: set_metrics(f_syn, f_ref, "judge", k=fcfg.realism_k,
                                                                kid_subsets=kid_subsets), device)
            t["total"] = sum(t.values())
            rows.append({"n": n, "seconds": t, "seconds_per_image": {k: v / n for k, v in t.items()}})
            print("  " + ", ".join(f"{k} {v * 1e3 / n:.3f} ms/img" for k, v in t.items()), flush=True)

    lo, hi = min(rows, key=lambda r: r["n"]), max(rows, key=lambda r: r["n"])
    parts = list(lo["seconds"])
    growth = {}
    for k in parts:
        a = lo["seconds_per_image"][k]
        b = hi["seconds_per_image"][k]
        exponent = math.log(max(hi["seconds"][k], 1e-12) / max(lo["seconds"][k], 1e-12)) / math.log(hi["n"] / lo["n"])
        growth[k] = {"per_image_ratio_largest_vs_smallest": b / a if a > 0 else None,
                     "exponent_cost_vs_n": exponent,
                     "linear_or_better": b / a <= LINEAR_TOLERANCE if a > 0 else None}
    pipeline_parts = [k for k in parts if k not in ("set_metrics", "total")]
    per_image_work = {"seconds_per_image": {str(r["n"]): sum(r["seconds_per_image"][k] for k in pipeline_parts)
                                            for r in rows}}
    a = per_image_work["seconds_per_image"][str(lo["n"])]
    b = per_image_work["seconds_per_image"][str(hi["n"])]
    per_image_work.update(ratio_largest_vs_smallest=b / a, linear=b / a <= LINEAR_TOLERANCE,
                          parts=pipeline_parts)
    result = {
        "settings": {"sizes": args.sizes, "sampler": "ddim", "steps": args.steps, "guidance_scale": 2.0,
                     "unet_block_out_channels": list(args.blocks), "sample_batch_size": batch,
                     "unet": "randomly initialised micro UNet2DModel (timing only)",
                     "judge": f"randomly initialised timm {fcfg.judge_arch} "
                              "(timing only: the same work as a trained one)",
                     "feature_space": "judge (penultimate layer)", "real_reference_size": args.max_real,
                     "set_metrics": None if args.no_set_metrics else {"kid_subsets": kid_subsets, "k": fcfg.realism_k},
                     "train_reference_size": len(train_x),
                     "duplicate_reference": f"{len(labeled_x)} labeled + {len(test_x)} test images",
                     "linear_tolerance": LINEAR_TOLERANCE, "quick": args.quick},
        "rows": rows,
        "growth": growth,
        "per_image_work_sample_plus_filter": per_image_work,
        "notes": "duplicate hashing hashes the fixed real images on every call (constant cost, so its per-image "
                 "cost falls with N); set_metrics' precision/recall needs the k-NN radii of the synthetic set "
                 "within itself (N x N distances, torch-fidelity), so it is the one quadratic piece.",
    }
    save("scaling", device, result, args.out_dir)
    return result


if __name__ == "__main__":
    main()
