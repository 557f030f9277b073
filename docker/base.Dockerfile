# syntax=docker/dockerfile:1
# llmpipe-base: a PyTorch image + a virtualenv with requirements.lock (the same lock `make install` uses) + the
# llmpipe package.
# Every stage image (data, train, eval, registry) is built FROM this one. Build with `make images`.
#
# BASE_IMAGE   any image with Python 3.11 and (usually) torch: the default is the official CUDA
#              runtime image; an NGC image (nvcr.io/nvidia/pytorch:<tag>) works the same way (Python 3.11+:
#              requirements.lock is universal). A bare Debian/Ubuntu works too: Python is installed with
#              apt and torch from TORCH_SPEC.
# TORCH_SPEC   empty: use the torch of BASE_IMAGE (never replaced). Else a pip requirement such as
#              "torch==2.13.0+cpu" installed first (with PIP_FIND_LINKS / PIP_INDEX_URL pointing at it).
# PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, PIP_FIND_LINKS, PIP_CERT   a mirror, a wheel folder (podman
#              build --volume), a proxy's CA bundle: used while building, not kept in the image's env.
ARG BASE_IMAGE=pytorch/pytorch:2.13.0-cuda12.8-cudnn9-runtime

# ---- stage 1: the virtualenv, built where a compiler may be added (a few locked packages are sdists) ----
FROM ${BASE_IMAGE} AS venv
ARG TORCH_SPEC=""
ARG PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_FIND_LINKS PIP_CERT
ENV VIRTUAL_ENV=/opt/llmpipe/venv \
    PATH=/opt/llmpipe/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    UV_NO_CACHE=1 \
    DS_BUILD_OPS=0
# apt versions are those of the base image's release, which BASE_IMAGE pins
# hadolint ignore=DL3008,SC2086
RUN pkgs=""; \
    command -v python3 >/dev/null || pkgs="python3 python3-venv python3-pip python3-dev ca-certificates"; \
    command -v g++ >/dev/null || pkgs="$pkgs g++"; \
    if [ -n "$pkgs" ]; then \
        apt-get update && apt-get install -y --no-install-recommends $pkgs && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv --system-site-packages --without-pip "$VIRTUAL_ENV" \
    && python -m pip --version
# torch and its CUDA wheels are the base image's (or TORCH_SPEC's), never in the lock. uv (pinned in the lock) installs
# the lock exactly, no resolver: --no-deps. DeepSpeed's sdist imports torch while it builds (no build isolation; its
# CUDA ops are JIT-compiled at first use where a compiler exists, DS_BUILD_OPS=0: none prebuilt here). uv reads the
# PIP_* mirror settings under its own names.
COPY requirements.lock /opt/llmpipe/requirements.lock
# uv's version is the lock's (grep), which hadolint cannot see
# hadolint ignore=DL3013
RUN if [ -n "$TORCH_SPEC" ]; then python -m pip install --no-cache-dir "$TORCH_SPEC"; fi \
    && python -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)' \
    && python -m pip install --no-cache-dir --no-deps "$(grep -m1 '^uv==' /opt/llmpipe/requirements.lock)" \
    && if [ -n "$PIP_INDEX_URL" ]; then export UV_INDEX_URL="$PIP_INDEX_URL"; fi \
    && if [ -n "$PIP_EXTRA_INDEX_URL" ]; then export UV_EXTRA_INDEX_URL="$PIP_EXTRA_INDEX_URL"; fi \
    && if [ -n "$PIP_FIND_LINKS" ]; then export UV_FIND_LINKS="$PIP_FIND_LINKS"; fi \
    && if [ -n "$PIP_CERT" ]; then export SSL_CERT_FILE="$PIP_CERT"; fi \
    && uv pip install --no-deps --no-build-isolation-package deepspeed -r /opt/llmpipe/requirements.lock

# ---- stage 2: the image: the same base, the virtualenv, the package, a non-root user ----
FROM ${BASE_IMAGE}
ARG UID=1000
ARG PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_FIND_LINKS PIP_CERT
ENV VIRTUAL_ENV=/opt/llmpipe/venv \
    PATH=/opt/llmpipe/venv/bin:$PATH \
    HOME=/home/llmpipe \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    MLFLOW_DISABLE_TELEMETRY=true \
    HF_HUB_DISABLE_TELEMETRY=1 \
    DO_NOT_TRACK=1
# hadolint ignore=DL3008
RUN if ! command -v python3 >/dev/null; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3 python3-venv python3-pip ca-certificates \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && (getent group "$UID" >/dev/null || groupadd --gid "$UID" llmpipe) \
    && useradd --non-unique --uid "$UID" --gid "$UID" --home-dir "$HOME" --create-home --shell /bin/bash llmpipe
COPY --from=venv /opt/llmpipe /opt/llmpipe

# The package itself (small; changes most often, so last).
COPY pyproject.toml README.md /opt/llmpipe/src/
COPY pipeline /opt/llmpipe/src/pipeline
COPY docker/smoke.py /opt/llmpipe/smoke.py
RUN python -m pip install --no-cache-dir --no-deps /opt/llmpipe/src \
    && rm -rf /opt/llmpipe/src/build \
    && llmpipe --help >/dev/null \
    && python /opt/llmpipe/smoke.py base \
    && chown -R "$UID:$UID" "$HOME"

# version labels last: a new commit changes REVISION and would otherwise rebuild every layer
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="llmpipe-base" \
      org.opencontainers.image.description="llm-pipeline: torch, the pinned dependencies and the llmpipe command" \
      org.opencontainers.image.source="https://github.com/llm-pipeline/llm-pipeline" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}"

USER ${UID}:${UID}
WORKDIR /home/llmpipe
ENTRYPOINT ["dumb-init", "--", "llmpipe"]
CMD ["--help"]
