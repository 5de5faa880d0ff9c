"""Where a result came from: git revision, dvc.lock, package versions, machine; timing."""
from __future__ import annotations

import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path

from pipeline.core.io import sha256_file

PACKAGES = ("torch", "diffusers", "timm", "torch-fidelity", "datasets", "prefect", "dvc", "accelerate")


def package_versions(packages=PACKAGES) -> dict[str, str]:
    out = {}
    for p in packages:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = "not installed"
    return out


def _git(root: Path, *args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def git_revision(root: Path) -> tuple[str | None, bool]:
    """Short HEAD revision (None outside git) and whether tracked files have uncommitted changes."""
    rev = _git(root, "rev-parse", "--short", "HEAD") or None
    return rev, bool(rev and _git(root, "status", "--porcelain", "--untracked-files=no"))


def run_metadata(root: Path, device: str) -> dict:
    """Git revision (and whether the tree was dirty), dvc.lock hash, device, versions, time."""
    rev, dirty = git_revision(root)
    lock = Path(root) / "dvc.lock"
    return {"git_revision": rev or "unknown", "git_dirty": dirty,
            "dvc_lock_sha256": sha256_file(lock)[:12] if lock.exists() else None, "device": device,
            "python": platform.python_version(), "platform": platform.platform(), "packages": package_versions(),
            "generated": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
