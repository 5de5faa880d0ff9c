"""``synthaug repro``: dvc repro with one Prefect server that every stage's flow run shares."""
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# a stage that records the Prefect API it was given and whether that API answered
STAGE = ("import json, os, urllib.request\n"
         "url = os.environ.get('PREFECT_API_URL')\n"
         "try:\n"
         "    up = urllib.request.urlopen(url + '/health', timeout=10).status == 200\n"
         "except Exception:\n"
         "    up = False\n"
         "json.dump({'url': url, 'up': up}, open('{out}', 'w'))\n")


def dvc_project(tmp_path: Path, stages: int) -> Path:
    subprocess.run([str(Path(sys.executable).parent / "dvc"), "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "stage.py").write_text("import sys\nexec(open('code.txt').read().replace('{out}', sys.argv[1]))\n")
    (tmp_path / "code.txt").write_text(STAGE)
    yaml = "stages:\n" + "".join(f"  s{i}:\n    cmd: {sys.executable} stage.py s{i}.json\n    deps: [stage.py]\n"
                                 f"    outs: [s{i}.json]\n" for i in range(stages))
    (tmp_path / "dvc.yaml").write_text(yaml)
    return tmp_path


def repro(cwd: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", "repro", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env={**env, "PYTHONPATH": str(ROOT)})


def test_repro_gives_every_stage_one_live_server_and_stops_it(tmp_path):
    project = dvc_project(tmp_path, 2)
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    out = repro(project, env)
    assert out.returncode == 0, out.stderr[-3000:]
    seen = [json.loads((project / f"s{i}.json").read_text()) for i in range(2)]
    assert seen[0]["url"].startswith("http://127.0.0.1:") and seen[0]["url"] == seen[1]["url"]
    assert all(s["up"] for s in seen)
    with pytest.raises(OSError):  # stopped once dvc repro returned
        urllib.request.urlopen(seen[0]["url"] + "/health", timeout=5)


def test_repro_leaves_a_configured_server_alone_and_passes_dvc_args_and_exit_code(tmp_path):
    project = dvc_project(tmp_path, 2)
    url = "http://127.0.0.1:9/api"  # nothing listens there: the stages only record it
    out = repro(project, {**os.environ, "PREFECT_API_URL": url}, "-s", "s1")  # dvc's flags may come first
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads((project / "s1.json").read_text()) == {"url": url, "up": False}
    assert not (project / "s0.json").exists()  # dvc repro s1 ran s1 alone
    assert repro(project, {**os.environ, "PREFECT_API_URL": url}, "no_such_stage").returncode != 0


def test_repro_runs_the_stages_with_its_own_interpreter_without_an_activated_venv(tmp_path):
    """`.venv/bin/synthaug repro` from a shell whose PATH lacks the venv: a stage's bare `python` is the venv's
    (it was the system's, without prefect)."""
    subprocess.run([str(Path(sys.executable).parent / "dvc"), "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "dvc.yaml").write_text("stages:\n  which:\n    cmd: python -c \"import sys; open('which.txt', 'w')"
                                       ".write(sys.executable)\"\n    outs: [which.txt]\n")
    url = "http://127.0.0.1:9/api"  # configured: no temporary server is started
    out = repro(tmp_path, {**os.environ, "PATH": "/usr/bin:/bin", "PREFECT_API_URL": url})
    assert out.returncode == 0, out.stderr[-3000:]
    assert Path((tmp_path / "which.txt").read_text()).parent == Path(sys.executable).parent
