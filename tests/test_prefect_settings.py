"""The project's Prefect settings apply whatever the working directory: the entry points put them in the
environment before Prefect reads its settings, and prefect.toml (for the `prefect` command at the
project root) holds the same values."""
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

from pipeline.core.env import PREFECT

ROOT = Path(__file__).resolve().parent.parent


def flatten(table: dict, prefix: str = "PREFECT") -> dict[str, str]:
    out = {}
    for key, value in table.items():
        name = f"{prefix}_{key}".upper()
        if isinstance(value, dict):
            out.update(flatten(value, name))
        else:
            out[name] = str(value).lower() if isinstance(value, bool) else str(value)
    return out


def test_prefect_toml_holds_the_entry_points_values():
    toml = flatten(tomllib.loads((ROOT / "prefect.toml").read_text()))
    assert toml, "prefect.toml is empty"
    assert {k: PREFECT.get(k) for k in toml} == toml
    # the services a temporary server goes without stay on for a server started with `prefect server start`
    assert not any("_SERVICES_" in k for k in toml)


def test_a_flow_process_started_elsewhere_has_the_settings(tmp_path):
    """From a folder without prefect.toml, importing the flows (what `python -m flows` and a worker's
    run do) leaves Prefect with analytics off and the unneeded server services off."""
    code = ("import flows.stages, json\n"
            "from prefect.settings import get_current_settings as g\n"
            "s = g().server\n"
            "print(json.dumps([s.analytics_enabled, s.services.triggers.enabled, s.services.event_persister.enabled,"
            " s.ephemeral.startup_timeout_seconds, g().logging.extra_loggers]))")
    env = {k: v for k, v in os.environ.items() if k not in PREFECT}
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    analytics, triggers, persister, timeout, extra = json.loads(out.stdout.strip().splitlines()[-1])
    assert (analytics, triggers, persister, timeout) == (False, False, False, 120)
    assert "pipeline" in (extra if isinstance(extra, list) else [extra])


def test_a_setting_in_the_environment_wins(monkeypatch):
    from pipeline.core.env import offline_defaults

    monkeypatch.setenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "33")
    monkeypatch.delenv("PREFECT_SERVER_ANALYTICS_ENABLED", raising=False)
    offline_defaults()
    assert os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] == "33"
    assert os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
