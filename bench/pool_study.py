"""The pool study: what synthetic data adds beyond the pool, on a dev split, against an oracle ceiling.

    python -m bench.pool_study splits --fashion-mnist DIR --out .gpu/pool_study   # here: splits + seed-0 labeler
    python -m bench.pool_study run --data .gpu/pool_study --out-dir OUT [--tiny]   # the GPU run
    python -m bench.pool_study report bench/results/pool_study-cuda.json           # reports/pool_study.md

``splits`` draws, per class and with a fixed seed, from the Fashion-MNIST *training* set: 50 labeled
+ 50 val (as the cpu profile), a 10,000-image pool (labels hidden) and a 5,000-image *dev* split that
no stage uses; the official test set is never read. It also trains the seed-0 FixMatch labeler at the
params in force and stores it: its labels train the DPT generator and the pseudo rows.

``run`` trains, in parallel processes: two generators of the params' architecture (the labeled images
alone; DPT: labeled + the labeler-labelled pool), samples from each (from noise, and img2img 0.5 from
the labeled + pool images), keeps the images the labeler gives their intended class p >= 0.5, then
trains the params' classifier with ``--seeds`` seeds per row. Every accuracy is on the dev split
(N = 5,000; the val split only picks each run's best checkpoint, as in the pipeline). Rows: the
labeler itself, real+classic, real+pseudo+classic, real + synthetic at several sizes (the scaling
curve), the oracle (the same number of truly labeled pool images in place of synthetic ones), DPT's
real+pseudo+synthetic, synthetic-only. Each finished run is appended to the JSON at once, so a run
stopped at its time cap keeps what it measured, and ``run --resume THAT.json`` runs only the rest
(the generators again only when a row that needs them is missing: their samples are not kept).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch

from bench.common import device_name

ROOT = Path(__file__).resolve().parents[1]
SPLIT = {"labeled": 50, "val": 50, "pool": 1000, "dev": 500}  # per class
TINY = {"labeled": 5, "val": 5, "pool": 20, "dev": 10}
_CACHE: dict = {}


# ---- here: splits and the seed-0 labeler -------------------------------------------------

def make_splits(x: np.ndarray, y: np.ndarray, sizes: dict, seed: int = 0) -> dict:
    """Disjoint per-class draws from one labeled set: {split: (x, y)}, class-major."""
    rng = np.random.default_rng(seed)
    out = {name: ([], []) for name in sizes}
    for c in np.unique(y):
        rows = rng.permutation(np.flatnonzero(y == c))
        start = 0
        for name, n in sizes.items():
            out[name][0].append(x[rows[start:start + n]])
            out[name][1].append(y[rows[start:start + n]])
            start += n
    return {name: (np.concatenate(a), np.concatenate(b)) for name, (a, b) in out.items()}


def draw_splits(folder: Path, sizes: dict) -> dict:
    """make_splits of the Fashion-MNIST *training* files in ``folder`` (the official test set is never read)."""
    from pipeline.core.sources import read_idx

    x = read_idx(folder / "train-images-idx3-ubyte.gz").astype(np.uint8)[:, None]
    y = read_idx(folder / "train-labels-idx1-ubyte.gz").astype(np.int64)
    return make_splits(x, y, sizes)


def study_params(tiny: bool):
    """params.yaml as the pipeline reads it (micro profile when tiny), the device chosen by this machine."""
    from pipeline.config import load_params

    return load_params(ROOT / "params.yaml", {"base.device": "auto", **({"base.profile": "micro"} if tiny else {})})


def splits(args) -> None:
    from safetensors.torch import save_file

    from pipeline.core.device import policy_for
    from pipeline.config import learner_config
    from pipeline.training.classifier import VariantData, predict_proba, train_one

    parts = draw_splits(args.fashion_mnist, TINY if args.tiny else SPLIT)
    params = study_params(args.tiny)
    t = {k: (torch.from_numpy(a), torch.from_numpy(b)) for k, (a, b) in parts.items()}
    cfg, policy = params.pseudo_label, policy_for(params.base)
    t0 = time.time()
    model, hist = train_one(*learner_config(cfg), VariantData(t["labeled"], t["val"], [str(c) for c in range(10)],
                                                              pool=t["pool"][0], learner=cfg), 0, 0.0, policy)
    proba = predict_proba(model, t["pool"][0], 512, policy)
    args.out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out / "splits.npz", **{f"{k}_{v}": a for k, (xa, ya) in parts.items()
                                                     for v, a in (("x", xa), ("y", ya))},
                        pool_proba=proba.numpy())
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, args.out / "labeler.safetensors")
    info = {"sizes_per_class": TINY if args.tiny else SPLIT, "labeler": cfg.model_dump(mode="json"),
            "labeler_val_accuracy": hist["best_val_acc"], "labeler_seconds": round(time.time() - t0, 1),
            "labeler_pool_accuracy": float((proba.argmax(1) == t["pool"][1]).float().mean()),
            "device": policy.as_record(), "torch_threads": torch.get_num_threads()}
    (args.out / "splits.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info, indent=2))


# ---- the GPU run: workers ------------------------------------------------------------------

def _init(threads: int) -> None:
    torch.set_num_threads(threads)


def _data(data_dir: str, tiny: bool) -> dict:
    """The splits as tensors, loaded once per worker process."""
    if data_dir not in _CACHE:
        z = np.load(Path(data_dir) / "splits.npz")
        d = {k: torch.from_numpy(z[k]) for k in z.files}
        d["params"], d["dir"] = study_params(tiny), data_dir
        _CACHE[data_dir] = d
    return _CACHE[data_dir]


def _labeler(d: dict, policy):
    from safetensors.torch import load_file

    from pipeline.models.classifier import build_model

    model = build_model(d["params"].pseudo_label.arch, 10, 1)
    model.load_state_dict(load_file(Path(d["dir"]) / "labeler.safetensors"))
    return policy.prepare(model).eval()


def task_generator(name: str, data_dir: str, work: str, tiny: bool, steps: int, batch: int, per_class: int,
                   min_conf: float, modes: tuple[str, ...] = ("generate", "img2img")) -> dict:
    """Train one generator (name: labeled | dpt), sample from noise (and img2img for dpt) as ``modes`` ask,
    score by the labeler."""
    from pipeline.config import SampleConfig
    from pipeline.core.device import policy_for
    from pipeline.models.diffusion import DiffusionGenerator, make_pipeline, train_scheduler
    from pipeline.models.sampling import generate, generation_plan, img2img_plan
    from pipeline.training.classifier import predict_proba
    from pipeline.training.diffusion import make_backbone, train
    from pipeline.training.generator import TrainData, generator_meta

    d = _data(data_dir, tiny)
    params = d["params"]
    policy = policy_for(params.base)
    cfg = params.train_generator.model_copy(update={"steps": steps, "batch_size": batch,
                                                     "checkpoint_every": steps, "log_every": max(1, steps // 8)})
    lx, ly = d["labeled_x"], d["labeled_y"]
    px, py = d["pool_x"], d["pool_proba"].argmax(1)
    if name == "dpt":  # DPT step two: the labeled images + the whole pool with the labeler's labels
        x, y = torch.cat([lx, px]), torch.cat([ly, py])
        weights = torch.cat([torch.full((len(lx),), cfg.labeled_weight), torch.ones(len(px))]).to(policy.device)
    else:
        x, y, weights = lx, ly, None
    names = [str(i) for i in range(10)]
    data = TrainData(x.to(policy.device), y.to(policy.device), 10, class_names=names, weights=weights,
                     num_pseudo=len(px) if name == "dpt" else 0)
    t0 = time.time()
    model, _ = make_backbone(cfg, data)
    res = train(model, cfg, data, seed=0, ckpt_dir=Path(work) / f"ckpt-{name}", chash=name, policy=policy)
    train_s = time.time() - t0
    gen = DiffusionGenerator(make_pipeline(res.ema_model.to(policy.device), dict(train_scheduler(cfg).config), names,
                                           data.image_size, policy), generator_meta(cfg, data))
    scfg = params.sample
    batch_s = 1024 if policy.is_cuda else 64
    labeler = _labeler(d, policy)
    out, t1 = {"generator": name, "train_seconds": round(train_s, 1), "steps": steps, "batch": batch,
               "final_loss": float(np.mean(res.losses[-50:]))}, time.time()
    plans = {"generate": generation_plan(10, per_class)} if "generate" in modes else {}
    if name == "dpt" and "img2img" in modes:  # img2img of the labeled images and the pool, each with its label, once
        src, lab = torch.cat([lx, px]), torch.cat([ly, py])
        plans["img2img"] = img2img_plan(src, lab, (0.5,), 1, [("src", i) for i in range(len(src))])
    for mode, plan in plans.items():
        xs, ys, _ = generate(gen, plan, range(len(plan)), SampleConfig(**{**scfg.model_dump(), "mode": mode}),
                             1, batch_s, progress=False)
        conf = predict_proba(labeler, xs, 1024, policy).gather(1, ys[:, None]).squeeze(1)
        torch.save({"x": xs, "y": ys, "conf": conf}, Path(work) / f"syn-{name}-{mode}.pt")
        out[f"{mode}_images"] = len(xs)
        out[f"{mode}_accepted"] = int((conf >= min_conf).sum())
        out[f"{mode}_accepted_per_class"] = [int(((conf >= min_conf) & (ys == c)).sum()) for c in range(10)]
    out["sample_seconds"] = round(time.time() - t1, 1)
    return out


def balanced(x: torch.Tensor, y: torch.Tensor, n: int, keep: torch.Tensor | None = None):
    """Up to n / 10 images of each class (the first ones, among ``keep``)."""
    keep = torch.ones(len(y), dtype=torch.bool) if keep is None else keep
    rows = torch.cat([torch.nonzero(keep & (y == c)).flatten()[: n // 10] for c in range(10)])
    return x[rows], y[rows]


def task_labeler(seed: int, data_dir: str, tiny: bool, row: str = "labeler (FixMatch)", steps_scale: int = 1) -> dict:
    from pipeline.core.device import policy_for
    from pipeline.config import learner_config
    from pipeline.training.classifier import VariantData, predict_proba, train_one

    d = _data(data_dir, tiny)
    params = d["params"]
    policy = policy_for(params.base)
    cfg = params.pseudo_label.model_copy(update={"steps": params.pseudo_label.steps * steps_scale})
    t0 = time.time()
    data = VariantData((d["labeled_x"], d["labeled_y"]), (d["val_x"], d["val_y"]), [str(c) for c in range(10)],
                       pool=d["pool_x"], learner=cfg)
    model, hist = train_one(*learner_config(cfg), data, seed, 0.0, policy)
    dev = predict_proba(model, d["dev_x"], 1024, policy)
    pool = predict_proba(model, d["pool_x"], 1024, policy).argmax(1)
    return {"row": row, "seed": seed, "steps": cfg.steps, **_scores(dev, d["dev_y"]), "val": hist["best_val_acc"],
            "pool_label_accuracy": float((pool == d["pool_y"]).float().mean()),
            "pool_label_accuracy_per_class": [float((pool == d["pool_y"])[d["pool_y"] == c].float().mean())
                                              for c in range(10)], "seconds": round(time.time() - t0, 1)}


def teacher_scores(data_dir: str, tiny: bool) -> dict:
    """The seed-0 labeler (the teacher of the rows with ``taught`` sources) on the dev split."""
    from pipeline.core.device import policy_for
    from pipeline.training.classifier import predict_proba

    d = _data(data_dir, tiny)
    policy = policy_for(d["params"].base)
    return _scores(predict_proba(_labeler(d, policy), d["dev_x"], 1024, policy), d["dev_y"])


def _scores(probs: torch.Tensor, y: torch.Tensor) -> dict:
    from pipeline.core.stats import classification_metrics

    m = classification_metrics(probs, y, 10)
    return {"dev": m["accuracy"], "dev_per_class": m["per_class_accuracy"]}


def task_classifier(row: str, spec: dict, seed: int, data_dir: str, work: str, tiny: bool) -> dict:
    """One classifier of one row and seed: the params' classifier, classic augmentation, scored on dev."""
    from pipeline.core.device import policy_for
    from pipeline.models.classifier import build_model
    from pipeline.training.classifier import Teacher, batch_sources, fit, predict_proba, sharpen

    d = _data(data_dir, tiny)
    params = d["params"]
    cfg, policy = params.train_classifier, policy_for(params.base)
    syn, info = None, {}
    if spec.get("source") == "oracle":  # truly labeled pool images in place of synthetic ones
        syn = balanced(d["pool_x"], d["pool_y"], spec["n"])
    elif spec.get("source"):
        s = torch.load(Path(work) / f"syn-{spec['source']}.pt")
        syn = balanced(s["x"], s["y"], spec["n"], s["conf"] >= spec["min_conf"])
    if syn is not None and not len(syn[1]):
        raise ValueError(f"{row}: the labeler accepted none of the synthetic images")
    if syn is not None:
        info = {"synthetic_images": len(syn[1]), "synthetic_per_class": torch.bincount(syn[1], minlength=10).tolist()}
    pseudo = (d["pool_x"], sharpen(d["pool_proba"].float(), cfg.pseudo_temperature)) if spec.get("pseudo") else None
    real = spec.get("real", True)
    ratio = spec.get("ratio", 0.5) if real else 1.0
    taught = tuple(spec.get("taught", ()))  # labeled by the seed-0 labeler from each augmented view
    teacher = Teacher([_labeler(d, policy)]) if taught else None
    torch.manual_seed(seed)
    t0 = time.time()
    sources = batch_sources(cfg.batch_size, (d["labeled_x"], d["labeled_y"]) if real else None, pseudo, syn,
                            ratio if syn is not None else 0.0, spec.get("pseudo_share", cfg.pseudo_share), taught)
    model, hist = fit(build_model(cfg.arch, 10, 1), sources, (d["val_x"], d["val_y"]),
                                 steps=cfg.steps * spec.get("steps_scale", 1),
                                 lr=cfg.lr, weight_decay=cfg.weight_decay, seed=seed, device=policy,
                                 augment="classic" if real else "standard", eval_every=cfg.eval_every, teacher=teacher,
                                 progress=False)
    probs = predict_proba(model, d["dev_x"], 1024, policy)
    return {"row": row, "seed": seed, **_scores(probs, d["dev_y"]), "val": hist["best_val_acc"],
            "ratio": ratio if syn is not None else 0.0, **info, "seconds": round(time.time() - t0, 1)}


# ---- the GPU run: the driver ---------------------------------------------------------------

BASE, LABELER, TAUGHT = "real+classic", "labeler (FixMatch)", "real+pseudo+classic, teacher"


def rows(sizes: list[int], min_conf: float) -> dict[str, dict]:
    """Classifier rows: name -> spec (source of synthetic images and their number, pseudo, real, ratio,
    taught sources, pool share, steps_scale)."""
    big = max(sizes)
    out = {BASE: {}, "real+pseudo+classic": {"pseudo": True}}
    for n in sizes:
        out[f"real+synthetic (DPT, generate) n={n}"] = {"source": "dpt-generate", "n": n, "gen": "dpt"}
    for n in sorted({min(sizes), big}):
        out[f"real+oracle (true pool labels) n={n}"] = {"source": "oracle", "n": n}
    out.update({
        f"real+synthetic (DPT, generate) n={big}, share 0.25": {"source": "dpt-generate", "n": big, "ratio": 0.25, "gen": "dpt"},
        f"real+synthetic (DPT, img2img 0.5) n={big}": {"source": "dpt-img2img", "n": big, "gen": "dpt"},
        f"real+synthetic (labeled-only generator) n={big}": {"source": "labeled-generate", "n": big, "gen": "labeled"},
        f"real+pseudo+synthetic (DPT, generate) n={big}": {"source": "dpt-generate", "n": big, "pseudo": True, "gen": "dpt"},
        f"synthetic-only (DPT, generate) n={big}": {"source": "dpt-generate", "n": big, "real": False, "gen": "dpt"},
        # consistent distillation: the labeler labels each augmented view of pool (and synthetic) images
        TAUGHT: {"pseudo": True, "taught": ["pseudo"]},
        f"{TAUGHT}, pool share 0.5": {"pseudo": True, "taught": ["pseudo"], "pseudo_share": 0.5},
        f"{TAUGHT}, 2x steps": {"pseudo": True, "taught": ["pseudo"], "steps_scale": 2},  # a patient student
        f"{BASE}, 2x steps": {"steps_scale": 2},  # its base
        f"real+pseudo+synthetic (DPT, generate), teacher n={big}": {"source": "dpt-generate", "n": big, "pseudo": True,
                                                                    "taught": ["pseudo", "synthetic"], "gen": "dpt"},
        f"real+pseudo+oracle, teacher n={big}": {"source": "oracle", "n": big, "pseudo": True, "taught": ["pseudo"]},
    })
    for spec in out.values():
        if spec.get("gen"):
            spec["min_conf"] = min_conf
    return out


def plan(row_specs: dict[str, dict], seeds: list[int], labeler_scale: int, done: set = frozenset(),
         labelers: bool = True) -> tuple[list[tuple], dict[str, list[tuple]]]:
    """The (kind, row, seed) tasks of a run: those that can start at once, in order, and per generator
    those that wait for it. Seed-major, the generators first: a worker takes a task only when it is
    free, and a generator's rows go ahead of the plain rows still waiting once it is ready, so every
    row gets its first seeds early and a run stopped at its time cap has something of each. ``done``:
    (row, seed) pairs an earlier run finished (``--resume``); a generator is trained only for rows
    that still need it; ``labelers``: False leaves the labeler rows out."""
    long = f"{LABELER}, steps x{labeler_scale}"  # last: the longest and the least needed
    ready = [("labeler", LABELER, s) for s in seeds if labelers]
    later: dict[str, list[tuple]] = {"dpt": [], "labeled": []}
    for s in seeds:
        for name, spec in row_specs.items():
            (later[spec["gen"]] if "gen" in spec else ready).append(("classifier", name, s))
    ready += [("labeler", long, s) for s in seeds[:3] if labeler_scale > 1 and labelers]
    later = {g: [t for t in ts if t[1:] not in done] for g, ts in later.items()}
    later = {g: ts for g, ts in later.items() if ts}
    return [("gen", g, None) for g in later] + [t for t in ready if t[1:] not in done], later


def run(args) -> None:
    from pipeline.core.io import write_json

    tiny = args.tiny
    sizes = [40, 80] if tiny else args.sizes
    seeds = list(range(args.seeds))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    dev_name = "cuda" if torch.cuda.is_available() else "cpu"
    out = Path(args.out_dir) / f"pool_study-{dev_name}.json"
    gen_steps, gen_batch = (10, 16) if tiny else (args.gen_steps, args.gen_batch)
    per_class = max(sizes) * 12 // 100 + (4 if tiny else 0)  # 20% room for the labeler's rejections (about 10%)
    min_conf = 0.0 if tiny else args.min_confidence  # an untrained tiny labeler must not reject everything
    doc = {"benchmark": "pool_study", "device": dev_name,
           "device_name": device_name(dev_name), "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "tiny": tiny, "seeds": seeds,
           "splits": json.loads((Path(args.data) / "splits.json").read_text()),
           "generator": {"steps": gen_steps, "batch": gen_batch, "per_class_sampled": per_class},
           "min_confidence": min_conf, "rows": {n: r for n, r in rows(sizes, min_conf).items() if re.search(args.rows, n)},
           "teacher": teacher_scores(str(Path(args.data).resolve()), tiny), "generators": {}, "runs": []}
    done = set()
    if args.resume:  # an earlier run's finished runs are kept and not run again
        earlier = json.loads(Path(args.resume).read_text())
        doc["runs"] = [r for r in earlier["runs"] if "error" not in r]
        doc["generators"] = earlier.get("generators", {})  # replaced by any generator trained again
        done = {(r["row"], r["seed"]) for r in doc["runs"]}
        doc["resumed_from"] = {"date": earlier.get("date"), "runs": len(doc["runs"]), "seconds": earlier.get("seconds")}
    t_start = time.time()
    ctx = get_context("spawn")
    data_dir = str(Path(args.data).resolve())

    def call(task):
        kind, name, seed = task
        if kind == "gen":  # only the sampling modes its rows ask for
            modes = tuple(sorted({r["source"].split("-", 1)[1] for r in doc["rows"].values() if r.get("gen") == name}))
            return task_generator, (name, data_dir, str(work), tiny, gen_steps, gen_batch, per_class, min_conf, modes)
        if kind == "labeler":
            return task_labeler, (seed, data_dir, tiny) + (() if name == LABELER else (name, args.labeler_scale))
        return task_classifier, (name, doc["rows"][name], seed, data_dir, str(work), tiny)

    ready, later = plan(doc["rows"], seeds, args.labeler_scale, done, labelers=bool(re.search(args.rows, LABELER)))
    with ProcessPoolExecutor(args.workers, mp_context=ctx, initializer=_init, initargs=(args.threads,)) as ex:
        pending: dict = {}
        while ready or pending:
            while ready and len(pending) < args.workers:
                task = ready.pop(0)
                fn, fargs = call(task)
                pending[ex.submit(fn, *fargs)] = task
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for f in finished:
                kind, name, _ = pending.pop(f)
                try:
                    result = f.result()
                except Exception as e:  # keep going: the JSON says which task failed and why
                    result = {"row": name, "error": f"{type(e).__name__}: {e}"}
                if kind == "gen":
                    doc["generators"][name] = result
                    if "error" not in result:
                        ready[:0] = later.pop(name)  # ahead of the plain rows still waiting
                else:
                    doc["runs"].append(result)
                print(f"[{time.time() - t_start:6.1f} s] {kind} {name}: "
                      + json.dumps({k: v for k, v in result.items() if "per_class" not in k}), flush=True)
                doc["seconds"] = round(time.time() - t_start, 1)
                doc["summary"] = summarize(doc)
                write_json(out, doc)
    print(json.dumps(doc["summary"], indent=2))
    print(f"wrote {out}")


def summarize(doc: dict) -> dict:
    """Per row: mean dev accuracy over its seeds and the paired difference (same seeds) against
    real+classic and against real+pseudo+classic and the labeler, the strongest rows without synthetic data."""
    from pipeline.core.stats import mean_ci, paired_difference

    by_row: dict[str, dict[int, dict]] = {}
    for r in doc["runs"]:
        if "error" not in r:
            by_row.setdefault(r["row"], {})[r["seed"]] = r
    out = {}
    for row, runs in by_row.items():
        entry = {"n_seeds": len(runs), "dev": mean_ci([r["dev"] for r in runs.values()])}
        for ref in (BASE, "real+pseudo+classic", TAUGHT, LABELER):
            common = sorted(set(runs) & set(by_row.get(ref, {})))
            if ref != row and len(common) >= 2:
                entry[f"vs {ref}"] = paired_difference([runs[s]["dev"] for s in common],
                                                       [by_row[ref][s]["dev"] for s in common])
        if row != BASE and BASE in by_row:
            common = sorted(set(runs) & set(by_row[BASE]))
            if common:
                entry["per_class_gain_vs_base"] = [round(float(np.mean([runs[s]["dev_per_class"][c]
                                                                        - by_row[BASE][s]["dev_per_class"][c]
                                                                        for s in common])), 4) for c in range(10)]
        out[row] = entry
    return out


CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def markdown(doc: dict) -> str:
    """reports/pool_study.md: the table of rows (dev accuracy, paired intervals), per-class gains, the labeler."""
    s, sp = doc["summary"], doc["splits"]
    n_dev = 10 * sp["sizes_per_class"]["dev"]

    def ci(c):
        return f"{100 * c['mean_diff']:+.2f} [{100 * c['low']:+.2f}, {100 * c['high']:+.2f}]" if c else ""
    lines = ["# Pool study: the labeler, self-training, synthetic data at scale and the oracle ceiling", "",
             f"`python -m bench.pool_study` on {doc['device_name']} ({doc['date'][:10]}; raw runs: "
             f"`bench/results/pool_study-{doc['device']}.json`). Fashion-MNIST *training* images only, drawn per class "
             f"with a fixed seed: {sp['sizes_per_class']['labeled']} labeled and {sp['sizes_per_class']['val']} val per "
             f"class (the cpu profile's), a pool of {10 * sp['sizes_per_class']['pool']:,} (labels hidden) and a dev "
             f"split of {n_dev:,} that no stage uses. Every accuracy below is on the dev split (N = {n_dev:,}); val only "
             "picks each run's best checkpoint, as in the pipeline; the test set was never read. Intervals: paired "
             "by seed, 95%, Student t. Classifier: the cpu profile's (test_resnet, 1,500 steps of 64, classic "
             "augmentation); synthetic or oracle images fill half of each batch unless the row says otherwise.", ""]
    if doc.get("command"):
        lines += [f"Run: `{doc['command']}` ({doc['seconds']:,.0f} s; {doc.get('load', 'load not recorded')}).", ""]
    if doc.get("stopped"):
        lines += [f"Note: {doc['stopped']}.", ""]
    if doc.get("findings"):  # written by whoever read the runs, stored beside them
        lines += ["## What it says", ""] + [f"- {f}" for f in doc["findings"]] + ["", "## Rows", ""]
    refs = [r for r in (BASE, TAUGHT, LABELER) if r in s]  # the columns: the strongest rows without synthetic data
    lines += ["| row | seeds | dev accuracy % | " + " | ".join(f"vs {r} (points)" for r in refs) + " |",
              "|---|---|---|" + "---|" * len(refs)]
    for row, e in s.items():
        lines.append(f"| {row} | {e['n_seeds']} | {100 * e['dev']['mean']:.2f} | "
                     + " | ".join(ci(e.get("vs " + r)) for r in refs) + " |")
    gains = {row: e["per_class_gain_vs_base"] for row, e in s.items() if "per_class_gain_vs_base" in e}
    if gains:
        lines += ["", "Per-class gain over real+classic (points, mean over the common seeds):", "",
                  "| row | " + " | ".join(CLASSES) + " |", "|---|" + "---|" * len(CLASSES)]
        lines += [f"| {row} | " + " | ".join(f"{100 * g:+.1f}" for g in gs) + " |" for row, gs in gains.items()]
    labs = [r for r in doc["runs"] if r.get("row") == LABELER and "pool_label_accuracy" in r]
    if labs:
        per = np.mean([r["pool_label_accuracy_per_class"] for r in labs], axis=0)
        lines += ["", f"The FixMatch labeler's labels of the {10 * sp['sizes_per_class']['pool']:,} pool images "
                  f"(mean of {len(labs)} seeds): {100 * np.mean([r['pool_label_accuracy'] for r in labs]):.1f}% right; "
                  "per class " + ", ".join(f"{c} {100 * a:.0f}%" for c, a in zip(CLASSES, per)) + "."]
    if doc.get("teacher"):
        t = doc["teacher"]
        lines += ["", f"The teacher of the rows marked teacher (the seed-0 FixMatch labeler of `splits`): "
                  f"{100 * t['dev']:.2f}% on dev; per class " + ", ".join(f"{c} {100 * a:.0f}%" for c, a in
                                                                    zip(CLASSES, t["dev_per_class"])) + "."]
    gens = doc.get("generators") or {}
    if gens:
        lines += ["", "Generators (the cpu profile's UNet, " + ", ".join(
            f"{g}: {v['steps']} steps of {v['batch']} in {v['train_seconds']:.0f} s, "
            f"{v.get('generate_accepted', 0):,} of {v.get('generate_images', 0):,} from noise kept"
            + (f", {v['img2img_accepted']:,} of {v['img2img_images']:,} img2img kept" if "img2img_images" in v else "")
            for g, v in gens.items() if "steps" in v) + f"; kept = the labeler gives the intended class p >= "
            f"{doc.get('min_confidence', 0.5)}).",
            "dpt learns the labeled images and the whole pool with the seed-0 labeler's labels (DPT's step two)"
            + (", labeled the 500 labeled images alone." if "labeled" in gens else ".")]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("splits")
    s.add_argument("--fashion-mnist", type=Path, required=True)
    s.add_argument("--out", type=Path, default=ROOT / ".gpu" / "pool_study")
    s.add_argument("--tiny", action="store_true")
    r = sub.add_parser("run")
    r.add_argument("--data", default=str(ROOT / ".gpu" / "pool_study"))
    r.add_argument("--out-dir", default=str(ROOT / "bench" / "results"))
    r.add_argument("--work", default="/tmp/synthaug-pool-study")
    r.add_argument("--seeds", type=int, default=5)
    r.add_argument("--workers", type=int, default=max(2, min(8, (os.cpu_count() or 2) // 2)))
    r.add_argument("--threads", type=int, default=2, help="torch threads per worker")
    r.add_argument("--gen-steps", type=int, default=6000)
    r.add_argument("--gen-batch", type=int, default=128)
    r.add_argument("--labeler-scale", type=int, default=4, help="a labeler row with this many times the steps (3 seeds)")
    r.add_argument("--min-confidence", type=float, default=0.5, help="labeler probability of the intended class to keep")
    r.add_argument("--tiny", action="store_true")
    r.add_argument("--resume", type=Path, help="an earlier run's JSON: keep its finished runs, run only the rest")
    r.add_argument("--rows", default="", help="only the rows whose name matches this regular expression")
    r.add_argument("--sizes", type=int, nargs="+", default=[500, 2000, 10000], help="synthetic / oracle set sizes")
    m = sub.add_parser("report")
    m.add_argument("file", type=Path)
    m.add_argument("--out", type=Path, default=ROOT / "reports" / "pool_study.md")
    args = p.parse_args(argv)
    if args.cmd == "splits":
        splits(args)
    elif args.cmd == "run":
        run(args)
    else:
        doc = json.loads(args.file.read_text())
        doc["summary"] = summarize(doc)
        args.out.write_text(markdown(doc))
        print(args.out.read_text())


if __name__ == "__main__":
    main()
