"""``python -m pipeline.<stage>``: parse the shared options, run, turn user errors into one line.

Lives below the stages so each stage module can be run as a script without importing
anything above it; ``pipeline.cli`` and ``flows`` use the same ``parse_set``.
"""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path

import yaml

from pipeline.config import Paths, load_params
from pipeline.core.env import offline_defaults
from pipeline.errors import USER_ERRORS, ConfigError

LOG_FORMAT, LOG_DATEFMT = "%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"


def setup_logging() -> None:
    """Log lines with time and module; also the offline defaults every entry point wants."""
    offline_defaults()
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, datefmt=LOG_DATEFMT)


def parse_set(items: list[str]) -> dict:
    """``["a.b=1", ...]`` -> ``{"a.b": 1}`` (values parsed as YAML)."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key.path=value")
        k, v = item.split("=", 1)
        try:
            out[k] = yaml.safe_load(v)
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML ({str(err).splitlines()[0]}); quote "
                              "it, e.g. --set 'key=\"[1\"'") from None
    return out


def exit_on_user_error(fn: Callable, *args, echo: bool = True, **kwargs):
    """Call ``fn``; a user mistake (``USER_ERRORS``) ends the process with its message (unless ``echo``
    is off: a flow run has logged it) and exit code 2; Ctrl-C with a note and exit code 130."""
    try:
        return fn(*args, **kwargs)
    except USER_ERRORS as err:
        if echo:
            print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: every output is written atomically, so what finished is kept and nothing is half "
              "written; run the same command again to resume (generator training from its last checkpoint, "
              "sampling from its finished shards).", file=sys.stderr)
        sys.exit(130)


def stage_main(name: str, run: Callable, argv: list[str] | None = None, options: dict[str, dict] | None = None
               ) -> None:
    """Run one stage from the command line; ``options``: extra ``--name`` flags passed to ``run``."""
    ap = argparse.ArgumentParser(prog=f"python -m pipeline.{name}", description=f"Run the {name} stage.")
    ap.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    ap.add_argument("--root", default=".", help="project root that data/, models/, reports/ are under")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a param, e.g. --set sample.shard_index=1")
    for flag, kw in (options or {}).items():
        ap.add_argument(f"--{flag}", **kw)
    args = ap.parse_args(argv)
    setup_logging()
    extra = {flag: getattr(args, flag) for flag in options or {}}
    exit_on_user_error(lambda: run(load_params(args.params, parse_set(args.set)), Paths(root=Path(args.root)),
                                   **extra))
