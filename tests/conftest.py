"""Fixtures and hooks for every test: offline flags and Prefect settings first (before any library
reads them), one torch thread, a fresh accelerate state, and the gpu marker's skip."""
from pipeline.core.env import offline_defaults

offline_defaults()

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu"):  # the marker, not a keyword (a parametrize id may say "gpu")
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and lose a lot on a busy machine; tests that
    time nothing run the same on 1 or 2 cores. Subprocesses a test starts set OMP_NUM_THREADS themselves."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """accelerate keeps one state per process (its mixed precision included); a stage run is one
    process, a test session is many runs, so each test starts from a clean state."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
