# syntax=docker/dockerfile:1
# llmpipe-mlflow: the MLflow tracking server for a dev cluster (k8s/mlflow/): MLflow with the
# PostgreSQL driver, boto3 for S3/MinIO artefacts and Flask-WTF for the basic-auth app
# (`mlflow server --app-name basic-auth`: mlflow's `auth` extra, Flask-WTF<2), which the upstream image leaves out.
# The server's MLflow is the clients' (requirements.lock: tests/docker checks the pin).
ARG BASE_IMAGE=python:3.11.13-slim-bookworm
FROM ${BASE_IMAGE}
ARG VERSION=0.1.0
ARG UID=1000
ARG PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_FIND_LINKS PIP_CERT
ENV VIRTUAL_ENV=/opt/mlflow/venv \
    PATH=/opt/mlflow/venv/bin:$PATH \
    HOME=/home/mlflow \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    MLFLOW_DISABLE_TELEMETRY=true \
    DO_NOT_TRACK=1
# Python from apt only when the base has none (a bare Debian); apt versions follow BASE_IMAGE.
# hadolint ignore=DL3008
RUN if ! command -v python3 >/dev/null; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && (getent group "$UID" >/dev/null || groupadd --gid "$UID" mlflow) \
    && useradd --non-unique --uid "$UID" --gid "$UID" --home-dir "$HOME" --create-home --shell /usr/sbin/nologin mlflow \
    && python3 -m venv "$VIRTUAL_ENV" \
    && python -m pip install --no-cache-dir mlflow==3.17.2 flask-wtf==1.3.0 psycopg2-binary==2.9.13 boto3==1.44.5 \
    && python -c "import psycopg2, boto3, flask_wtf, mlflow.server" \
    && chown -R "$UID:$UID" "$HOME"
LABEL org.opencontainers.image.title="llmpipe-mlflow" \
      org.opencontainers.image.description="MLflow tracking server with PostgreSQL and S3 support, for llm-pipeline dev clusters" \
      org.opencontainers.image.source="https://github.com/llm-pipeline/llm-pipeline" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}"
USER ${UID}:${UID}
WORKDIR /home/mlflow
EXPOSE 5000
ENTRYPOINT ["mlflow"]
CMD ["server", "--host", "0.0.0.0", "--port", "5000"]
