"""``python -m flows <stage> [--variant V] [--params F] [--set key=value ...]``: what dvc.yaml runs."""
from __future__ import annotations

import argparse

from pipeline import STAGE_ORDER
from pipeline.config import load_params
from pipeline.core.entrypoint import exit_on_user_error, parse_set
from pipeline.errors import ConfigError


def check_prefect_api() -> None:
    """With a Prefect server configured (PREFECT_API_URL in the environment or the Prefect profile), ask it
    once before the flow run starts; a dead, wrong or refusing server is a ConfigError that says what to do."""
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    if not url:
        return  # a temporary local server per run
    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            client.read_flows(limit=1)
    except Exception as err:  # connection refused, DNS, TLS, 401/403 from a wrong auth string, not a Prefect API
        reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]
        raise ConfigError(f"PREFECT_API_URL={url}: the Prefect server does not answer ({reason}). Start it "
                          "(prefect server start), correct PREFECT_API_URL and PREFECT_API_AUTH_STRING "
                          "(environment, or prefect config view), or unset PREFECT_API_URL to run with a temporary "
                          "local server.") from None


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m flows", description="Run a stage as a Prefect flow.")
    ap.add_argument("stage", choices=[*STAGE_ORDER, "augment"])
    ap.add_argument("--variant", help="train_classifier variant")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--root", default=".")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    from flows.stages import STAGE_FLOWS, augment_flow

    kwargs = dict(params_file=args.params, overrides=exit_on_user_error(parse_set, args.set) or None, root=args.root)
    params = exit_on_user_error(load_params, args.params, kwargs["overrides"])  # bad params: one line, no server
    exit_on_user_error(check_prefect_api)  # a configured server that does not answer: one line, not 130
    if args.stage != "train_classifier":
        return exit_on_user_error(augment_flow if args.stage == "augment" else STAGE_FLOWS[args.stage], **kwargs,
                                  echo=False)  # the flow run logged a user error once; exit 2 without repeating it
    for variant in [args.variant] if args.variant else params.train_classifier.variants:  # none named: every one
        exit_on_user_error(STAGE_FLOWS["train_classifier"], variant=variant, **kwargs, echo=False)


if __name__ == "__main__":
    main()
