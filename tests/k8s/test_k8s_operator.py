"""The fake API server's training operator is the model of v1.8.1 (tests/k8s/operator.py), run end to end:
`llmpipe k8s submit` renders the chart, the fake admits the PyTorchJob (CRD schema, the operator's webhook),
its reconcile loop creates the pods and Services the operator creates (Pod Security admission on each),
restarts or fails replicas by exit code, and `llmpipe k8s wait / status` read the result.

What each test shows, with the upstream function that decides it:
- pods and Services: common/pod.go createNewPod, pytorch/envvar.go setPodEnv, elastic.go, initcontainer.go,
  common/service.go CreateNewService; conditions: pytorchjob_controller.go UpdateJobStatus
- Pod Security: with the operator's built-in init container the API server refuses every Worker pod
  (k8s.io/pod-security-admission v0.33.0), the operator records FailedCreatePod (control/pod_control.go) and
  the Master waits for Workers that never come; with ours (k8s/training-operator/) the stage runs
- restartPolicy ExitCode: 137 / 143 restart the pod, 1 / 2 fail the job at once (common/pod.go ReconcilePods);
  nothing in the operator bounds the restarts (core/job.go PastBackoffLimit never trips: the pods have
  restartPolicy Never), the stage's own restart budget does (pipeline/training/restarts.py); backoffLimit 0
  fails the job on the first failure whatever the code (common/job.go ReconcileJobs: exceedsBackoffLimit)
- restartPolicy OnFailure: the kubelet restarts the container in place and PastBackoffLimit fails the job
- the webhook: a denied PyTorchJob is a 403 "admission webhook ... denied the request", not an RBAC problem
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import pytest

from tests.k8s import operator as op
from tests.k8s.conftest import error_lines
from tests.k8s.fakeapi import Scenario

FAST = ("--interval", "0.1")
NS = "llm-pipeline"


def until(check, timeout: float = 20.0, what: str = "the condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def conditions(fake, name: str) -> dict[str, dict]:
    return {c["type"]: c for c in (fake.get("pytorchjobs", name) or {}).get("status", {}).get("conditions") or []}


def events(fake, reason: str) -> list[dict]:
    return [e for e in fake.items("events") if e["reason"] == reason]


def env(pod: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in pod["spec"]["containers"][0].get("env") or []}


def test_pods_services_and_conditions_are_the_operators(fake, chart, llmpipe):
    rc, _, err = llmpipe("k8s", "submit", "pretrain", "--wait", *FAST, "--set", "nnodes=3")
    assert rc == 0, err
    assert "3/3 done" in err.splitlines()[-1]  # the Master ends after its Workers: 1 + 2 succeeded
    stored = fake.get("pytorchjobs", "llmpipe-pretrain")
    pods = {p["metadata"]["name"]: p for p in fake.items("pods")}
    assert sorted(pods) == ["llmpipe-pretrain-master-0", "llmpipe-pretrain-worker-0", "llmpipe-pretrain-worker-1"]
    # exactly what the model says the operator POSTs, with our init container template
    for want in op.pods_for(stored, init_template=fake.init_template):
        got = pods[want["metadata"]["name"]]
        assert got["spec"] | {"nodeName": None} == want["spec"] | {"nodeName": None}
        assert got["metadata"]["labels"] == want["metadata"]["labels"]
        assert got["metadata"]["ownerReferences"] == want["metadata"]["ownerReferences"]
    w1 = env(pods["llmpipe-pretrain-worker-1"])
    assert (w1["MASTER_ADDR"], w1["RANK"], w1["PET_NODE_RANK"], w1["PET_NNODES"]) == \
        ("llmpipe-pretrain-master-0", "2", "2", "3")
    assert pods["llmpipe-pretrain-master-0"]["spec"]["restartPolicy"] == "Never"  # ExitCode: the operator restarts
    assert [c["name"] for c in pods["llmpipe-pretrain-worker-0"]["spec"]["initContainers"]] == ["init-pytorch"]
    assert "initContainers" not in pods["llmpipe-pretrain-master-0"]["spec"]
    init = pods["llmpipe-pretrain-worker-0"]["status"]["initContainerStatuses"][0]
    assert init["state"]["terminated"]["reason"] == "Completed"
    # one headless Service per pod, the Master's is the address the Workers wait for
    services = {s["metadata"]["name"]: s for s in fake.items("services")}
    assert set(services) == set(pods)
    assert services["llmpipe-pretrain-master-0"]["spec"]["clusterIP"] == "None"
    assert services["llmpipe-pretrain-master-0"]["spec"]["ports"] == [{"name": "pytorchjob-port", "port": 23456}]
    # the stored job is the submitted one (v1.8.1 has no mutating webhook) plus the CRD's defaults
    assert stored["spec"]["runPolicy"]["suspend"] is False
    # conditions as UpdateJobStatus writes them
    conds = conditions(fake, "llmpipe-pretrain")
    assert [(t, c["status"], c["reason"], c["message"]) for t, c in conds.items()] == [
        ("Created", "True", "PyTorchJobCreated", "PyTorchJob llmpipe-pretrain is created."),
        ("Running", "False", "PyTorchJobRunning", "PyTorchJob llmpipe-pretrain is running."),
        ("Succeeded", "True", "PyTorchJobSucceeded", "PyTorchJob llmpipe-pretrain is successfully completed.")]
    status = stored["status"]
    assert status["replicaStatuses"]["Master"]["succeeded"] == 1 and status["completionTime"]
    assert status["replicaStatuses"]["Worker"]["selector"] == (
        "training.kubeflow.org/job-name=llmpipe-pretrain,training.kubeflow.org/operator-name=pytorchjob-controller,"
        "training.kubeflow.org/replica-type=worker")
    created = sorted(e["message"] for e in events(fake, "SuccessfulCreatePod"))
    assert created == [f"Created pod: {n}" for n in sorted(pods)]
    assert all(e["source"]["component"] == "pytorchjob-controller" for e in events(fake, "SuccessfulCreatePod"))


def test_an_elastic_job_has_only_workers_with_the_rendezvous_env(fake, chart, llmpipe):
    rc, _, err = llmpipe("k8s", "submit", "pretrain", "--wait", *FAST, "--set", "nnodes=2",
                         "--set", "elasticPolicy.maxRestarts=3")
    assert rc == 0, err
    pods = {p["metadata"]["name"]: p for p in fake.items("pods")}
    assert sorted(pods) == ["llmpipe-pretrain-worker-0", "llmpipe-pretrain-worker-1"]
    e = env(pods["llmpipe-pretrain-worker-1"])
    assert e["PET_RDZV_ENDPOINT"] == "llmpipe-pretrain-worker-0:23456" and e["PET_RDZV_BACKEND"] == "c10d"
    assert e["PET_NNODES"] == "2:2" and e["PET_MAX_RESTARTS"] == "3" and "MASTER_ADDR" not in e
    assert all("initContainers" not in p["spec"] for p in pods.values())
    assert conditions(fake, "llmpipe-pretrain")["Succeeded"]["message"] == \
        "PyTorchJob llm-pipeline/llmpipe-pretrain successfully completed."


def test_pod_security_refuses_the_operators_default_init_container(fake, chart, llmpipe):
    """A stock operator (built-in init container template) in our restricted namespace: every Worker pod is
    refused, the operator records FailedCreatePod with the API server's message and retries; the Master runs
    and waits at the rendezvous. `wait` and `status` say why."""
    fake.init_template = op.DEFAULT_INIT_TEMPLATE
    rc, _, err = llmpipe("k8s", "submit", "pretrain", "--wait", *FAST, "--timeout", "2", "--set", "nnodes=3")
    assert rc == 124, err
    lines = error_lines(err)
    assert lines[0] == "error: pretrain did not finish within 2s (namespace llm-pipeline):"
    assert len(lines) == 2, lines
    assert lines[1].startswith(
        '  PyTorchJob llmpipe-pretrain: FailedCreatePod: Error creating: pods "llmpipe-pretrain-worker-0" is '
        'forbidden: violates PodSecurity "restricted:v1.33": allowPrivilegeEscalation != false (container '
        '"init-pytorch" must set securityContext.allowPrivilegeEscalation=false)'), lines[1]
    assert [p["metadata"]["name"] for p in fake.items("pods")] == ["llmpipe-pretrain-master-0"]
    assert fake.get("pods", "llmpipe-pretrain-master-0")["status"]["phase"] == "Running"
    (ev,) = events(fake, "FailedCreatePod")
    assert ev["type"] == "Warning" and ev["count"] >= 2  # retried, counted by the event recorder
    # ReconcilePods returns the error before UpdateJobStatusInApiServer: no status is ever written, not even
    # the Created condition (onOwnerCreateFunc sets it on the cached object only): the job shows no state
    assert conditions(fake, "llmpipe-pretrain") == {}
    rc, out, _ = llmpipe("k8s", "status", "pretrain")
    assert rc == 0 and "pretrain: PyTorchJob llmpipe-pretrain: FailedCreatePod: Error creating: " in out
    assert "PyTorchJob/llmpipe-pretrain  train  Pending*" in out


def test_pod_security_admits_the_worker_pods_with_our_init_container(fake, chart, llmpipe):
    assert fake.init_template != op.DEFAULT_INIT_TEMPLATE  # conftest installs k8s/training-operator's
    rc, _, err = llmpipe("k8s", "submit", "pretrain", "--wait", *FAST, "--set", "nnodes=3")
    assert rc == 0, err
    assert not events(fake, "FailedCreatePod")
    assert len([p for p in fake.items("pods") if p["status"]["phase"] == "Succeeded"]) == 3


def test_pod_security_refuses_a_jobs_pods_too(fake, llmpipe):
    job = {"apiVersion": "batch/v1", "kind": "Job",
           "metadata": {"name": "llmpipe-collect", "labels": {"llmpipe.io/stage": "collect"}},
           "spec": {"template": {"metadata": {"labels": {"llmpipe.io/stage": "collect"}},
                                 "spec": {"restartPolicy": "Never", "containers": [{"name": "llmpipe", "image": "x"}]}}}}
    fake._create("apis/batch/v1", "jobs", NS, job)
    rc, _, err = llmpipe("k8s", "wait", "collect", *FAST, "--timeout", "1")
    assert rc == 124
    line = error_lines(err)[1]
    assert line.startswith('  Job llmpipe-collect: FailedCreate: Error creating: pods "llmpipe-collect-')
    assert 'is forbidden: violates PodSecurity "restricted:v1.33": allowPrivilegeEscalation != false' in line
    assert fake.items("pods") == []
    (ev,) = events(fake, "FailedCreate")
    assert ev["source"]["component"] == "job-controller"


def test_a_preempted_pod_is_recreated_and_the_job_succeeds(fake, chart, llmpipe):
    fake.scenarios["llmpipe-pretrain"] = Scenario(outcome="preempted", replica="worker-0")
    rc, _, err = llmpipe("k8s", "submit", "pretrain", "--wait", *FAST, "--set", "nnodes=2")
    assert rc == 0, err
    assert fake.starts[(NS, "llmpipe-pretrain-worker-0")] == 2 and fake.starts[(NS, "llmpipe-pretrain-master-0")] == 1
    # ReconcilePods' event, then UpdateJobStatus' (its Master branch set Running, which drops Restarting)
    assert {(e["type"], e["message"]) for e in events(fake, "PyTorchJobRestarting")} == {
        ("Warning", "job llmpipe-pretrain is restarting because Worker replica(s) failed."),
        ("Warning", "PyTorchJob llmpipe-pretrain is restarting because 1 Worker replica(s) failed.")}
    exits = {e["message"] for e in events(fake, "ExitedWithCode")}
    assert "Pod: llm-pipeline.llmpipe-pretrain-worker-0 exited with code 143" in exits
    assert "Deleted pod: llmpipe-pretrain-worker-0" in {e["message"] for e in events(fake, "SuccessfulDeletePod")}
    conds = conditions(fake, "llmpipe-pretrain")
    assert conds["Succeeded"]["status"] == "True" and "Failed" not in conds


@pytest.mark.parametrize("code", [1, 2], ids=["error", "config-error"])
def test_a_permanent_error_fails_the_job_at_once(fake, chart, llmpipe, code):
    fake.scenarios["llmpipe-pretrain"] = Scenario(outcome="fail", exit_code=code, error_line="error: bad config")
    rc, _, err = llmpipe("k8s", "submit", "pretrain", "--wait", *FAST, "--set", "nnodes=2")
    assert rc == 1
    assert error_lines(err)[1:] == [
        '  PyTorchJob llmpipe-pretrain failed: job "llmpipe-pretrain" is failing because "Master" replica(s) failed.',
        f"  pod llmpipe-pretrain-master-0: container pytorch exited with code {code}; log: error: bad config"]
    assert fake.starts[(NS, "llmpipe-pretrain-master-0")] == 1  # no restart
    assert not events(fake, "PyTorchJobRestarting")
    # cleanPodPolicy Running: the Worker still running is deleted (with its Service), the failed Master kept
    until(lambda: fake.get("pods", "llmpipe-pretrain-worker-0") is None, what="the Worker to be deleted")
    assert fake.get("pods", "llmpipe-pretrain-master-0")["status"]["phase"] == "Failed"
    assert fake.get("services", "llmpipe-pretrain-worker-0") is None
    status = fake.get("pytorchjobs", "llmpipe-pretrain")["status"]
    assert "completionTime" not in status  # ReconcilePods' Failed sets none (UpdateJobStatus's branches do)


def test_a_pod_killed_every_time_is_restarted_without_bound(fake, chart, llmpipe):
    """OOM-killed (137) at every start: the operator recreates the pod every time and never fails the job -
    backoffLimit 1 notwithstanding (PastBackoffLimit counts container restarts of Running pods; ExitCode
    pods have restartPolicy Never). Only a workload that counts its starts stops this (next test)."""
    fake.scenarios["llmpipe-pretrain"] = Scenario(outcome="oom", steps=1)
    rc, _, err = llmpipe("k8s", "submit", "pretrain", "--set", "nnodes=2")
    assert rc == 0, err
    until(lambda: fake.starts.get((NS, "llmpipe-pretrain-worker-0"), 0) >= 6, what="6 starts of worker-0")
    conds = conditions(fake, "llmpipe-pretrain")
    assert "Failed" not in conds and ("Restarting" in conds or conds["Running"]["status"] == "True")
    assert max(e["count"] for e in events(fake, "PyTorchJobRestarting")) >= 5
    assert fake.get("pytorchjobs", "llmpipe-pretrain")["spec"]["runPolicy"]["backoffLimit"] == 1
    rc, _, err = llmpipe("k8s", "wait", "pretrain", *FAST, "--timeout", "1")
    assert rc == 124, err  # still going: not failed
    assert fake.starts[(NS, "llmpipe-pretrain-master-0")] == 1  # the Master waits on, untouched


def test_the_restart_budget_fails_the_job_the_operator_would_restart_forever(fake, chart, llmpipe):
    """The same OOM kills, with the stage counting its starts (pipeline/training/restarts.py): after
    LLMPIPE_MAX_RESTARTS (= backoffLimit, 2 here) restarts from step 1200 the 4th start exits 1, which
    ExitCode does not restart: the job fails and `wait` shows the line."""
    fake.scenarios["llmpipe-pretrain"] = Scenario(outcome="oom", restart_budget=True, steps=1)
    rc, _, err = llmpipe("k8s", "submit", "pretrain", "--wait", *FAST, "--set", "nnodes=2", "--set", "backoffLimit=2")
    assert rc == 1, err
    assert error_lines(err)[1:] == [
        '  PyTorchJob llmpipe-pretrain failed: job "llmpipe-pretrain" is failing because "Master" replica(s) failed.',
        ("  pod llmpipe-pretrain-master-0: container pytorch exited with code 1; log: error: pretrain: started 4 times "
         "from step 1200 without reaching a new checkpoint (LLMPIPE_MAX_RESTARTS=2): giving up; the earlier pods' "
         "logs say why")]
    assert fake.starts[(NS, "llmpipe-pretrain-master-0")] == 4
    assert [e["count"] for e in events(fake, "PyTorchJobRestarting")
            if e["message"] == "job llmpipe-pretrain is restarting because Master replica(s) failed."] == [3]
    assert fake.log_of("llmpipe-pretrain-master-0", "pytorch")[-1].startswith("error: pretrain: started 4 times")


def test_backoff_limit_0_fails_the_job_on_the_first_failure(fake, chart, llmpipe):
    """ReconcileJobs' exceedsBackoffLimit: a new failed pod, not all replicas active and NumRequeues (always 0:
    FakeWorkQueue) + 1 > backoffLimit. With backoffLimit 0 even a preemption (143) fails the job, and every
    pod goes (DeletePodsAndServices before the job is Failed: all of them, whatever cleanPodPolicy)."""
    fake.scenarios["llmpipe-pretrain"] = Scenario(outcome="preempted", replica="worker-0")
    rc, _, err = llmpipe("k8s", "submit", "pretrain", "--wait", *FAST, "--set", "nnodes=2", "--set", "backoffLimit=0")
    assert rc == 1
    assert error_lines(err)[1] == ("  PyTorchJob llmpipe-pretrain failed: Job llmpipe-pretrain has failed because it "
                                   "has reached the specified backoff limit")
    until(lambda: not fake.items("pods"), what="every pod to be deleted")
    assert fake.starts[(NS, "llmpipe-pretrain-worker-0")] == 1


def test_on_failure_restarts_in_place_and_the_backoff_limit_fails_the_job(fake, chart, llmpipe):
    """restartPolicy OnFailure: the pod keeps restartPolicy OnFailure, the kubelet restarts the container in
    place, and PastBackoffLimit (restartCount of Running pods >= backoffLimit 1) fails the job."""
    fake.scenarios["llmpipe-pretrain"] = Scenario(outcome="fail", steps=1, error_line="error: bad config")
    rc, _, err = llmpipe("k8s", "submit", "pretrain", "--wait", *FAST, "--set", "nnodes=2",
                         "--set", "restartPolicy=OnFailure")
    assert rc == 1
    assert error_lines(err)[1] == ("  PyTorchJob llmpipe-pretrain failed: Job llmpipe-pretrain has failed because it "
                                   "has reached the specified backoff limit")
    # the first in-place restart (restartCount 1 on a Running pod) reaches backoffLimit 1: the job fails and
    # its pods are deleted before the container runs again; the pod was never deleted and recreated
    assert fake.starts[(NS, "llmpipe-pretrain-master-0")] == 1
    assert not events(fake, "PyTorchJobRestarting")
    assert [e["count"] for e in events(fake, "SuccessfulCreatePod")] == [1, 1]


def _post(fake, body: dict) -> tuple[int, dict, list[str]]:
    req = urllib.request.Request(f"{fake.url}/apis/kubeflow.org/v1/namespaces/{NS}/pytorchjobs", method="POST",
                                 data=json.dumps(body).encode(), headers={"Authorization": f"Bearer {fake.token}",
                                                                          "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req) as resp:
            return resp.status, json.loads(resp.read()), resp.headers.get_all("Warning") or []
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read()), err.headers.get_all("Warning") or []


def _ptj(name: str = "ptj", **spec) -> dict:
    master = {"replicas": 1, "template": {"spec": {"containers": [{"name": "pytorch", "image": "img"}]}}}
    return {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "metadata": {"name": name},
            "spec": {"pytorchReplicaSpecs": {"Master": master}, **spec}}


def test_the_webhook_and_the_crd_schema_answer_as_the_api_server_does(fake):
    fake.simulate = False
    bad = _ptj()
    bad["spec"]["pytorchReplicaSpecs"]["Master"]["replicas"] = 2
    code, body, _ = _post(fake, bad)
    assert (code, body["reason"], body["message"]) == (403, "Forbidden", (
        'admission webhook "validator.pytorchjob.training-operator.kubeflow.org" denied the request: '
        "spec.pytorchReplicaSpecs[Master].replicas: Forbidden: must be 1"))
    code, body, _ = _post(fake, {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "metadata": {"name": "x"},
                                 "spec": {}})
    assert (code, body["reason"]) == (422, "Invalid")
    assert body["message"] == 'PyTorchJob.kubeflow.org "x" is invalid: spec.pytorchReplicaSpecs: Required value'
    code, body, warnings = _post(fake, _ptj("old", elasticPolicy={"nProcPerNode": 2}))
    assert code == 201 and warnings == [
        '299 - "spec.elasticPolicy.nProcPerNode is deprecated, use spec.nprocPerNode instead"']


def test_a_webhook_denial_is_not_reported_as_missing_rbac(fake):
    """403 is also admission's answer; only the authorizer's 403 asks for the llmpipe-submitter Role."""
    from pipeline.k8s.client import K8sError, Kube

    bad = _ptj()
    del bad["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["image"]
    with pytest.raises(K8sError) as err:
        Kube().create("kubeflow.org/v1", "pytorchjobs", bad, what="create pytorchjob/ptj")
    assert str(err.value) == (
        'the Kubernetes API refused to create pytorchjob/ptj: 403 admission webhook '
        '"validator.pytorchjob.training-operator.kubeflow.org" denied the request: '
        "spec.pytorchReplicaSpecs[Master].template.spec.containers[0].image: Required value: must be required")
    assert err.value.status == 403
    fake.deny("create", "pytorchjobs")
    with pytest.raises(K8sError, match=r"^forbidden: .* cannot create resource \"pytorchjobs\" .*llmpipe-submitter Role"):
        Kube().create("kubeflow.org/v1", "pytorchjobs", _ptj(), what="create pytorchjob/ptj")
