"""`llmpipe k8s wait` (and `submit --wait`) against simulated Jobs and PyTorchJobs: exit 0 on
success, and on failure or timeout one line per cause, read from the API's status fields."""

from __future__ import annotations

import time

import pytest

from pipeline.errors import PipelineError
from pipeline.k8s.wait import parse_duration
from tests.k8s.conftest import error_lines
from tests.k8s.fakeapi import Scenario

FAST = ("--interval", "0.1")


def test_sharded_stage_succeeds_when_the_merge_job_does(fake, chart, llmpipe):
    fake.scenarios["llmpipe-clean-merge"] = Scenario(after="llmpipe-clean-part", steps=2)
    rc, out, err = llmpipe("k8s", "submit", "clean", "--wait", *FAST, "--set", "workers=3")
    assert rc == 0, err
    assert "clean succeeded (Job llmpipe-clean-merge) in " in out
    # progress: pods by phase, completions, elapsed
    progress = [ln for ln in err.splitlines() if ln.startswith("[")]
    assert progress and "clean: " in progress[0] and " running, " in progress[0]
    assert "4/4 done" in progress[-1] and "3 succeeded" not in progress[0]
    assert "Job llmpipe-clean-merge Succeeded" in progress[-1]
    # and a later `wait` on the finished stage returns at once
    rc, out, _ = llmpipe("k8s", "wait", "clean", *FAST)
    assert rc == 0 and "clean succeeded" in out


def test_training_stage_succeeds_when_the_pytorchjob_does(fake, chart, llmpipe):
    rc, out, err = llmpipe("k8s", "submit", "sft", "--config", "jobs/demo/sft.yaml", "--wait", *FAST, "--set", "nnodes=3")
    assert rc == 0, err
    assert "sft succeeded (PyTorchJob llmpipe-sft) in " in out
    assert "3/3 done" in err.splitlines()[-1]


MERGE_AFTER_PARTS = {"llmpipe-clean-merge": Scenario(after="llmpipe-clean-part")}

FAILURES = [
    # stage, scenarios by workload name, --set values, what each explanation line contains (one per line)
    ("collect", {"llmpipe-collect": Scenario(outcome="fail")}, [], [
        "error: collect failed after ",
        "Job llmpipe-collect: BackoffLimitExceeded: 2 pod(s) failed, more than backoffLimit 1 allows",
        " and 1 more: container llmpipe exited with code 1; log: error: no committed 'raw/' under /data/runs/default",
    ]),
    ("collect", {"llmpipe-collect": Scenario(outcome="oom")}, ["resources.limits.memory=6Gi"], [
        "error: collect failed after ",
        "Job llmpipe-collect: BackoffLimitExceeded",
        "container llmpipe was OOMKilled (memory limit 6Gi): raise resources.limits.memory",
    ]),
    ("collect", {"llmpipe-collect": Scenario(outcome="deadline")}, ["activeDeadlineSeconds=600"], [
        "error: collect failed after ",
        "Job llmpipe-collect: DeadlineExceeded: still running after activeDeadlineSeconds 600 (10m00s)",
    ]),
    ("clean", {"llmpipe-clean-part": Scenario(outcome="oom"), **MERGE_AFTER_PARTS}, [], [
        "error: clean failed after ",
        "Job llmpipe-clean-part: BackoffLimitExceeded",
        "OOMKilled (memory limit 4Gi)",
    ]),
    # restartPolicy ExitCode, exit 1 (below 128): the operator fails the job at once, with the message
    # ReconcilePods writes (pkg/controller.v1/common/pod.go); cleanPodPolicy Running deletes the 7 running
    # Workers and keeps the failed Master with its log
    ("pretrain", {"llmpipe-pretrain": Scenario(outcome="fail", error_line="RuntimeError: CUDA error: an illegal memory access")},
     [], [
        "error: pretrain failed after ",
        'PyTorchJob llmpipe-pretrain failed: job "llmpipe-pretrain" is failing because "Master" replica(s) failed.',
        "pod llmpipe-pretrain-master-0: container pytorch exited with code 1; log: RuntimeError: CUDA error: an illegal",
    ]),
    # (an OOM-killed training pod is no failure: the operator recreates it, see test_k8s_operator.py)
]


@pytest.mark.parametrize("stage,scenarios,sets,expected", FAILURES,
                         ids=["backoff-limit", "oom", "deadline", "sharded-part-oom", "pytorchjob-failed"])
def test_failures_are_explained_one_line_per_cause(fake, chart, llmpipe, stage, scenarios, sets, expected):
    fake.scenarios.update(scenarios)
    args = [a for s in sets for a in ("--set", s)]
    rc, out, err = llmpipe("k8s", "submit", stage, "--wait", *FAST, *args)
    assert rc == 1, err
    lines = error_lines(err)
    assert len(lines) == len(expected), lines
    for line, piece in zip(lines, expected):
        assert piece in line, f"{piece!r} not in {line!r}"
    assert all(ln.startswith("  ") for ln in lines[1:])
    assert "Traceback" not in err and "succeeded" not in out


STUCK = [
    ("imagepull", ["cannot pull image ghcr.io/llm-pipeline/llmpipe-data:0.0.0-missing (ImagePullBackOff): ",
                   "(ImagePullBackOff): failed to pull and unpack image: failed to resolve reference: not found"]),
    ("unschedulable", ["Unschedulable: 0/3 nodes are available: ", "2 Insufficient nvidia.com/gpu."]),
    ("createfail", ["Job llmpipe-collect: FailedCreate: Error creating: pods \"llmpipe-collect-abcde\" is forbidden: "
                    "exceeded quota: compute"]),
]


@pytest.mark.parametrize("outcome,expected", STUCK, ids=[s[0] for s in STUCK])
def test_a_stage_that_cannot_start_times_out_with_the_reason(fake, chart, llmpipe, outcome, expected):
    fake.scenarios["llmpipe-collect"] = Scenario(outcome=outcome)
    t0 = time.monotonic()
    rc, _, err = llmpipe("k8s", "submit", "collect", "--wait", *FAST, "--timeout", "1.5",
                         "--set", "image.tag=0.0.0-missing")
    assert rc == 124, err
    assert time.monotonic() - t0 < 30
    lines = error_lines(err)
    assert lines[0] == "error: collect did not finish within 1s (namespace llm-pipeline):"
    assert len(lines) == 2 and all(piece in lines[1] for piece in expected), lines
    # the same cause was shown as a warning while waiting, once
    warnings = [ln for ln in err.splitlines() if ln.startswith("warning: ")]
    assert len(warnings) == 1 and expected[0] in warnings[0]


def test_fail_fast_stops_on_an_image_that_cannot_be_pulled(fake, chart, llmpipe):
    fake.scenarios["llmpipe-collect"] = Scenario(outcome="imagepull")
    rc, _, err = llmpipe("k8s", "submit", "collect", "--wait", *FAST, "--fail-fast")
    assert rc == 1
    lines = error_lines(err)
    assert lines[0].startswith("error: collect cannot finish (--fail-fast, after ")
    assert "cannot pull image ghcr.io/llm-pipeline/llmpipe-data:" in lines[1]


def test_a_failed_part_fails_the_stage_while_the_merge_still_waits(fake, chart, llmpipe):
    fake.scenarios["llmpipe-clean-part"] = Scenario(outcome="fail")
    fake.scenarios["llmpipe-clean-merge"] = Scenario(after="llmpipe-clean-part")
    rc, _, err = llmpipe("k8s", "submit", "clean", "--wait", *FAST)
    assert rc == 1
    lines = error_lines(err)
    assert "Job llmpipe-clean-part: BackoffLimitExceeded" in lines[1]
    assert fake.get("jobs", "llmpipe-clean-merge")["status"].get("active") == 1  # still waiting for the parts


def test_wait_after_a_resubmit_ignores_the_old_jobs_lingering_pods(fake, chart, llmpipe):
    from pipeline.k8s.client import Kube
    from pipeline.k8s.state import owner_uid, snapshot

    rc, _, err = llmpipe("k8s", "submit", "collect", "--wait", *FAST)
    assert rc == 0, err
    old_pods = {p["metadata"]["name"] for p in fake.items("pods")}
    fake.gc_delay = 3.0  # the garbage collector is slow today
    fake.scenarios["llmpipe-collect"] = Scenario(outcome="hang")
    rc, _, err = llmpipe("k8s", "submit", "collect")
    assert rc == 0, err
    new_uid = fake.get("jobs", "llmpipe-collect")["metadata"]["uid"]
    deadline = time.monotonic() + 10
    while not any(owner_uid(p) == new_uid for p in fake.items("pods")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert old_pods & {p["metadata"]["name"] for p in fake.items("pods")}, "the old pods should still be there"
    snap = snapshot(Kube(), "collect")
    assert snap.pods and {owner_uid(p) for p in snap.pods} == {new_uid}
    assert snap.workloads[0].state == "Running"


def test_wait_rides_out_an_api_server_restart(fake, chart, llmpipe):
    import threading

    fake.scenarios["llmpipe-collect"] = Scenario(steps=20)
    assert llmpipe("k8s", "submit", "collect")[0] == 0
    fake.unavailable = True
    threading.Timer(0.6, lambda: setattr(fake, "unavailable", False)).start()
    rc, out, err = llmpipe("k8s", "wait", "collect", *FAST)
    assert rc == 0, err
    assert err.count("warning: the Kubernetes API refused to list Jobs: 503 the server is currently unable to handle "
                     "the request (retrying for up to 5m00s)") == 1
    assert "collect succeeded" in out


def test_waiting_for_a_stage_never_submitted_says_so(fake, llmpipe):
    rc, _, err = llmpipe("k8s", "wait", "tokenizer", *FAST)
    assert rc == 1
    assert err.strip() == ("error: no Job or PyTorchJob of stage tokenizer in namespace llm-pipeline: submit it first "
                           "(`llmpipe k8s submit tokenizer`), or pick the namespace with -n")


def test_suspended_job_is_reported_as_queued(fake, chart, llmpipe, tmp_path):
    values = tmp_path / "kueue.yaml"
    values.write_text("image: {tag: '0.1.0'}\n")
    rc, _, err = llmpipe("k8s", "submit", "collect", "-f", str(values), "--dry-run")
    assert rc == 0
    # suspend the Job the way Kueue does, before the controller sees it
    job = {"apiVersion": "batch/v1", "kind": "Job",
           "metadata": {"name": "llmpipe-collect", "labels": {"llmpipe.io/stage": "collect",
                                                              "kueue.x-k8s.io/queue-name": "gpu-queue"}},
           "spec": {"suspend": True, "template": {"spec": {"restartPolicy": "Never",
                                                           "containers": [{"name": "llmpipe", "image": "x"}]}}}}
    fake._create("apis/batch/v1", "jobs", "llm-pipeline", job)
    rc, _, err = llmpipe("k8s", "wait", "collect", *FAST, "--timeout", "0.5")
    assert rc == 124
    assert error_lines(err)[1] == ("  Job llmpipe-collect is suspended: queued in Kueue queue gpu-queue, "
                                   "waiting for admission")


def test_parse_duration():
    assert parse_duration("90") == 90 and parse_duration("15m") == 900 and parse_duration("2h") == 7200
    assert parse_duration("1.5s") == 1.5 and parse_duration("1d") == 86400
    assert parse_duration(None) is None and parse_duration("0") is None
    with pytest.raises(PipelineError, match="give seconds or a number with s, m, h or d"):
        parse_duration("soon")
