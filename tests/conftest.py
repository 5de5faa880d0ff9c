from pipeline.core.env import offline_defaults

offline_defaults()

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """accelerate keeps one state per process (its mixed precision included); a stage run is one
    process, a test session is many runs, so each test starts from a clean state."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
