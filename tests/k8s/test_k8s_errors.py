"""Every way of not reaching the cluster is one `error:` line, never a traceback; the namespace
default order; `llmpipe --help` stays free of the kubernetes client; the console script works."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.k8s.client import resolve_namespace
from tests.k8s.conftest import REPO, SITE_VALUES


def _one_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def test_no_kubeconfig(llmpipe, tmp_path, monkeypatch):
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    rc, _, err = llmpipe("k8s", "status")
    assert rc == 1
    assert _one_error(err) == (f"error: no kubeconfig at {tmp_path / 'missing'}: set $KUBECONFIG or --kubeconfig, or "
                               "create ~/.kube/config (`kubectl config view` shows what you have)")


def test_broken_kubeconfig(llmpipe, tmp_path, monkeypatch):
    bad = tmp_path / "kc"
    bad.write_text("apiVersion: v1\nkind: Config\nclusters: []\ncontexts: []\nusers: []\n")
    monkeypatch.setenv("KUBECONFIG", str(bad))
    rc, _, err = llmpipe("k8s", "wait", "clean")
    assert rc == 1 and _one_error(err).startswith(f"error: cannot use {bad}: ")


def test_api_unreachable(llmpipe, tmp_path, monkeypatch):
    from tests.k8s.fakeapi import FakeKube

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = FakeKube()
    server._server = type("S", (), {"server_address": ("127.0.0.1", port)})()  # only for write_kubeconfig's URL
    monkeypatch.setenv("KUBECONFIG", str(server.write_kubeconfig(tmp_path / "kc")))
    rc, _, err = llmpipe("k8s", "status")
    assert rc == 1
    assert _one_error(err) == (f"error: cannot reach the Kubernetes API at http://127.0.0.1:{port} (kubeconfig "
                               f"{tmp_path / 'kc'}) to list Jobs: connection refused")


def test_unauthorized(fake, llmpipe, tmp_path, monkeypatch):
    monkeypatch.setenv("KUBECONFIG", str(fake.write_kubeconfig(tmp_path / "kc2", token="expired")))
    rc, _, err = llmpipe("k8s", "logs", "clean")
    assert rc == 1 and _one_error(err).startswith(f"error: unauthorized at {fake.url}: the credentials from kubeconfig ")


def test_forbidden_names_the_missing_permission(fake, chart, llmpipe):
    fake.deny("create", "jobs")
    rc, out, err = llmpipe("k8s", "submit", "collect")
    assert rc == 1
    assert "configmap/llmpipe-collect-config created" in out
    assert _one_error(err) == ('error: forbidden: jobs.batch is forbidden: User "system:serviceaccount:ci:tester" cannot '
                               'create resource "jobs" in API group "batch" in the namespace "llm-pipeline" (bind '
                               "your account to the llmpipe-submitter Role of k8s/rbac.yaml in namespace llm-pipeline)")


def test_namespace_order(fake, tmp_path, monkeypatch):
    kc = str(fake.write_kubeconfig(tmp_path / "kc3", namespace="from-context"))
    assert resolve_namespace("explicit", kc) == "explicit"
    monkeypatch.setenv("LLMPIPE_NAMESPACE", "from-env")
    assert resolve_namespace(None, kc) == "from-env"
    monkeypatch.delenv("LLMPIPE_NAMESPACE")
    assert resolve_namespace(None, kc) == "from-context"
    assert resolve_namespace(None, str(fake.write_kubeconfig(tmp_path / "kc4", namespace=None))) == "llm-pipeline"
    assert resolve_namespace(None, str(tmp_path / "none")) == "llm-pipeline"


def test_help_does_not_import_the_kubernetes_client():
    code = ("import sys; from pipeline.cli import build_parser; build_parser(); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('kubernetes', 'urllib3', 'pydantic')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True).stdout
    assert out.strip() == "[]"


def test_the_console_script_against_the_fake_cluster(fake, chart, tmp_path):
    exe = Path(sys.executable).parent / "llmpipe"
    if not exe.exists():
        pytest.skip("the llmpipe console script is not installed in this environment")
    env = dict(os.environ)
    proc = subprocess.run([str(exe), "k8s", "submit", "collect", "-f", str(SITE_VALUES), "--wait", "--interval", "0.1"],
                          capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "collect succeeded (Job llmpipe-collect) in " in proc.stdout
