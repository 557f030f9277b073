# syntax=docker/dockerfile:1
# llmpipe-train: init, pretrain, sft, dpo, reward (DeepSpeed, TRL, PEFT: in the base, from requirements.lock).
ARG BASE=ghcr.io/llm-pipeline/llmpipe-base:0.1.0
FROM ${BASE}
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="llmpipe-train" \
      org.opencontainers.image.description="llm-pipeline training stages: init, pretrain, sft, dpo, reward" \
      org.opencontainers.image.version="${VERSION}"
ENV LLMPIPE_IMAGE_FAMILY=train \
    TORCH_NCCL_ASYNC_ERROR_HANDLING=1 \
    NCCL_DEBUG=WARN
RUN python /opt/llmpipe/smoke.py train
