"""Prefect flows: thin wrappers over ``pipeline.<stage>.run`` (see flows/stages.py).

Prefect's own settings for this project are in ``prefect.toml`` at the project root.
"""
import logging

from pipeline.core.env import offline_defaults

offline_defaults()
logging.getLogger("pipeline").setLevel(logging.INFO)
