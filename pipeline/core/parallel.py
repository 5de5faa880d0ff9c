"""Independent torch jobs side by side in spawned processes, for the CPU: a small network's OpenMP
threads mostly wait on each other, so jobs at one thread each beat the same jobs one after another on
every thread (a variant's 5 seeds on 2 cores: 1.26x the runs per second, bench/results/seeds-cpu.json)."""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

from pipeline.core.entrypoint import LOG_DATEFMT, LOG_FORMAT


def cpu_cores() -> int:
    """The cores this process may run on (its affinity mask, where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _start(level: int) -> None:
    logging.basicConfig(level=level, format=LOG_FORMAT, datefmt=LOG_DATEFMT, force=True)


def _call(fn: Callable, args: tuple, label: str, threads: int):
    import torch

    torch.set_num_threads(threads)
    for handler in logging.getLogger().handlers:  # say which job each interleaved log line belongs to
        labeled = LOG_FORMAT.replace("%(message)s", f"[{label}] %(message)s")
        handler.setFormatter(logging.Formatter(labeled, LOG_DATEFMT))
    return fn(*args)


def map_processes(fn: Callable, calls: Sequence[tuple], workers: int, labels: Sequence[str] = ()) -> list:
    """``[fn(*args) for args in calls]``, in order, run by ``workers`` spawned processes of ``cores //
    workers`` torch threads each; the calls of an unfilled last round share the cores among them (5 calls
    on 2 cores: 4 at one thread, the 5th at two). In this process when ``workers`` is 1 or there is one
    call. ``fn`` must be importable by name; ``labels[i]`` starts call i's log lines. A call's error is
    raised here."""
    workers = min(workers, len(calls))
    if workers <= 1:
        return [fn(*args) for args in calls]
    last = len(calls) % workers or workers  # calls in the last round
    threads = [max(1, cpu_cores() // (workers if i < len(calls) - last else last)) for i in range(len(calls))]
    labels = list(labels) or [f"job {i}" for i in range(len(calls))]
    pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_start,
                               initargs=(logging.getLogger(fn.__module__).getEffectiveLevel(),))  # fn's log lines
    try:
        futures = [pool.submit(_call, fn, *job) for job in zip(calls, labels, threads)]
        return [f.result() for f in futures]
    finally:  # after an error, the calls not yet started are dropped
        pool.shutdown(cancel_futures=True)
