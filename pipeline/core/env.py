"""Process environment defaults: nothing is downloaded at run time."""
import os

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def offline_defaults() -> None:
    """Set the offline flags of the Hugging Face libraries unless the environment sets them."""
    for k, v in OFFLINE.items():
        os.environ.setdefault(k, v)
