# syntax=docker/dockerfile:1
# llmpipe-eval: evaluate and quantize (lm-evaluation-harness, gguf, optimum-quanto, llm-compressor: in the base, from requirements.lock).
ARG BASE=ghcr.io/llm-pipeline/llmpipe-base:0.1.0
FROM ${BASE}
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="llmpipe-eval" \
      org.opencontainers.image.description="llm-pipeline evaluation and quantization stages: evaluate, quantize" \
      org.opencontainers.image.version="${VERSION}"
ENV LLMPIPE_IMAGE_FAMILY=eval
RUN python /opt/llmpipe/smoke.py eval
