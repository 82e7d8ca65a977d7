# hirl_ray — two commands for newcomers: `make train` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check

.PHONY: install install-test train test test-fast bench bench-quick lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel

# Reinstall when pyproject.toml changes (editable install: code edits need nothing).
$(VENV)/.installed: pyproject.toml | $(PY)
	$(PIP) install -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(PY)
	$(PIP) install -e '.[test]'
	touch $(VENV)/.installed $@

$(VENV)/.installed-bench: pyproject.toml | $(PY)
	$(PIP) install -e '.[test,bench]'
	touch $(VENV)/.installed $(VENV)/.installed-test $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

## Pretrain HIRL on the built-in dataset with the embedded default experiment.
train: install
	$(VENV)/bin/hirl-ray fit experiments/default.yaml

## Run the test suite (slow multi-node/fault tests included; `make test-fast` skips them).
test: install-test
	$(PY) -m pytest -q

test-fast: install-test
	$(PY) -m pytest -q -m "not slow"

## Benchmarks: side-by-side ratios, JSON in experiments/bench/results/ (bench-quick: ≤10 min).
bench: $(VENV)/.installed-bench
	$(PY) -m experiments.bench.run

bench-quick: $(VENV)/.installed-bench
	$(PY) -m experiments.bench.run --quick

lint: install-test
	$(PIP) install -q -e '.[dev]'
	$(VENV)/bin/ruff check hirl_ray tests
	$(VENV)/bin/ruff format --check hirl_ray tests
	$(VENV)/bin/mypy hirl_ray

clean:
	rm -rf results .pytest_cache
