"""The ``synthaug`` command: run stages in-process, ``dvc repro`` with one Prefect server, print the params
in force, compare runs, summarize a study's experiments."""
from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from pipeline import STAGE_ORDER
from pipeline.config import Paths, load_params
from pipeline.core.entrypoint import exit_on_user_error, parse_set, setup_logging
from pipeline.core.prefect_setup import temporary_server
from pipeline.errors import ConfigError
from pipeline.reporting import compare, study


def _command(args) -> None:
    if args.cmd == "compare":
        print(compare.to_markdown(compare.run(Path(args.repo), args.names or None)))
        return
    if args.cmd == "study":
        rows = study.run(Path(args.repo), args.reference, args.names or None, args.score, Path(args.out), args.title)
        print(study.to_markdown(rows, args.reference, args.score, args.title))
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


def repro(dvc_args: list[str]) -> int:
    """``dvc repro dvc_args`` with one temporary Prefect server for every stage's flow run, when no server is
    configured (``PREFECT_API_URL``): each stage would otherwise start and stop a server of its own (about
    7 s per stage, 12 stages in the default pipeline). The runs are kept in ``PREFECT_HOME``'s database
    either way. Returns dvc's exit code."""
    # the stages' `python -m flows ...` and dvc itself run with the interpreter synthaug runs in, venv active or not
    env = {**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    dvc = shutil.which("dvc", path=env["PATH"])
    if dvc is None:
        raise ConfigError("synthaug repro: the dvc command is not installed here; run make setup (or pip install dvc)")
    cmd = [dvc, "repro", *dvc_args]
    # with PREFECT_API_URL set, every flow run goes there as it is (each one checks it); else one temporary server,
    # in a process group of its own: Ctrl-C stops the runs first, then it
    with temporary_server() as url:
        return subprocess.call(cmd, env={**env, "PREFECT_API_URL": url} if url else env)


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
    s = sub.add_parser("study", help="summarize finished DVC experiments (a study over params) -> reports/<out>.md")
    s.add_argument("names", nargs="*", help="experiment names (default: every finished experiment and the workspace)")
    s.add_argument("--reference", default="fixmatch", help="the variant every row is paired with, in each run")
    s.add_argument("--score", default="dev_accuracy", choices=sorted(study.SCORES), help="never the test split")
    s.add_argument("--out", default="reports/study", help="output path without extension (.md, .json, .png)")
    s.add_argument("--title", default="Study")
    s.add_argument("--repo", default=".", help="the project's git/DVC repository")
    d = sub.add_parser("repro", help="dvc repro [ARGS] with one Prefect server for all its flow runs")
    d.add_argument("dvc_args", nargs=argparse.REMAINDER, help="passed to dvc repro (stage names, --force, ...)")
    c = sub.add_parser("config", help="print the resolved params (defaults + profile + params.yaml)")
    c.add_argument("--params", default="params.yaml")
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["repro"]:  # every later word is dvc's, flags first too (argparse's REMAINDER takes no -s ...)
        setup_logging()
        sys.exit(exit_on_user_error(repro, argv[1:]))
    args = ap.parse_args(argv)
    setup_logging()
    exit_on_user_error(_command, args)


if __name__ == "__main__":
    main()
