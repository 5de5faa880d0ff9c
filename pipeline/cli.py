"""Command line: ``python -m pipeline.<stage>`` and the ``synthaug`` command."""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from pathlib import Path
from typing import Callable

import yaml

from pipeline import STAGE_ORDER
from pipeline.config import ConfigError, Paths, load_params

USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, FileNotFoundError)


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean bad input, shown as one clear message rather than a traceback."""
    from pipeline.prepare import DataError
    return USER_ERRORS + (DataError,)


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")


def _parse_set(items: list[str]) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key.path=value")
        k, v = item.split("=", 1)
        out[k] = yaml.safe_load(v)
    return out


def stage_main(name: str, run: Callable, argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog=f"python -m pipeline.{name}", description=f"Run the {name} stage.")
    ap.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    ap.add_argument("--root", default=".", help="project root that data/, models/, reports/ are under")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a param, e.g. --set sample.shard_index=1")
    args = ap.parse_args(argv)
    setup_logging()
    try:
        params = load_params(args.params, _parse_set(args.set))
        run(params, Paths(root=Path(args.root)))
    except user_errors() as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="synthaug", description="Synthetic data for classifier augmentation.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run one stage (or 'all') in-process, without Prefect")
    r.add_argument("stage", choices=[*STAGE_ORDER, "all"])
    r.add_argument("--params", default="params.yaml")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    k = sub.add_parser("compare", help="compare generator kinds across DVC experiments -> reports/generators.md")
    k.add_argument("names", nargs="*", help="experiment names (default: every experiment and the workspace)")
    k.add_argument("--repo", default=".", help="the project's git/DVC repository")
    c = sub.add_parser("config", help="print the resolved params (defaults + profile + params.yaml)")
    c.add_argument("--params", default="params.yaml")
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    setup_logging()
    try:
        if args.cmd == "compare":
            from pipeline import compare
            print(compare.to_markdown(compare.run(Path(args.repo), args.names or None)))
            return
        params = load_params(args.params, _parse_set(args.set))
        if args.cmd == "config":
            print(yaml.safe_dump(json.loads(json.dumps(params.resolved())), sort_keys=False))
            return
        for stage in (STAGE_ORDER if args.stage == "all" else [args.stage]):
            importlib.import_module(f"pipeline.{stage}").run(params, Paths())
    except user_errors() as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
