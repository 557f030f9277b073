# syntax=docker/dockerfile:1
# llmpipe-train: init, pretrain, sft, dpo, reward (DeepSpeed, TRL, PEFT: in the base, from requirements.lock), with
# what the base's runtime image cannot do itself: DeepSpeed's ops that our configs use, prebuilt (cpu_adam:
# DeepSpeedCPUAdam of the *-offload configs), flash-attn and liger-kernel for the image's own torch/CUDA. Versions:
# docker/matrix.toml (docs/kubernetes.md, "Images").
#
# BASE           the llmpipe-base image (make images builds it first)
# BUILDER_IMAGE  the base's BASE_IMAGE with a compiler: the same torch, CUDA and Python at the same paths, plus nvcc
#                and headers (the -devel twin of the -runtime default). For a CPU base (BASE_IMAGE=a bare Debian,
#                TORCH_SPEC=torch==...+cpu) the same bare image: g++ and the Python headers come from apt here.
# FLASH_ATTN_WHEEL  a URL or file of the flash-attn wheel, instead of its release's wheel for this torch/CUDA/ABI/Python
#
# The profile follows from the base's torch: a CUDA build gets all of the above; a CPU build gets cpu_adam only
# (flash-attn and liger-kernel are GPU-only: docker/smoke.py says so in the build log).
ARG BASE=ghcr.io/llm-pipeline/llmpipe-base:0.1.0
ARG BUILDER_IMAGE=pytorch/pytorch:2.13.0-cuda12.8-cudnn9-devel

FROM ${BASE} AS base

# ---- stage 1: build the ops against the base's virtualenv into /overlay, laid out as the venv's own paths ----
FROM ${BUILDER_IMAGE} AS ops
ARG PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_FIND_LINKS PIP_CERT
ARG FLASH_ATTN_WHEEL=""
# A100, H100/H200 (the clusters' GPUs); PTX for newer ones
ARG TORCH_CUDA_ARCH_LIST="8.0;9.0+PTX"
ENV VIRTUAL_ENV=/opt/llmpipe/venv \
    PATH=/opt/llmpipe/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    UV_NO_CACHE=1
COPY --from=base /opt/llmpipe /opt/llmpipe
COPY docker/matrix.toml /opt/llmpipe/matrix.toml
# a bare OS (the CPU profile) has neither Python's headers nor g++; the -devel CUDA images have both
# hadolint ignore=DL3008,SC2086
RUN pkgs=""; \
    command -v python3 >/dev/null || pkgs="python3 python3-dev"; \
    command -v g++ >/dev/null || pkgs="$pkgs g++"; \
    if [ -n "$pkgs" ]; then \
        apt-get update && apt-get install -y --no-install-recommends $pkgs && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python -c 'import sysconfig, os; h = sysconfig.get_paths()["include"]; assert os.path.isfile(h + "/Python.h"), h'
# DeepSpeed compiles its CPU ops for the build host (-march=native, and -D__AVX512__ where the host has AVX-512: SIGILL
# on a node without it); docker/portable-cxx.sh, ahead of the real compiler on this stage's PATH only, turns them into
# -march=x86-64-v3 -D__AVX256__ (DS_CPU_ARCH overrides the -march; DeepSpeed itself has no setting for either)
COPY docker/portable-cxx.sh /opt/portable-cxx/portable-cxx
RUN chmod 755 /opt/portable-cxx/portable-cxx && mkdir /opt/portable-cxx/bin \
    && for n in c++ g++ gcc cc "$(uname -m)-linux-gnu-g++" "$(uname -m)-linux-gnu-gcc"; do \
        ln -s ../portable-cxx "/opt/portable-cxx/bin/$n"; \
    done
# DeepSpeed again, from the lock's version, with the ops of deepspeed_ops compiled in (DS_BUILD_<OP>=1) for the
# accelerator of this torch (DS_ACCELERATOR: a build host has no GPU, so DeepSpeed would otherwise pick `cpu`, and a
# GPU node would then find no op for `cuda` and compile it just in time: without a compiler, it cannot)
# (podman and buildah ignore SHELL in their default OCI format: the RUN below is plain POSIX sh, set -u safe, and
# checks what a pipe would hide)
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# $ops: DS_BUILD_<OP>=1 words, split on purpose
# hadolint ignore=SC2086
RUN set -eu; \
    if [ -n "${PIP_INDEX_URL:-}" ]; then export UV_INDEX_URL="$PIP_INDEX_URL"; fi; \
    if [ -n "${PIP_EXTRA_INDEX_URL:-}" ]; then export UV_EXTRA_INDEX_URL="$PIP_EXTRA_INDEX_URL"; fi; \
    if [ -n "${PIP_FIND_LINKS:-}" ]; then export UV_FIND_LINKS="$PIP_FIND_LINKS"; fi; \
    if [ -n "${PIP_CERT:-}" ]; then export SSL_CERT_FILE="$PIP_CERT"; fi; \
    pin() { python -c "import sys, tomllib; print(tomllib.load(open('/opt/llmpipe/matrix.toml', 'rb'))[sys.argv[1]])" "$1"; }; \
    profile=$(python -c 'import torch; print("cuda" if torch.version.cuda else "cpu")'); \
    site=$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'); \
    overlay="/overlay$site"; mkdir -p "$overlay"; \
    ops=$(python -c "import tomllib; print(' '.join('DS_BUILD_%s=1' % o.upper() for o in tomllib.load(open('/opt/llmpipe/matrix.toml', 'rb'))['deepspeed_ops']))"); \
    echo "train ops: profile $profile, $ops, into $overlay"; \
    export PATH="/opt/portable-cxx/bin:$PATH" PORTABLE_CXX_LOG=/tmp/portable-cxx.log; \
    env DS_BUILD_OPS=0 $ops DS_ACCELERATOR="$profile" TORCH_CUDA_ARCH_LIST="$TORCH_CUDA_ARCH_LIST" MAX_JOBS="$(nproc)" \
        uv pip install --no-deps --no-build-isolation --python "$VIRTUAL_ENV/bin/python" --target "$overlay" \
        "$(grep -m1 '^deepspeed==' /opt/llmpipe/requirements.lock)"; \
    if [ "$(uname -m)" = x86_64 ]; then \
        grep -q -- '-march=' "$PORTABLE_CXX_LOG" || { echo "train ops: no compile went through portable-cxx" >&2; exit 1; }; \
        flags=$(grep -o -- '-march=[^ ]*\|-D__AVX[0-9]*__' "$PORTABLE_CXX_LOG" | sort -u | tr '\n' ' '); \
        command -v objdump >/dev/null || { echo "train ops: no objdump to check the ops' instructions" >&2; exit 1; }; \
        sos=$(find "$overlay/deepspeed" -name '*.so'); \
        [ -n "$sos" ] || { echo "train ops: no compiled op in $overlay/deepspeed" >&2; exit 1; }; \
        for so in $sos; do \
            objdump -d --no-show-raw-insn "$so" >/tmp/op.dis; \
            zmm=$(grep -c '%zmm' /tmp/op.dis || true); \
            echo "train ops: portable: ${so#"$overlay"/} built with $flags($(wc -l <"$PORTABLE_CXX_LOG") compiles rewritten), AVX-512 instructions: $zmm"; \
            [ "$zmm" = 0 ] || { echo "train ops: $so has AVX-512 code: not every x86_64 node runs it" >&2; exit 1; }; \
        done; \
    fi; \
    if [ "$profile" = cuda ]; then \
        fa=$(pin flash_attn); \
        tag=$(python -c 'import sys, torch; v = torch.__version__.split("+")[0].split("."); print("cu%storch%s.%scxx11abi%s-cp%d%d-cp%d%d" % (torch.version.cuda.split(".")[0], v[0], v[1], str(torch._C._GLIBCXX_USE_CXX11_ABI).upper(), *sys.version_info[:2], *sys.version_info[:2]))'); \
        wheel="${FLASH_ATTN_WHEEL:-https://github.com/Dao-AILab/flash-attention/releases/download/v$fa/flash_attn-$fa+$tag-linux_$(uname -m).whl}"; \
        echo "train ops: flash-attn $fa: $wheel"; \
        uv pip install --no-deps --python "$VIRTUAL_ENV/bin/python" --target "$overlay" "$wheel" "liger-kernel==$(pin liger_kernel)"; \
    else \
        echo "train ops: torch $(python -c 'import torch; print(torch.__version__)') is a CPU build: flash-attn and liger-kernel skipped (GPU-only)"; \
    fi; \
    rm -rf "${overlay:?}/bin"

# ---- stage 2: the base + the overlay (a few files over the venv's deepspeed, the new packages) ----
FROM ${BASE}
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="llmpipe-train" \
      org.opencontainers.image.description="llm-pipeline training stages: init, pretrain, sft, dpo, reward" \
      org.opencontainers.image.version="${VERSION}"
ENV LLMPIPE_IMAGE_FAMILY=train \
    TORCH_NCCL_ASYNC_ERROR_HANDLING=1 \
    NCCL_DEBUG=WARN
COPY --from=ops /overlay/ /
COPY docker/smoke.py docker/matrix.toml /opt/llmpipe/
# fails the build unless the ops load prebuilt (no compiler here), flash-attn and liger-kernel import (CUDA profile),
# and torch / CUDA / Python / the pins are docker/matrix.toml's
RUN python /opt/llmpipe/smoke.py train
