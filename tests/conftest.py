"""Fixtures and hooks for every test: offline flags and Prefect settings first (before any library
reads them), one torch thread, a fresh accelerate state, the gpu marker's skip, and one Prefect server
for the session."""
from pipeline.core.env import offline_defaults

offline_defaults()

import os  # noqa: E402
import tempfile  # noqa: E402

# stages run in-process here, outside any flow run, with Prefect imported and the pipeline logger forwarded
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
# a Prefect home (the temporary servers' SQLite database) of this test process and the stages it starts:
# not the user's, and not shared with another pytest-xdist worker, whose runs would lock the same file
_PREFECT_HOME = tempfile.TemporaryDirectory(prefix="synthaug-tests-prefect-")
os.environ["PREFECT_HOME"] = _PREFECT_HOME.name
import base64  # noqa: E402
import secrets  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
import urllib.error  # noqa: E402
import urllib.request  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.helpers import BIN, make_idx_dir, stop_process_group  # noqa: E402


def pytest_collection_modifyitems(config, items):
    # modules with slow tests first: pytest-xdist hands out whole modules (--dist loadscope) in this order,
    # so the long ones start at once instead of ending the run on one worker (a stable sort: the order
    # within a module is kept)
    slow = {item.module.__name__ for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.module.__name__ not in slow)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu"):  # the marker, not a keyword (a parametrize id may say "gpu")
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and lose a lot on a busy machine; tests that
    time nothing run the same on 1 or 2 cores. Session-wide, so module fixtures (a generator trained
    once for a module) and the tests that compare with them compute with the same thread count: float
    sums in another order would make "same seed, same weights" depend on the machine's cores.
    Subprocesses a test starts set OMP_NUM_THREADS themselves."""
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serving(proc: subprocess.Popen, api: str, auth: str, seconds: float = 120) -> bool:
    """True once the server ``proc`` started answers with ``auth`` (so it is this one, not another test
    worker's on the same port); False if it exits or is not up within ``seconds``."""
    token = base64.b64encode(auth.encode()).decode()
    deadline = time.time() + seconds
    while proc.poll() is None and time.time() < deadline:
        try:
            urllib.request.urlopen(urllib.request.Request(f"{api}/flows/filter", data=b"{}", method="POST", headers={
                "Authorization": f"Basic {token}", "Content-Type": "application/json"}), timeout=5)
            return proc.poll() is None
        except urllib.error.HTTPError as e:
            if e.code == 401:
                return False  # another server answers on this port, with another auth string
            time.sleep(0.5)  # up but not ready yet
        except OSError:
            time.sleep(0.5)
    return False


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """A real Prefect server on a free loopback port for the whole session, with API auth on as README's
    GPU-worker setup has it; stopped with everything it started. Holds the environment a client or worker
    needs: PREFECT_API_URL, PREFECT_API_AUTH_STRING, PREFECT_HOME (tests create their own work pools and
    deployments, each under names of its own or with --overwrite)."""
    home = tmp_path_factory.mktemp("prefect_home")
    auth = f"synthaug:{secrets.token_hex(16)}"
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": "",
           "PREFECT_HOME": str(home), "PREFECT_SERVER_API_AUTH_STRING": auth}
    env.pop("PREFECT_API_URL", None)
    for _ in range(3):  # a port taken between choosing and binding (pytest-xdist runs a server per worker)
        port = _free_port()
        api = f"http://127.0.0.1:{port}/api"
        proc = subprocess.Popen([BIN / "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        if _serving(proc, api, auth):
            break
        stop_process_group(proc)
    else:
        raise AssertionError("Prefect server did not start on any of 3 free ports")
    try:
        with pytest.raises(urllib.error.HTTPError, match="401"):  # the door is closed without the auth string
            urllib.request.urlopen(urllib.request.Request(f"{api}/flows/filter", data=b"{}", method="POST"), timeout=10)
        yield {"PREFECT_API_URL": api, "PREFECT_API_AUTH_STRING": auth, "PREFECT_HOME": str(home)}
    finally:
        stop_process_group(proc)


@pytest.fixture(scope="session")
def tiny_fmnist(tmp_path_factory):
    """A tiny dataset in Fashion-MNIST's files (3 classes, 120 train and 30 test images of 28 px), for the
    tests that run the pipeline on a project copy; read only."""
    return make_idx_dir(tmp_path_factory.mktemp("fmnist"), n_train=120, n_test=30, classes=3, size=28)
