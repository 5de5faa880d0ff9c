"""Put on PYTHONPATH by the kill tests for the processes they start (and the processes those start:
torchrun's workers). With SYNTHAUG_TEST_HOLD_AFTER_CHECKPOINT set to a file name, the first process
that writes a training checkpoint writes that file next (the marker) and then waits to be killed,
so a test kills a run that has a checkpoint and cannot have finished: no race against a clock."""
import os
import sys

MARKER = os.environ.get("SYNTHAUG_TEST_HOLD_AFTER_CHECKPOINT")


def _hold_after_first_save(module) -> None:
    import time
    from pathlib import Path

    save = module.save

    def save_then_hold(*args, **kwargs):
        path = save(*args, **kwargs)
        Path(MARKER).write_text(f"{os.getpid()} {path}\n")
        while True:  # killed here; never returns
            time.sleep(1)

    module.save = save_then_hold


class _AfterImport:
    """Runs the hook once ``pipeline.training.checkpoint`` has been imported (importing it here would
    import torch and the pipeline before the entry point has set its environment)."""

    def find_spec(self, name, path=None, target=None):
        if name != "pipeline.training.checkpoint":
            return None
        sys.meta_path.remove(self)
        import importlib.util

        spec = importlib.util.find_spec(name)
        exec_module = spec.loader.exec_module

        def exec_then_hook(module):
            exec_module(module)
            _hold_after_first_save(module)

        spec.loader.exec_module = exec_then_hook
        return spec


if MARKER:
    sys.meta_path.insert(0, _AfterImport())

