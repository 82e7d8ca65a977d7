# hirl_ray — two commands for newcomers: `make train` and `make test`.
comma := ,
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
# One faiss build per environment (faiss-cpu and faiss-gpu overwrite each other's module): the
# venv remembers its flavour in .venv/.faiss; `make install-gpu` switches it to faiss-gpu.
FAISS       ?= $(shell cat $(VENV)/.faiss 2>/dev/null || echo cpu)
FAISS_OTHER := $(if $(filter gpu,$(FAISS)),faiss-cpu,faiss-gpu)

.PHONY: install install-test install-gpu train test test-all test-fast bench bench-quick gpu-check lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel

# Reinstall when pyproject.toml changes (editable install: code edits need nothing).
# $(1): extra extras after the faiss flavour. The other flavour goes first, so the two never mix.
define install_with
	$(PIP) uninstall -y -q $(FAISS_OTHER) >/dev/null 2>&1 || true
	$(PIP) install -e '.[$(FAISS)$(1)]'
	echo $(FAISS) > $(VENV)/.faiss
endef

$(VENV)/.installed: pyproject.toml | $(PY)
	$(call install_with,)
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(PY)
	$(call install_with,$(comma)test)
	touch $(VENV)/.installed $@

$(VENV)/.installed-bench: pyproject.toml | $(PY)
	$(call install_with,$(comma)test$(comma)bench)
	touch $(VENV)/.installed $(VENV)/.installed-test $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

## Swap faiss-cpu for faiss-gpu (CUDA 12 runtime wheels) in .venv; later installs keep it.
install-gpu: | $(PY)
	rm -f $(VENV)/.installed $(VENV)/.installed-test $(VENV)/.installed-bench
	$(MAKE) install-test FAISS=gpu

## Pretrain HIRL on the built-in dataset with the embedded default experiment.
train: install
	$(VENV)/bin/hirl-ray fit experiments/default.yaml

## Run the test suite: everything but the end-to-end Ray scenarios marked slow (multi-node,
## fault injection, sweeps, one Ray fit per method; ~20 min more on 2 cores). CI (CI=true,
## .ci/run) and `make test-all` run those too.
SLOW_FILTER := $(if $(filter true 1,$(CI)),,-m "not slow")
test: install-test
	@$(if $(SLOW_FILTER),echo "make test: skipping tests marked slow (make test-all or CI=true runs them)",true)
	$(PY) -m pytest -q --durations=15 $(SLOW_FILTER)

test-all: install-test
	$(PY) -m pytest -q --durations=15

test-fast: install-test
	$(PY) -m pytest -q -m "not slow"

## Benchmarks: side-by-side ratios, JSON in experiments/bench/results/ (bench-quick: ≤10 min).
bench: $(VENV)/.installed-bench
	$(PY) -m experiments.bench.run

bench-quick: $(VENV)/.installed-bench
	$(PY) -m experiments.bench.run --quick

## GPU checks (AMP steps, path loss on CUDA, faiss-gpu vs faiss-cpu, 1-GPU Ray fit); without a
## GPU it says so and exits 0. On a GPU machine run `make install-gpu gpu-check`.
gpu-check: install-test
	$(PY) -m experiments.gpu_check

lint: install-test
	$(PIP) install -q -e '.[dev]'
	$(VENV)/bin/ruff check hirl_ray tests
	$(VENV)/bin/ruff format --check hirl_ray tests
	$(VENV)/bin/mypy hirl_ray

clean:
	rm -rf results .pytest_cache
