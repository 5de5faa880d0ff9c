"""Stage 5, train_classifier: train a timm classifier per variant and seed, test on real data.

A variant (``train_classifier.variants`` in params.yaml: real images or not, augmentation,
which synthetic set) trains ``seeds`` models for the same number of steps, each selected on
the real validation split, then tested once on the real test split. Writes
``models/classifier/<variant>/seed<k>/`` (weights, metrics, config) and
``metrics/classifier/<variant>.json`` (per-seed metrics, mean, std, 95% CI) and
``metrics/classifier/<variant>/`` (each seed's validation accuracy and training loss, DVCLive logs).
A variant with ``pseudo: true`` adds the pseudo-labeled pool (``data/pseudo/``) to the labeled images."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline.config import Params, Paths
from pipeline.core.device import policy_for
from pipeline.core.curves import write_curves
from pipeline.core.entrypoint import stage_main
from pipeline.core.images import class_names_of, dataset_to_tensors, image_hashes
from pipeline.core.io import (OUTPUTS, atomic_path, check_writable, load_dataset_dir, load_pseudo_labels, load_split,
                              read_output, write_json)
from pipeline.core.stats import classification_metrics, summarize_seeds
from pipeline.errors import ConfigError, DataError
from pipeline.models.classifier import check_input_size, load_classifier, save_classifier
from pipeline.training.classifier import RATIO_RULE, predict_proba, sharpen, synthetic_use, train_variant
from pipeline.training.seed_runs import CLI_OPTIONS, gather_seeds, train_seed

log = logging.getLogger(__name__)
SUMMARY_METRICS = ("accuracy", "macro_f1", "ece")


def load_synthetic(paths: Paths, source: str, class_names: list[str], like: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, Path, str | None]:
    """Synthetic images of ``source`` (filtered | synthetic) as tensors, checked against the real data
    and along their chain (a filtered set of older samples is refused); also the set's fingerprint."""
    stage, out = OUTPUTS[source][0], getattr(paths, source)
    summary = read_output(paths, source)
    where = out / "dataset"
    ds = load_dataset_dir(where, stage)
    if ds is None or len(ds) == 0:
        raise DataError(f"{where}: the {source} dataset is empty, so variants that train on "
                          f"synthetic images have nothing to use. Loosen the filter (filter.min_confidence, "
                          f"filter.require_realism) or sample more, or drop those variants from "
                          f"train_classifier.variants.")
    if class_names_of(ds) != class_names:
        raise DataError(f"{where}: class names {class_names_of(ds)} differ from the prepared data's "
                          f"{class_names}. Re-run sample and filter on this prepared data.")
    x, y = dataset_to_tensors(ds)
    if x.shape[1:] != like.shape[1:]:
        raise DataError(f"{where}: images are {tuple(x.shape[1:])} (C,H,W) but the real ones are "
                          f"{tuple(like.shape[1:])}. Re-run sample with the generator trained on this data.")
    return x, y, where, summary.get("fingerprint")


@dataclass
class VariantData:
    """What a variant trains and selects on (never the test split)."""
    train: tuple[torch.Tensor, torch.Tensor]  # the labeled images
    val: tuple[torch.Tensor, torch.Tensor]
    class_names: list[str]
    pseudo: tuple[torch.Tensor, torch.Tensor] | None = None  # pool images, pseudo-labels (ids or probabilities)
    synthetic: tuple[torch.Tensor, torch.Tensor] | None = None
    synthetic_path: Path | None = None
    inputs: dict = field(default_factory=dict)  # stage output -> fingerprint of what it read (the report checks)


def load_variant_data(params: Params, paths: Paths, variant: str) -> VariantData:
    """The labeled, validation, pseudo-labeled and synthetic images of ``variant``, checked."""
    cfg = params.train_classifier
    if variant not in cfg.variants:
        raise ConfigError(f"train_classifier variant {variant!r} is not in train_classifier.variants "
                          f"({', '.join(cfg.variants)}); add it to params.yaml or pick one of those")
    spec = cfg.variants[variant]
    prepared_fp = read_output(paths, "prepared").get("fingerprint")
    train_x, train_y, class_names = load_split(paths, "train")
    val_x, val_y, _ = load_split(paths, "val")
    check_input_size(cfg.arch, len(class_names), val_x.shape[1], val_x.shape[-1])
    data = VariantData((train_x, train_y), (val_x, val_y), class_names,
                       inputs={"prepared": prepared_fp})
    if spec.pseudo:  # the pseudo-labeled pool, drawn beside the labeled images (self-training)
        pseudo, kept = load_pseudo_labels(paths)
        if kept is None:
            raise DataError(f"{paths.pseudo}: pseudo_label kept no pool image ({pseudo.get('headline')}), so variant "
                            f"{variant!r} (pseudo: true) has nothing to add. Give prepare a pool or drop the variant.")
        px, py, proba = kept
        if cfg.pseudo_labels == "soft":
            if proba is None:
                raise DataError(f"{paths.pseudo}: no labeler probabilities saved; re-run pseudo_label for "
                                "train_classifier.pseudo_labels: soft")
            py = sharpen(proba, cfg.pseudo_temperature)
        data.pseudo, data.inputs["pseudo"] = (px, py), pseudo.get("fingerprint")
    if spec.uses_synthetic:
        sx, sy, data.synthetic_path, data.inputs[spec.data] = load_synthetic(paths, spec.data, class_names, val_x)
        if cfg.synthetic_labels == "labeler":  # distillation: the labeler's probabilities, not the intended class
            labeler = load_classifier(paths.pseudo / "labeler.safetensors", len(class_names), sx.shape[1],
                                      "train_classifier.synthetic_labels: labeler needs pseudo_label's labeler")
            sy = sharpen(predict_proba(labeler, sx, 512, policy_for(params.base)), cfg.pseudo_temperature)
        data.synthetic = (sx, sy)
    return data


def run(params: Params, paths: Paths, variant: str, seed_index: int | None = None, ratio: float | None = None,
        gather: bool = False) -> dict:
    """Train ``variant`` (a name in train_classifier.variants) for each seed; test; write. A fan-out's parts
    (training/seed_runs.py): ``seed_index`` trains one seed alone; ``gather`` reads those instead of training."""
    cfg = params.train_classifier
    data = load_variant_data(params, paths, variant)
    spec, policy = cfg.variants[variant], policy_for(params.base)
    check_writable(paths.classifier / variant, paths.classifier_metrics / variant)
    (train_x, train_y), (val_x, val_y), class_names = data.train, data.val, data.class_names
    k, synthetic = len(class_names), data.synthetic
    n_pseudo = len(data.pseudo[0]) if data.pseudo else 0
    seeds = [params.base.seed * 1000 + i for i in range(cfg.seeds)]
    log.info("train_classifier %s: %s, %d labeled + %d pseudo-labeled + %d synthetic training images, %d val, "
             "%d seeds x %d steps on %s", variant, cfg.arch, len(train_x) if spec.real else 0, n_pseudo,
             len(synthetic[0]) if synthetic else 0, len(val_x), len(seeds), cfg.steps, policy.device)
    if seed_index is not None:
        return train_seed(params, paths, variant, data, seeds, seed_index, ratio, policy)
    results, ratio, sweep = gather_seeds(params, paths, variant, data) if gather else \
        train_variant(cfg, spec, data.train, data.val, synthetic, seeds, policy, k, data.pseudo)

    test_x, test_y, _ = load_split(paths, "test")  # read once every model is trained and selected
    seen = set(image_hashes(val_x)) | (set(image_hashes(train_x)) if spec.real else set()) | \
        (set(image_hashes(data.pseudo[0])) if data.pseudo else set())
    leaked = set(image_hashes(test_x)) & seen
    if leaked:
        raise DataError(f"{len(leaked)} test images also appear in train/val. Run prepare again.")
    absent = [name for c, name in enumerate(class_names) if not bool((test_y == c).any())]
    if absent:
        log.warning("train_classifier %s: the test split has no image of class(es) %s: accuracy is over the other "
                    "classes only", variant, absent)
    per_seed, evaluated = [], []
    for seed, (model, hist) in zip(seeds, results):
        m = classification_metrics(predict_proba(model, test_x, cfg.eval_batch_size, policy), test_y, k, cfg.ece_bins)
        m["per_class_accuracy"] = dict(zip(class_names, m["per_class_accuracy"]))
        m.update(seed=seed, best_val_accuracy=hist["best_val_acc"], best_step=hist["best_step"],
                 steps=hist["steps"], seconds=round(hist["seconds"], 2))
        log.info("train_classifier %s seed %d: test acc %.4f, macro-F1 %.4f, ECE %.4f (val %.4f @ step %d, %.0fs)",
                 variant, seed, m["accuracy"], m["macro_f1"], m["ece"], hist["best_val_acc"], hist["best_step"],
                 hist["seconds"])
        evaluated.append((model, m, hist))
        per_seed.append({key: m[key] for key in ("seed", *SUMMARY_METRICS, "best_val_accuracy", "best_step",
                                                 "steps", "seconds", "per_class_accuracy")})

    common = {"variant": variant, "arch": cfg.arch, "pretrained": cfg.pretrained, "augment": spec.augment,
              "trains_on_real": spec.real,
              "synthetic_source": str(data.synthetic_path) if data.synthetic_path else None,
              "synthetic_ratio": ratio, "ratio_rule": RATIO_RULE if sweep else None, "steps": cfg.steps,
              "batch_size": cfg.batch_size,
              "pseudo": {"share": cfg.pseudo_share, "labels": cfg.pseudo_labels,
                         "temperature": cfg.pseudo_temperature} if data.pseudo else None,
              "synthetic_labels": cfg.synthetic_labels if synthetic else None,
              "n_train_real": len(train_x) if spec.real else 0, "n_pseudo_labeled": n_pseudo,
              "n_synthetic": len(synthetic[0]) if synthetic else 0, "n_val": len(val_x), "n_test": len(test_y),
              **synthetic_use(synthetic, ratio, cfg.steps, cfg.batch_size, class_names),
              "class_names": class_names, "test_classes_missing": absent,
              "inputs": data.inputs,  # the report refuses metrics of other data or other settings
              "params": params.made_with("train_classifier", variant)}
    with atomic_path(paths.classifier / variant, is_dir=True) as tmp:
        for i, (model, m, hist) in enumerate(evaluated):
            d = tmp / f"seed{i}"
            d.mkdir(parents=True)
            save_classifier(model, d / "model.safetensors", cfg.arch, k, val_x.shape[1])
            write_json(d / "metrics.json", {**common, **m, "history": hist})
            write_json(d / "config.json", {**common, "seed": m["seed"], "params": params.resolved()})
    summary = {**common, "seeds": seeds, **summarize_seeds(per_seed, SUMMARY_METRICS)}
    summary["ratio_sweep"] = {str(r): sum(a) / len(a) for r, a in sweep.items()} if sweep else None
    summary["ratio_sweep_per_seed"] = {str(r): a for r, a in sweep.items()} if sweep else None
    acc = summary["aggregate"]["accuracy"]
    summary["headline"] = (f"{variant}: test accuracy {acc['mean']:.2%} "
                           f"(95% CI {acc['low']:.2%} to {acc['high']:.2%}, {len(seeds)} seeds, {len(test_y)} test images)")
    summary["per_seed"] = per_seed
    with atomic_path(paths.classifier_metrics / variant, is_dir=True) as tmp:  # curves for `dvc plots show`
        write_curves(tmp, {f"seed{i}/{name}": (hist["step"], hist[name]) for i, (_, hist) in enumerate(results)
                           for name in ("val_acc", "train_loss")})
    write_json(paths.classifier_metrics / f"{variant}.json", summary)
    log.info("train_classifier %s", summary["headline"])
    return summary


def main(argv: list[str] | None = None) -> None:
    stage_main("train_classifier", run, argv,
               {"variant": {"required": True, "help": "a name in train_classifier.variants"}, **CLI_OPTIONS})


if __name__ == "__main__":
    main()
