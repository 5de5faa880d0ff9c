"""A variant's seeds one after another on every core against side by side, one process per core.

    python -m bench.seeds [--seeds 5] [--steps 300] [--fashion-mnist DIR]

Both sides are ``pipeline.training.classifier.train_runs`` with the cpu profile's classifier
(test_resnet, batch 64, classic augmentation) on 50 Fashion-MNIST images per class (prepare's split rule),
``--seeds`` runs of ``--steps`` steps each: ``workers: 1`` (torch's threads on every core) against
``workers: auto`` (one process per core at one thread). Alternated, so a change of load hits both.
Writes ``bench/results/seeds-cpu.json``; the figure is ``ratio_runs_per_second``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from bench.common import alternate, parser, rate, ratio, save, section, setup


def main(argv=None) -> dict:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=5, help="runs per side (the cpu profile's seeds per variant)")
    p.add_argument("--steps", type=int, default=300, help="steps per run")
    p.add_argument("--fashion-mnist", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    args = p.parse_args(argv)
    device = setup(args)
    if args.quick:
        args.seeds, args.steps = 2, 4

    from pipeline.config import Params, PrepareConfig
    from pipeline.core.device import DevicePolicy
    from pipeline.core.parallel import cpu_cores
    from pipeline.core.sources import Source, read_idx
    from pipeline.core.splits import make_splits
    from pipeline.training.classifier import VariantData, train_runs

    x = read_idx(args.fashion_mnist / "train-images-idx3-ubyte.gz").astype(np.uint8)[:, None]
    y = read_idx(args.fashion_mnist / "train-labels-idx1-ubyte.gz").astype(np.int64)
    n = 5 if args.quick else 50  # prepare's split rule, as the pipeline draws its labeled and val images
    names = [str(c) for c in np.unique(y)]
    idx, _ = make_splits(Source(x.transpose(0, 2, 3, 1), y, names, x[:0].transpose(0, 2, 3, 1), y[:0]),
                         PrepareConfig(labeled_per_class=n, val_per_class=n, unlabeled_pool=0), 0)
    split = {k: (torch.from_numpy(x[idx[k]]), torch.from_numpy(y[idx[k]])) for k in ("train", "val")}
    cfg = Params().train_classifier.model_copy(update={"steps": args.steps, "eval_every": 100})  # the cpu profile's
    spec = cfg.variants["real+classic"]
    data = VariantData(split["train"], split["val"], names)
    jobs = [(1000 + i, 0.0) for i in range(args.seeds)]
    policy = DevicePolicy.for_device(device)
    sides = {"side by side": lambda: train_runs(cfg, spec, data, jobs, policy, "auto"),
             "one after another": lambda: train_runs(cfg, spec, data, jobs, policy, 1)}
    with section(f"{args.seeds} seeds x {args.steps} steps of {cfg.arch}, batch {cfg.batch_size}, classic"):
        seconds, _, last = alternate(sides, args.repeats, device)
    rates = {k: rate(args.seeds, v) for k, v in seconds.items()}
    val = {k: [round(h["best_val_acc"], 4) for _, h in runs] for k, runs in last.items()}
    result = {"settings": {"arch": cfg.arch, "seeds": args.seeds, "steps": args.steps, "batch_size": cfg.batch_size,
                           "augment": spec.augment, "train_images": len(data.train[1]), "val_images": len(data.val[1]),
                           "cores": cpu_cores(), "workers_side_by_side": min(cpu_cores(), args.seeds),
                           "threads_one_after_another": torch.get_num_threads(), "repeats": args.repeats,
                           "order": "alternated", "quick": args.quick},
              "runs": {k: {**r, "runs_per_second": r["per_second_best"]} for k, r in rates.items()},
              "ratio_runs_per_second": ratio(rates["side by side"], rates["one after another"]),
              "best_val_accuracy": val}
    save("seeds", device, result, args.out_dir)
    return result


if __name__ == "__main__":
    main()
