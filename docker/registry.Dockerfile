# syntax=docker/dockerfile:1
# llmpipe-registry: register and promote (MLflow registry; everything is in the base).
ARG BASE=ghcr.io/llm-pipeline/llmpipe-base:0.1.0
FROM ${BASE}
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="llmpipe-registry" \
      org.opencontainers.image.description="llm-pipeline registry stages: register, promote" \
      org.opencontainers.image.version="${VERSION}"
ENV LLMPIPE_IMAGE_FAMILY=registry
RUN python /opt/llmpipe/smoke.py registry
