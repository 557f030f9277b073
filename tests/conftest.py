"""Shared fixtures: the committed real-text corpus, a CLI runner, an S3 server on loopback."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
CORPUS = FIXTURES / "corpus"
REPO = Path(__file__).resolve().parent.parent

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# tracking is opt-in in tests (the embedded SQLite store costs seconds per new run root);
# tests/integration/test_tracking.py turns it on against a real `mlflow server`
os.environ.setdefault("LLMPIPE_TRACKING", "off")


from pipeline.localserver import free_port as _free_port  # noqa: E402
from pipeline.localserver import stop, wait_http  # noqa: E402


@pytest.fixture
def run_root(template_root, tmp_path) -> Path:
    """A fresh copy of the test module's own ``template_root`` fixture (a prepared run root)."""
    root = tmp_path / "root"
    shutil.copytree(template_root, root)
    return root


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` process on loopback: SQLite backend, proxied artefact store."""

    base = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    exe = Path(sys.executable).with_name("mlflow")
    proc = subprocess.Popen(
        [str(exe), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{base}/mlflow.db", "--artifacts-destination", str(base / "artifacts")],
        stdout=open(base / "server.log", "wb"), stderr=subprocess.STDOUT, cwd=base,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/health", proc, timeout=120, what="mlflow server", log=base / "server.log")
        yield url
    finally:
        stop(proc, timeout=20)


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API (moto's server) on 127.0.0.1; yields its endpoint URL."""
    exe = shutil.which("moto_server") or str(Path(sys.executable).parent / "moto_server")
    port = _free_port()
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("moto_server did not start")
    yield url
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """Environment pointing fsspec/s3fs and boto3 at the loopback server; returns a fresh bucket name."""
    import boto3

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    monkeypatch.setenv("LLMPIPE_STORAGE_OPTIONS", f'{{"client_kwargs": {{"endpoint_url": "{s3_server}"}}}}')
    bucket = f"test-{time.time_ns()}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    import fsspec

    fsspec.config.conf.pop("s3", None)
    yield bucket


def write_configs(folder: Path, corpus: Path = CORPUS, **extra: str) -> Path:
    """Small CPU configs for the four data stages over the committed fixtures."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "collect.yaml").write_text(
        f"""\
sources:
  - name: en-fortunes
    paths: ["{corpus}/en/*.txt"]
    language: en
    split_mode: regex
    separator: "^%$"
  - name: ru-fortunes
    paths: ["{corpus}/ru/*.txt"]
    language: ru
    split_mode: regex
    separator: "^%$"
  - name: kk-catalogs
    paths: ["{corpus}/kk/*.jsonl"]
    language: kk
    id_field: id
  - name: planted
    paths: ["{corpus}/planted.jsonl"]
    id_field: id
""",
        encoding="utf-8",
    )
    (folder / "clean.yaml").write_text("samples_per_reason: 5\n" + extra.get("clean", ""), encoding="utf-8")
    (folder / "tokenizer.yaml").write_text(
        "vocab_size: 800\ntrain_chars: 2000000\nheldout_fraction: 0.1\n" + extra.get("tokenizer", ""), encoding="utf-8"
    )
    (folder / "pack.yaml").write_text(
        "seq_len: 64\nval_fraction: 0.1\nblocks_per_shard: 40\n" + extra.get("pack", ""), encoding="utf-8"
    )
    return folder
