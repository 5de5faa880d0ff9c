"""The ``synthaug`` command: run stages in-process, print the params in force, compare runs."""
from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path

import yaml

from pipeline import STAGE_ORDER
from pipeline.config import Paths, load_params
from pipeline.core.entrypoint import exit_on_user_error, parse_set, setup_logging
from pipeline.reporting import compare


def _command(args) -> None:
    if args.cmd == "compare":
        print(compare.to_markdown(compare.run(Path(args.repo), args.names or None)))
        return
    params = load_params(args.params, parse_set(args.set))
    if args.cmd == "config":
        print(yaml.safe_dump(json.loads(json.dumps(params.resolved())), sort_keys=False))
        return
    for stage in (STAGE_ORDER if args.stage == "all" else [args.stage]):
        run = importlib.import_module(f"pipeline.{stage}").run
        for kwargs in ([{"variant": v} for v in params.train_classifier.variants] if stage == "train_classifier"
                       else [{}]):
            run(params, Paths(), **kwargs)


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
    exit_on_user_error(_command, args)


if __name__ == "__main__":
    main()
