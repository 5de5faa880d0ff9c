"""Benchmarks (not tests): each module compares a pipeline code path with a plain reference
implementation on the same work and writes ``bench/results/<name>-<device>.json``.

Run one with ``python -m bench.<name>`` (``--quick`` for a smoke run) or all CPU
benchmarks with ``python -m bench.run_all``.
"""
