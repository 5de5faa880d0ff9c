"""Stage 3, sample: class-conditional synthetic images from the trained generator.

Any generator kind (pipeline/models/registry.py). ``sample.mode`` generate: image ``i``
(global index, class-major: label = i // per_class) is new, from its own seed
``image_seed(base.seed, i)`` (the initial noise of DDIM (eta 0) and DPM-Solver++, the latent
of the GAN). img2img (diffusion kinds): variations of the labeled train images (and of
``pool_per_class`` pseudo-labeled pool images per class, read from ``data/pseudo``), each
noised to a strength and denoised with its class; every image records its source
(``source_split``, ``source_index``) and ``strength``. See pipeline/models/sampling.py.
Sampler, steps and guidance apply to the diffusion kinds.

Shards: shard k of n generates a contiguous range of indices into
``data/synthetic_shards/shard-kkk-of-nnn`` (skipped when already complete). A run makes
every missing shard and merges them into ``data/synthetic/``: ``dataset/`` (sorted by global
index), ``preview/NN_<class>.png`` and ``summary.json``; a fan-out worker (``shard_only``)
makes its own shard alone and never touches ``data/synthetic``.
"""
from __future__ import annotations

import logging
import re
import time
from pathlib import Path

import datasets
import torch

from pipeline.config import Params, Paths, SampleConfig, keeps_output
from pipeline.core.device import policy_for
from pipeline.core.entrypoint import stage_main
from pipeline.core.images import dataset_to_tensors, make_grid_image, tensors_to_dataset
from pipeline.core.io import (atomic_path, check_writable, fingerprint, load_dataset_dir, load_img2img_sources,
                              read_json, read_output, save_dataset, save_png, write_json)
from pipeline.core.seeding import SEED_STRIDE, image_seed
from pipeline.errors import ConfigError, DataError
from pipeline.models.registry import load_generator
from pipeline.models.sampling import Plan, generate, generation_plan, img2img_plan, shard_range

log = logging.getLogger(__name__)
AUTO_BATCH = {False: 64, True: 256}  # sample.batch_size 0: by whether the device is a GPU


def shard_name(shard_index: int, num_shards: int) -> str:
    return f"shard-{shard_index:03d}-of-{num_shards:03d}"


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower() or "class"


def make_plan(cfg: SampleConfig, paths: Paths, meta: dict) -> Plan:
    """generate: per_class images of each class; img2img: variations of the labeled (and pool) images."""
    if cfg.mode == "generate":
        return generation_plan(meta["num_classes"], cfg.per_class)
    if meta["kind"] not in ("unet", "dit"):
        raise ConfigError(f"sample.mode: img2img needs a diffusion generator (kind unet or dit), this one is "
                          f"{meta['kind']}. Use mode: generate.")
    x, y, origins = load_img2img_sources(paths.prepared, paths.pseudo, cfg.pool_per_class, meta["num_classes"])
    return img2img_plan(x, y, cfg.strengths, cfg.variations, origins)


def to_dataset(images: torch.Tensor, labels: torch.Tensor, seeds: list[int], cfg: SampleConfig, meta: dict,
               plan: Plan, indices: range):
    n = len(seeds)
    strength, split, row = plan.origin(indices)
    return tensors_to_dataset(images, labels, meta["class_names"], extra={
        "seed": seeds, "guidance": [float(cfg.guidance_scale)] * n, "steps": [cfg.num_inference_steps] * n,
        "sampler": [cfg.sampler] * n, "generator": [meta["fingerprint"]] * n,
        "strength": strength, "source_split": split, "source_index": row})


def recipe(cfg: SampleConfig) -> dict:
    """The settings that change an image (besides its seed, source and the generator): every field not
    marked ``changes_images: False``. A shard made with the same recipe is reused."""
    return cfg.model_dump(mode="json", exclude=keeps_output(type(cfg)))


def shard_recipe(record: Path) -> dict | None:
    """The settings a finished shard records (None when its record is unreadable: it is made again)."""
    try:
        return read_json(record, "sample").get("recipe")
    except DataError as err:
        log.warning("%s", err)
        return None


def shard_is_complete(path: Path, indices: range, cfg: SampleConfig, meta: dict, base_seed: int, plan: Plan
                      ) -> bool:
    """A saved shard that holds exactly these images with these settings."""
    if not path.exists():
        return False
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as err:  # an unreadable folder is regenerated
        log.warning("%s: unreadable shard (%s); generating it again", path, err)
        return False
    if len(ds) != len(indices) or len(ds) == 0:
        return len(ds) == len(indices)
    done = path.with_name(path.name + ".json")
    ok = (list(ds["seed"]) == [image_seed(base_seed, i) for i in indices] and "strength" in ds.column_names
          and list(ds["strength"]) == [float(v) for v in plan.strengths[list(indices)]]
          and list(ds["label"]) == plan.labels[list(indices)].tolist()
          and ds[0]["generator"] == meta["fingerprint"] and done.exists() and shard_recipe(done) == recipe(cfg))
    if not ok:
        log.warning("%s: made with other settings or another generator; generating it again", path)
    return ok


def make_shard(generator, plan: Plan, k: int, cfg: SampleConfig, paths: Paths, seed: int, device: str,
               batch_size: int) -> None:
    """Generate shard ``k`` of ``cfg.num_shards`` unless a complete one is already there."""
    meta = generator.meta
    indices = shard_range(len(plan), k, cfg.num_shards)
    shard_dir = paths.synthetic_shards / shard_name(k, cfg.num_shards)
    if shard_is_complete(shard_dir, indices, cfg, meta, seed, plan):
        log.info("sample: %s already complete (%d images); skipped", shard_dir, len(indices))
        return
    log.info("sample: shard %d/%d, %d images (indices %d..%d), %s, %s %d steps, guidance %.2f, batch %d on %s",
             k, cfg.num_shards, len(indices), indices.start, indices.stop - 1, cfg.mode, cfg.sampler,
             cfg.num_inference_steps, cfg.guidance_scale, batch_size, device)
    t0 = time.perf_counter()
    images, labels, seeds = generate(generator, plan, indices, cfg, seed, batch_size)
    seconds = time.perf_counter() - t0
    save_dataset(to_dataset(images, labels, seeds, cfg, meta, plan, indices), shard_dir)
    write_json(shard_dir.with_name(shard_dir.name + ".json"), {
        "images": len(indices), "seconds": round(seconds, 3), "device": device, "batch_size": batch_size,
        "recipe": recipe(cfg), "images_per_second": round(len(indices) / max(seconds, 1e-9), 3)})
    log.info("sample: wrote %s (%.2f images/s)", shard_dir, len(indices) / max(seconds, 1e-9))


def run(params: Params, paths: Paths = Paths(), shard_only: bool = False) -> dict:
    """Generate every missing shard (``sample.shard_index``'s first) and merge them into
    ``data/synthetic``. ``shard_only``: generate ``sample.shard_index`` alone (one worker of a
    fan-out; the merge is a later run), leaving ``data/synthetic`` untouched."""
    cfg = params.sample
    seed = params.base.seed
    policy = policy_for(params.base)
    device = policy.device
    inputs = {"generator": read_output(paths, "generator")["fingerprint"]}  # refused when made from older data
    generator = load_generator(paths.generator, policy)
    meta = generator.meta
    plan = make_plan(cfg, paths, meta)
    if cfg.mode == "img2img":
        inputs["prepared"] = read_output(paths, "prepared").get("fingerprint")
        if cfg.pool_per_class:
            inputs["pseudo"] = read_output(paths, "pseudo").get("fingerprint")
    # room for the shards and the merged copy (uint8 pixels; the files are a little larger)
    check_writable(paths.synthetic, paths.synthetic_shards, need_bytes=2 * len(plan) * meta["channels"] *
                   meta["image_size"] ** 2)
    batch_size = cfg.batch_size or AUTO_BATCH[policy.is_cuda]
    order = [cfg.shard_index] if shard_only else \
        [cfg.shard_index, *(k for k in range(cfg.num_shards) if k != cfg.shard_index)]
    for k in order:
        make_shard(generator, plan, k, cfg, paths, seed, device, batch_size)
    if shard_only:
        return {"complete": False, "shard": cfg.shard_index,
                "headline": f"shard {cfg.shard_index} of {cfg.num_shards} done; merged by a run without shard_only"}
    dirs = [paths.synthetic_shards / shard_name(k, cfg.num_shards) for k in range(cfg.num_shards)]
    merged = datasets.concatenate_datasets([ds for d in dirs if (ds := load_dataset_dir(d, "sample")) is not None])
    timing = [read_json(d.with_name(d.name + ".json")) for d in dirs if d.with_name(d.name + ".json").exists()]
    seconds = sum(t["seconds"] for t in timing)
    counts = torch.bincount(torch.tensor(merged["label"]), minlength=meta["num_classes"]).tolist()
    strengths = list(merged["strength"])
    summary = {
        "num_images": len(merged), "mode": cfg.mode, "per_class": cfg.per_class if cfg.mode == "generate" else None,
        "images_per_strength": {str(v): strengths.count(v) for v in sorted(set(strengths))},
        "sources": None if plan.sources is None else {s: [o[0] for o in plan.origins].count(s)
                                                      for s in ("train", "pool")},
        "counts_per_class": dict(zip(meta["class_names"], counts)),
        "images_per_second": round(sum(t["images"] for t in timing) / seconds, 3) if seconds else None,
        "generation_seconds": round(seconds, 2), "timing": {"seconds": round(seconds, 1)}, "shards": timing,
        "num_shards": cfg.num_shards, "device": device, "batch_size": batch_size, "sampler": cfg.sampler,
        "precision": policy.as_record()["precision"], "policy": policy.as_record(),
        "num_inference_steps": cfg.num_inference_steps, "guidance_scale": cfg.guidance_scale,
        "generator": meta["fingerprint"], "generator_kind": meta["kind"], "image_size": meta["image_size"],
        "channels": meta["channels"], "inputs": inputs,
        "fingerprint": fingerprint(meta["fingerprint"], list(merged["seed"]), list(merged["label"]), recipe(cfg),
                                   list(merged["source_split"]), list(merged["source_index"])),
        "seed_rule": f"seed = base.seed * {SEED_STRIDE} + global index", "params": params.resolved(),
    }
    orders, nrow = plan.preview(meta["num_classes"], cfg.grid_per_class)
    with atomic_path(paths.synthetic, is_dir=True) as tmp:
        merged.save_to_disk(str(tmp / "dataset"))
        for c, (name, order) in enumerate(zip(meta["class_names"], orders)):
            grid = plan.with_sources(dataset_to_tensors(merged.select(order))[0], order)  # img2img: source first
            save_png(make_grid_image(grid, nrow=nrow), tmp / "preview" / f"{c:02d}_{safe_name(name)}.png")
        write_json(tmp / "summary.json", summary)
    log.info("sample: merged %d shards into %s (%d images)", cfg.num_shards, paths.synthetic, len(merged))
    return {"complete": True, **summary}


def main(argv: list[str] | None = None) -> None:
    stage_main("sample", run, argv)


if __name__ == "__main__":
    main()
