# syntax=docker/dockerfile:1
# llmpipe-data: collect, clean, tokenizer, pack. Everything they need is in the base.
ARG BASE=ghcr.io/llm-pipeline/llmpipe-base:0.1.0
FROM ${BASE}
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="llmpipe-data" \
      org.opencontainers.image.description="llm-pipeline data stages: collect, clean, tokenizer, pack" \
      org.opencontainers.image.version="${VERSION}"
ENV LLMPIPE_IMAGE_FAMILY=data
RUN python /opt/llmpipe/smoke.py data
