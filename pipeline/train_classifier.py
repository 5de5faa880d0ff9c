"""Stage 5, train_classifier: train a timm classifier per variant and seed, test on real data.

A variant (``train_classifier.variants`` in params.yaml: real images or not, augmentation, which synthetic
set) trains ``seeds`` models for the same number of steps, each selected on the real validation split, then
tested once on the real test split. Writes ``models/classifier/<variant>/seed<k>/`` (weights, metrics,
config; no run times, so the same bytes for the same inputs), ``metrics/classifier/<variant>.json`` (per-seed
metrics, mean, std, 95% CI, run times: the variant's wall seconds and each seed's) and
``metrics/classifier/<variant>/`` (each seed's validation accuracy and training loss, DVCLive).
A variant with ``pseudo: true`` adds the pseudo-labeled pool (``data/pseudo/``) to the labeled images."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from pipeline.config import Params, Paths, classifier_file
from pipeline.core.curves import write_curves
from pipeline.core.device import policy_for
from pipeline.core.entrypoint import stage_main
from pipeline.core.images import class_names_of, dataset_to_tensors, image_hashes
from pipeline.core.io import (OUTPUTS, atomic_path, check_writable, load_dataset_dir, load_pool, load_pseudo_labels,
                              load_split, read_output, without_timing, write_json)
from pipeline.core.oracle import load_oracle
from pipeline.core.stats import summarize_seeds
from pipeline.errors import DataError
from pipeline.models.classifier import check_input_size, save_classifier
from pipeline.training.classifier import (Teacher, VariantData, accuracy, count, ensemble_proba, score_on_test, sharpen,
                                          train_runs, variant_record)
from pipeline.training.plan import carry_out
from pipeline.training.seed_runs import CLI_OPTIONS, SeedRuns, load_labelers, pseudo_label_runs, train_seed

log = logging.getLogger(__name__)
SUMMARY_METRICS = ("accuracy", "macro_f1", "ece")
PER_SEED = ("seed", *SUMMARY_METRICS, "best_val_accuracy", "dev_accuracy", "best_step", "steps", "seconds",
            "per_class_accuracy")
SCORED_ON = {"accuracy": "test split (tested once)", "best_val_accuracy": "val split (model selection)",
             "dev_accuracy": "dev split (studies only: prepare.dev_per_class)"}


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


def load_variant_data(params: Params, paths: Paths, variant: str) -> VariantData:
    """The labeled, validation, pseudo-labeled and synthetic images of ``variant``, checked."""
    cfg = params.classifier_config(variant)  # a ConfigError for a variant params.yaml does not name
    spec = cfg.variants[variant]
    prepared_fp = read_output(paths, "prepared").get("fingerprint")
    train_x, train_y, class_names = load_split(paths, "train")
    val_x, val_y, _ = load_split(paths, "val")
    check_input_size(cfg.arch, len(class_names), val_x.shape[1], val_x.shape[-1],
                     "pseudo_label.arch" if spec.learner == "fixmatch" else "train_classifier.arch")
    data = VariantData((train_x, train_y), (val_x, val_y), class_names, inputs={"prepared": prepared_fp})
    if spec.learner == "fixmatch":  # the semi-supervised learner: the pool stays unlabeled
        data.pool, data.learner = load_pool(paths, f"variant {variant!r} (learner: fixmatch)"), params.pseudo_label
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
    if spec.adds_images:
        if spec.oracle and not (getattr(paths, spec.data) / OUTPUTS[spec.data][1]).exists():
            raise DataError(f"variant {variant!r} (oracle: true) draws as many pool images of each class as "
                            f"{getattr(paths, spec.data)} has, and there is none: run {OUTPUTS[spec.data][0]} first.")
        sx, sy, data.synthetic_path, data.inputs[spec.data] = load_synthetic(paths, spec.data, class_names, val_x)
        if spec.oracle:  # as many truly labeled pool images of each class in their place; their labels stay true
            sx, sy, data.oracle = load_oracle(paths, sy, class_names, params.base.seed, variant)
            data.synthetic_path = paths.prepared / "dataset"
        data.synthetic = (sx, sy)
    syn_labels = "intended" if spec.oracle else cfg.synthetic_labels
    chosen = {"pseudo": (cfg.pseudo_labels, data.pseudo), "synthetic": (syn_labels, data.synthetic)}
    data.taught = tuple(name for name, (labels, xy) in chosen.items() if labels == "teacher" and xy)
    relabel = data.synthetic is not None and syn_labels == "labeler"
    if data.taught or relabel:  # pseudo_label's labelers, read once
        labelers = load_labelers(paths, class_names, val_x.shape[1],
                                 "the labels train_classifier.pseudo_labels / synthetic_labels ask for")[0]
        data.inputs.setdefault("pseudo", read_output(paths, "pseudo").get("fingerprint"))
        if relabel:  # distillation: the labelers' probabilities, not the intended class
            proba = ensemble_proba(labelers, sx, policy_for(params.base), params.pseudo_label.flip)
            data.synthetic = (sx, sharpen(proba, cfg.pseudo_temperature))
        if data.taught:  # the labelers label each augmented view as the student sees it
            data.teacher = Teacher(labelers, cfg.pseudo_temperature)
    return data


def run(params: Params, paths: Paths, variant: str, seed_index: int | None = None, ratio: float | None = None,
        gather: bool = False) -> dict:
    """Train ``variant`` (a name in train_classifier.variants) for each seed; test; write. A fan-out's parts
    (training/seed_runs.py): ``seed_index`` trains one seed alone; ``gather`` reads those instead of training."""
    cfg, t0 = params.classifier_config(variant), time.perf_counter()
    data = load_variant_data(params, paths, variant)
    spec, policy = cfg.variants[variant], policy_for(params.base)
    check_writable(paths.classifier / variant, paths.classifier_metrics / variant)
    seeds = [params.base.seed * 1000 + i for i in range(cfg.seeds)]
    log.info("train_classifier %s: %s (%s), %d labeled + %d pseudo-labeled + %d synthetic + %d unlabeled training "
             "images, %d val, %d seeds x %d steps on %s", variant, cfg.arch, spec.learner,
             len(data.train[0]) if spec.real else 0, count(data.pseudo), count(data.synthetic),
             0 if data.pool is None else len(data.pool), len(data.val[0]), len(seeds), cfg.steps, policy.device)
    if seed_index is not None or ratio is not None:  # --ratio alone: refused there
        return train_seed(params, paths, variant, data, seeds, seed_index, ratio, policy)
    get = pseudo_label_runs(params, paths, variant, data)  # the fixmatch variant: pseudo_label's own models
    if get is None:
        get = SeedRuns(params, paths, variant, data).read if gather else \
            (lambda runs: train_runs(cfg, spec, data, [(seeds[r.seed_index], r.share) for r in runs], policy,
                                     cfg.workers))
    results, share, sweep = carry_out(cfg, spec, get)
    test = load_test(paths, data, spec, variant)  # read once every model is trained and selected
    flip = spec.learner == "fixmatch" and params.pseudo_label.flip  # the learner predicts as pseudo_label does
    per_seed = [score_on_test(model, hist, seed, test, data.class_names, cfg, policy, variant, flip)
                for seed, (model, hist) in zip(seeds, results)]
    dev = "dev" in read_output(paths, "prepared").get("sizes", {})  # prepare.dev_per_class: studies score on it
    if dev:
        dev_x, dev_y, _ = load_split(paths, "dev")
        for m, (model, _) in zip(per_seed, results):
            m["dev_accuracy"] = accuracy(model, dev_x, dev_y, cfg.eval_batch_size, policy, flip)
    common = {**variant_record(params, variant, data, share, sweep, test), **data.oracle,
              "scored_on": {k: v for k, v in SCORED_ON.items() if dev or k != "dev_accuracy"}}
    write_models(paths, variant, params, results, per_seed, common, data)
    summary = {**common, "seeds": seeds, **summarize_seeds(per_seed, SUMMARY_METRICS + ("dev_accuracy",) * dev),
               "ratio_sweep": {str(r): sum(a) / len(a) for r, a in sweep.items()} if sweep else None,
               "ratio_sweep_per_seed": {str(r): a for r, a in sweep.items()} if sweep else None}
    acc = summary["aggregate"]["accuracy"]
    summary["headline"] = (f"{variant}: test accuracy {acc['mean']:.2%} (95% CI {acc['low']:.2%} to "
                           f"{acc['high']:.2%}, {len(seeds)} seeds, {len(test[1])} test images)")
    summary["per_seed"] = [{key: m[key] for key in PER_SEED if key in m} for m in per_seed]
    summary["seconds"] = round(time.perf_counter() - t0, 1)  # wall: the seeds may have trained side by side
    with atomic_path(paths.classifier_metrics / variant, is_dir=True) as tmp:  # curves for `dvc plots show`
        write_curves(tmp, {f"seed{i}/{name}": (hist["step"], hist[name]) for i, (_, hist) in enumerate(results)
                           for name in ("val_acc", "train_loss")})
    write_json(paths.classifier_metrics / f"{variant}.json", summary)
    log.info("train_classifier %s", summary["headline"])
    return summary


def load_test(paths: Paths, data: VariantData, spec, variant: str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """The test split, refused when an image also appears in what the variant trained or selected on;
    also the classes it lacks (accuracy is then over the others)."""
    test_x, test_y, _ = load_split(paths, "test")
    seen = set(image_hashes(data.val[0])) | (set(image_hashes(data.train[0])) if spec.real else set()) | \
        (set(image_hashes(data.pseudo[0])) if data.pseudo else set())
    leaked = set(image_hashes(test_x)) & seen
    if leaked:
        raise DataError(f"{len(leaked)} test images also appear in train/val. Run prepare again.")
    absent = [name for c, name in enumerate(data.class_names) if not bool((test_y == c).any())]
    if absent:
        log.warning("train_classifier %s: the test split has no image of class(es) %s: accuracy is over the other "
                    "classes only", variant, absent)
    return test_x, test_y, absent


def write_models(paths: Paths, variant: str, params: Params, results, per_seed: list[dict], common: dict,
                 data: VariantData) -> None:
    """``models/classifier/<variant>/seed<k>/``: weights, metrics with the training history, config."""
    cfg = params.classifier_config(variant)
    with atomic_path(paths.classifier / variant, is_dir=True) as tmp:
        for i, ((model, hist), m) in enumerate(zip(results, per_seed)):
            weights = tmp / classifier_file(i)
            d = weights.parent
            d.mkdir(parents=True)
            save_classifier(model, weights, cfg.arch, len(data.class_names), data.val[0].shape[1])
            write_json(d / "metrics.json", {**common, **without_timing(m), "history": without_timing(hist)})
            write_json(d / "config.json", {**common, "seed": m["seed"], "params": params.resolved()})


def main(argv: list[str] | None = None) -> None:
    stage_main("train_classifier", run, argv,
               {"variant": {"required": True, "help": "a name in train_classifier.variants"}, **CLI_OPTIONS})


if __name__ == "__main__":
    main()
