"""Process environment defaults: nothing is downloaded at run time, and Prefect runs quietly with the
project's settings whatever the working directory.

Prefect reads ``prefect.toml`` from the working directory only, so a stage started from another folder
(a test's temporary folder, a user's data folder) would run without it: analytics on, whose telemetry
heartbeat then fights the flow run for the temporary server's SQLite database ("database is locked"
tracebacks, Prefect issues #18934, #19771). The entry points (``flows``, ``python -m pipeline.<stage>``,
``synthaug``) therefore put the same settings in the environment before Prefect is imported; the
temporary server a flow run starts inherits them. ``prefect.toml`` holds the same values for the
``prefect`` command run from the project root (``tests/test_prefect_settings.py`` keeps the two equal),
except the services turned off below: a server you start yourself keeps its automations and events.
"""
import os
import warnings

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

# Environment variable -> value. A variable already set in the environment wins; these override the
# same keys in a Prefect profile (environment variables come first in Prefect's order), never
# PREFECT_API_URL, which is not set here.
PREFECT = {
    # no telemetry: nothing leaves the machine, and no heartbeat writes to the temporary server's database
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    # a patient start-up for the temporary server on a slow or busy machine
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    # the pipeline's own log lines in the flow run's logs
    "PREFECT_LOGGING_EXTRA_LOGGERS": "pipeline",
    # services of a temporary server that no pipeline run uses, each of which polls or writes the same
    # SQLite database as the run: automations (triggers and their actions) and the event store (with its
    # vacuum). Flow and task runs, their states and logs are recorded as before.
    "PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_ENABLED": "false",
}


def offline_defaults() -> None:
    """Set the offline flags of the Hugging Face libraries and the project's Prefect settings, each
    unless the environment sets it already. Call it before Prefect is imported."""
    for k, v in {**OFFLINE, **PREFECT}.items():
        os.environ.setdefault(k, v)
    # Prefect warns at import, in two lines, that it could not create PREFECT_HOME; what needs the folder (a
    # temporary server's database) says so in one line that says what to do (core/prefect_setup.py)
    warnings.filterwarnings("ignore", message="Failed to create the Prefect home directory", category=UserWarning)
