"""Prefect flows: thin wrappers over ``pipeline.<stage>.run`` (see flows/stages.py).

Prefect's settings for this project are put in the environment here, before Prefect is imported
(``pipeline.core.env``), so they apply whatever the working directory; ``prefect.toml`` holds the same
values for the ``prefect`` command run from the project root.
"""
import logging

from pipeline.core.env import offline_defaults

offline_defaults()
logging.getLogger("pipeline").setLevel(logging.INFO)
