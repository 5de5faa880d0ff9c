"""Typed configuration, read from ``params.yaml``. Each field resolves to the class default
(``pipeline.config.sections``), then the ``base.profile`` preset (``pipeline/profiles.yaml``),
then what params.yaml says; unknown keys and wrong types are errors that name the key and the file."""
from __future__ import annotations

import logging
import os
import reprlib
from pathlib import Path
from typing import Annotated, Any, get_args, get_origin

import yaml
from pydantic import ValidationError
from pydantic.fields import FieldInfo

from pipeline.config.paths import Paths, classifier_file, labeler_file  # noqa: F401
from pipeline.config.sections import (  # noqa: F401
    IGNORED_BY_KIND, STAGES, BaseParams, CganConfig, ClipConfig, DatasetGanConfig, DitConfig, FilterConfig, Location,
    Params, PrepareConfig, PseudoLabelConfig, ReportConfig, SampleConfig, TrainClassifierConfig, TrainGeneratorConfig,
    VariantSpec, keeps_output, learner_config)
from pipeline.config.variant_paths import colliding_variants, variant_outputs  # noqa: F401
from pipeline.errors import ConfigError

log = logging.getLogger(__name__)
PARAMS_FILE = "params.yaml"
PROFILES_FILE = Path(__file__).resolve().parent.parent / "profiles.yaml"
MAX_VALUES = 100_000  # params are small; more values than this (a YAML alias bomb) is refused at once
_SHORT = reprlib.Repr()
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlevel = 80, 80, 2
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxdict = _SHORT.maxset = 5


def short(value: Any) -> str:
    """A bounded repr of a user's value for an error message (a huge or deeply nested value is cut)."""
    return _SHORT.repr(value)


def _check_size(raw: Any, source: str) -> None:
    """Refuse params that expand to more than MAX_VALUES values, counting each alias as the copy it
    stands for; stops counting at the limit, so a bomb costs no more than that to detect."""
    seen, stack = 0, [raw]
    while stack:
        node = stack.pop()
        seen += 1
        if seen > MAX_VALUES:
            raise ConfigError(f"{source}: the params expand to more than {MAX_VALUES:,} values (YAML anchors and "
                              "aliases that repeat each other?). Params are a few hundred values: write them out.")
        if isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend(node)


def _allowed_keys(loc: tuple) -> list[str]:
    model, parts = Params, list(loc[:-1])
    while parts:
        model = model.model_fields[parts.pop(0)].annotation
        if get_origin(model) is dict:  # a named entry (a variant): its value's fields
            model = get_args(model)[1]
            parts = parts[1:]
    return sorted(model.model_fields)


def _field_at(loc: tuple) -> tuple[str, FieldInfo] | None:
    """The last field on an error's path (a variant's, a section's) and its name; a tuple's item or a union's
    member is its field's."""
    model, found = Params, None
    for part in loc:
        if get_origin(model) is dict:  # a named entry (a variant): its value's fields
            model = get_args(model)[1]
            continue
        fields = model.model_fields if isinstance(model, type) and hasattr(model, "model_fields") else {}
        if part not in fields:
            break
        found = part, fields[part]
        model = fields[part].annotation
    return found


def _range(field: FieldInfo) -> FieldInfo | None:
    """The ``FieldInfo`` that bounds a number: the field's own, or that of the numbers inside it (``Annotated``)."""
    if any(hasattr(m, k) for m in field.metadata for k in ("ge", "gt", "le", "lt")):
        return field
    stack = [field.annotation]
    while stack:
        arg = stack.pop()
        if get_origin(arg) is Annotated:
            inner = next((m for m in get_args(arg)[1:] if isinstance(m, FieldInfo)), None)
            if inner is not None:
                return inner
        stack.extend(get_args(arg))
    return None


def allowed_range(name: str, field: FieldInfo) -> str:
    """``1 <= name <= 64: why`` for a bounded number field (``section.Number``); "" for another."""
    bounded = _range(field)
    if bounded is None:
        return ""
    limits = {k: getattr(m, k) for m in bounded.metadata for k in ("ge", "gt", "le", "lt") if hasattr(m, k)}
    low = f"{limits['ge']:,} <= " if "ge" in limits else f"{limits['gt']:,} < " if "gt" in limits else ""
    high = f" <= {limits['le']:,}" if "le" in limits else f" < {limits['lt']:,}" if "lt" in limits else ""
    return f"{low}{name}{high}" + (f" ({bounded.description})" if bounded.description else "")


_BOUNDS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "finite_number"}


def _format_errors(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key (allowed here: {', '.join(_allowed_keys(e['loc']))})")
        else:
            # a section: its message says
            got = "" if isinstance(e.get("input"), dict) else f" (got {short(e.get('input'))})"
            field = _field_at(e["loc"]) if e["type"] in _BOUNDS else None
            allowed = field and allowed_range(*field)
            lines.append(f"  {key}: {e['msg']}{got}" + (f"; allowed: {allowed}" if allowed else ""))
    return f"{source}: invalid params:\n" + "\n".join(lines) + "\nFix these keys and run again."


def _yaml_to_model_types(raw: dict) -> dict:
    """YAML has no tuples; strict pydantic wants them for tuple fields."""
    out = {}
    for k, v in raw.items():
        if isinstance(v, dict):
            out[k] = _yaml_to_model_types(v)
        elif isinstance(v, list):
            out[k] = tuple(v)
        else:
            out[k] = v
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML that refuses a key given twice in one mapping (YAML itself keeps the last silently).
    Kept: ruamel.yaml refuses them too, but reads YAML 1.2 (``1e-3`` a float, ``yes`` a string), names one key."""

    def construct_mapping(self, node, deep=False):
        keys = [self.construct_object(k, deep=deep) for k, _ in node.value]
        dup = sorted({str(k) for k in keys if keys.count(k) > 1})
        if dup:
            raise ConfigError(f"{node.start_mark.name}, line {node.start_mark.line + 1}: key(s) {dup} given twice "
                              "in one section. Keep one of each.")
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path) -> Any:
    """A YAML file with duplicated keys refused; a syntax error is a ConfigError naming the file."""
    if Path(path).is_dir():
        raise ConfigError(f"{path}: is a folder, not a params file. Pass the YAML file (e.g. --params params.yaml).")
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.load(f, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.object[err.start:err.start + 1]!r} at offset "
                          f"{err.start}). Save it as UTF-8.") from None


PROFILES: dict[str, dict[str, dict[str, Any]]] = {
    name: _yaml_to_model_types(preset) for name, preset in read_yaml(PROFILES_FILE).items()}


def deep_merge(base: dict, over: dict) -> dict:
    """``over`` wins, key by key, also inside nested sections (e.g. train_generator.dit).
    Kept: OmegaConf.merge turns tuples into lists and refuses dates and non-string keys that pydantic reports."""
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def params_diff(made: dict, now: dict, prefix: str = "") -> list[str]:
    """``key: value there -> value now`` for every leaf where two resolved params dicts differ."""
    out = []
    for k in sorted(set(made) | set(now), key=str):
        a, b = made.get(k), now.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += params_diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


def params_from_dict(raw: dict | None, source: str = "<params>") -> Params:
    if not isinstance(raw or {}, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections")
    _check_size(raw, source)
    raw = dict(raw or {})
    base_raw = raw.get("base") or {}
    profile = base_raw.get("profile", BaseParams().profile) if isinstance(base_raw, dict) else "cpu"
    if not isinstance(profile, str) or profile not in PROFILES:
        raise ConfigError(f"{source}: base.profile: unknown profile {short(profile)} (allowed: {', '.join(PROFILES)})")
    merged: dict[str, Any] = {}
    for section, value in raw.items():
        if section in STAGES and not isinstance(value, (dict, type(None))):
            raise ConfigError(f"{source}: {section}: must be a mapping of keys, got {short(value)}")
        merged[section] = dict(value or {}) if isinstance(value, dict) or value is None else value
    for stage, preset in PROFILES[profile].items():
        merged[stage] = deep_merge(preset, merged.get(stage) or {})
    try:
        params = Params.model_validate(_yaml_to_model_types(merged))
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None
    clash = colliding_variants(params.train_classifier.variants)
    if clash:
        raise ConfigError(f"{source}: train_classifier.variants: " + "; ".join(clash) + ". Rename one of each "
                          "pair: training one would replace or delete the other's outputs.")
    _warn_ignored(raw, params, source)
    return params


# the keys of a section that one of its choices does not read (train_generator's: IGNORED_BY_KIND, beside its
# section): loading params warns when params.yaml or an override sets one of them for that choice
IGNORED_BY_CHOICE = {
    ("train_generator", "kind"): IGNORED_BY_KIND,
    ("pseudo_label", "method"): {"supervised": frozenset({"unlabeled_ratio", "fixmatch_threshold", "fairness",
                                                          "unlabeled_weight", "ema_decay"})},
    ("sample", "mode"): {"generate": frozenset({"strengths", "variations", "pool_per_class"}),
                         "img2img": frozenset({"per_class"})},
}


def _warn_ignored(raw: dict, params: Params, source: str) -> None:
    """Name the keys the user set (not the profile: it sets some for every choice) that the section's choice (e.g.
    train_generator.kind) does not read, and the choices that do; a key set to its default changes nothing."""
    for (section, choice_key), table in IGNORED_BY_CHOICE.items():
        user = raw.get(section) or {}
        if not isinstance(user, dict):
            continue
        fields, choice = STAGES[section].model_fields, getattr(getattr(params, section), choice_key)
        ignored = {k for k in table.get(choice, frozenset()) & set(user)
                   if _yaml_to_model_types({k: user[k]})[k] != fields[k].default}
        if ignored:
            readers = [c for c in get_args(fields[choice_key].annotation) if not ignored & table.get(c, frozenset())]
            log.warning("%s: %s.%s %s ignores %s.%s (they apply to %s %s only); remove them or set %s.%s to one of "
                        "those", source, section, choice_key, choice, section, ", ".join(sorted(ignored)), choice_key,
                        ", ".join(readers), section, choice_key)


def load_params(path: str | os.PathLike = PARAMS_FILE, overrides: dict | None = None) -> Params:
    """Read, merge with the profile preset and validate ``params.yaml``."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: params file not found. Run from the project root or pass --params.")
    raw = read_yaml(path)
    if raw is None:
        log.warning("%s is empty: every param takes its default (profile %s)", path, BaseParams().profile)
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for i, p in enumerate(parents):
            if node.get(p) is None:  # absent, or an empty section in the file
                node[p] = {}
            node = node[p]
            if not isinstance(node, dict):
                where = ".".join(parents[:i + 1])
                raise ConfigError(f"override {dotted}: {where} is a value ({short(node)}), not a section; "
                                  f"set {where}=... or a key inside a section")
        node[leaf] = value
    return params_from_dict(raw, str(path))


def resolve_device(base: BaseParams, compute: bool = True) -> str:
    """The device a stage runs on. ``compute``: the stage trains or samples at the profile's sizes, so the
    gpu profile without a CUDA device is refused (days of CPU time) unless ``base.device: cpu`` asks for it
    (then a warning); a stage that only reads results (report) passes False."""
    import torch

    if base.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("base.device: cuda was asked for but no CUDA device is visible; use auto or cpu")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if base.device == "auto" else base.device
    if compute and base.profile == "gpu" and device == "cpu":
        if base.device == "auto":
            raise ConfigError("base.profile: gpu sizes every model for a GPU (a 36M-parameter generator, thousands of "
                              "steps: days on a CPU), but no CUDA device is visible here. Use base.profile: cpu on "
                              "this machine, or run on a GPU machine; base.device: cpu runs it on the CPU anyway.")
        import logging

        logging.getLogger(__name__).warning("base.profile: gpu on the CPU (base.device: cpu): expect days, not hours")
    return device
