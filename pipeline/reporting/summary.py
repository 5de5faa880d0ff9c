"""The report's record of a run (pure): metrics.json, the generator's facts, each stage's time, the
variant table as rows for the page."""
from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline.config import VariantSpec
from pipeline.core.io import OUTPUTS
from pipeline.reporting.tables import generator_quality

VARIANT_KEYS = ("accuracy", "accuracy_low", "accuracy_high", "val_accuracy", "macro_f1", "ece", "diff", "p_value",
                "synthetic_ratio")


def generator_facts(outputs: dict[str, dict]) -> dict:
    """Kind, size, training and sampling cost of the generator (for the report's Generator section)."""
    g = outputs.get("generator")
    if not g:
        return {}
    facts = {"kind": g.get("kind", "unet"), "parameters_m": g.get("num_parameters", 0) / 1e6, "steps": g.get("steps"),
             "seconds": (g.get("timing") or {}).get("seconds"), "device": g.get("device"),
             "images_per_second": (outputs.get("synthetic") or {}).get("images_per_second")}
    if g.get("interpreter_val_accuracy") is not None:
        facts["interpreter"] = f"interpreter accuracy on val {100 * g['interpreter_val_accuracy']:.1f}% " \
                               f"(N={g.get('interpreter_val_n')})"
    return facts


def stage_seconds(outputs: dict[str, dict], variants: dict[str, dict], recorded: dict[str, float | None]) -> dict:
    """Seconds each stage took: those ``recorded`` in metrics/stages/ (stage -> seconds), else each earlier
    output's own (an older pseudo_label's summary kept it), the classifier variants' summed (each variant's
    wall time; its seeds' training times summed where an older output lacks it)."""
    times = {"prepare": recorded.get("prepare")}
    for name, facts in outputs.items():
        if name != "prepared":
            stage = OUTPUTS[name][0]
            own = (facts.get("timing") or facts).get("seconds")
            times[stage] = own if recorded.get(stage) is None else recorded[stage]
    times["train_classifier"] = sum(v.get("seconds") or sum(r.get("seconds") or 0 for r in v["per_seed"])
                                    for v in variants.values()) or None
    return times


def metrics(answer: dict, table: pd.DataFrame, outputs: dict[str, dict], specs: dict[str, VariantSpec],
            stage_times: dict) -> dict:
    """What metrics.json says (for ``dvc metrics``): the answer with its numbers, each variant's,
    the generator's quality, the pseudo-labels."""
    filt, pseudo = outputs.get("filtered") or {}, outputs.get("pseudo") or {}
    return {"headline": answer["headline"], "model": answer["model"], "findings": answer["findings"],
            "notes": answer["points"], "helped": answer["helped"], "recommend": answer["recommend"],
            "best_variant": answer["best_variant"], "synthetic_variant": answer["synthetic_variant"],
            "strongest_without_synthetic": answer["strongest_without_synthetic"],
            "baseline": answer["baseline"], "generator_kind": generator_facts(outputs).get("kind"),
            "n_test": answer["n_test"], "seeds": answer["seeds"],
            "detectable_difference": answer["detectable_difference"],
            **({"gain": answer["gain"], "gain_ci95_low": answer["gain_low"], "gain_ci95_high": answer["gain_high"]}
               if "gain" in answer else {}),
            "stage_seconds": stage_times,
            "generator_quality": generator_quality(filt, table, specs) if filt else None,
            "pseudo_labels": {k: pseudo.get(k) for k in ("kept", "pool_size", "pseudo_label_accuracy",
                                                         "pseudo_label_accuracy_per_class", "threshold", "labeler")},
            "variants": {v: {k: None if pd.isna(x) else float(x) for k, x in table.loc[v].items()
                             if k in VARIANT_KEYS} for v in table.index}}


def rows(table: pd.DataFrame) -> list[dict]:
    """The variant table as records, NaN as None."""
    return [{k: (None if isinstance(x, float) and np.isnan(x) else x) for k, x in r.items()}
            for r in table.reset_index().to_dict("records")]
