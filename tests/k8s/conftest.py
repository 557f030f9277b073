"""Fixtures for the `llmpipe k8s` tests: the fake API server (tests/k8s/fakeapi.py) with a
kubeconfig pointing at it, the helm binary, the chart, and the CLI run in-process."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helm.chart import find_helm
from tests.k8s.fakeapi import FakeKube, restricted_init_template

REPO = Path(__file__).resolve().parents[2]
REAL_CHART = REPO / "charts" / "llm-pipeline"
SITE_VALUES = Path(__file__).parent / "site-values.yaml"


@pytest.fixture(scope="session")
def helm() -> str:
    path = find_helm()
    if path is None:
        pytest.skip("helm not found: run `python scripts/fetch_tools.py` (puts it in .cache/bin/) or set $HELM")
    return path


@pytest.fixture
def chart(helm, monkeypatch) -> Path:
    """charts/llm-pipeline, what `llmpipe k8s submit` renders by default."""
    monkeypatch.setenv("HELM", helm)
    monkeypatch.setenv("LLMPIPE_CHART", str(REAL_CHART))
    return REAL_CHART


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A started FakeKube; $KUBECONFIG points at it (context namespace llm-pipeline). The cluster k8s/README.md
    sets up: namespace llm-pipeline with k8s/namespace.yaml's Pod Security labels (FakeKube's default), the
    training operator v1.8.1 with our init container template (k8s/training-operator/, step 5)."""
    server = FakeKube(tick=0.03, gc_delay=0.2)
    server.init_template = restricted_init_template()
    server.start()
    monkeypatch.setenv("KUBECONFIG", str(server.write_kubeconfig(tmp_path / "kubeconfig")))
    monkeypatch.delenv("LLMPIPE_NAMESPACE", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    yield server
    server.stop()


@pytest.fixture
def llmpipe(capsys):
    """Run `llmpipe ARGS` in-process; returns (exit status, stdout, stderr)."""
    from pipeline.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        if args[:2] == ("k8s", "submit"):  # the test site's values first: a test's own -f / --set win
            args = (*args[:3], "-f", str(SITE_VALUES), *args[3:])
        rc = main(list(args))
        out, err = capsys.readouterr()
        return rc, out, err

    return run


def error_lines(err: str) -> list[str]:
    """stderr without progress lines and warnings: the error and its explanation lines."""
    lines = err.splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.startswith("error: ")), None)
    assert start is not None, f"no `error:` line in:\n{err}"
    return lines[start:]
