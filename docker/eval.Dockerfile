# syntax=docker/dockerfile:1
# llmpipe-eval: evaluate and quantize (lm-evaluation-harness, gguf, optimum-quanto on top of the base).
ARG BASE=ghcr.io/llm-pipeline/llmpipe-base:0.1.0
FROM ${BASE}
ARG VERSION=0.1.0
ARG PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_FIND_LINKS PIP_CERT
LABEL org.opencontainers.image.title="llmpipe-eval" \
      org.opencontainers.image.description="llm-pipeline evaluation and quantization stages: evaluate, quantize" \
      org.opencontainers.image.version="${VERSION}"
ENV LLMPIPE_IMAGE_FAMILY=eval
ARG UID=1000
# the virtualenv belongs to root; install as root, check and run as the image's user
USER 0
COPY docker/requirements/eval.txt /opt/llmpipe/requirements/eval.txt
RUN python -m pip install --no-cache-dir --no-deps -r /opt/llmpipe/requirements/eval.txt
USER ${UID}:${UID}
RUN python /opt/llmpipe/smoke.py eval
