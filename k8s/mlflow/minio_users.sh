#!/bin/sh
# Buckets and least-privilege users on the bootstrap's MinIO, with `mc` (quay.io/minio/mc); run by the
# mlflow-setup Job (setup.yaml), again on every apply: each step is idempotent (mc mb --ignore-existing;
# `admin policy create` and `admin user add` overwrite; `admin policy attach` accepts a policy already
# attached: github.com/minio/mc cmd/admin-policy-attach.go, errCodeChangeAlreadyApplied).
#
# Every credential comes from the environment; none is an argument of any process (`ps`):
#   MINIO_ROOT_USER / MINIO_ROOT_PASSWORD            the root user (Secret mlflow-minio), as MC_HOST_minio
#   MLFLOW_S3_ACCESS_KEY / MLFLOW_S3_SECRET_KEY      the MLflow server's user (Secret mlflow-s3)
#   LLMPIPE_S3_ACCESS_KEY / LLMPIPE_S3_SECRET_KEY    the pipeline's user (Secret llmpipe-s3)
#   MINIO_URL (default http://minio:9000)
# New users' keys reach `mc admin user add` on stdin (cmd/admin-user-add.go: fetchUserKeys reads both
# lines from a non-terminal stdin); printf is the shell's builtin, not a process.
set -eu

case "$MINIO_ROOT_USER$MINIO_ROOT_PASSWORD" in
  *:*)
    # mc splits MC_HOST_<alias>=scheme://KEY:SECRET@host at ':' (cmd/config.go: hostKeyTokens reads a
    # third ':'-separated part as a session token)
    echo "mlflow-minio: MINIO_ROOT_USER and MINIO_ROOT_PASSWORD must not contain ':'" >&2
    exit 1 ;;
esac
url=${MINIO_URL:-http://minio:9000}
MC_HOST_minio="${url%%://*}://${MINIO_ROOT_USER}:${MINIO_ROOT_PASSWORD}@${url#*://}"
export MC_HOST_minio

tries=0
until mc ready minio >/dev/null 2>&1; do
  tries=$((tries + 1))
  if [ "$tries" -ge "${MINIO_WAIT_TRIES:-60}" ]; then
    echo "MinIO at $url did not become ready" >&2
    exit 1
  fi
  echo "waiting for MinIO at $url"
  sleep "${MINIO_WAIT_SECONDS:-5}"
done

# user ACCESS_KEY SECRET_KEY BUCKET: read/write on BUCKET's objects, list BUCKET, nothing else
user() {
  policy="llmpipe-rw-$3"
  file="${TMPDIR:-/tmp}/$policy.json"
  printf '{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":["s3:GetBucketLocation","s3:ListBucket","s3:ListBucketMultipartUploads"],"Resource":["arn:aws:s3:::%s"]},{"Effect":"Allow","Action":["s3:GetObject","s3:PutObject","s3:DeleteObject","s3:AbortMultipartUpload","s3:ListMultipartUploadParts"],"Resource":["arn:aws:s3:::%s/*"]}]}\n' "$3" "$3" > "$file"
  mc mb --ignore-existing "minio/$3"
  mc admin policy create minio "$policy" "$file"
  printf '%s\n%s\n' "$1" "$2" | mc admin user add minio
  mc admin policy attach minio "$policy" --user "$1"
  echo "MinIO user $1: read/write on bucket $3"
}

user "$MLFLOW_S3_ACCESS_KEY" "$MLFLOW_S3_SECRET_KEY" "${MLFLOW_BUCKET:-mlflow-artifacts}"
user "$LLMPIPE_S3_ACCESS_KEY" "$LLMPIPE_S3_SECRET_KEY" "${LLMPIPE_BUCKET:-llm-pipeline}"
