"""Shared helpers of the benchmarks: device choice, timing, peak memory, environment
description and atomic JSON results."""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import platform
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch

from pipeline.core.provenance import git_revision, package_versions

RESULTS_DIR = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("torch", "torchvision", "diffusers", "accelerate", "timm", "torch-fidelity", "datasets",
            "numpy", "scipy", "pandas")


# ---- command line -----------------------------------------------------------------------

def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="auto = cuda when available")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of the code paths")
    p.add_argument("--repeats", type=int, default=2,
                   help="timed runs of each side, alternated (ours, reference, ours, reference, ...)")
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR, help="folder of the JSON result")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    return p


def setup(args) -> str:
    """Apply --threads, return the device ("cpu" or "cuda")."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    return "cuda" if args.device == "auto" and torch.cuda.is_available() else \
        ("cpu" if args.device == "auto" else args.device)


# ---- environment ------------------------------------------------------------------------

def cpu_model() -> str:
    """The CPU's model name and its widest vector / matrix units (machines of one kind differ 3-6x)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "")
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    units = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{name or platform.machine()} ({os.cpu_count()} CPUs; {', '.join(units) or 'no AVX2'})"


def device_name(device: str) -> str:
    if str(device).startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return cpu_model()


def environment(device: str) -> dict:
    rev, dirty = git_revision(ROOT)
    env = {
        "device": device, "device_name": device_name(device),
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "git_rev": rev and rev + ("+dirty" if dirty else ""), "python": platform.python_version(),
        "platform": platform.platform(), "packages": package_versions(PACKAGES),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.version.cuda if str(device).startswith("cuda") else None,
    }
    try:
        env["load_average_1_5_15"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        pass
    return env


# ---- timing and memory ------------------------------------------------------------------

def sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux
        import psutil
        return psutil.Process().memory_info().rss


CPU_MEMORY_METHOD = ("resident set size polled every 2 ms from a background thread during the run "
                     "(/proc/self/statm); peak minus the value at the start of the run, after gc and glibc "
                     "malloc_trim; memory the allocator keeps cached from earlier runs can still be reused "
                     "unseen, so on CPU this is a lower bound")
CUDA_MEMORY_METHOD = "torch.cuda.max_memory_allocated during the run minus torch.cuda.memory_allocated at its start"


def _malloc_trim() -> None:
    """Give freed heap memory back to the OS (glibc), so the RSS at the start reflects live memory."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class _RSSPeak:
    def __init__(self, interval: float = 0.002):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    def __enter__(self):
        gc.collect()
        _malloc_trim()
        self.start = self.peak = _rss()
        self._t = threading.Thread(target=self._poll, daemon=True)
        self._t.start()
        return self

    def _poll(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss())


def memory_method(device: str) -> str:
    return CUDA_MEMORY_METHOD if str(device).startswith("cuda") else CPU_MEMORY_METHOD


def measure(fn: Callable[[], object], device: str) -> tuple[float, float, object]:
    """Run ``fn`` once -> (seconds, peak extra memory in MiB, its result)."""
    gc.collect()
    if str(device).startswith("cuda"):
        sync(device)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        seconds = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() - base
    else:
        with _RSSPeak() as mem:
            t0 = time.perf_counter()
            out = fn()
            seconds = time.perf_counter() - t0
        peak = mem.peak - mem.start
    return seconds, peak / 2**20, out


def alternate(sides: dict[str, Callable[[], object]], repeats: int, device: str,
              log: Callable[[str], None] = print) -> tuple[dict[str, list[float]], dict[str, list[float]], dict]:
    """Time each side ``repeats`` times, interleaved (a, b, a, b, ...) so a change of machine
    load hits both. -> (seconds per side, peak MiB per side, last result per side)."""
    seconds = {k: [] for k in sides}
    memory = {k: [] for k in sides}
    last = {}
    for r in range(repeats):
        for name, fn in sides.items():
            s, m, out = measure(fn, device)
            seconds[name].append(s)
            memory[name].append(m)
            last[name] = out
            log(f"  run {r + 1}/{repeats} {name}: {s:.3f} s, peak +{m:.1f} MiB")
    return seconds, memory, last


def rate(count: float, seconds: list[float]) -> dict:
    """Throughput summary: best (min time) and median run."""
    ss = sorted(seconds)
    med = ss[len(ss) // 2] if len(ss) % 2 else 0.5 * (ss[len(ss) // 2 - 1] + ss[len(ss) // 2])
    return {"per_second_best": count / ss[0], "per_second_median": count / med,
            "seconds": [round(s, 4) for s in seconds]}


def ratio(ours: dict, ref: dict) -> dict:
    """best / median of each side, and the median of the per-repeat ratios (run r of each side
    ran next to each other, so a load change hits both: the figure the targets are judged on)."""
    n_o, n_r = ours["per_second_best"] * min(ours["seconds"]), ref["per_second_best"] * min(ref["seconds"])
    pairs = sorted((n_o / a) / (n_r / b) for a, b in zip(ours["seconds"], ref["seconds"]))
    mid = len(pairs) // 2
    paired = pairs[mid] if len(pairs) % 2 else 0.5 * (pairs[mid - 1] + pairs[mid])
    return {"best": ours["per_second_best"] / ref["per_second_best"],
            "median": ours["per_second_median"] / ref["per_second_median"],
            "paired_median": paired, "paired": pairs}


def compile_if(model: torch.nn.Module, device: str, enabled: bool):
    """torch.compile on CUDA when asked; the model unchanged elsewhere."""
    return torch.compile(model) if enabled and str(device).startswith("cuda") else model


def diffusion_generator(backbone: torch.nn.Module, schedule: dict, meta: dict):
    """The sample stage's diffusion generator around ``backbone`` (UNet2DModel or DiT, possibly
    compiled): a ``ClassConditionalPipeline`` with the DPM-Solver++ scheduler built from the
    training ``schedule`` (as train_generator saves it) in a ``DiffusionGenerator``. ``meta`` needs
    image_size, channels and null_label (= number of classes); class_names default to "0".."K-1"."""
    from pipeline.models.diffusion import DiffusionGenerator, make_pipeline

    names = list(meta.get("class_names") or [str(i) for i in range(meta["null_label"])])
    pipe = make_pipeline(backbone, schedule, names, meta["image_size"])
    if pipe.null_label != meta["null_label"]:
        raise ValueError(f"meta null_label {meta['null_label']} but {len(names)} class names")
    return DiffusionGenerator(pipe, meta)


# ---- results ----------------------------------------------------------------------------

def save(name: str, device: str, payload: dict, out_dir: Path = RESULTS_DIR) -> Path:
    """Write ``<out_dir>/<name>-<cpu|cuda>.json`` atomically and print it."""
    from pipeline.core.io import write_json

    tag = "cuda" if str(device).startswith("cuda") else "cpu"
    path = Path(out_dir) / f"{name}-{tag}.json"
    doc = {"benchmark": name, **environment(device), **payload}
    write_json(path, doc)
    print(json.dumps(doc, indent=2, default=str))
    print(f"wrote {path}")
    return path


@contextmanager
def section(title: str):
    t0 = time.perf_counter()
    print(f"== {title}", flush=True)
    yield
    print(f"== {title}: {time.perf_counter() - t0:.1f} s", flush=True)
