"""``python -m flows <stage> [--variant V] [--params F] [--set key=value ...]``: what dvc.yaml runs."""
from __future__ import annotations

import argparse
import functools
import sys

from pipeline import STAGE_ORDER
from pipeline.config import load_params
from pipeline.core.entrypoint import exit_on_user_error, parse_set
from pipeline.core.prefect_setup import check_prefect, temporary_server
from pipeline.errors import USER_ERRORS


def run_flows(stage: str, variants: list[str], kwargs: dict) -> None:
    """The stage's flow runs (one per variant for train_classifier), with a temporary server when none is
    configured. Ctrl-C ends the flow run (recorded on the server), then the server, then the process:
    exit_on_user_error's note, exit 130."""
    from flows.stages import STAGE_FLOWS, augment_flow

    runs = ([functools.partial(STAGE_FLOWS["train_classifier"], variant=v) for v in variants]
            if stage == "train_classifier" else [augment_flow if stage == "augment" else STAGE_FLOWS[stage]])
    with temporary_server():
        for run in runs:
            try:
                run(**kwargs)
            except USER_ERRORS:  # the flow run logged it once: exit 2 without repeating it
                sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m flows", description="Run a stage as a Prefect flow.")
    ap.add_argument("stage", choices=[*STAGE_ORDER, "augment"])
    ap.add_argument("--variant", help="train_classifier variant")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--root", default=".")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    kwargs = dict(params_file=args.params, overrides=exit_on_user_error(parse_set, args.set) or None, root=args.root)
    params = exit_on_user_error(load_params, args.params, kwargs["overrides"])  # bad params: one line, no server
    # a configured server that does not answer, or no server and an unwritable PREFECT_HOME: one line, exit 2
    exit_on_user_error(check_prefect)
    variants = [args.variant] if args.variant else list(params.train_classifier.variants)  # none named: every one
    exit_on_user_error(run_flows, args.stage, variants, kwargs)


if __name__ == "__main__":
    main()
