"""Opt-in end-to-end tests of `llmpipe k8s` on a real cluster.

They run only with ``KUBECONFIG`` set and ``LLMPIPE_E2E_K8S=1``; they create (and delete
afterwards) the objects of the release ``llmpipe-collect`` in ``$LLMPIPE_NAMESPACE`` (else the
kubeconfig context's namespace, else ``llm-pipeline``), which must exist. They use the real
chart (charts/llm-pipeline, or ``$LLMPIPE_CHART``) and helm (``$HELM``, ``.cache/bin/helm``, PATH).

* the two failure tests need nothing but the cluster: an image tag that does not exist must
  be explained as a failed pull, a nodeSelector no node has as Unschedulable;
* the success test also needs ``LLMPIPE_E2E_VALUES`` (site values: an image the cluster can
  pull, storage) and ``LLMPIPE_E2E_CONFIG`` (a collect config whose sources the pod can read).

    KUBECONFIG=~/.kube/config LLMPIPE_E2E_K8S=1 .venv/bin/pytest tests/k8s/test_k8s_e2e_cluster.py -m slow
"""

from __future__ import annotations

import os
import uuid

import pytest

from pipeline.k8s.client import KINDS, Kube
from tests.k8s.conftest import REAL_CHART, error_lines

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (os.environ.get("KUBECONFIG") and os.environ.get("LLMPIPE_E2E_K8S") == "1"),
                       reason="opt-in: set KUBECONFIG and LLMPIPE_E2E_K8S=1 to run against a real cluster"),
]
STAGE = "collect"


@pytest.fixture
def cluster(helm, monkeypatch):
    chart = os.environ.get("LLMPIPE_CHART") or str(REAL_CHART)
    if not os.path.exists(os.path.join(chart, "Chart.yaml")):
        pytest.skip(f"no chart at {chart}")
    monkeypatch.setenv("HELM", helm)
    monkeypatch.setenv("LLMPIPE_CHART", chart)
    kube = Kube()
    _delete_stage(kube, STAGE)
    yield kube
    _delete_stage(kube, STAGE)


def _delete_stage(kube, stage: str) -> None:
    selector = f"llmpipe.io/stage={stage}"
    for kind in ("Job", "PyTorchJob", "ConfigMap"):
        api_version, plural = KINDS[kind]
        for obj in (kube.list_pytorchjobs(selector) if kind == "PyTorchJob" else
                    kube.list(kind, labels=selector, what="clean up")):
            kube.delete(api_version, plural, obj["metadata"]["name"], what="clean up", missing_ok=True)


def _values() -> list[str]:
    path = os.environ.get("LLMPIPE_E2E_VALUES")
    return ["--values", path] if path else []


def test_an_image_that_does_not_exist_is_explained(cluster, llmpipe):
    tag = f"e2e-missing-{uuid.uuid4().hex[:8]}"
    rc, _, err = llmpipe("k8s", "submit", STAGE, *_values(), "--set", f"image.tag={tag}", "--wait", "--fail-fast",
                         "--timeout", "5m", "--interval", "3")
    assert rc == 1, err
    lines = error_lines(err)
    assert "cannot pull image " in lines[1] and tag in lines[1]
    assert "(ErrImagePull)" in lines[1] or "(ImagePullBackOff)" in lines[1]


def test_a_pod_no_node_can_take_is_unschedulable(cluster, llmpipe):
    rc, _, err = llmpipe("k8s", "submit", STAGE, *_values(), "--set", "nodeSelector.llmpipe-e2e=nowhere", "--wait",
                         "--timeout", "60", "--interval", "3")
    assert rc == 124, err
    assert any("Unschedulable: 0/" in ln and "node" in ln for ln in error_lines(err)[1:])
    rc, out, _ = llmpipe("k8s", "status", STAGE)
    assert rc == 0 and "Unschedulable" in out


def test_a_stage_runs_to_completion(cluster, llmpipe):
    config = os.environ.get("LLMPIPE_E2E_CONFIG")
    if not (config and os.environ.get("LLMPIPE_E2E_VALUES")):
        pytest.skip("set LLMPIPE_E2E_VALUES (image, storage) and LLMPIPE_E2E_CONFIG (a collect config) to run a stage")
    rc, out, err = llmpipe("k8s", "submit", STAGE, "--config", config, *_values(), "--wait", "--timeout", "20m",
                           "--interval", "5")
    assert rc == 0, err
    assert f"{STAGE} succeeded" in out
    rc, out, _ = llmpipe("k8s", "logs", STAGE)
    assert rc == 0 and f"== {STAGE}" in out  # the stage's own summary line
    rc, out, _ = llmpipe("k8s", "status", STAGE)
    assert "Succeeded*" in out
