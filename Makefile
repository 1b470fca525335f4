# llavanext: `make demo` runs the bundled job, `make test` the suite; both set themselves up.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel first: an unpinned torch would pull a CUDA build of several GB.
# On a GPU machine: make install TORCH=torch
TORCH ?= torch==2.13.0
PYTEST_ARGS ?=
# e.g. BENCH_ARGS="--model tiny --device cpu" for a smoke run
BENCH_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install demo test test-fast lint format clean bench bench-fsdp

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

install: $(VENV)/.installed ## create .venv with CPU torch and the project (editable, with dev tools and energon)

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev,energon]"
	touch $@

demo: install ## stage 1 + stage 2 on the tiny model with the bundled data, then held-out questions
	$(PY) -m llavanext.demo --out outputs/demo

bench: install ## training speed: plain transformers + peft vs ours on the GPU it finds (docs/benchmarks.md)
	$(PY) bench/train_bench.py $(BENCH_ARGS)

GPUS ?= 4
bench-fsdp: install ## full finetune with FSDP2: the plain loop vs ours on GPUS GPUs of this node (docs/benchmarks.md)
	$(VENV)/bin/torchrun --nproc-per-node $(GPUS) bench/fsdp_bench.py $(BENCH_ARGS)

test: install ## the whole suite (about 10 minutes on 2 cores)
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: install ## the suite without the slow end-to-end tests
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

lint: install ## ruff
	$(VENV)/bin/ruff check .

format: install ## ruff format + import order
	$(VENV)/bin/ruff check --fix --select I .
	$(VENV)/bin/ruff format .

clean: ## remove runs and build leftovers (keeps .venv)
	rm -rf outputs multirun build dist *.egg-info .pytest_cache .ruff_cache
