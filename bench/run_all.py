"""Run the CPU benchmarks one after another (``make bench``); results in bench/results/.

Extra options are passed to every benchmark (e.g. ``--threads 1`` on a shared machine,
``--quick`` for a smoke run). ``--only sampling classifier`` picks some.
"""
from __future__ import annotations

import argparse
import importlib
import time
import traceback

# benchmark -> arguments that keep each one to a few minutes on a 2-core CPU
CPU_RUNS = {
    "sampling": ["--device", "cpu"],
    "train_generator": ["--device", "cpu"],
    "classifier": ["--device", "cpu"],
    "seeds": ["--device", "cpu"],
    "augment": ["--device", "cpu"],
    "features": ["--device", "cpu"],
    "scaling": ["--device", "cpu", "--sizes", "1000", "5000", "20000", "--steps", "1", "--blocks", "8", "16",
                "--kid-subsets", "10"],
    "generators": ["--device", "cpu"],
    "e2e": ["--device", "cpu"],
    "gpu_budget": [],  # counts on the CPU whatever the device
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="+", choices=list(CPU_RUNS), default=list(CPU_RUNS))
    args, extra = p.parse_known_args(argv)
    failed = []
    for name in args.only:
        t0 = time.perf_counter()
        print(f"\n######## bench.{name}", flush=True)
        argv_one = CPU_RUNS[name] + extra
        if "--quick" in extra and name == "scaling":
            argv_one = ["--device", "cpu"] + extra
        try:
            importlib.import_module(f"bench.{name}").main(argv_one)
        except (Exception, SystemExit) as err:  # keep going: one broken benchmark should not hide the others
            traceback.print_exc()
            failed.append(f"{name}: {err!r}")
        print(f"######## bench.{name}: {time.perf_counter() - t0:.0f} s", flush=True)
    if failed:
        print("failed:\n  " + "\n  ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
