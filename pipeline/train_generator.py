"""Stage 2, train_generator: the generator of ``train_generator.kind`` on the prepared data.

Kinds (pipeline/models/registry.py): unet and dit (class-conditional diffusion), cgan,
datasetgan; their training loops live in ``pipeline.training``. Reads ``data/prepared/``
(train; plus pool for ``init: pretrain`` and datasetgan) and ``data/pseudo/`` (the pseudo-labeled
pool, learned with the labeled images: ``train_generator.labels``) and writes ``models/generator/``:
the weights of the kind (the diffusion kinds as a diffusers pipeline: ``model_index.json``,
``unet/`` or ``transformer/``, ``scheduler/``), ``generator.json`` (kind, what sample needs,
fingerprint, params), ``dvclive/`` (the loss and lr of every step, for ``dvc plots show``) and
a ``samples.png`` preview. Resumable checkpoints
live in ``models/generator_checkpoints/``, tied to the training config by a hash.

Several GPUs of one machine: ``train_generator.num_processes: N`` makes ``run`` start N copies of
this module under torchrun (``--standalone``; accelerate in each picks its GPU by LOCAL_RANK, gloo
on CPU) and wait for them; ``accelerate launch -m pipeline.train_generator`` works too.
``batch_size`` is the global batch of an optimizer step whatever the process count, and the
count is not part of the checkpoint hash, so a run resumes on another number of processes.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml

from pipeline.config import Params, Paths, resolve_device
from pipeline.core.curves import CURVES, write_curves
from pipeline.core.device import policy_for
from pipeline.core.entrypoint import stage_main
from pipeline.core.images import dataset_to_tensors, make_grid_image
from pipeline.core.io import (atomic_path, check_writable, load_dataset_dir, load_pseudo_labels, read_json, read_output,
                              save_png, sha256_file, write_json)
from pipeline.errors import ConfigError, DataError
from pipeline.models.registry import GENERATOR_META
from pipeline.training.checkpoint import config_hash
from pipeline.training.generator import TrainData, fitter, generator_meta, hashed_config, preview

log = logging.getLogger(__name__)


def load_train_data(params: Params, paths: Paths, device: str) -> TrainData:
    cfg = params.train_generator
    summary = read_output(paths, "prepared")
    inputs = {"prepared": summary.get("fingerprint")}
    dd = load_dataset_dir(paths.prepared / "dataset", "prepare")
    x, y = dataset_to_tensors(dd["train"])
    if y is None or len(x) == 0:
        raise DataError(f"{paths.prepared}: the train split has no labeled images. Re-run prepare.")
    unlabeled = None
    if cfg.init == "pretrain" or cfg.kind == "datasetgan":
        if cfg.init == "pretrain" and cfg.pretrain_steps == 0:
            raise ConfigError("train_generator.pretrain_steps: init=pretrain needs pretrain_steps > 0")
        if "pool" not in dd:
            raise DataError(f"{paths.prepared}: init=pretrain and kind=datasetgan need the unlabeled pool "
                            "split; set prepare.unlabeled_pool > 0 and re-run prepare, or use init=scratch.")
        unlabeled = torch.cat([x, dataset_to_tensors(dd["pool"], label_column=None)[0]])
        unlabeled = unlabeled.to(device)
    val_x, val_y = dataset_to_tensors(dd["val"]) if "val" in dd else (None, None)
    weights, n_pseudo = None, 0
    if cfg.kind == "datasetgan" and cfg.labels == "pseudo":
        raise ConfigError("train_generator.labels: pseudo does not apply to kind datasetgan (its interpreter labels "
                          "its own samples); use labels: auto or labeled")
    if cfg.labels != "labeled" and cfg.kind != "datasetgan":
        pseudo, kept = load_pseudo_labels(paths)
        inputs["pseudo"] = pseudo.get("fingerprint")
        if kept is None and cfg.labels == "pseudo":
            raise DataError(f"{paths.pseudo}: train_generator.labels is pseudo but pseudo_label kept no pool image "
                            f"({pseudo.get('headline', 'no pool')}). Set prepare.unlabeled_pool > 0 or labels: auto.")
        if kept is not None:  # labeled + pseudo-labeled pool, the labeled drawn labeled_weight times as often
            px, py, _ = kept
            n_pseudo = len(px)
            weights = torch.cat([torch.full((len(x),), cfg.labeled_weight), torch.ones(n_pseudo)]).to(device)
            x, y = torch.cat([x, px]), torch.cat([y, py])
    return TrainData(x.to(device), y.to(device), int(summary["num_classes"]), unlabeled,
                     list(summary["class_names"]), val_x, val_y, inputs, weights, n_pseudo)


def launch(params: Params, paths: Paths) -> dict:
    """Run this stage in ``num_processes`` processes under torchrun and wait for them; returns
    the generator.json they wrote. Params and data are checked here first, so a user mistake
    stops the run with one message before any process starts."""
    n = params.train_generator.num_processes
    if resolve_device(params.base) == "cuda" and n > torch.cuda.device_count():
        raise ConfigError(f"train_generator.num_processes: {n}, but {torch.cuda.device_count()} GPU(s) are visible; "
                          "use at most one process per GPU")
    load_train_data(params, paths, "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        resolved = Path(tmp) / "params.yaml"  # every value in force, so each process resolves the same params
        resolved.write_text(yaml.safe_dump(params.resolved(), sort_keys=False))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
               "-m", "pipeline.train_generator", "--params", str(resolved), "--root", str(Path(paths.root).resolve())]
        log.info("train_generator: %d processes: %s", n, " ".join(cmd))
        with subprocess.Popen(cmd) as proc:
            try:
                rc = proc.wait()
            except BaseException:  # Ctrl-C, a cancelled flow run: torchrun stops its workers on SIGTERM
                proc.terminate()  # (subprocess.run would SIGKILL it and leave the workers running)
                proc.wait()
                raise
    if rc:
        raise RuntimeError(f"train_generator: the {n} training processes failed (exit status {rc}); see their log "
                           "above. Running the stage again resumes from the last checkpoint.")
    return read_json(paths.generator / GENERATOR_META, "train_generator")


def run(params: Params, paths: Paths = Paths()) -> dict:
    from accelerate import Accelerator

    cfg = params.train_generator
    check_writable(paths.generator, paths.generator_checkpoints)
    if cfg.num_processes > 1 and "LOCAL_RANK" not in os.environ:  # not yet one of the launched processes
        return launch(params, paths)
    policy = policy_for(params.base)
    device, mp = policy.device, policy.mixed_precision
    accelerator = Accelerator(cpu=device == "cpu", mixed_precision=mp)
    if str(accelerator.device) != device:  # one of several processes: its own GPU (LOCAL_RANK)
        policy = dataclasses.replace(policy, device=str(accelerator.device))
    data = load_train_data(params, paths, policy.device)
    torch.manual_seed(params.base.seed)  # the initial weights, so the same seed gives the same run
    # the process count is left out: a run resumes on another number of processes
    run_facts = {"device": device, "mixed_precision": mp,
                 "checkpoint_format": 2}  # 2: training.checkpoint (named objects); older files are not resumed
    if cfg.init not in ("scratch", "pretrain") and Path(cfg.init).exists():  # a changed init checkpoint is a new run
        run_facts["init_files"] = [sha256_file(p) for p in sorted(Path(cfg.init).rglob("*")) if p.is_file()]
    chash = config_hash(hashed_config(cfg), params.base.seed, [data.images, data.labels, data.unlabeled, data.weights],
                        run_facts)
    fitted = fitter(cfg.kind)(params, data, accelerator, paths.generator_checkpoints, chash, policy)
    meta = {}
    if accelerator.is_main_process:
        with atomic_path(paths.generator, is_dir=True) as tmp:
            weights = fitted.save(tmp)
            steps = list(range(1, len(fitted.history["loss"]) + 1))
            write_curves(tmp / CURVES, {name: (steps, values) for name, values in fitted.history.items()})
            if cfg.preview_per_class:
                grid = preview(fitted.generator, data.num_classes, cfg.preview_per_class)
                save_png(make_grid_image(grid, nrow=cfg.preview_per_class), tmp / "samples.png")
            losses = fitted.history["loss"]
            meta = {
                **generator_meta(cfg, data), **fitted.extra, "fingerprint": sha256_file(weights),
                "num_parameters": fitted.num_parameters, "steps": len(losses),
                "resumed_from_step": fitted.resumed_from, "seconds_per_step": round(fitted.seconds_per_step, 4),
                "timing": {"seconds": round(fitted.seconds_per_step * len(losses), 1)},
                "final_loss": sum(losses[-50:]) / len(losses[-50:]) if losses else None,
                "device": str(accelerator.device), "mixed_precision": mp, "policy": policy.as_record(),
                "processes": accelerator.num_processes,
                "gradient_accumulation_steps": cfg.gradient_accumulation_steps, "config_hash": chash,
                "params": params.resolved(),
            }
            write_json(tmp / GENERATOR_META, meta)
        log.info("train_generator: wrote %s (%s, %.3f s/step, fingerprint %s)", paths.generator, cfg.kind,
                 fitted.seconds_per_step, meta["fingerprint"][:12])
    accelerator.wait_for_everyone()
    accelerator.end_training()  # trackers and the process group (several processes) are closed
    return meta


def main(argv: list[str] | None = None) -> None:
    stage_main("train_generator", run, argv)


if __name__ == "__main__":
    main()
