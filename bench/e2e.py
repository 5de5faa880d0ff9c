"""Wall time of the pipeline (``dvc repro``) stage by stage.

Default: read the times an existing run left in its outputs (stage summaries; nothing is run):
  prepare          - (its summary has no timing)
  train_generator  models/generator/generator.json: steps x seconds_per_step (training loop only)
  sample           data/synthetic/summary.json: generation_seconds (sampling only)
  filter           data/filtered/summary.json: timing.seconds (whole stage body)
  train_classifier metrics/classifier/*.json: sum of the variants' wall seconds (per_seed seconds summed
                   where an older output lacks it: training loops only)
These leave out process start-up, Prefect and DVC overhead and file I/O.

``--run``: run ``dvc repro <stage>`` for each stage of dvc.yaml in order and time each command
(the whole wall time, overheads included); ``--force`` adds ``--force --single-item`` so cached
stages run again instead of being skipped.
"""
from __future__ import annotations

import subprocess
import time
from pathlib import Path

from bench.common import ROOT, parser, save, setup
from pipeline.config import Paths


def _read(path: Path):
    from pipeline.core.io import read_json
    return read_json(path) if path.exists() else None


def from_outputs(paths: Paths) -> dict:
    """Stage -> {"seconds", "source", "what"} from an existing run's outputs (None when absent)."""
    out = {}
    prep = _read(paths.prepared / "summary.json")
    out["prepare"] = {"seconds": (prep.get("timing") or {}).get("seconds") if prep else None,
                      "source": str(paths.prepared / "summary.json"),
                      "what": "stage output present but it records no timing" if prep else "no output"}
    gen = _read(paths.generator / "generator.json")
    out["train_generator"] = {
        "seconds": gen["steps"] * gen["seconds_per_step"] if gen and gen.get("seconds_per_step") else None,
        "source": str(paths.generator / "generator.json"),
        "what": "steps x seconds_per_step (training loop)" if gen else "no output",
        **({"device": gen.get("device"), "steps": gen.get("steps")} if gen else {})}
    syn = _read(paths.synthetic / "summary.json")
    out["sample"] = {"seconds": syn.get("generation_seconds") if syn else None,
                     "source": str(paths.synthetic / "summary.json"),
                     "what": "generation_seconds (sampling, all shards)" if syn else "no output",
                     **({"images": syn.get("num_images"), "images_per_second": syn.get("images_per_second")}
                        if syn else {})}
    filt = _read(paths.filtered / "summary.json")
    out["filter"] = {"seconds": (filt.get("timing") or {}).get("seconds") if filt else None,
                     "source": str(paths.filtered / "summary.json"),
                     "what": "timing.seconds (stage body)" if filt else "no output"}
    files = sorted(paths.classifier_metrics.glob("*.json")) if paths.classifier_metrics.exists() else []
    per_variant = {}
    for f in files:
        doc = _read(f) or {}
        per_variant[f.stem] = doc.get("seconds") or sum((r.get("seconds") or 0) for r in doc.get("per_seed", []))
    out["train_classifier"] = {"seconds": sum(per_variant.values()) if per_variant else None,
                               "source": str(paths.classifier_metrics / "*.json"),
                               "what": "sum of the variants' wall seconds" if per_variant else "no output",
                               "per_variant": per_variant}
    return out


def stage_names() -> list[str]:
    import yaml
    return list((yaml.safe_load((ROOT / "dvc.yaml").read_text()) or {}).get("stages", {}))


def run_stages(stages: list[str], force: bool) -> dict:
    out = {}
    for stage in stages:
        cmd = ["dvc", "repro", *(["--force", "--single-item"] if force else []), stage]
        print("$", " ".join(cmd), flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT)
        out[stage] = {"seconds": time.perf_counter() - t0, "command": " ".join(cmd), "returncode": proc.returncode}
        if proc.returncode:
            print(f"{stage} failed (exit {proc.returncode}); stopping", flush=True)
            break
    return out


def main(argv=None) -> dict:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--run", action="store_true", help="run dvc repro stage by stage and time it")
    p.add_argument("--force", action="store_true", help="with --run: force every stage to run again")
    p.add_argument("--stages", nargs="+", default=None, help="with --run: stages to run (default: all, in order)")
    args = p.parse_args(argv)
    device = setup(args)
    if args.run and not args.quick:
        stages = run_stages(args.stages or stage_names(), args.force)
        method = "measured: wall time of `dvc repro <stage>` per stage, in dvc.yaml order" + (
            " with --force --single-item" if args.force else " (stages already up to date are skipped by DVC)")
    else:
        stages = from_outputs(Paths())
        method = "read from an existing run's stage outputs (nothing run): " + \
            "; ".join(f"{k}: {v['what']}" for k, v in stages.items())
    known = [v["seconds"] for v in stages.values() if v.get("seconds") is not None]
    result = {"settings": {"method": method, "profile": _profile(), "quick": args.quick},
              "stages": stages, "total_seconds_known": sum(known) if known else None,
              "stages_without_timing": [k for k, v in stages.items() if v.get("seconds") is None]}
    save("e2e", device, result, args.out_dir)
    return result


def _profile() -> str | None:
    try:
        from pipeline.config import load_params
        return load_params(ROOT / "params.yaml").base.profile
    except Exception:  # no params file: only the description suffers
        return None


if __name__ == "__main__":
    main()
