# syntax=docker/dockerfile:1
# llmpipe-train: init, pretrain, sft, dpo, reward (DeepSpeed, TRL, PEFT on top of the base).
ARG BASE=ghcr.io/llm-pipeline/llmpipe-base:0.1.0
FROM ${BASE}
ARG VERSION=0.1.0
ARG PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_FIND_LINKS PIP_CERT
LABEL org.opencontainers.image.title="llmpipe-train" \
      org.opencontainers.image.description="llm-pipeline training stages: init, pretrain, sft, dpo, reward" \
      org.opencontainers.image.version="${VERSION}"
# DeepSpeed's sdist imports torch while it builds, hence no build isolation; its CUDA ops are
# JIT-compiled at first use where a compiler exists (DS_BUILD_OPS=0: none prebuilt here).
ENV LLMPIPE_IMAGE_FAMILY=train \
    DS_BUILD_OPS=0 \
    TORCH_NCCL_ASYNC_ERROR_HANDLING=1 \
    NCCL_DEBUG=WARN
ARG UID=1000
# the virtualenv belongs to root; install as root, check and run as the image's user
USER 0
COPY docker/requirements/train.txt /opt/llmpipe/requirements/train.txt
RUN python -m pip install --no-cache-dir --no-deps --no-build-isolation -r /opt/llmpipe/requirements/train.txt
USER ${UID}:${UID}
RUN python /opt/llmpipe/smoke.py train
