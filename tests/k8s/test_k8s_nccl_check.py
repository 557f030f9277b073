"""The fabric check on the fake API server: the chart's nccl-check objects (real helm, pretrain's shape, the test
site's values) created with the same client as `llmpipe k8s submit`, then `llmpipe k8s wait / status / logs
nccl-check` follow it like a stage: success when the PyTorchJob succeeds, and a failed check explained with the
Master's last line, the one `llmpipe fabric-check` ends with."""

from __future__ import annotations

from tests.k8s.conftest import REPO, SITE_VALUES
from tests.k8s.fakeapi import Scenario

FAST = ("--interval", "0.1")
FAILED = ("error: distributed launch failed (exit 1): rank 0/64: FabricCheckFailed: fabric check failed: bus bandwidth "
          "11.80 GB/s at 1G is 3% of the nominal 8 x 400 Gb/s (400 GB/s), below --min-fraction 0.7")


def _submit(chart, *sets: str) -> None:
    from pipeline.k8s.client import Kube
    from pipeline.k8s.render import render
    from pipeline.k8s.submit import submit

    kube = Kube()
    values = [str(REPO / "jobs" / "cluster" / "values" / "pretrain.yaml"), str(SITE_VALUES)]
    objects = render("nccl-check", REPO / "jobs" / "cluster" / "nccl-check.yaml", kube.namespace, chart, values,
                     [*sets, "activeDeadlineSeconds=1800", "nnodes=2"])
    assert [o["kind"] for o in objects] == ["ConfigMap", "PyTorchJob"]
    submit(kube, objects)


def test_a_passing_check_is_followed_like_a_stage(fake, chart, llmpipe):
    fake.scenarios["llmpipe-nccl-check"] = Scenario(steps=2, logs=["fabric check passed: bus bandwidth 371.2 GB/s"])
    _submit(chart)
    rc, out, err = llmpipe("k8s", "wait", "nccl-check", *FAST)
    assert rc == 0, err
    assert "nccl-check succeeded (PyTorchJob llmpipe-nccl-check) in " in out
    rc, out, _ = llmpipe("k8s", "status", "nccl-check")
    assert rc == 0 and "llmpipe-nccl-check" in out


def test_a_failed_check_is_explained_with_the_masters_line(fake, chart, llmpipe):
    fake.scenarios["llmpipe-nccl-check"] = Scenario(outcome="fail", error_line=FAILED)
    _submit(chart)
    rc, out, err = llmpipe("k8s", "wait", "nccl-check", *FAST)
    assert rc == 1, err
    assert 'PyTorchJob llmpipe-nccl-check failed: job "llmpipe-nccl-check" is failing because "Master" replica(s) failed.' in err
    line = next(ln for ln in err.splitlines() if "pod llmpipe-nccl-check-master-0" in ln)
    assert "container pytorch exited with code 1; log: error: distributed launch failed (exit 1): rank 0/64: " \
           "FabricCheckFailed: fabric check failed: bus bandwidth 11.80 GB/s" in line
    rc, out, _ = llmpipe("k8s", "logs", "nccl-check", "--role", "train")
    assert FAILED in out


def test_backoff_limit_0_would_lose_the_table(fake, chart, llmpipe):
    """Why make deploy-nccl-check keeps backoffLimit: with 0 the operator fails the job through its backoff limit
    and deletes every pod first, whatever cleanPodPolicy (ReconcileJobs, tests/k8s/operator.py), so the Master's
    log with the table and the verdict is gone."""
    fake.scenarios["llmpipe-nccl-check"] = Scenario(outcome="fail", error_line=FAILED)
    _submit(chart, "backoffLimit=0")
    rc, _, err = llmpipe("k8s", "wait", "nccl-check", *FAST)
    assert rc == 1 and "has reached the specified backoff limit" in err and "FabricCheckFailed" not in err
