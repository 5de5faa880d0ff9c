"""Prefect's set-up around ``python -m flows`` (pipeline/core/prefect_setup.py): Ctrl-C stops the flow run, then
the temporary server, and exits 130 with one line; an unwritable PREFECT_HOME and a server that accepts
connections but never answers each end in one line naming the setting, exit 2."""
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import yaml

from tests.helpers import TINY, held_after_first_checkpoint, make_prepared

ROOT = Path(__file__).resolve().parent.parent


def flow_env(tmp_path: Path, **extra) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PREFECT_HOME": str(tmp_path / "prefect"), **extra}
    if "PREFECT_API_URL" not in extra:
        env.pop("PREFECT_API_URL", None)
    return env


def write_params(path: Path, **sections) -> Path:
    path.write_text(yaml.safe_dump({"base": {"profile": "micro", "device": "cpu"}, **sections}))
    return path


def one_line_exit_2(out: subprocess.CompletedProcess, needle: str) -> None:
    text = out.stdout + out.stderr
    assert out.returncode == 2, text[-3000:]
    assert "Traceback" not in text and text.count("\n") <= 3, text[-3000:]
    assert needle in out.stderr, out.stderr[-3000:]


def test_ctrl_c_on_a_flow_stops_the_run_then_the_temporary_server(tmp_path):
    """SIGINT to the process group, as a terminal's Ctrl-C sends it, while the flow trains: it killed the
    temporary server too, and the run printed "Finished in state Running()" and connection tracebacks and was
    still alive 150 s later. The run is interrupted where it is held (after its first checkpoint), so no
    timing decides what is interrupted."""
    make_prepared(tmp_path)
    p = write_params(tmp_path / "p.yaml", train_generator={**TINY, "steps": 100_000})
    cmd = [sys.executable, "-m", "flows", "train_generator", "--params", str(p), "--root", str(tmp_path)]
    # a session of its own (its process group is what a terminal signals), SIGINT's default disposition as in a
    # terminal (a child inherits "ignored" from a parent that set it)
    proc = held_after_first_checkpoint(cmd, flow_env(tmp_path), tmp_path / "checkpointed", cwd=tmp_path,
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                       start_new_session=True,
                                       preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        os.killpg(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # never left running (100,000 steps beside the rest of the suite)
        except ProcessLookupError:
            pass
        proc.wait()
    assert proc.returncode == 130, out[-3000:]
    assert "Traceback" not in out and "Error logging to API" not in out and "state Running" not in out, out[-3000:]
    ended = out.index("Finished in state Crashed('Execution was aborted by an interrupt signal.')")
    stopped = out.index("Stopping temporary server on ")
    assert ended < stopped < out.index("interrupted: every output is written atomically"), out[-3000:]
    assert out.count("interrupted:") == 1
    address = out[stopped:].split()[4]  # http://127.0.0.1:PORT
    host, port = address.removeprefix("http://").split(":")
    with socket.socket() as s:  # the server is gone, not left behind
        assert s.connect_ex((host, int(port))) != 0


def test_an_unwritable_prefect_home_is_one_line_naming_it(tmp_path):
    """PREFECT_HOME where no folder can be made (under a file: as root, a read-only folder would still be
    written): the temporary server failed to start, 130 s and over 4,000 lines of tracebacks, exit 1."""
    (tmp_path / "file").write_text("")
    home = tmp_path / "file" / "prefect"
    p = write_params(tmp_path / "p.yaml", prepare={"path": str(tmp_path / "nowhere")})
    out = subprocess.run([sys.executable, "-m", "flows", "prepare", "--params", str(p), "--root", str(tmp_path)],
                         cwd=tmp_path, env=flow_env(tmp_path, PREFECT_HOME=str(home)), capture_output=True, text=True,
                         timeout=300)
    one_line_exit_2(out, f"PREFECT_HOME={home}: cannot write there")
    assert (out.stdout + out.stderr).count("\n") == 1  # not Prefect's own two-line warning about the folder too
    assert "set PREFECT_HOME to a writable folder" in out.stderr


def test_a_prefect_api_that_never_answers_is_one_line_within_the_request_timeout(tmp_path):
    """A server that accepts connections and never answers (a listening socket nobody reads) hung the stage
    without a word; now the check before the flow run waits PREFECT_API_REQUEST_TIMEOUT once, without retries."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)  # the kernel completes the connections; nothing ever reads or answers
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/api"
        p = write_params(tmp_path / "p.yaml", prepare={"path": str(tmp_path)})
        out = subprocess.run([sys.executable, "-m", "flows", "prepare", "--params", str(p), "--root", str(tmp_path)],
                             cwd=tmp_path, env=flow_env(tmp_path, PREFECT_API_URL=url, PREFECT_API_REQUEST_TIMEOUT="2"),
                             capture_output=True, text=True, timeout=300)
        silent.setblocking(False)
        asked = 0  # the connections made, still in the socket's queue
        while True:
            try:
                silent.accept()[0].close()
            except BlockingIOError:
                break
            asked += 1
    one_line_exit_2(out, f"PREFECT_API_URL={url}: the Prefect server did not answer within 2 s "
                         "(PREFECT_API_REQUEST_TIMEOUT)")
    assert asked == 1  # once: Prefect's client retried 5 times, with back-off (6 minutes at the default 60 s)
