# Two commands for a fresh machine:  `make run`  (set up + dvc repro)  and  `make test`.
# Both are idempotent: a second run reuses the virtual environment and the data.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
LOCK := requirements.lock
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml $(LOCK) | sha1sum | cut -c1-12)
FMNIST_DIR ?= /usr/share/datasets/fashion-mnist
# Prefect's settings and the offline flags are set by the entry points (pipeline/core/env.py; also prefect.toml)
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: setup venv lock data browser run lint test check bench gpu-wheels clean help

help:
	@echo "make run    set up (venv, packages, Fashion-MNIST) and run the pipeline: dvc repro (synthaug repro)"
	@echo "make test   set up and run the test suite (after ruff: make lint)"
	@echo "make check  lint and the fast tests, before a commit"
	@echo "make bench  run the CPU benchmarks (results in bench/results/)"
	@echo "make lock   re-resolve pyproject.toml and pin the result in requirements.lock"
	@echo "make gpu-wheels  put what a bare GPU box needs for bench/gpu_check.py in .gpu/ (wheels + data)"
	@echo "make clean  delete the stage outputs git does not track (data/, models/, report.html); dvc repro re-makes them"

# The packages come from the lock file (the versions the tests passed with); the project itself is
# installed editable on top, without resolving anything again.
$(STAMP): pyproject.toml $(LOCK)
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (Python >= 3.11) on PATH, or run: make PYTHON=python3 ..."; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip wheel
	$(BIN)/pip install --quiet -r $(LOCK)
	$(BIN)/pip install --quiet --no-deps -e .
	$(BIN)/pip check
	rm -f $(VENV)/.installed-* && touch $@

venv: $(STAMP)

# Re-resolve pyproject.toml's ranges in a scratch venv and pin the result: after changing a
# dependency, or to take newer releases. Then run make test and commit the lock with the change.
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install --quiet --upgrade pip wheel
	.lock-venv/bin/pip install --quiet -e '.[test]'
	{ sed -n '/^#/p' $(LOCK); .lock-venv/bin/pip freeze --exclude-editable; } > $(LOCK).tmp && mv $(LOCK).tmp $(LOCK)
	rm -rf .lock-venv
	@echo "$(LOCK) refreshed: run make test, then commit it"

data:
	@if [ -f "$(FMNIST_DIR)/t10k-labels-idx1-ubyte.gz" ]; then \
	  echo "Fashion-MNIST found in $(FMNIST_DIR)"; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  echo "installing Fashion-MNIST (Debian package dataset-fashion-mnist)"; \
	  (apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	   (apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null)) ; \
	elif command -v sudo >/dev/null && command -v apt-get >/dev/null; then \
	  sudo apt-get update -q && sudo apt-get install -y -q dataset-fashion-mnist; \
	else \
	  echo "Fashion-MNIST is missing from $(FMNIST_DIR) and apt is not usable here."; \
	  echo "Download train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz"; \
	  echo "and t10k-labels-idx1-ubyte.gz from the Fashion-MNIST project, put them in a folder and"; \
	  echo "set prepare.path in params.yaml to it (or run make FMNIST_DIR=that/folder run)."; exit 1; \
	fi

setup: venv data

# synthaug repro = dvc repro with one temporary Prefect server shared by every stage's flow run (or the server
# PREFECT_API_URL names), not one started and stopped per stage
run: setup
	$(BIN)/synthaug repro
	@echo "Report: reports/report.html   metrics: $(BIN)/dvc metrics show"

# Debian's Chromium, for the test that opens report.html headless (skipped without it)
browser:
	@command -v chromium >/dev/null || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	  (apt-get install -y -q chromium >/dev/null 2>&1 || (apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null)) \
	  || echo "Chromium not installed: the report browser test will be skipped"; }

# ruff check (pyproject.toml [tool.ruff]); ruff format is there for new files, not enforced (why: pyproject.toml)
lint: venv
	$(BIN)/ruff check .

test: venv browser lint
	$(BIN)/python -m pytest -q -n auto --dist loadscope --durations=10 -m "not gpu" tests

# before a commit: lint, then the tests that take seconds (no end-to-end run, no GPU)
check: lint
	$(BIN)/python -m pytest -q -n auto -m "not slow and not gpu" -x tests

bench: venv
	$(BIN)/python -m bench.run_all

# the wheels a GPU machine without registry access lacks (the lock's versions, for its Python 3.12)
# and a Fashion-MNIST subset, for python -m bench.gpu_check there (bench/README.md, "GPU check")
gpu-wheels: venv data
	$(BIN)/python -m bench.gpu_carry --fashion-mnist $(FMNIST_DIR)

# every stage output that is not tracked by git (data/, models/, report.html); metrics/ and
# reports/metrics.json, report.md are the committed record of the last run: git checkout restores them
clean:
	rm -rf data/prepared data/pseudo data/synthetic data/synthetic_shards data/filtered data/cache models reports/*.html
