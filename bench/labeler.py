"""The pool labeler's methods side by side on validation: supervised vs FixMatch (flexmatch | da | none).

    python -m bench.labeler --root DIR [--methods supervised,flexmatch,da] [--seeds 0,1]
    python -m bench.labeler --fashion-mnist DIR --methods flexmatch --out bench/results/labeler_tta-cpu.json
    python -m bench.labeler --compare BASE.json LEVER.json ... --out bench/results/labeler_levers-cpu.json

Reads a prepared data folder (``DIR/data/prepared``, written by ``python -m pipeline.prepare --root
DIR``), or draws the pool study's splits from the Fashion-MNIST *training* files (``--fashion-mnist``:
50 labeled + 50 val per class, a 10,000-image pool and a 5,000-image dev split no stage uses;
``bench/pool_study.py``), and trains ``pseudo_label``'s labeler with each method and seed on the
labeled split and the pool, at the params in force (``--set`` overrides, e.g.
``pseudo_label.unlabeled_ratio=2``). Records per run and per way of predicting (``tta``: the image
alone, or the mean with its mirror image): accuracy on val and dev (the choices are made there), the
accuracy of the labels of every pool image against the pool's hidden source labels, overall and per
class (a diagnostic: no stage trains on them), the share of pool images labeled per class, and
seconds. Test accuracy is never computed here. Writes ``bench/results/labeler-<cpu|cuda>.json``.

``--compare`` reads result files of this benchmark (runs in separate processes, e.g. one lever per core)
and writes the ablation: files with the same ``pseudo_label`` settings are one lever, each lever's
mean per way of predicting and its difference from the first file's settings, paired by method and seed.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bench.common import environment
from bench.pool_study import SPLIT, TINY, draw_splits
from pipeline.config import load_params
from pipeline.core.device import policy_for
from pipeline.core.entrypoint import parse_set
from pipeline.core.images import class_names_of, dataset_to_tensors
from pipeline.core.io import load_dataset_dir, write_json
from pipeline.core.stats import mean_ci, paired_difference
from pipeline.config import learner_config
from pipeline.training.classifier import VariantData, accuracy, predict_proba, train_one

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("val_accuracy", "dev_accuracy", "pool_label_accuracy", "worst_class_pool_accuracy", "seconds")


def one_run(method: str, seed: int, cfg, data, policy) -> dict:
    (tx, ty), (vx, vy), pool_x, hidden, k, dev = data
    t0 = time.time()
    lab = cfg.model_copy(update={"method": "supervised"} if method == "supervised" else {"fairness": method})
    model, hist = train_one(*learner_config(lab), VariantData((tx, ty), (vx, vy), [str(c) for c in range(k)],
                                                               pool=pool_x, learner=lab), seed, 0.0, policy)
    seconds = round(time.time() - t0, 1)
    out = []
    for flip in (False, True):
        def acc(x, y):
            return round(accuracy(model, x, y, 512, policy, flip), 4)
        pred = predict_proba(model, pool_x, 512, policy, flip).argmax(1)
        right = pred == hidden
        per_class = {c: round(float(right[hidden == c].float().mean()), 4) for c in range(k)}
        out.append({"method": method, "tta": "flip" if flip else "none", "seed": seed, "val_accuracy": acc(vx, vy),
                    **({"dev_accuracy": acc(*dev)} if dev else {}), "best_step": hist["best_step"],
                    "pool_label_accuracy": round(float(right.float().mean()), 4),
                    "pool_label_accuracy_per_class": per_class, "worst_class_pool_accuracy": min(per_class.values()),
                    "labeled_share_per_class": [round(float((pred == c).float().mean()), 4) for c in range(k)],
                    "mask_rate_last": (hist.get("mask_rate") or [None])[-1], "seconds": seconds})
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--compare", type=Path, nargs="+", help="result files: the first one's settings are the base")
    where.add_argument("--root", type=Path, help="project root holding data/prepared")
    where.add_argument("--fashion-mnist", type=Path, help="folder of the Fashion-MNIST files: the pool study's splits")
    p.add_argument("--tiny", action="store_true", help="--fashion-mnist: the pool study's tiny splits (tests)")
    p.add_argument("--params", default=str(ROOT / "params.yaml"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--methods", default="supervised,flexmatch,da")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if args.compare:
        result = compare(args.compare)
        write_json(args.out or ROOT / "bench" / "results" / "labeler_levers-cpu.json", result)
        print(json.dumps(result["levers"], indent=2))
        return result
    if args.threads:
        torch.set_num_threads(args.threads)
    params = load_params(args.params, parse_set(args.set))
    cfg, policy = params.pseudo_label, policy_for(params.base)
    if args.fashion_mnist:
        data = study_splits(args.fashion_mnist, TINY if args.tiny else SPLIT)
    else:
        data = prepared_splits(args.root)
    runs = []
    for method in args.methods.split(","):
        for seed in map(int, args.seeds.split(",")):
            runs += one_run(method, seed, cfg, data, policy)
            print(json.dumps([{k: v for k, v in r.items() if "per_class" not in k} for r in runs[-2:]]), flush=True)
    summary = {}
    for method in args.methods.split(","):
        for tta in ("none", "flip"):
            mine = [r for r in runs if (r["method"], r["tta"]) == (method, tta)]
            summary[f"{method}, tta {tta}"] = {key: mean_ci([r[key] for r in mine]) for key in METRICS
                                               if key in mine[0]}
    settings = {"pseudo_label": cfg.model_dump(mode="json"), "n_val": len(data[1][1]),
                "n_dev": len(data[5][1]) if data[5] else 0, "n_pool": len(data[2]), "n_labeled": len(data[0][1]),
                "device": policy.as_record(), "torch_threads": torch.get_num_threads()}
    result = {"benchmark": "labeler", **environment(policy.device), "settings": settings,
              "summary": summary, "runs": runs}
    out = args.out or ROOT / "bench" / "results" / f"labeler-{'cuda' if policy.is_cuda else 'cpu'}.json"
    write_json(out, result)
    print(json.dumps(summary, indent=2))
    return result


def compare(files: list[Path]) -> dict:
    """The levers' ablation: each set of ``pseudo_label`` settings in ``files`` against the first file's."""
    docs = [(Path(f).name, json.loads(Path(f).read_text())) for f in files]
    base_cfg = docs[0][1]["settings"]["pseudo_label"]
    levers: dict[str, dict] = {}
    for file, doc in docs:
        changed = {k: v for k, v in doc["settings"]["pseudo_label"].items() if v != base_cfg[k]}
        name = ", ".join(f"{k}={v}" for k, v in changed.items()) or "base"
        lever = levers.setdefault(name, {"changed": changed, "files": [], "runs": {}})
        lever["files"].append(file)
        lever["runs"].update({(r["method"], r["tta"], r["seed"]): r for r in doc["runs"]})
    base = levers[next(iter(levers))]["runs"]
    out = {}
    for name, lever in levers.items():
        for tta in ("none", "flip"):
            keys = sorted(k for k in lever["runs"] if k[1] == tta and k in base)
            row = {"changed": lever["changed"], "files": lever["files"], "seeds": [k[2] for k in keys]}
            for m in (m for m in METRICS if all(m in base[k] for k in keys)):
                ours, ref = [lever["runs"][k][m] for k in keys], [base[k][m] for k in keys]
                row[m] = mean_ci(ours)
                if lever["runs"] is not base:
                    row[f"{m}_vs_base"] = paired_difference(ours, ref)
            out[f"{name}, tta {tta}"] = row
    runs = [{**r, "lever": name} for name, lever in levers.items() for r in lever["runs"].values()]
    environment_keys = ("device_name", "date", "git_rev", "torch_threads", "load_average_1_5_15")
    return {"benchmark": "labeler levers", "compared": [f for f, _ in docs],
            "environments": {f: {k: d.get(k) for k in environment_keys} for f, d in docs},
            "settings": {f: d["settings"] for f, d in docs}, "levers": out, "runs": runs}


def prepared_splits(root: Path) -> tuple:
    dd = load_dataset_dir(root / "data" / "prepared" / "dataset", "prepare")
    pool_x, hidden = dataset_to_tensors(dd["pool"], label_column="hidden_label")
    return (dataset_to_tensors(dd["train"]), dataset_to_tensors(dd["val"]), pool_x, hidden,
            len(class_names_of(dd["train"])), None)


def study_splits(folder: Path, sizes: dict) -> tuple:
    """The pool study's labeled, val, pool and dev splits of the Fashion-MNIST training files."""
    t = {k: (torch.from_numpy(a), torch.from_numpy(b)) for k, (a, b) in draw_splits(folder, sizes).items()}
    return t["labeled"], t["val"], t["pool"][0], t["pool"][1], 10, t["dev"]


if __name__ == "__main__":
    main()
