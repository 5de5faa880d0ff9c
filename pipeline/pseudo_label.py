"""Stage 2, pseudo_label: label the unlabeled pool with the semi-supervised learner (DPT, step one).

``pseudo_label.seeds`` timm classifiers (``pseudo_label.arch``) train on the labeled train split and the
pool (``method: fixmatch``, ``training.tasks.FixMatch``; ``supervised``: on the labeled split alone), each
selected on val; the mean of their probabilities labels every pool image (``tta: flip``: each model's
mean over the image and its mirror image). Every pool image keeps its predicted class and probabilities
by default (DPT, You et al. 2023); ``threshold`` / ``per_class_cap`` / ``balance`` keep fewer. Writes
``data/pseudo/``: ``dataset`` (image, label = pseudo-label, confidence, the labelers' probabilities,
the row in the pool), ``labelers/seed<k>.safetensors`` with each one's training history (the ``fixmatch``
variant of train_classifier tests these models rather than training them again) and ``summary.json``
(kept per class; the ensemble's validation accuracy; where the pool's source labels are known, how many
pseudo-labels are right, per class: a diagnostic only, no stage trains on those labels). With no pool
no labeler is trained, the dataset is empty and the generators learn from the labeled set alone. Its run
time (and each labeler's) goes to ``metrics/stages/pseudo_label.json``, so that ``data/pseudo`` is the
same bytes for the same inputs and params.
"""
from __future__ import annotations

import logging
import time

import numpy as np
import torch

from pipeline.config import Params, Paths, labeler_file
from pipeline.core.device import policy_for
from pipeline.core.entrypoint import stage_main
from pipeline.core.images import class_names_of, dataset_to_tensors, tensors_to_dataset
from pipeline.core.io import (atomic_path, check_writable, fingerprint, load_dataset_dir, read_output, sha256_tensor,
                              without_timing, write_json)
from pipeline.errors import DataError
from pipeline.models.classifier import check_input_size, save_classifier
from pipeline.quality.selection import confident_per_class
from pipeline.training.classifier import VariantData, ensemble_proba, train_runs

log = logging.getLogger(__name__)


def run(params: Params, paths: Paths = Paths()) -> dict:
    cfg, seed, t0 = params.pseudo_label, params.base.seed, time.perf_counter()
    check_writable(paths.pseudo, paths.stage_timing)
    device = policy_for(params.base)
    prepared_fp = read_output(paths, "prepared").get("fingerprint")
    dd = load_dataset_dir(paths.prepared / "dataset", "prepare")
    class_names = class_names_of(dd["train"])
    num_classes = len(class_names)
    (tx, ty), (vx, vy) = dataset_to_tensors(dd["train"]), dataset_to_tensors(dd["val"])
    if "pool" in dd:
        pool_x, hidden = dataset_to_tensors(dd["pool"], label_column="hidden_label")
    else:
        pool_x, hidden = torch.zeros(0, *tx.shape[1:], dtype=torch.uint8), None
    summary = {"inputs": {"prepared": prepared_fp}, "pool_size": len(pool_x), "threshold": cfg.threshold,
               "per_class_cap": cfg.per_class_cap, "class_names": class_names}
    keep = torch.zeros(0, dtype=torch.long)
    proba = torch.zeros(0, num_classes)
    results = []
    if len(pool_x):
        check_input_size(cfg.arch, num_classes, tx.shape[1], tx.shape[-1], key="pseudo_label.arch")
        learner, spec = params.learner()
        seeds = [seed * 1000 + i for i in range(cfg.seeds)]
        log.info("pseudo_label: training %d x %s (%s) on %d labeled images%s (%d steps), then labeling %d pool images "
                 "with their mean prediction", len(seeds), cfg.arch, cfg.method, len(tx),
                 " and the pool" if cfg.method == "fixmatch" else "", cfg.steps, len(pool_x))
        data = VariantData((tx, ty), (vx, vy), class_names, pool=pool_x, learner=cfg)
        results = train_runs(learner, spec, data, [(s, 0.0) for s in seeds], device, learner.workers)
        models = [model for model, _ in results]
        proba = ensemble_proba(models, pool_x, device, cfg.flip)
        keep = confident_per_class(proba, cfg.threshold, cfg.per_class_cap, cfg.balance)
        val_acc = float((ensemble_proba(models, vx, device, cfg.flip).argmax(1) == vy).float().mean())
        summary["labeler"] = {"arch": cfg.arch, "method": cfg.name + (", flip TTA" * cfg.flip), "seeds": seeds,
                              "val_accuracy": round(val_acc, 4),
                              "val_accuracy_per_seed": [round(h["best_val_acc"], 4) for _, h in results],
                              "best_step": [h["best_step"] for _, h in results], "n_val": len(vy)}
    else:
        log.warning("pseudo_label: the prepared data has no pool split (prepare.unlabeled_pool = 0): no pseudo-labels")
    conf, pred = proba.max(1)
    labels = pred[keep]
    kept = np.bincount(labels.numpy(), minlength=num_classes)
    predicted = np.bincount(pred.numpy(), minlength=num_classes)
    summary.update(kept=int(len(keep)), kept_per_class=dict(zip(class_names, kept.tolist())),
                   coverage_per_class={c: round(float(kept[i] / predicted[i]), 4) if predicted[i] else None
                                       for i, c in enumerate(class_names)})
    if hidden is not None and len(keep):  # how right the kept pseudo-labels are (diagnostic only)
        right = (labels == hidden[keep]).numpy()
        summary["pseudo_label_accuracy"] = round(float(right.mean()), 4)
        summary["pseudo_label_accuracy_per_class"] = {
            c: round(float(right[labels.numpy() == i].mean()), 4) if kept[i] else None
            for i, c in enumerate(class_names)}
        summary["pool_accuracy_all"] = round(float((pred == hidden).float().mean()), 4)
    if len(keep) == 0 and len(pool_x):
        raise DataError(f"pseudo_label: no pool image reached confidence {cfg.threshold}; lower "
                        "pseudo_label.threshold or train the labeler longer (pseudo_label.steps)")
    x = pool_x[keep]
    summary["fingerprint"] = fingerprint(prepared_fp, sha256_tensor(x), sha256_tensor(labels))
    summary["params"] = params.resolved()
    summary["headline"] = (f"pseudo_label: kept {len(keep)} of {len(pool_x)} pool images at confidence >= "
                           f"{cfg.threshold}" + (f", {summary['pseudo_label_accuracy']:.1%} of them labeled right "
                                                 "(source labels, diagnostic)" if "pseudo_label_accuracy" in summary
                                                 else ""))
    with atomic_path(paths.pseudo, is_dir=True) as tmp:
        tensors_to_dataset(x, labels, class_names, {"confidence": conf[keep].double(), "pool_index": keep,
                                                    "probabilities": proba[keep].double()}).save_to_disk(
            str(tmp / "dataset"))
        for i, (model, hist) in enumerate(results):  # each seed's model and history (the fixmatch variant reads them)
            (tmp / labeler_file(i)).parent.mkdir(exist_ok=True)
            save_classifier(model, tmp / labeler_file(i), cfg.arch, num_classes, tx.shape[1])
            write_json((tmp / labeler_file(i)).with_suffix(".json"), without_timing(hist))
        write_json(tmp / "summary.json", summary)
    write_json(paths.stage_timing / "pseudo_label.json", {  # kept out of data/pseudo: the same inputs, the same bytes
        "seconds": round(time.perf_counter() - t0, 1), "labelers": [round(h["seconds"], 1) for _, h in results]})
    log.info(summary["headline"])
    return summary


def main(argv: list[str] | None = None) -> None:
    stage_main("pseudo_label", run, argv)


if __name__ == "__main__":
    main()
