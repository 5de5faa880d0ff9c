"""Prefect's set-up for the entry points that run flows (``python -m flows``, ``synthaug repro``): the settings
checked before any flow run starts, each failure one ConfigError naming the setting, and the temporary server
that flow runs use when no server is configured (``PREFECT_API_URL`` unset).

The temporary server is the one Prefect itself starts (``SubprocessASGIServer``), started in a process group
of its own, so that Ctrl-C in a terminal (SIGINT to the foreground process group) stops the flow run, which
records its end on the server, and not the server under it; the server is stopped after the run (it got the
interrupt too and died first: the run then printed "Finished in state Running()" and connection tracebacks
for minutes). On Linux it also stops when the process that started it dies, however it dies.
"""
from __future__ import annotations

import ctypes
import functools
import os
import signal
import subprocess
import sys
import tempfile
import types
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.errors import ConfigError


def check_prefect() -> None:
    """The configured server answers (``check_prefect_api``), or, without one, the temporary server's
    folder can be written (``check_prefect_home``)."""
    from prefect.settings import get_current_settings

    check_prefect_api() if get_current_settings().api.url else check_prefect_home()


def check_prefect_api() -> None:
    """With a Prefect server configured (PREFECT_API_URL in the environment or the Prefect profile), ask it
    once, within PREFECT_API_REQUEST_TIMEOUT and without retries; a dead, wrong, refusing or silent server is
    a ConfigError that says what to do."""
    import httpx
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_CLIENT_MAX_RETRIES, get_current_settings, temporary_settings

    settings = get_current_settings()
    url, timeout = settings.api.url, settings.api.request_timeout
    if not url:
        return  # a temporary local server per run
    try:
        with temporary_settings({PREFECT_CLIENT_MAX_RETRIES: 0}), get_client(sync_client=True) as client:
            client.read_flows(limit=1)
    except httpx.TimeoutException:  # it accepts connections and does not answer (it hung the stage, silent)
        raise ConfigError(f"PREFECT_API_URL={url}: the Prefect server did not answer within {timeout:g} s "
                          "(PREFECT_API_REQUEST_TIMEOUT). Check that a Prefect server (prefect server start) runs "
                          "there and is not stuck, raise PREFECT_API_REQUEST_TIMEOUT for a slow one, or unset "
                          "PREFECT_API_URL to run with a temporary local server.") from None
    except Exception as err:  # connection refused, DNS, TLS, 401/403 from a wrong auth string, not a Prefect API
        reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]
        raise ConfigError(f"PREFECT_API_URL={url}: the Prefect server does not answer ({reason}). Start it "
                          "(prefect server start), correct PREFECT_API_URL and PREFECT_API_AUTH_STRING "
                          "(environment, or prefect config view), or unset PREFECT_API_URL to run with a temporary "
                          "local server.") from None


def check_prefect_home() -> None:
    """The temporary server keeps its database in PREFECT_HOME: a folder that cannot be made or written is a
    ConfigError (the server failed to start, 130 s and thousands of lines of tracebacks)."""
    from prefect.settings import get_current_settings

    home = Path(get_current_settings().home)
    try:
        home.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=home):
            pass
    except OSError as err:
        raise ConfigError(f"PREFECT_HOME={home}: cannot write there ({err.strerror or type(err).__name__}). A flow "
                          "run without a Prefect server (PREFECT_API_URL unset) keeps its temporary server's database "
                          "there: make that folder writable, set PREFECT_HOME to a writable folder, or set "
                          "PREFECT_API_URL to a running Prefect server.") from None


def _detach():
    """What the server's process runs before it starts: a process group of its own and, on Linux, SIGTERM
    when its parent dies (looked up here: between fork and exec nothing may load a library)."""
    prctl = ctypes.CDLL(None).prctl if sys.platform.startswith("linux") else None

    def detach() -> None:
        os.setpgid(0, 0)
        if prctl is not None:
            prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    return detach


def _server_class():
    from prefect.server.api import server as module

    class DetachedServer(module.SubprocessASGIServer):
        """Prefect's temporary server, in its own process group (see the module's docstring)."""
        _instances: dict = {}  # not Prefect's own one-per-port cache

        def _run_uvicorn_command(self) -> subprocess.Popen:
            if os.name != "posix":  # no process groups to leave
                return super()._run_uvicorn_command()
            popen = functools.partial(subprocess.Popen, preexec_fn=_detach())
            real, module.subprocess = module.subprocess, types.SimpleNamespace(Popen=popen)
            try:  # Prefect's own command and environment, in a process group of its own
                return super()._run_uvicorn_command()
            finally:
                module.subprocess = real

    return DetachedServer


@contextmanager
def temporary_server() -> Iterator[str | None]:
    """Yield the API URL of a temporary server that the flow runs inside use (None, and nothing started, when
    PREFECT_API_URL is set; an unwritable PREFECT_HOME is a ConfigError); on the way out, send what the runs
    still have to log, then stop the server."""
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    settings = get_current_settings()
    if settings.api.url:
        yield None
        return
    check_prefect_home()
    server = _server_class()()
    server.start(timeout=settings.server.ephemeral.startup_timeout_seconds)
    try:
        with temporary_settings({PREFECT_API_URL: server.api_url}):
            yield server.api_url
    finally:
        _drain_prefect_workers()
        server.stop()


def _drain_prefect_workers() -> None:
    """The flow runs' log lines and events still queued for the server, sent before it stops."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        worker.drain_all(timeout=5)
