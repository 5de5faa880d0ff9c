"""Ablation on validation: which lever moves what (reports/ablation.md and .json).

Starting from a params file (the defaults before the levers), levers are added one at a time,
in order; a lever is kept when the validation accuracy of the variant it serves (mean over
``--seeds`` seeds, N = the val split) beats the best so far, and dropped otherwise, so every
row says what that lever did on top of the levers kept before it. Test accuracy is never
computed here: the classifiers are trained and selected on train / val only
(``training.plan.carry_out``), and nothing reads the test split except the filter's set metrics, which
are reported beside each generator lever and never used to choose.

Stages run through their ``run`` functions, each output in a folder keyed by the params that
made it (and its inputs'), so a lever that changes only the sampler re-uses the trained
generator, and an interrupted ablation resumes where it stopped.

    python -m bench.ablation --params start.yaml --work ablation-work   # the starting params are recorded in the json
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import yaml

from pipeline.config import Paths, deep_merge, params_from_dict
from pipeline.core.entrypoint import setup_logging
from pipeline.core.io import fingerprint, read_json, write_json
from pipeline.reporting.tables import filter_quality

log = logging.getLogger("ablation")
ROOT = Path(__file__).resolve().parent.parent
SYN, SYN_ONLY, POOL, POOL_SYN = "real+synthetic+classic", "synthetic-only", "real+pseudo+classic", \
    "real+pseudo+synthetic+classic"

# stage -> (its params section, its outputs, the file that says it finished)
STAGES = {
    "prepare": ("prepare", ["data/prepared"], "data/prepared/summary.json"),
    "pseudo_label": ("pseudo_label", ["data/pseudo"], "data/pseudo/summary.json"),
    "train_generator": ("train_generator", ["models/generator", "models/generator_checkpoints"],
                        "models/generator/generator.json"),
    "sample": ("sample", ["data/synthetic", "data/synthetic_shards"], "data/synthetic/summary.json"),
    "filter": ("filter", ["data/filtered"], "data/filtered/summary.json"),
}

# (name, what it changes, the variants it is judged by: the first decides, the others are reported)
GENERATOR = [SYN, SYN_ONLY]
LEVERS = [
    ("today's defaults", {}, GENERATOR),
    ("v-prediction + zero terminal SNR", {"train_generator": {"prediction_type": "v_prediction",
                                                             "zero_terminal_snr": True}}, GENERATOR),
    ("min-SNR-5 loss weighting", {"train_generator": {"snr_gamma": 5.0}}, GENERATOR),
    ("guidance rescale 0.7", {"sample": {"guidance_rescale": 0.7}}, GENERATOR),
    ("guidance interval: none above t/T = 0.7", {"sample": {"guidance_interval": [0.0, 0.7]}}, GENERATOR),
    ("img2img strength 0.25", {"sample": {"mode": "img2img", "strengths": [0.25], "variations": 3}}, GENERATOR),
    ("img2img strength 0.5", {"sample": {"mode": "img2img", "strengths": [0.5], "variations": 3}}, GENERATOR),
    ("img2img strength 0.75", {"sample": {"mode": "img2img", "strengths": [0.75], "variations": 3}}, GENERATOR),
    ("img2img strengths 0.25/0.5/0.75/1.0", {"sample": {"mode": "img2img", "strengths": [0.25, 0.5, 0.75, 1.0],
                                                        "variations": 1}}, GENERATOR),
    ("img2img of pool images too (50 per class)", {"sample": {"pool_per_class": 50}}, GENERATOR),
    ("synthetic images learn the labeler's soft labels", {"train_classifier": {"synthetic_labels": "labeler"}},
     GENERATOR),
    ("self-training as today (labeled images ~7% of each batch)", {}, [POOL]),
    ("self-training: half of each batch labeled", {"train_classifier": {"pseudo_share": 0.5}}, [POOL]),
    ("self-training: class-balanced pseudo-labels", {"pseudo_label": {"balance": True}}, [POOL]),
    ("self-training: soft labels", {"train_classifier": {"pseudo_labels": "soft"}}, [POOL]),
    ("self-training: soft labels sharpened (T = 0.5)", {"train_classifier": {"pseudo_labels": "soft",
                                                                              "pseudo_temperature": 0.5}}, [POOL]),
    ("longer generator training (2x steps)", {"train_generator": {"steps": 2400}}, GENERATOR),
]


class Runner:
    """Runs each stage once per distinct params chain, in its own folder under ``work``."""

    def __init__(self, work: Path):
        self.work = work
        work.mkdir(parents=True, exist_ok=True)

    def root(self, raw: dict, upto: str) -> Path:
        """The folder holding the outputs of every stage up to ``upto`` for these params (run as needed)."""
        params = params_from_dict(raw)
        resolved = params.resolved()
        key, links = [resolved["base"]], {}
        for stage, (section, outs, marker) in STAGES.items():
            key.append(resolved[section])
            root = self.work / f"{stage}-{fingerprint(key)[:12]}"
            root.mkdir(parents=True, exist_ok=True)
            for rel, target in links.items():
                link = root / rel
                if not link.is_symlink() and target.exists():
                    link.parent.mkdir(parents=True, exist_ok=True)
                    link.symlink_to(target, target_is_directory=True)
            cache = root / "data/cache"  # judge and real features, keyed by their own recipe: shared
            if not cache.exists():
                (self.work / "cache").mkdir(exist_ok=True)
                cache.parent.mkdir(parents=True, exist_ok=True)
                cache.symlink_to(self.work / "cache", target_is_directory=True)
            if not (root / marker).exists():
                log.info("ablation: running %s in %s", stage, root.name)
                module = __import__(f"pipeline.{stage}", fromlist=["run"])
                module.run(params, Paths(root=root))
            links.update({rel: root / rel for rel in outs})
            if stage == upto:
                return root
        raise ValueError(upto)

    def val_accuracy(self, raw: dict, variant: str, seeds: int) -> dict:
        """Mean validation accuracy of ``variant`` over ``seeds`` seeds (cached)."""
        from pipeline.config import resolve_device
        from pipeline.train_classifier import load_variant_data
        from pipeline.training.classifier import train_one
        from pipeline.training.plan import carry_out

        raw = deep_merge(raw, {"train_classifier": {"seeds": seeds, "ratio_sweep": []}})
        params = params_from_dict(raw)
        spec = params.train_classifier.variants[variant]
        root = self.root(raw, "filter" if spec.uses_synthetic else "pseudo_label")
        key = fingerprint(str(root), params.resolved()["train_classifier"], variant)
        cached = self.work / "val" / f"{key[:16]}.json"
        if cached.exists():
            return read_json(cached)
        cfg, t0 = params.train_classifier, time.time()
        data = load_variant_data(params, Paths(root=root), variant)
        seed_list = [params.base.seed * 1000 + i for i in range(seeds)]
        device = resolve_device(params.base)
        results, ratio, _ = carry_out(cfg, spec, lambda runs: [train_one(cfg, spec, data, seed_list[r.seed_index],
                                                                         r.share, device) for r in runs])
        accs = [h["best_val_acc"] for _, h in results]
        out = {"variant": variant, "val_accuracy": sum(accs) / len(accs), "per_seed": accs, "seeds": seed_list,
               "n_val": len(data.val[1]), "synthetic_ratio": ratio, "seconds": round(time.time() - t0, 1)}
        write_json(cached, out)
        return out

    def generator_quality(self, raw: dict) -> dict:
        return filter_quality(read_json(self.root(raw, "filter") / "data/filtered/summary.json"))


def run(params_file: Path, work: Path, seeds: int, out: Path, only: int | None) -> dict:
    runner = Runner(work)
    raw = yaml.safe_load(params_file.read_text())
    raw["sample"] = {**(raw.get("sample") or {}), "per_class": 150}  # generate: 1500 images, as img2img's 3 x 500
    best_raw, best, rows, adopted = raw, {}, [], {}
    for i, (name, change, judged_by) in enumerate(LEVERS[: only or len(LEVERS)]):
        trial = deep_merge(best_raw, change)
        log.info("ablation: lever %d: %s", i, name)
        accs = {v: runner.val_accuracy(trial, v, seeds) for v in judged_by}
        row = {"lever": name, "change": change, "judged_by": judged_by[0],
               "val": {v: a["val_accuracy"] for v, a in accs.items()},
               "val_per_seed": {v: a["per_seed"] for v, a in accs.items()},
               "n_val": accs[judged_by[0]]["n_val"], "seeds": accs[judged_by[0]]["seeds"]}
        if any(v in GENERATOR or v == POOL_SYN for v in judged_by):
            row["generator"] = runner.generator_quality(trial)
        score = row["val"][judged_by[0]]
        row["best_before"] = best.get(judged_by[0])
        row["kept"] = row["best_before"] is None or (bool(change) and score > row["best_before"])
        if row["kept"]:
            best_raw, adopted = trial, deep_merge(adopted, change)
            best[judged_by[0]] = score
        rows.append(row)
        result = {"what": "validation accuracy (mean over seeds) of the variant each lever serves; a lever is kept "
                          "when it beats the best so far; test accuracy is not computed",
                  "params_file": params_file.name, "seeds": seeds, "rows": rows,
                  "start": raw, "adopted": adopted}
        write_json(out.with_suffix(".json"), result)
        out.with_suffix(".md").write_text(markdown(result))
    return result


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.1f}"


def markdown(result: dict) -> str:
    rows = result["rows"]
    seeds = rows[0]["seeds"] if rows else []
    lines = ["# Ablation on validation", "",
             f"Each lever is added to the levers kept before it. Accuracy is validation accuracy in % (N = "
             f"{rows[0]['n_val'] if rows else '?'} val images), mean over {len(seeds)} seeds {seeds}; a lever is "
             "kept when the variant it serves beats its best so far. Test accuracy was not computed for any of it. "
             "Frechet distance (efficientnet-lite0 space, not comparable with Inception FID) against the filter's "
             "real reference, with the real-vs-real floor at the same N; judge agreement = share of synthetic images "
             "the judge (trained on the labeled images) gives their intended class. Reported, never used to choose.",
             "", "Read the accuracy column with its noise in mind: one seed on 500 validation images has a standard "
                 "error of about 1.8 points, so differences of a point or less between rows are within noise, and a "
                 "lever kept by a few tenths is a coin toss; the generator's quality columns move far beyond theirs.",
             "", "The questions this table cannot answer with 500 validation images (the labeler, self-training, "
                 "synthetic data at 10,000 images, the oracle ceiling of truly labeled pool images) are measured on "
                 "a 5,000-image dev split with paired intervals in `reports/pool_study.md` (`bench/pool_study.py`).",
             "", "| # | lever | judged by | val % (per seed) | vs best before | kept | FD all / floor | "
                 "FD accepted / floor | judge agreement % | accepted | synthetic-only val % |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(rows):
        v = r["judged_by"]
        g = r.get("generator") or {}
        diff = "" if r["best_before"] is None else f"{100 * (r['val'][v] - r['best_before']):+.1f}"
        fd = (lambda a, b: "—" if g.get(a) is None else f"{g[a]:.1f} / {g[b]:.1f}")
        lines.append(
            f"| {i} | {r['lever']} | {v} | {_pct(r['val'][v])} ({', '.join(_pct(a) for a in r['val_per_seed'][v])}) | "
            f"{diff} | {'yes' if r['kept'] else 'no'} | {fd('frechet_distance_all', 'frechet_distance_all_floor')} | "
            f"{fd('frechet_distance_accepted', 'frechet_distance_accepted_floor')} | {_pct(g.get('judge_agreement'))} | "
            f"{g.get('accepted', '—')} of {g.get('generated', '—')} | {_pct(r['val'].get(SYN_ONLY))} |")
    lines += ["", "Adopted (the kept levers, on top of the starting params):", "", "```yaml",
              yaml.safe_dump(result["adopted"], sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)


def rewrite_markdown(out: Path) -> None:
    """``reports/ablation.md`` again from its .json (after a change of this layout)."""
    out.with_suffix(".md").write_text(markdown(read_json(out.with_suffix(".json"))))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--params", type=Path, default=ROOT / "params.yaml", help="the starting params")
    p.add_argument("--work", type=Path, required=True, help="folder for the stage outputs (resumable)")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--levers", type=int, default=None, help="run only the first N levers")
    p.add_argument("--out", type=Path, default=ROOT / "reports" / "ablation")
    args = p.parse_args(argv)
    setup_logging()
    result = run(args.params, args.work, args.seeds, args.out, args.levers)
    print(json.dumps(result["adopted"], indent=2))


if __name__ == "__main__":
    main()
