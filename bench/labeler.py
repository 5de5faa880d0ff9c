"""The pool labeler's methods side by side on validation: supervised vs FixMatch (flexmatch | da | none).

    python -m bench.labeler --root DIR [--methods supervised,flexmatch,da] [--seeds 0,1] [--steps N]

Reads a prepared data folder (``DIR/data/prepared``, written by ``python -m pipeline.prepare --root
DIR``) and trains ``pseudo_label``'s labeler with each method and seed on the labeled split and the
pool, at the params in force (``--set`` overrides, e.g. ``pseudo_label.unlabeled_ratio=2``). Records
per run: validation accuracy (N = the val split; the choice is made on it), the accuracy of the
labels of every pool image against the pool's hidden source labels, overall and per class (a
diagnostic: no stage trains on them), the share of pool images labeled per class, and seconds.
Test accuracy is never computed here. Writes ``bench/results/labeler-<cpu|cuda>.json``.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from pipeline.config import load_params
from pipeline.core.device import policy_for
from pipeline.core.entrypoint import parse_set
from pipeline.core.images import class_names_of, dataset_to_tensors
from pipeline.core.io import load_dataset_dir, write_json
from pipeline.core.stats import mean_ci
from pipeline.models.classifier import build_model
from pipeline.training.classifier import batch_sources, fit_classifier, predict_proba
from pipeline.training.semi import fit_fixmatch

ROOT = Path(__file__).resolve().parents[1]


def one_run(method: str, seed: int, cfg, data, policy) -> dict:
    (tx, ty), (vx, vy), pool_x, hidden, k = data
    torch.manual_seed(seed)
    model = build_model(cfg.arch, k, tx.shape[1])
    t0 = time.time()
    if method == "supervised":
        model, hist = fit_classifier(model, batch_sources(cfg.batch_size, (tx, ty)), (vx, vy), steps=cfg.steps, lr=cfg.lr,
                                     weight_decay=cfg.weight_decay, seed=seed, device=policy, augment=cfg.augment,
                                     eval_every=max(1, cfg.steps // 10), progress=False)
    else:
        model, hist = fit_fixmatch(model, (tx, ty), pool_x, (vx, vy), cfg.model_copy(update={"fairness": method}),
                                   seed=seed, device=policy, progress=False)
    pred = predict_proba(model, pool_x, 512, policy).argmax(1)
    right = pred == hidden
    per_class = {c: round(float(right[hidden == c].float().mean()), 4) for c in range(k)}
    return {"method": method, "seed": seed, "val_accuracy": hist["best_val_acc"], "best_step": hist["best_step"],
            "pool_label_accuracy": round(float(right.float().mean()), 4),
            "pool_label_accuracy_per_class": per_class, "worst_class_pool_accuracy": min(per_class.values()),
            "labeled_share_per_class": [round(float((pred == c).float().mean()), 4) for c in range(k)],
            "mask_rate_last": (hist.get("mask_rate") or [None])[-1], "seconds": round(time.time() - t0, 1)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", type=Path, required=True, help="project root holding data/prepared")
    p.add_argument("--params", default=str(ROOT / "params.yaml"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--methods", default="supervised,flexmatch,da")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    params = load_params(args.params, parse_set(args.set))
    cfg, policy = params.pseudo_label, policy_for(params.base)
    dd = load_dataset_dir(args.root / "data" / "prepared" / "dataset", "prepare")
    pool_x, hidden = dataset_to_tensors(dd["pool"], label_column="hidden_label")
    data = (dataset_to_tensors(dd["train"]), dataset_to_tensors(dd["val"]), pool_x, hidden,
            len(class_names_of(dd["train"])))
    runs = []
    for method in args.methods.split(","):
        for seed in map(int, args.seeds.split(",")):
            runs.append(one_run(method, seed, cfg, data, policy))
            print(json.dumps({k: v for k, v in runs[-1].items() if "per_class" not in k}), flush=True)
    summary = {}
    for method in args.methods.split(","):
        mine = [r for r in runs if r["method"] == method]
        summary[method] = {key: mean_ci([r[key] for r in mine]) for key in
                           ("val_accuracy", "pool_label_accuracy", "worst_class_pool_accuracy", "seconds")}
    result = {"settings": {"pseudo_label": cfg.model_dump(mode="json"), "n_val": len(data[1][1]),
                           "n_pool": len(pool_x), "n_labeled": len(data[0][1]), "device": policy.as_record(),
                           "torch_threads": torch.get_num_threads()},
              "summary": summary, "runs": runs}
    out = args.out or ROOT / "bench" / "results" / f"labeler-{'cuda' if policy.is_cuda else 'cpu'}.json"
    write_json(out, result)
    print(json.dumps(summary, indent=2))
    return result


if __name__ == "__main__":
    main()
