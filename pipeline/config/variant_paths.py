"""The paths a classifier variant's name becomes, and names refused because two would share one."""

from __future__ import annotations

from pathlib import Path

from pipeline.config.paths import Paths

_REL = Paths(root=Path("."))


def variant_outputs(name: str) -> dict[str, str]:
    """Every path train_classifier writes for variant ``name`` (relative to the project root) -> what it is."""
    return {
        (_REL.classifier / name).as_posix(): "models folder",
        (_REL.classifier_seeds / name).as_posix(): "seed-runs folder",
        (_REL.classifier_metrics / name).as_posix(): "curves folder",
        (_REL.classifier_metrics / f"{name}.json").as_posix(): "metrics file",
    }


def _same_on_any_disk(path: str) -> str:
    """One key for the paths a case-insensitive file system (macOS, Windows) takes as the same,
    or Windows, which drops a name's trailing dots."""
    return "/".join(part.rstrip(".") for part in path.casefold().split("/"))


def colliding_variants(names) -> list[str]:
    """A sentence for each pair of variant names that would write to the same path (one's metrics file
    ``x.json`` is the other's curves folder when it is named ``x.json``; names that differ in letter case
    only are one folder on a case-insensitive file system)."""
    owner: dict[str, tuple[str, str, str]] = {}
    out = []
    for name in names:
        for path, what in variant_outputs(name).items():
            key = _same_on_any_disk(path)
            if key in owner and owner[key][0] != name:
                other, other_path, other_what = owner[key]
                same = (
                    "the same path"
                    if other_path == path
                    else "one path on macOS or Windows (they ignore letter case, Windows a name's trailing dots)"
                )
                out.append(
                    f"the {other_what} of {other!r} ({other_path}) and the {what} of {name!r} ({path}) are {same}"
                )
                break
            owner.setdefault(key, (name, path, what))
    return out
