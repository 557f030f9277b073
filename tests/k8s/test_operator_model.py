"""tests/k8s/operator.py against the training operator v1.8.1's own expectations.

Each test names the upstream Go test (github.com/kubeflow/training-operator, tag v1.8.1) whose
facts it checks; the inputs are those tests' inputs as dicts. The rest pin what the Go code does
where no upstream test spells it out (cited by function)."""

from __future__ import annotations

import copy

import pytest
import yaml

from tests.k8s import operator as op


def container(name="pytorch", image="test-image", ports=None):
    c = {"name": name, "image": image}
    if ports is not None:
        c["ports"] = ports
    return c


def rspec(replicas=None, containers=None, restart=None):
    s = {"template": {"spec": {"containers": containers if containers is not None else [container()]}}}
    if replicas is not None:
        s["replicas"] = replicas
    if restart:
        s["restartPolicy"] = restart
    return s


def job(name="test", namespace="ns", uid="uid-1", **spec):
    return {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob",
            "metadata": {"name": name, "namespace": namespace, "uid": uid}, "spec": spec}


def env(pod, container_index=0) -> dict:
    return {e["name"]: e["value"] for e in pod["spec"]["containers"][container_index]["env"]}


PORT_8080 = [{"name": "pytorchjob-port", "containerPort": 8080, "protocol": "TCP"}]


# ------------------------------------------------------------ pkg/apis/kubeflow.org/v1 (defaults)


@pytest.mark.parametrize("policy, expected", [
    ({}, (1, 1)),                                   # "minReplicas and maxReplicas to null"
    ({"maxReplicas": 1, "minReplicas": 1}, (1, 1)),  # "minReplicas and maxReplicas to 1"
    ({"maxReplicas": 1}, (1, 1)),                   # "minReplicas to null, maxRepliacs to 1"
    ({"minReplicas": 1}, (1, 1)),                   # "maxRepliacs to null, minReplicas to 1"
])
def test_set_elastic_policy_like_pytorch_defaults_test(policy, expected):
    """pytorch_defaults_test.go: TestSetElasticPolicy."""
    j = job(elasticPolicy=policy, pytorchReplicaSpecs={"Worker": rspec(1)})
    ep = op.defaulted(j)["spec"]["elasticPolicy"]
    assert (ep["minReplicas"], ep["maxReplicas"]) == expected


def test_elastic_policy_without_replicas_takes_the_workers_count():
    j = op.defaulted(job(elasticPolicy={}, pytorchReplicaSpecs={"Worker": rspec(4)}))
    assert (j["spec"]["elasticPolicy"]["minReplicas"], j["spec"]["elasticPolicy"]["maxReplicas"]) == (4, 4)
    with pytest.raises(op.OperatorError, match="nil pointer"):
        op.defaulted(job(elasticPolicy={}, pytorchReplicaSpecs={"Master": rspec(1)}))


@pytest.mark.parametrize("elastic", [{"nProcPerNode": None}, None])
def test_default_nproc_per_node_like_pytorch_defaults_test(elastic):
    """pytorch_defaults_test.go: TestSetDefaultNprocPerNode (both cases: "auto")."""
    spec = {"pytorchReplicaSpecs": {"Worker": rspec(1)}}
    if elastic is not None:
        spec["elasticPolicy"] = {}
    assert op.defaulted(job(**spec))["spec"]["nprocPerNode"] == op.DEFAULT_NPROC_PER_NODE == "auto"
    # the deprecated elasticPolicy.nProcPerNode suppresses the default
    j = op.defaulted(job(elasticPolicy={"nProcPerNode": 2}, pytorchReplicaSpecs={"Worker": rspec(1)}))
    assert "nprocPerNode" not in j["spec"]


def test_set_defaults_pytorchjob():
    """SetDefaults_PyTorchJob: cleanPodPolicy None, camel-cased types, 1 replica, OnFailure, port 23456."""
    j = op.defaulted(job(pytorchReplicaSpecs={"master": rspec(containers=[container(ports=[])]),
                                              "WORKER": rspec(3, containers=[container("sidecar"), container()])}))
    assert j["spec"]["runPolicy"]["cleanPodPolicy"] == "None"
    assert set(j["spec"]["pytorchReplicaSpecs"]) == {"Master", "Worker"}
    master = j["spec"]["pytorchReplicaSpecs"]["Master"]
    assert master["replicas"] == 1 and master["restartPolicy"] == "OnFailure"
    assert master["template"]["spec"]["containers"][0]["ports"] == [{"name": "pytorchjob-port", "containerPort": 23456}]
    worker = j["spec"]["pytorchReplicaSpecs"]["Worker"]
    assert "ports" not in worker["template"]["spec"]["containers"][0]  # the port goes to "pytorch", not index 0
    assert worker["template"]["spec"]["containers"][1]["ports"][0]["containerPort"] == 23456
    # an existing pytorchjob-port is kept, the input is not modified
    j0 = job(pytorchReplicaSpecs={"Master": rspec(1, [container(ports=copy.deepcopy(PORT_8080))], "ExitCode")})
    j1 = op.defaulted(j0)
    assert j1["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["ports"] == PORT_8080
    assert j1["spec"]["pytorchReplicaSpecs"]["Master"]["restartPolicy"] == "ExitCode"
    assert "runPolicy" not in j0["spec"]


# ------------------------------------------------------------------ pkg/webhooks/pytorch


VALID = {"Master": rspec(1, [container(image="gcr.io/kubeflow-ci/pytorch-dist-mnist_test:1.0")]),
         "Worker": rspec(1, [container(image="gcr.io/kubeflow-ci/pytorch-dist-mnist_test:1.0")])}


@pytest.mark.parametrize("name, j, want", [
    ("valid PyTorchJob", job(pytorchReplicaSpecs=VALID), []),
    ("pytorchJob name does not meet DNS1035", job(name="0-test", pytorchReplicaSpecs=VALID),
     [("Invalid", "metadata.name")]),
    ("no containers", job(pytorchReplicaSpecs={"Worker": rspec(containers=[])}),
     [("Required", "spec.pytorchReplicaSpecs[Worker].template.spec.containers")] * 2),
    ("image is empty", job(pytorchReplicaSpecs={"Worker": rspec(containers=[container(image="")])}),
     [("Required", "spec.pytorchReplicaSpecs[Worker].template.spec.containers[0].image")]),
    ("pytorchJob default container name doesn't present",
     job(pytorchReplicaSpecs={"Worker": rspec(containers=[container(name="")])}),
     [("Required", "spec.pytorchReplicaSpecs[Worker].template.spec.containers")]),
    ("the number of replicas in masterReplica is other than 1", job(pytorchReplicaSpecs={"Master": rspec(2)}),
     [("Forbidden", "spec.pytorchReplicaSpecs[Master].replicas")]),
    ("Spec.ElasticPolicy.NProcPerNode are set", job(elasticPolicy={"nProcPerNode": 1}, pytorchReplicaSpecs={"Master": rspec(1)}), []),
    ("Spec.NprocPerNode and Spec.ElasticPolicy.NProcPerNode are set",
     job(nprocPerNode="1", elasticPolicy={"nProcPerNode": 1}, pytorchReplicaSpecs={"Master": rspec(1)}),
     [("Forbidden", "spec.elasticPolicy.nProcPerNode")]),
])
def test_webhook_like_pytorchjob_webhook_test(name, j, want):
    """pkg/webhooks/pytorch/pytorchjob_webhook_test.go: TestValidateV1PyTorchJob (compares type and field,
    ignoring detail and bad value, as the Go test does)."""
    assert [(e.type, e.field) for e in op.validation_errors(j)] == want


def test_webhook_messages():
    assert op.validate(job(name="0-test", pytorchReplicaSpecs=VALID)) == [
        'metadata.name: Invalid value: "0-test": should match: a DNS-1035 label must consist of lower case alphanumeric '
        "characters or '-', start with an alphabetic character, and end with an alphanumeric character (e.g. 'my-name',  "
        "or 'abc-123', regex used for validation is '[a-z]([-a-z0-9]*[a-z0-9])?')"]
    assert op.validate(job(pytorchReplicaSpecs={"Master": rspec()})) == [
        "spec.pytorchReplicaSpecs[Master].replicas: Forbidden: must be 1"]  # no defaulting before the webhook
    assert op.validate(job(pytorchReplicaSpecs={"Chief": rspec(1)})) == [
        'spec.pytorchReplicaSpecs[Chief]: Unsupported value: "Chief": supported values: "Master", "Worker"']
    assert op.webhook_denial(job(pytorchReplicaSpecs={"Worker": rspec(containers=[])})) == (
        'admission webhook "validator.pytorchjob.training-operator.kubeflow.org" denied the request: '
        "[spec.pytorchReplicaSpecs[Worker].template.spec.containers: Required value: must be specified, "
        "spec.pytorchReplicaSpecs[Worker].template.spec.containers: Required value: must have at least one container "
        "with name pytorch]")
    assert op.webhook_denial(job(pytorchReplicaSpecs=VALID)) is None
    assert op.webhook_warnings(job(elasticPolicy={"nProcPerNode": 1}, pytorchReplicaSpecs=VALID)) == [
        "spec.elasticPolicy.nProcPerNode is deprecated, use spec.nprocPerNode instead"]


# ------------------------------------------------------------ pkg/controller.v1/pytorch


def test_elastic_generate_like_elastic_test():
    """pkg/controller.v1/pytorch/elastic_test.go: TestElasticGenerate."""
    assert op.elastic_env(job(pytorchReplicaSpecs={"Worker": {"replicas": 1}})) is None
    j = job(elasticPolicy={"minReplicas": 1, "maxReplicas": 3, "rdzvBackend": "c10d", "rdzvPort": 1234,
                           "rdzvHost": "localhost", "rdzvId": "rdzv-id", "maxRestarts": 3,
                           "rdzvConf": [{"key": "rdzv-conf-name", "value": "rdzv-conf-value"},
                                        {"key": "rdzv-conf-name-1", "value": "rdzv-conf-value-1"}]},
            pytorchReplicaSpecs={"Worker": {"replicas": 1}})
    got = op.elastic_env(j)
    want = [("PET_MAX_RESTARTS", "3"), ("PET_RDZV_BACKEND", "c10d"), ("PET_RDZV_ENDPOINT", "localhost:1234"),
            ("PET_RDZV_ID", "rdzv-id"), ("PET_RDZV_CONF", "rdzv-conf-name=rdzv-conf-value,rdzv-conf-name-1=rdzv-conf-value-1"),
            ("PET_NNODES", "1:3")]
    assert sorted((e["name"], e["value"]) for e in got) == sorted(want)  # gomega.ConsistOf: any order


def test_elastic_errors():
    """elastic.go: generateEnvNnodes ("cannot find the worker spec"), getPortFromPyTorchJob ("port not found")."""
    no_worker = job(elasticPolicy={"rdzvPort": 1}, pytorchReplicaSpecs={"Master": rspec(1)})
    with pytest.raises(op.OperatorError, match="^cannot find the worker spec$"):
        op.elastic_env(no_worker)
    no_port = job(elasticPolicy={"minReplicas": 1, "maxReplicas": 1}, pytorchReplicaSpecs={"Worker": rspec(1)})
    with pytest.raises(op.OperatorError, match="^port not found$"):
        op.elastic_env(no_port)  # not defaulted: no pytorchjob-port yet
    assert op.elastic_env(op.defaulted(no_port))[0] == {"name": "PET_RDZV_ENDPOINT", "value": "test-worker-0:23456"}
    # a Master-only job with an elasticPolicy: the operator has no Worker to read the port from
    with pytest.raises(op.OperatorError, match="no Worker spec"):
        op.pods_for(job(elasticPolicy={"minReplicas": 1, "maxReplicas": 1}, pytorchReplicaSpecs={"Master": rspec(1)}))


def test_init_container_like_initcontainer_test():
    """pkg/controller.v1/pytorch/initcontainer_test.go: TestInitContainer: Worker without Master: none;
    Worker with Master: one; Master: none."""
    worker_only = job(pytorchReplicaSpecs={"Worker": {"replicas": 1}})
    both = job(pytorchReplicaSpecs={"Worker": {"replicas": 1}, "Master": {"replicas": 1}})
    assert len(op.init_containers(worker_only, "worker")) == 0
    assert len(op.init_containers(both, "worker")) == 1
    assert len(op.init_containers(both, "master")) == 0


def test_default_init_container_is_the_operators():
    (c,) = op.init_containers(job(name="llmpipe-pretrain", pytorchReplicaSpecs={"Master": {}, "Worker": {}}), "worker")
    assert c == {
        "name": "init-pytorch", "image": "alpine:3.10", "imagePullPolicy": "IfNotPresent",
        "resources": {"limits": {"cpu": "100m", "memory": "20Mi"}, "requests": {"cpu": "50m", "memory": "10Mi"}},
        "command": ["sh", "-c", "err=1;for i in $(seq 100); do if nslookup llmpipe-pretrain-master-0; then err=0 && break; "
                                "fi;echo waiting for master; sleep 2; done; exit $err"]}
    assert "securityContext" not in c  # what Pod Security "restricted" refuses
    assert op.INIT_TEMPLATE_FILE_DEFAULT == "/etc/config/initContainer.yaml"
    assert op.template_from_file("/nonexistent/initContainer.yaml") == op.DEFAULT_INIT_TEMPLATE


def test_init_template_execution():
    """initcontainer.go: GetInitContainer: html/template values, escaped in text context; sigs.k8s.io/yaml
    drops unknown fields."""
    t = "- name: x\n  image: {{ .InitContainerImage }}\n  args: ['{{.MaxTries}}', '{{.MasterAddr}}']\n  securityContex: {}\n"
    assert op.parse_init_containers(op.execute_init_template(t, "a-master-0", "reg:5000/img@sha256:ab", 7)) == [
        {"name": "x", "image": "reg:5000/img@sha256:ab", "args": ["7", "a-master-0"]}]
    assert op.execute_init_template("{{.MasterAddr}}", "a&b'c") == "a&amp;b&#39;c"
    with pytest.raises(op.OperatorError, match="can't evaluate field Nope"):
        op.execute_init_template("{{.Nope}}", "m")
    with pytest.raises(op.OperatorError, match="not modelled"):
        op.execute_init_template("{{if .MasterAddr}}x{{end}}", "m")
    with pytest.raises(op.OperatorError, match="cannot unmarshal"):
        op.parse_init_containers(op.execute_init_template("name: x", "m"))


def test_master_and_worker_pods_like_pytorchjob_controller_test():
    """pytorchjob_controller_test.go: "Should get the corresponding resources successfully": a Master
    and 2 Workers on port 8080, nprocPerNode nil: master-0's port and env (MASTER_PORT = the Service's
    port, MASTER_ADDR = the Service's name, PET_NPROC_PER_NODE = auto), owner reference, Service port."""
    j = job(name="test-job", pytorchReplicaSpecs={"Master": rspec(1, [container(ports=PORT_8080)]),
                                                 "Worker": rspec(2, [container(ports=PORT_8080)])})
    pods = {p["metadata"]["name"]: p for p in op.pods_for(j)}
    assert list(pods) == ["test-job-master-0", "test-job-worker-0", "test-job-worker-1"]
    services = {s["metadata"]["name"]: s for s in op.services_for(j)}
    assert list(services) == list(pods)
    master, svc = pods["test-job-master-0"], services["test-job-master-0"]
    assert {"name": "pytorchjob-port", "containerPort": 8080, "protocol": "TCP"} in master["spec"]["containers"][0]["ports"]
    e = env(master)
    assert e["MASTER_PORT"] == str(svc["spec"]["ports"][0]["port"]) == "8080"
    assert e["MASTER_ADDR"] == svc["metadata"]["name"]
    assert e["PET_NPROC_PER_NODE"] == "auto"
    assert svc["spec"]["ports"][0]["port"] == 8080
    ref = {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "name": "test-job", "uid": "uid-1",
           "controller": True, "blockOwnerDeletion": True}
    assert ref in master["metadata"]["ownerReferences"] and ref in svc["metadata"]["ownerReferences"]


def test_pod_env_labels_and_restart_policy():
    """envvar.go: setPodEnv (all variables, order, every container), common/pod.go: createNewPod (labels),
    core/pod.go: SetRestartPolicy."""
    j = job(name="llmpipe-pretrain", nprocPerNode="8",
            pytorchReplicaSpecs={"Master": rspec(1, [container(), container("sidecar")], "ExitCode"),
                                 "Worker": rspec(3, None, "ExitCode")})
    j["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["metadata"] = {"labels": {"app": "x"}, "annotations": {"a": "b"}}
    pods = op.pods_for(j)
    assert [p["metadata"]["name"] for p in pods] == ["llmpipe-pretrain-master-0"] + [f"llmpipe-pretrain-worker-{i}" for i in range(3)]
    w2 = pods[3]
    assert [(e["name"], e["value"]) for e in w2["spec"]["containers"][0]["env"]] == [
        ("PYTHONUNBUFFERED", "1"), ("MASTER_PORT", "23456"), ("PET_MASTER_PORT", "23456"),
        ("MASTER_ADDR", "llmpipe-pretrain-master-0"), ("PET_MASTER_ADDR", "llmpipe-pretrain-master-0"),
        ("WORLD_SIZE", "32"), ("RANK", "3"), ("PET_NODE_RANK", "3"), ("PET_NPROC_PER_NODE", "8"), ("PET_NNODES", "4")]
    assert env(pods[0], 1)["RANK"] == "0" == env(pods[0])["PET_NODE_RANK"]  # every container gets them
    assert w2["metadata"]["labels"] == {
        "app": "x", "training.kubeflow.org/operator-name": "pytorchjob-controller",
        "training.kubeflow.org/job-name": "llmpipe-pretrain", "training.kubeflow.org/replica-type": "worker",
        "training.kubeflow.org/replica-index": "2"}
    assert w2["metadata"]["annotations"] == {"a": "b"} and w2["metadata"]["namespace"] == "ns"
    assert pods[0]["metadata"]["labels"]["training.kubeflow.org/job-role"] == "master"
    assert all(p["spec"]["restartPolicy"] == "Never" for p in pods)
    assert [len(p["spec"].get("initContainers", [])) for p in pods] == [0, 1, 1, 1]
    # nprocPerNode "auto": WORLD_SIZE counts one process per pod
    assert env(op.pods_for(dict(j, spec=dict(j["spec"], nprocPerNode="auto")))[1])["WORLD_SIZE"] == "4"


def test_worker_only_job():
    """No Master: no MASTER_*, RANK or init container; Worker 0 gets job-role=master (IsMasterRole)."""
    pods = op.pods_for(job(pytorchReplicaSpecs={"Worker": rspec(2)}))
    assert [p["metadata"]["labels"].get("training.kubeflow.org/job-role") for p in pods] == ["master", None]
    assert set(env(pods[1])) == {"PYTHONUNBUFFERED", "PET_NPROC_PER_NODE", "PET_NNODES"}
    assert all("initContainers" not in p["spec"] for p in pods)
    assert all(p["spec"]["restartPolicy"] == "OnFailure" for p in pods)  # the default restart policy


def test_elastic_worker_pods_like_pytorchjob_controller_test():
    """pytorchjob_controller_test.go: elastic "Should get the corresponding resources successfully": one
    Worker, min 1 max 3, c10d, maxRestarts 3, port 8080: worker-0's env and its Service's port."""
    j = job(name="test-job", elasticPolicy={"rdzvBackend": "c10d", "minReplicas": 1, "maxReplicas": 3, "maxRestarts": 3},
            pytorchReplicaSpecs={"Worker": rspec(1, [container(ports=PORT_8080)])})
    (pod,) = op.pods_for(j)
    (svc,) = op.services_for(j)
    e = env(pod)
    assert e["PET_RDZV_BACKEND"] == "c10d" and e["PET_NNODES"] == "1:3" and e["PET_MAX_RESTARTS"] == "3"
    assert e["PET_RDZV_ENDPOINT"] == f"{svc['metadata']['name']}:8080"
    assert svc["spec"]["ports"][0]["port"] == 8080
    assert "MASTER_ADDR" not in e and "initContainers" not in pod["spec"]


def test_services_are_headless_one_per_pod():
    """common/service.go: CreateNewService: clusterIP None, selector = the pod's operator labels."""
    j = job(name="j", pytorchReplicaSpecs={"Master": rspec(1, [container(ports=[{"name": "pytorchjob-port", "containerPort": 1},
                                                                                {"name": "metrics", "containerPort": 2}])]),
                                           "Worker": rspec(2)})
    pods, services = op.pods_for(j), op.services_for(j)
    assert [s["metadata"]["name"] for s in services] == [p["metadata"]["name"] for p in pods]
    for pod, svc in zip(pods, services):
        assert svc["spec"]["clusterIP"] == "None"
        assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
        assert op.JOB_ROLE_LABEL not in svc["spec"]["selector"]
    assert services[0]["spec"]["ports"] == [{"name": "metrics", "port": 2}, {"name": "pytorchjob-port", "port": 1}]


def test_failed_create_pod_event():
    """control/pod_control.go: createPods records "Error creating: <the API server's error>"."""
    assert op.failed_create_pod_event('pods "x" is forbidden: nope') == (
        "Warning", "FailedCreatePod", 'Error creating: pods "x" is forbidden: nope')


# --------------------------------------------------------- restarts, backoff, clean-up, status


@pytest.mark.parametrize("code, retryable", [(1, False), (2, False), (3, False), (130, True), (138, True)])
def test_is_retryable_exit_code_like_train_util_test(code, retryable):
    """pkg/util/train/train_util_test.go: TestIsRetryableExitCode."""
    assert op.is_retryable_exit_code(code) is retryable


@pytest.mark.parametrize("policy, pod_policy", [("ExitCode", "Never"), ("Never", "Never"), ("Always", "Always"),
                                                ("OnFailure", "OnFailure")])
def test_set_restart_policy_like_pod_test(policy, pod_policy):
    """pkg/controller.v1/common/pod_test.go: TestSetRestartPolicy."""
    assert op.pod_restart_policy(policy) == pod_policy


@pytest.mark.parametrize("policy, code, action", [
    ("ExitCode", 1, "fail"), ("ExitCode", 2, "fail"), ("ExitCode", 127, "fail"),
    ("ExitCode", 128, "restart"), ("ExitCode", 137, "restart"), ("ExitCode", 143, "restart"),
    ("ExitCode", None, "restart"),          # 0xbeef: the pytorch container never terminated
    ("OnFailure", 1, "restart"), ("Always", 0, "restart"),
    ("Never", 1, "fail"), ("Never", 137, "fail"),
])
def test_restart_action(policy, code, action):
    """common/pod.go: ReconcilePods; Never via pytorchjob_controller.go: UpdateJobStatus."""
    assert op.restart_action(policy, code) == action


def test_exit_code_failures_like_tensorflow_pod_test():
    """pkg/controller.v1/tensorflow/pod_test.go "Test Exit Code" (130: pod deleted) and "Test Unretryable
    Exit Code" (1: Failed, `job "<name>" is failing because "Worker" replica(s) failed.`), same
    ReconcilePods code path for PyTorchJobs."""
    j = op.defaulted(job(name="test-exit-code", pytorchReplicaSpecs={"Worker": rspec(1, restart="ExitCode")}))
    status: dict = {}
    assert op.reconcile_failed_pod(j, status, "Worker", 130) == "restart"
    assert status["conditions"][-1]["type"] == "Restarting"
    status = {}
    assert op.reconcile_failed_pod(j, status, "Worker", 1) == "fail"
    assert status["conditions"] == [{"type": "Failed", "status": "True", "reason": "PyTorchJobFailed",
                                     "message": 'job "test-exit-code" is failing because "Worker" replica(s) failed.'}]
    # once Failed, nothing else is recorded (setCondition), e.g. UpdateJobStatus' Restarting
    status["replicaStatuses"] = {"Worker": {"failed": 1}}
    op.update_job_status(j, status)
    assert [c["type"] for c in status["conditions"]] == ["Failed"]


def _pod(name, phase, rtype="test", restarts=()):
    p = {"metadata": {"name": name, "labels": {op.REPLICA_TYPE_LABEL: rtype}}, "status": {"phase": phase}}
    if restarts:
        p["status"]["containerStatuses"] = [{"restartCount": r} for r in restarts]
    return p


def test_past_backoff_limit_like_job_test():
    """pkg/controller.v1/common/job_test.go: TestPastBackoffLimit."""
    pods = [_pod("runningPod", "Running"), _pod("succeededPod", "Succeeded"),
            _pod("runningPodWithBackoff", "Running", restarts=(3,))]
    replicas = {"test": {"restartPolicy": "OnFailure"}}
    assert op.past_backoff_limit(0, replicas, pods[:2]) is False
    assert op.past_backoff_limit(3, replicas, pods) is True


def test_backoff_limit_never_trips_with_exit_code():
    """core/job.go: PastBackoffLimit counts container restarts of Running pods only: an ExitCode replica's
    pods (restartPolicy Never) fail and are recreated, never restarted in place."""
    replicas = {"Worker": {"restartPolicy": "ExitCode"}}
    failed = [_pod(f"w{i}", "Failed", "worker") for i in range(10)]
    assert op.past_backoff_limit(2, replicas, failed) is False
    assert op.past_backoff_limit(2, {"Worker": {"restartPolicy": "Never"}},
                                 [_pod("w", "Running", "worker", restarts=(5,))]) is False


@pytest.mark.parametrize("policy, condition, kept", [
    ("Running", "Succeeded", ["succeededPod"]),   # "Succeeded job and cleanPodPolicy is Running"
    ("Running", "Suspended", []),                 # "Suspended job and cleanPodPolicy is Running"
    ("All", "Succeeded", []),                     # "Finished job and cleanPodPolicy is All"
    ("None", "Failed", ["runningPod", "succeededPod"]),  # "Finished job and cleanPodPolicy is None"
    ("None", "Suspended", []),                    # "Suspended job and cleanPodPolicy is None"
])
def test_delete_pods_and_services_like_job_test(policy, condition, kept):
    """pkg/controller.v1/common/job_test.go: TestDeletePodsAndServices."""
    pods = [_pod("runningPod", "Running"), _pod("succeededPod", "Succeeded")]
    status = {"conditions": [{"type": condition, "status": "True"}]}
    deleted = op.pods_to_delete(policy, status, pods)
    assert [p["metadata"]["name"] for p in pods if p["metadata"]["name"] not in deleted] == kept


def test_update_job_conditions_like_status_test():
    """pkg/util/status_test.go: TestUpdateJobConditions."""
    st: dict = {}
    op.update_job_conditions(st, "Created", "True", "Job Created", "Job Created")
    assert st["conditions"][0]["type"] == "Created"
    op.update_job_conditions(st, "Running", "True", "Job Running", "Job Running")
    assert st["conditions"][1]["type"] == "Running"
    op.update_job_conditions(st, "Restarting", "True", "Job Restarting", "Job Restarting")
    assert st["conditions"][1]["type"] == "Restarting" and len(st["conditions"]) == 2
    op.update_job_conditions(st, "Running", "True", "Job Running", "Job Running")
    assert st["conditions"][1]["type"] == "Running" and len(st["conditions"]) == 2
    op.update_job_conditions(st, "Failed", "True", "Job Failed", "Job Failed")
    assert st["conditions"][1] == {"type": "Running", "status": "False", "reason": "Job Running", "message": "Job Running"}
    assert st["conditions"][2]["type"] == "Failed"
    op.update_job_conditions(st, "Succeeded", "True", "x", "x")  # nothing after Failed
    assert len(st["conditions"]) == 3


def test_update_job_status():
    """pytorchjob_controller.go: UpdateJobStatus: Running with the Master active, Succeeded when the Master
    has (Workers not waited for); without a Master, when all Workers have."""
    j = op.defaulted(job(name="t", pytorchReplicaSpecs={"Master": rspec(1, restart="ExitCode"), "Worker": rspec(3, restart="ExitCode")}))
    st = {"replicaStatuses": {"Master": {"active": 1}, "Worker": {"active": 3}}}
    op.update_job_status(j, st)
    assert [(c["type"], c["status"], c["message"]) for c in st["conditions"]] == [("Running", "True", "PyTorchJob t is running.")]
    st["replicaStatuses"] = {"Master": {"succeeded": 1}, "Worker": {"active": 2}}
    op.update_job_status(j, st)
    assert [(c["type"], c["status"]) for c in st["conditions"]] == [("Running", "False"), ("Succeeded", "True")]
    # a Worker that failed with a retryable code while the rest run: Restarting replaces Running
    st = {"replicaStatuses": {"Master": {"active": 1}, "Worker": {"active": 2, "failed": 1}}}
    op.update_job_status(j, st)
    assert [c["type"] for c in st["conditions"]] == ["Restarting"]
    assert st["conditions"][0]["message"] == "PyTorchJob t is restarting because 1 Worker replica(s) failed."
    never = op.defaulted(job(name="t", pytorchReplicaSpecs={"Master": rspec(1, restart="Never")}))
    st = {"replicaStatuses": {"Master": {"failed": 1}}}
    op.update_job_status(never, st)
    assert st["conditions"][-1]["type"] == "Failed"
    workers = op.defaulted(job(name="w", namespace="ns", pytorchReplicaSpecs={"Worker": rspec(2)}))
    st = {"replicaStatuses": {"Worker": {"succeeded": 2}}}
    op.update_job_status(workers, st)
    assert st["conditions"][-1]["message"] == "PyTorchJob ns/w successfully completed."


def test_templates_are_yaml_only_once_executed():
    """{{.InitContainerImage}} is a YAML flow mapping before execution: the file is a Go template, not YAML."""
    with pytest.raises(yaml.YAMLError):
        yaml.safe_load(op.DEFAULT_INIT_TEMPLATE)
    assert yaml.safe_load(op.execute_init_template(op.DEFAULT_INIT_TEMPLATE, "m"))[0]["name"] == "init-pytorch"
