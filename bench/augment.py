"""Classic augmentation batched on the device against the per-image loop it replaced.

batched   = ``pipeline.training.augment.trivial_augment_wide`` (one op + magnitude per image drawn
            from the training loop's generator, the batch grouped by op, each group transformed at
            once on the training device) then ``crop_flip``: what ``fit`` runs.
per_image = the code before: ``v2.TrivialAugmentWide()`` called on each image of the batch in
            Python on the CPU (the global RNG), then the batch moved to the device and ``crop_flip``.
            It lives here only, for this comparison.

Timed side by side, alternated: the augmentation alone (per batch) and whole training steps of
``fit`` with ``augment="classic"`` (the cpu profile's classifier; the per-image side is
``fit`` with the old augmentation put back in, otherwise the same loop).

``--accuracy``: validation accuracy (never test) of the real+classic variant through
``train_one`` with each side, at the cpu profile's settings, ``--seeds`` seeds on prepared
Fashion-MNIST (made in ``--work`` when missing): the batched version must not lose accuracy.
Writes ``augment-accuracy-<device>.json``.
"""
from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import torch

import pipeline.training.classifier as training
from bench.common import alternate, parser, rate, ratio, save, section, setup
from pipeline.training.augment import crop_flip, trivial_augment_wide


def per_image_trivial_augment(x: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
    """The replaced code: torchvision's TrivialAugmentWide image by image on the CPU (global RNG;
    ``gen`` unused), the result back on ``x``'s device."""
    from torchvision.transforms import v2

    t = v2.TrivialAugmentWide()
    return torch.stack([t(im) for im in x.cpu()]).to(x.device)


@contextlib.contextmanager
def per_image_in_fit():
    """``fit`` with the per-image augmentation put back (the loop is otherwise the same;
    on CUDA the batch makes one extra round trip to the CPU, as the old code augmented before the copy)."""
    saved = training.trivial_augment_wide
    training.trivial_augment_wide = per_image_trivial_augment
    try:
        yield
    finally:
        training.trivial_augment_wide = saved


def load_images(data: Path | None, n: int = 2000) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, str]:
    """(train x, y, val x, y, what they are): a prepared dataset when there is one, else uniform noise."""
    from pipeline.config import Paths

    path = data or Paths().prepared / "dataset"
    if path.exists():
        from pipeline.core.images import dataset_to_tensors
        from pipeline.core.io import load_dataset_dir

        dd = load_dataset_dir(path, "prepare")
        (tx, ty), (vx, vy) = dataset_to_tensors(dd["train"]), dataset_to_tensors(dd["val"].select(range(64)))
        return tx, ty, vx, vy, f"prepared dataset {path}"
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 1, 28, 28), generator=g).to(torch.uint8)
    y = torch.arange(n) % 10
    return x, y, x[:64], y[:64], "uniform noise 28x28x1 (no prepared dataset)"


def timing(args, device: str) -> dict:
    cuda = device == "cuda"
    from pipeline.models.classifier import build_model

    tx, ty, vx, vy, what = load_images(args.data)
    batches = args.batches or (5 if args.quick else (500 if cuda else 100))
    sizes = [16] if args.quick else ([64, 256] if cuda else [64])
    aug = {}
    for bs in sizes:
        gen = torch.Generator().manual_seed(0)
        idx = [torch.randint(len(tx), (bs,), generator=gen) for _ in range(batches)]
        x_cpu = [tx[i] for i in idx]

        def batched():
            g = torch.Generator().manual_seed(1)
            for xb in x_cpu:
                out = crop_flip(trivial_augment_wide(xb.to(device, non_blocking=True), g), g)
            return out

        def per_image():
            g = torch.Generator().manual_seed(1)
            for xb in x_cpu:
                out = crop_flip(per_image_trivial_augment(xb).to(device, non_blocking=True), g)
            return out

        batched(), per_image()  # warm-up
        with section(f"augmentation alone: {batches} batches of {bs} on {device}"):
            s, m, _ = alternate({"batched": batched, "per_image": per_image}, args.repeats, device)
        r = {k: rate(batches, v) for k, v in s.items()}
        aug[f"batch_{bs}"] = {**{k: {"ms_per_batch": 1000 / r[k]["per_second_best"], **r[k],
                                     "peak_memory_mib": max(m[k])} for k in r},
                              "ratio_batches_per_second": ratio(r["batched"], r["per_image"])}

    steps = args.steps or (3 if args.quick else (300 if cuda else 100))
    bs = 16 if args.quick else 64
    torch.manual_seed(0)
    init = build_model(args.arch, 10, int(tx.shape[1]))

    def fit():
        _, hist = training.fit(copy.deepcopy(init), training.batch_sources(bs, (tx, ty)), (vx, vy), steps=steps,
                               lr=3e-3, weight_decay=0.05, seed=0, device=device, augment="classic",
                               eval_every=10**9, progress=False)
        return hist["train_loss"][-1]

    def fit_per_image():
        with per_image_in_fit():
            return fit()

    fit(), fit_per_image()  # warm-up
    with section(f"training steps: {args.arch}, {steps} steps of batch {bs}, classic augmentation, on {device}"):
        s, m, _ = alternate({"batched": fit, "per_image": fit_per_image}, args.repeats, device)
    r = {k: rate(steps, v) for k, v in s.items()}
    train = {**{k: {"seconds_per_step": 1 / r[k]["per_second_best"], **r[k], "peak_memory_mib": max(m[k])} for k in r},
             "ratio_steps_per_second": ratio(r["batched"], r["per_image"])}
    return {"settings": {"images": what, "image_shape": list(tx.shape[1:]), "batches_per_run": batches,
                         "batch_sizes": sizes, "arch": args.arch, "train_steps_per_run": steps,
                         "train_batch_size": bs, "repeats": args.repeats, "order": "alternated",
                         "quick": args.quick,
                         "note": "training steps include fit's one validation pass (64 images) and "
                                 "best-state copy at the end"},
            "augmentation": aug, "training": train}


def accuracy(args, device: str) -> dict:
    """Validation accuracy of real+classic, batched vs per-image, per seed (cpu profile settings)."""
    from pipeline.config import Paths, params_from_dict
    from pipeline.core.images import dataset_to_tensors
    from pipeline.core.io import load_dataset_dir
    from pipeline.training.classifier import VariantData, train_one

    params = params_from_dict({"base": {"profile": args.profile, "device": device}})
    paths = Paths(root=args.work)
    if not (paths.prepared / "summary.json").exists():
        from pipeline import prepare
        prepare.run(params, paths)
    dd = load_dataset_dir(paths.prepared / "dataset", "prepare")
    real, val = dataset_to_tensors(dd["train"]), dataset_to_tensors(dd["val"])
    cfg, spec = params.train_classifier, params.train_classifier.variants["real+classic"]
    if args.steps:
        cfg = cfg.model_copy(update={"steps": args.steps})
    seeds = [params.base.seed * 1000 + i for i in range(args.seeds)]
    data = VariantData(real, val, dd["train"].features["label"].names)
    out = {"batched": [], "per_image": []}
    for seed in seeds:  # alternated seed by seed, so a load change hits both sides
        for side in out:
            with per_image_in_fit() if side == "per_image" else contextlib.nullcontext():
                with section(f"accuracy: {side}, seed {seed}, {cfg.steps} steps"):
                    _, hist = train_one(cfg, spec, data, seed, 0.0, device)
            out[side].append({"seed": seed, "val_accuracy": hist["best_val_acc"], "best_step": hist["best_step"],
                              "seconds_per_step": hist["seconds_per_step"]})
            print(f"  {side} seed {seed}: val acc {hist['best_val_acc']:.4f}", flush=True)
    mean = {s: sum(r["val_accuracy"] for r in v) / len(v) for s, v in out.items()}
    n_val, acc = len(val[1]), sum(mean.values()) / 2
    return {"settings": {"variant": "real+classic", "profile": args.profile, "arch": cfg.arch, "steps": cfg.steps,
                         "batch_size": cfg.batch_size, "lr": cfg.lr, "seeds": seeds, "n_train": len(real[1]),
                         "n_val": n_val, "split": "validation only (test never computed)",
                         "noise": f"one seed's accuracy on N = {n_val} has a binomial standard error of about "
                                  f"{100 * (acc * (1 - acc) / n_val) ** 0.5:.1f} points at {100 * acc:.0f}%"},
            "per_seed": out, "mean_val_accuracy": mean,
            "difference_batched_minus_per_image_points": 100 * (mean["batched"] - mean["per_image"]),
            "paired_differences_points": [100 * (a["val_accuracy"] - b["val_accuracy"])
                                          for a, b in zip(out["batched"], out["per_image"])]}


def main(argv=None) -> dict:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--arch", default="test_resnet", help="timm model of the training-step timing (cpu profile's)")
    p.add_argument("--steps", type=int, default=0,
                   help="training steps (timing: 0 = 100 cpu / 300 cuda; --accuracy: 0 = the profile's)")
    p.add_argument("--batches", type=int, default=0, help="batches per augmentation-only run (0 = 100 cpu, 500 cuda)")
    p.add_argument("--data", type=Path, default=None, help="a prepared dataset folder (default: data/prepared/dataset)")
    p.add_argument("--accuracy", action="store_true", help="compare validation accuracy instead of timing")
    p.add_argument("--seeds", type=int, default=2, help="--accuracy: seeds per side")
    p.add_argument("--profile", default="cpu", help="--accuracy: the profile whose train_classifier settings are used")
    p.add_argument("--work", type=Path, default=Path("augment-work"), help="--accuracy: folder of the prepared data")
    args = p.parse_args(argv)
    device = setup(args)
    result = accuracy(args, device) if args.accuracy else timing(args, device)
    save("augment-accuracy" if args.accuracy else "augment", device, result, args.out_dir)
    return result


if __name__ == "__main__":
    main()
