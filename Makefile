# Two commands for a fresh machine:  `make run`  (set up + dvc repro)  and  `make test`.
# Both are idempotent: a second run reuses the virtual environment and the data.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)
FMNIST_DIR ?= /usr/share/datasets/fashion-mnist
# Prefect's settings are in prefect.toml; the offline flags are set by the entry points
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: setup venv data browser run test bench clean help

help:
	@echo "make run    set up (venv, packages, Fashion-MNIST) and run the pipeline: dvc repro"
	@echo "make test   set up and run the test suite"
	@echo "make bench  run the CPU benchmarks (results in bench/results/)"

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (Python >= 3.11) on PATH, or run: make PYTHON=python3 ..."; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip wheel
	$(BIN)/pip install --quiet -e '.[test]'
	rm -f $(VENV)/.installed-* && touch $@

venv: $(STAMP)

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

run: setup
	$(BIN)/dvc repro
	@echo "Report: reports/report.html   metrics: $(BIN)/dvc metrics show"

# Debian's Chromium, for the test that opens report.html headless (skipped without it)
browser:
	@command -v chromium >/dev/null || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	  (apt-get install -y -q chromium >/dev/null 2>&1 || (apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null)) \
	  || echo "Chromium not installed: the report browser test will be skipped"; }

test: venv browser
	$(BIN)/python -m pytest -q -m "not gpu" tests

bench: venv
	$(BIN)/python -m bench.run_all

clean:
	rm -rf data/prepared data/synthetic data/filtered models metrics reports/*.html
