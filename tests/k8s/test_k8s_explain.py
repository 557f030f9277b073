"""The failure explanations on pod / Job objects in the API's JSON shape (the cases the
simulator does not produce: crash loops, missing Secrets, evictions, OOM without a limit)."""

from __future__ import annotations

from pipeline.k8s.explain import explain_failure, group, pod_problems, workload_failure
from pipeline.k8s.state import Snapshot, Workload


def pod(name: str, statuses: list[dict], limits: dict | None = None, **status) -> dict:
    container = {"name": "llmpipe", "image": "ghcr.io/llm-pipeline/llmpipe-train:0.1.0"}
    if limits:
        container["resources"] = {"limits": limits}
    return {"kind": "Pod", "metadata": {"name": name, "ownerReferences": [{"uid": "j1", "controller": True}]},
            "spec": {"containers": [container]},
            "status": {"phase": status.pop("phase", "Running"), "containerStatuses": statuses, **status}}


def cs(**state) -> dict:
    return {"name": "llmpipe", "image": "ghcr.io/llm-pipeline/llmpipe-train:0.1.0", "imageID": "", "ready": False,
            "restartCount": state.pop("restarts", 0), **state}


def texts(p: dict) -> list[str]:
    return [x.text for x in pod_problems(p)]


def test_oom_in_the_last_state_without_a_limit_blames_the_node():
    p = pod("a", [cs(state={"running": {}}, lastState={"terminated": {"reason": "OOMKilled", "exitCode": 137}}, restarts=1)])
    assert texts(p) == ["container llmpipe was OOMKilled (no memory limit: the node ran out of memory): raise "
                        "resources.limits.memory or lower the batch size / workers"]


def test_crash_loop_with_the_last_exit():
    p = pod("a", [cs(state={"waiting": {"reason": "CrashLoopBackOff"}},
                     lastState={"terminated": {"reason": "Error", "exitCode": 137}}, restarts=4)], {"memory": "8Gi"})
    assert texts(p) == ["container llmpipe is crash-looping (4 restarts; last exited with code 137 (SIGKILL))"]


def test_missing_secret_is_fatal():
    p = pod("a", [cs(state={"waiting": {"reason": "CreateContainerConfigError",
                                        "message": 'secret "s3-credentials" not found'}})], phase="Pending")
    (problem,) = pod_problems(p)
    assert problem.fatal and problem.text == ('container llmpipe cannot start (CreateContainerConfigError): '
                                              'secret "s3-credentials" not found')


def test_eviction_and_a_container_that_could_not_run():
    p = pod("a", [cs(state={"terminated": {"reason": "ContainerCannotRun", "exitCode": 128,
                                           "message": "exec: \"llmpipe\": executable file not found in $PATH"}})],
            phase="Failed", reason="Evicted", message="The node was low on resource: ephemeral-storage.")
    assert texts(p) == [
        'container llmpipe exited with code 128, ContainerCannotRun: exec: "llmpipe": executable file not found in $PATH',
        "Evicted: The node was low on resource: ephemeral-storage.",
    ]


def test_the_same_cause_on_many_pods_is_one_line():
    oom = [cs(state={"terminated": {"reason": "OOMKilled", "exitCode": 137}})]
    problems = [x for i in range(8) for x in pod_problems(pod(f"p{i}", oom, {"memory": "2Gi"}, phase="Failed"))]
    (line,) = group(problems)
    assert line.startswith("pod p0 and 7 more: container llmpipe was OOMKilled (memory limit 2Gi)")


def test_job_failures_by_reason():
    def job(reason: str, message: str, **spec) -> Workload:
        return Workload({"kind": "Job", "metadata": {"name": "j", "uid": "j1"}, "spec": spec,
                         "status": {"failed": 3, "conditions": [{"type": "Failed", "status": "True", "reason": reason,
                                                                 "message": message}]}})

    assert workload_failure(job("BackoffLimitExceeded", "Job has reached the specified backoff limit", backoffLimit=2)) == \
        "Job j: BackoffLimitExceeded: 3 pod(s) failed, more than backoffLimit 2 allows"
    assert workload_failure(job("DeadlineExceeded", "Job was active longer than specified deadline",
                                activeDeadlineSeconds=7200)) == \
        ("Job j: DeadlineExceeded: still running after activeDeadlineSeconds 7200 (2h00m); raise "
         "activeDeadlineSeconds or add resources")
    assert workload_failure(job("PodFailurePolicy", "Container llmpipe for pod x failed with exit code 3 matching "
                                "FailJob rule at index 0")) == \
        "Job j: PodFailurePolicy: Container llmpipe for pod x failed with exit code 3 matching FailJob rule at index 0"


def test_a_failed_job_whose_pods_are_gone_still_explains_itself():
    w = Workload({"kind": "Job", "metadata": {"name": "j", "uid": "j1"}, "spec": {"activeDeadlineSeconds": 60},
                  "status": {"conditions": [{"type": "Failed", "status": "True", "reason": "DeadlineExceeded"}]}})
    assert explain_failure(Snapshot("ns", "collect", [w], [])) == [
        "Job j: DeadlineExceeded: still running after activeDeadlineSeconds 60 (1m00s); raise activeDeadlineSeconds "
        "or add resources"]
