"""Production GPU clusters (issue 17): the pod-spec fields of a real cluster, the interconnect profiles (RDMA for
NCCL over InfiniBand / RoCE), and gang scheduling with Kueue or Volcano.

Everything is rendered with the real helm binary and validated offline: core kinds with kubernetes-validate
(tests/helm/chart.py), the PyTorchJob against the training operator v1.8.1 CRD schema, and the Kueue and Volcano
objects against schemas generated from their projects' CRDs (tests/helm/schemas/README.md) with the same
generator as the PyTorchJob one. Pod Security is judged by tests/k8s/podsecurity.py (the admission plugin's
checks, v1.33) on the pods the training operator would create (tests/k8s/operator.py).
"""

from __future__ import annotations

import copy
import json
import shlex
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path

import pytest
import yaml

from tests.helm.chart import CHART, REPO, SCHEMAS, helm_run, kubectl, one, pod_templates, render, render_error, validate, workloads

CLUSTER = REPO / "jobs" / "cluster"
PROFILES = CLUSTER / "values" / "profiles"
K8S = REPO / "k8s"
NAMESPACE = "llm-pipeline"

SCHEMA_FILES = {
    ("kueue.x-k8s.io/v1beta2", "ResourceFlavor"): "resourceflavor-kueue.x-k8s.io-v1beta2.json",
    ("kueue.x-k8s.io/v1beta2", "ClusterQueue"): "clusterqueue-kueue.x-k8s.io-v1beta2.json",
    ("kueue.x-k8s.io/v1beta2", "LocalQueue"): "localqueue-kueue.x-k8s.io-v1beta2.json",
    ("scheduling.volcano.sh/v1beta1", "PodGroup"): "podgroup-scheduling.volcano.sh-v1beta1.json",
    ("scheduling.volcano.sh/v1beta1", "Queue"): "queue-scheduling.volcano.sh-v1beta1.json",
}


@lru_cache(maxsize=None)
def _crd_validator(name: str):
    import jsonschema

    return jsonschema.Draft202012Validator(json.loads((SCHEMAS / name).read_text()))


def validate_cr(obj: dict) -> None:
    """Raise on a Kueue / Volcano object its CRD would refuse (or a misspelt field); anything else: validate()."""
    name = SCHEMA_FILES.get((obj.get("apiVersion"), obj.get("kind")))
    if name is None:
        validate(obj)
        return
    errors = sorted(_crd_validator(name).iter_errors(obj), key=lambda e: list(e.absolute_path))
    if errors:
        e = errors[0]
        raise ValueError(f"{obj['kind']} {obj['metadata'].get('name')} {'/'.join(map(str, e.absolute_path))}: {e.message}")


def cfg(stage: str) -> Path:
    return CLUSTER / f"{stage}.yaml"


def shape(stage: str) -> Path:
    return CLUSTER / "values" / f"{stage}.yaml"


def containers(tpl: dict) -> dict:
    return {c["name"]: c for c in tpl["spec"]["containers"]}


def main_container(tpl: dict) -> dict:
    cs = containers(tpl)
    return cs.get("llmpipe") or cs["pytorch"]


def env_of(tpl: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in main_container(tpl).get("env", [])}


# ------------------------------------------------------------------ schema completeness: the pod-spec fields

POD_SETS = (
    "runtimeClassName=nvidia",
    "schedulerName=volcano",
    "priorityClassName=llm-batch",
    "image.pullSecrets[0]=regcred",
    "topologySpreadConstraints[0].maxSkew=1",
    "topologySpreadConstraints[0].topologyKey=kubernetes.io/hostname",
    "topologySpreadConstraints[0].whenUnsatisfiable=DoNotSchedule",
    "extraEnvFrom[0].secretRef.name=hf-token",
    "extraEnvFrom[1].configMapRef.name=site-env",
    "extraEnvFrom[1].prefix=SITE_",
)

KINDS = [("collect", "single", ()), ("clean", "part", ()), ("clean", "merge", ()), ("pretrain", "train", ("nnodes=2",)),
         ("sft", "train", ("nnodes=2", "elasticPolicy.maxRestarts=2"))]


@pytest.fixture(scope="module")
def pod_field_renders() -> dict:
    out = {}
    for stage, _role, sets in KINDS:
        if stage not in out:
            out[stage] = render(stage, cfg(stage), *POD_SETS, *sets, "mlflow.secretName=mlflow-auth")
    return out


@pytest.mark.parametrize("stage,role,sets", KINDS, ids=[f"{s}-{r}{'-elastic' if len(x) > 1 else ''}" for s, r, x in KINDS])
def test_pod_spec_fields_reach_every_pod(pod_field_renders, stage, role, sets):
    """runtimeClassName, schedulerName, priorityClassName, imagePullSecrets, topologySpreadConstraints, envFrom in
    the Job, the Indexed Job (+ merge Job) and every PyTorchJob replica, and the objects still validate."""
    objs = pod_field_renders[stage]
    for o in objs:
        validate(o)
    wl = [o for o in workloads(objs) if o["metadata"]["labels"]["llmpipe.io/role"] == role]
    assert len(wl) == 1
    tpls = pod_templates(wl[0])
    assert tpls
    for replica, tpl in tpls:
        spec = tpl["spec"]
        assert spec["runtimeClassName"] == "nvidia", replica
        assert spec["schedulerName"] == "volcano", replica
        assert spec["priorityClassName"] == "llm-batch", replica
        assert spec["imagePullSecrets"] == [{"name": "regcred"}], replica
        assert spec["topologySpreadConstraints"] == [{
            "maxSkew": 1, "topologyKey": "kubernetes.io/hostname", "whenUnsatisfiable": "DoNotSchedule",
            # no labelSelector given: this workload's own pods
            "labelSelector": {"matchLabels": {"app.kubernetes.io/instance": f"llmpipe-{stage}", "llmpipe.io/role": role}},
        }], replica
        # the selector matches the pod's own labels, so the constraint spreads the workload's pods
        for k, v in spec["topologySpreadConstraints"][0]["labelSelector"]["matchLabels"].items():
            assert tpl["metadata"]["labels"][k] == v
        assert main_container(tpl)["envFrom"] == [
            {"secretRef": {"name": "mlflow-auth"}},
            {"secretRef": {"name": "hf-token"}},
            {"configMapRef": {"name": "site-env"}, "prefix": "SITE_"},
        ], replica


def test_defaults_render_none_of_the_new_fields():
    for stage, sets in (("collect", ()), ("pretrain", ("nnodes=2",))):
        for o in workloads(render(stage, cfg(stage), *sets)):
            for _replica, tpl in pod_templates(o):
                spec = tpl["spec"]
                for key in ("runtimeClassName", "schedulerName", "topologySpreadConstraints", "imagePullSecrets", "priorityClassName"):
                    assert key not in spec
                c = main_container(tpl)
                assert "envFrom" not in c
                assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
                assert "k8s.v1.cni.cncf.io/networks" not in tpl["metadata"].get("annotations", {})
        if stage == "pretrain":
            assert "schedulingPolicy" not in one(workloads(render(stage, cfg(stage), *sets)), "PyTorchJob")["spec"]["runPolicy"]


def test_topology_spread_keeps_a_given_selector(tmp_path):
    v = tmp_path / "v.yaml"
    v.write_text(yaml.safe_dump({"topologySpreadConstraints": [
        {"maxSkew": 2, "topologyKey": "topology.kubernetes.io/zone", "whenUnsatisfiable": "ScheduleAnyway",
         "labelSelector": {"matchLabels": {"llmpipe.io/stage": "pack"}}, "matchLabelKeys": ["batch.kubernetes.io/controller-uid"]}]}))
    objs = render("pack", cfg("pack"), values=[v])
    for o in objs:
        validate(o)
    for o in workloads(objs):
        (c,) = o["spec"]["template"]["spec"]["topologySpreadConstraints"]
        assert c["labelSelector"] == {"matchLabels": {"llmpipe.io/stage": "pack"}}
        assert c["matchLabelKeys"] == ["batch.kubernetes.io/controller-uid"]


def test_per_stage_pod_fields():
    """The new fields are stage values too (stages.<stage> overrides)."""
    objs = render("pretrain", cfg("pretrain"), "stages.pretrain.runtimeClassName=nvidia", "stages.collect.runtimeClassName=x",
                  "stages.pretrain.schedulingPolicy.queue=llm-training", "nnodes=2")
    pj = one(objs, "PyTorchJob")
    assert pj["spec"]["runPolicy"]["schedulingPolicy"] == {"minAvailable": 2, "queue": "llm-training"}
    assert all(t["spec"]["runtimeClassName"] == "nvidia" for _r, t in pod_templates(pj))


@pytest.mark.parametrize("where", ["restartPolicy=Always", "stages.pretrain.restartPolicy=Always"])
def test_restart_policy_always_is_refused(where):
    """A replica restarted after it succeeded (Always) would keep the PyTorchJob from ever finishing."""
    err = render_error("pretrain", cfg("pretrain"), where)
    # helm: "- at '/restartPolicy': value must be one of 'ExitCode', 'OnFailure', 'Never'"
    assert "values don't meet the specifications of the schema" in err, err
    path = "/stages/pretrain/restartPolicy" if where.startswith("stages.") else "/restartPolicy"
    assert f"at '{path}': value must be one of 'ExitCode', 'OnFailure', 'Never'" in err, err


@pytest.mark.parametrize("policy", ["ExitCode", "OnFailure", "Never"])
def test_restart_policies_a_pytorchjob_can_finish_with(policy):
    objs = render("pretrain", cfg("pretrain"), f"restartPolicy={policy}", "nnodes=2")
    pj = one(objs, "PyTorchJob")
    validate(pj)
    assert {s["restartPolicy"] for s in pj["spec"]["pytorchReplicaSpecs"].values()} == {policy}
    # Job pods keep Never whatever the PyTorchJob replicas use (podFailurePolicy requires it)
    for o in workloads(render("clean", cfg("clean"), f"restartPolicy={policy}")):
        assert o["spec"]["template"]["spec"]["restartPolicy"] == "Never"


@pytest.mark.parametrize("bad,what", [
    ("extraEnvFrom[0].prefix=X", "extraEnvFrom"),                 # neither secretRef nor configMapRef
    ("extraEnvFrom[0].secretRef.key=x", "extraEnvFrom"),          # not an EnvFromSource field
    ("runtimeClassName=Nvidia_Runtime", "runtimeClassName"),
    ("topologySpreadConstraints[0].maxSkew=1", "topologySpreadConstraints"),  # no topologyKey / whenUnsatisfiable
    ("schedulingPolicy.minMember=2", "schedulingPolicy"),         # the PodGroup's name, not the PyTorchJob's
    ("interconnect.ncclEnv.IB_HCA=mlx5", "interconnect"),         # only NCCL_* names
    ("interconnect.resources.rdma/ib=0", "interconnect"),
])
def test_schema_refuses(bad, what):
    err = render_error("pretrain", cfg("pretrain"), bad)
    assert what in err, err


# ------------------------------------------------------------------ interconnect: the RDMA profiles

@lru_cache(maxsize=None)
def render_profile(profile: str, stage: str = "pretrain", *sets: str) -> list[dict]:
    return render(stage, cfg(stage), *sets, values=[shape(stage), PROFILES / f"{profile}.yaml"])


@pytest.mark.parametrize("profile", ["infiniband", "roce"])
def test_profile_renders_rdma_for_every_training_pod(profile):
    prof = yaml.safe_load((PROFILES / f"{profile}.yaml").read_text())["interconnect"]
    objs = render_profile(profile)
    for o in objs:
        validate(o)
    pj = one(objs, "PyTorchJob")
    reps = pod_templates(pj)
    assert sum(pj["spec"]["pytorchReplicaSpecs"][r]["replicas"] for r, _ in reps) == 8  # the pretrain shape
    for replica, tpl in reps:
        c = main_container(tpl)
        for name, n in prof["resources"].items():
            assert c["resources"]["requests"][name] == n and c["resources"]["limits"][name] == n, replica
        # the GPUs and the shape's own requests are still there
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 8
        assert c["resources"]["requests"]["memory"] == "1000Gi"
        assert c["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["IPC_LOCK"]}
        assert c["securityContext"]["allowPrivilegeEscalation"] is False and c["securityContext"]["privileged"] is False
        assert tpl["metadata"]["annotations"]["k8s.v1.cni.cncf.io/networks"] == ",".join(prof["networks"])
        env = env_of(tpl)
        for k, v in prof["ncclEnv"].items():
            assert env[k] == str(v), (replica, k)
        for k in ("NCCL_IB_HCA", "NCCL_SOCKET_IFNAME", "NCCL_DEBUG", "NCCL_IB_DISABLE"):
            assert k in env
    if profile == "roce":
        assert env_of(reps[0][1])["NCCL_IB_GID_INDEX"] == "3"


def test_profile_leaves_data_stages_alone():
    """Data stages use no NCCL: the profile applied to every stage (make deploy-pipeline VALUES=...) adds nothing
    to their pods, so they stay "restricted" and ask for no RDMA device."""
    plain = render("clean", cfg("clean"), values=[shape("clean")])
    prof = render_profile("infiniband", "clean")
    assert len(workloads(plain)) == len(workloads(prof)) == 2
    for a, b in zip(workloads(plain), workloads(prof)):
        ta, tb = a["spec"]["template"], b["spec"]["template"]
        assert ta["spec"]["containers"] == tb["spec"]["containers"]
        assert ta["metadata"]["annotations"] == tb["metadata"]["annotations"]


def test_extra_env_wins_over_the_profiles_nccl_env(tmp_path):
    v = tmp_path / "site.yaml"
    v.write_text(yaml.safe_dump({"extraEnv": [{"name": "NCCL_IB_HCA", "value": "mlx5_0,mlx5_3"}],
                                 "interconnect": {"ipcLock": False, "networks": []}}))
    objs = render("pretrain", cfg("pretrain"), "nnodes=2", values=[PROFILES / "infiniband.yaml", v])
    for _r, tpl in pod_templates(one(objs, "PyTorchJob")):
        names = [e["name"] for e in main_container(tpl)["env"]]
        assert names.count("NCCL_IB_HCA") == 1
        assert env_of(tpl)["NCCL_IB_HCA"] == "mlx5_0,mlx5_3"
        assert main_container(tpl)["securityContext"]["capabilities"] == {"drop": ["ALL"]}
        assert "k8s.v1.cni.cncf.io/networks" not in tpl["metadata"]["annotations"]


def _operator_pods(pj: dict) -> list[dict]:
    from tests.k8s import operator as op

    cm = yaml.safe_load((K8S / "training-operator" / "restricted-pytorch-init-container.yaml").read_text())
    job = copy.deepcopy(pj)
    job["metadata"].setdefault("namespace", NAMESPACE)
    job["metadata"].setdefault("uid", "6f1c1d8e-0000-4000-8000-000000000017")
    return op.pods_for(job, init_template=cm["data"]["initContainer.yaml"])


def test_interconnect_namespace_admits_the_profile_and_restricted_does_not():
    """IPC_LOCK is beyond "restricted" and "baseline" (check_capabilities_*.go): the profile's pods are refused in
    k8s/namespace.yaml's namespace and admitted in k8s/interconnect/namespace.yaml's, which enforces
    "privileged" and keeps warn/audit at "restricted"; the only finding is the capability."""
    from tests.k8s import podsecurity as ps

    restricted = yaml.safe_load((K8S / "namespace.yaml").read_text())
    rdma = yaml.safe_load((K8S / "interconnect" / "namespace.yaml").read_text())
    assert rdma["metadata"]["name"] == restricted["metadata"]["name"] == NAMESPACE
    policy = ps.namespace_policy(rdma)
    assert policy.enforce == ("privileged", "v1.33")
    assert policy.warn == policy.audit == ("restricted", "v1.33")

    pods = _operator_pods(one(render_profile("infiniband", "pretrain", "nnodes=2"), "PyTorchJob"))
    assert len(pods) == 2 and any(p["spec"].get("initContainers") for p in pods)
    for p in pods:
        allowed, message, _ = ps.admit_pod(p, restricted)
        assert not allowed and "IPC_LOCK" in message and "capabilities" in message, message
        assert ps.rejection_message(p, "baseline", "v1.33") and "IPC_LOCK" in ps.rejection_message(p, "baseline", "v1.33")
        allowed, message, warnings = ps.admit_pod(p, rdma)
        assert allowed, message
        # beyond "restricted" only by the capability: the warning names nothing else
        (w,) = warnings
        assert w.startswith('would violate PodSecurity "restricted:v1.33": unrestricted capabilities'), w
        assert w.count(";") == 0 and "IPC_LOCK" in w, w
        # without IPC_LOCK the pods are "restricted" again
        q = copy.deepcopy(p)
        for c in q["spec"]["containers"]:
            c["securityContext"]["capabilities"].pop("add", None)
        assert ps.admit_pod(q, restricted)[0]


# ------------------------------------------------------------------ gang scheduling: Volcano via the operator

def volcano_podgroup(pj: dict) -> dict:
    """The PodGroup the training operator v1.8.1 makes for a PyTorchJob when started with
    --gang-scheduler-name=volcano: pkg/controller.v1/common/job.go ReconcileJobs (minMember = minAvailable, else
    every replica; queue "default" unless schedulingPolicy.queue; priorityClassName = priorityClass; minResources
    = schedulingPolicy.minResources, else calcPGMinResources), named after the job
    (control/podgroup_control.go)."""
    replicas = pj["spec"]["pytorchReplicaSpecs"]
    sp = pj["spec"]["runPolicy"].get("schedulingPolicy") or {}
    spec = {"minMember": sp.get("minAvailable", sum(r.get("replicas", 1) for r in replicas.values())),
            "queue": sp.get("queue") or "default"}
    if sp.get("priorityClass"):
        spec["priorityClassName"] = sp["priorityClass"]
    if sp.get("minResources"):
        spec["minResources"] = sp["minResources"]
    else:  # calcPGMinResources: the requests of the first minMember pods
        total: dict = {}
        for r in replicas.values():
            req = r["template"]["spec"]["containers"][0].get("resources", {}).get("requests", {})
            for k, v in req.items():
                total[k] = total.get(k, []) + [v] * r.get("replicas", 1)
        spec["minResources"] = {k: str(v[0]) for k, v in total.items()}  # the shape only: quantities are strings
    return {"apiVersion": "scheduling.volcano.sh/v1beta1", "kind": "PodGroup",
            "metadata": {"name": pj["metadata"]["name"], "namespace": NAMESPACE}, "spec": spec}


@pytest.mark.parametrize("sets,expect", [
    (("schedulingPolicy.queue=llm-training",), {"minAvailable": 8, "queue": "llm-training"}),
    (("schedulingPolicy.queue=llm-training", "schedulingPolicy.minAvailable=4", "schedulingPolicy.priorityClass=llm-high",
      "schedulingPolicy.scheduleTimeoutSeconds=600", "schedulingPolicy.minResources.nvidia\\.com/gpu=32"),
     {"minAvailable": 4, "queue": "llm-training", "priorityClass": "llm-high", "scheduleTimeoutSeconds": 600,
      "minResources": {"nvidia.com/gpu": 32}}),
    (("schedulingPolicy.queue=llm-training", "elasticPolicy.maxRestarts=2"), {"minAvailable": 8, "queue": "llm-training"}),
])
def test_volcano_scheduling_policy(sets, expect):
    objs = render("pretrain", cfg("pretrain"), "schedulerName=volcano", *sets, values=[shape("pretrain")])
    pj = one(objs, "PyTorchJob")
    validate(pj)  # runPolicy.schedulingPolicy against the v1.8.1 CRD (RunPolicy.SchedulingPolicy)
    assert pj["spec"]["runPolicy"]["schedulingPolicy"] == expect
    # minAvailable defaults to every pod of the job, Master included (or nnodes Workers when elastic)
    assert sum(r["replicas"] for r in pj["spec"]["pytorchReplicaSpecs"].values()) == 8
    for _r, tpl in pod_templates(pj):
        assert tpl["spec"]["schedulerName"] == "volcano"  # what DecoratePodTemplateSpec would set: no warning event
    validate_cr(volcano_podgroup(pj))


def test_min_available_above_the_job_is_refused():
    err = render_error("pretrain", cfg("pretrain"), "nnodes=2", "schedulingPolicy.minAvailable=3")
    assert "schedulingPolicy.minAvailable 3 is more than the job's 2 pods (nnodes)" in err, err


def test_volcano_queue_manifest():
    (q,) = [d for d in yaml.safe_load_all((K8S / "volcano" / "queue.yaml").read_text()) if d]
    validate_cr(q)
    assert q["metadata"]["name"] == "llm-training"
    bad = copy.deepcopy(q)
    bad["spec"]["capacity"] = bad["spec"].pop("capability")
    with pytest.raises(ValueError, match="capacity"):
        validate_cr(bad)


# ------------------------------------------------------------------ gang scheduling: Kueue

def kueue_objects() -> list[dict]:
    out = subprocess.run([kubectl(), "kustomize", str(K8S / "kueue")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


# The Kueue manager's Configuration is a Go type, not a CRD: this schema holds the fields the snippet may use, from
# kubernetes-sigs/kueue v0.19.2 (8eab68778fc1b52affe165fdf5af29d1e9b4f3cb) apis/config/v1beta2/configuration_types.go:
# Configuration (+ the inlined ControllerManager), WaitForPodsReady, RequeuingStrategy (RequeuingTimestamp
# Creation | Eviction), Integrations, Resources (QuotaCheckStrategy). Objects not used here are left open.
_DURATION = {"type": "string", "pattern": r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$"}
KUEUE_CONFIGURATION_SCHEMA = {
    "type": "object", "additionalProperties": False, "required": ["apiVersion", "kind"],
    "properties": {
        "apiVersion": {"const": "config.kueue.x-k8s.io/v1beta2"}, "kind": {"const": "Configuration"},
        **{k: {"type": "object"} for k in ("webhook", "leaderElection", "metrics", "health", "controller", "tls",
                                           "managedJobsNamespaceSelector", "internalCertManagement", "clientConnection",
                                           "multiKueue", "fairSharing", "admissionFairSharing", "featureGates",
                                           "objectRetentionPolicies", "visibilityServer")},
        "namespace": {"type": "string"}, "pprofBindAddress": {"type": "string"},
        "manageJobsWithoutQueueName": {"type": "boolean"},
        "waitForPodsReady": {"type": "object", "additionalProperties": False, "required": ["timeout"], "properties": {
            "timeout": _DURATION, "blockAdmission": {"type": "boolean"}, "recoveryTimeout": _DURATION,
            "requeuingStrategy": {"type": "object", "additionalProperties": False, "properties": {
                "timestamp": {"enum": ["Creation", "Eviction"]},
                "backoffLimitCount": {"type": ["integer", "null"], "minimum": 0},
                "backoffBaseSeconds": {"type": "integer", "minimum": 0},
                "backoffMaxSeconds": {"type": "integer", "minimum": 0}}}}},
        "integrations": {"type": "object", "additionalProperties": False, "properties": {
            "frameworks": {"type": "array", "items": {"type": "string"}},
            "externalFrameworks": {"type": "array", "items": {"type": "string"}},
            "labelKeysToCopy": {"type": "array", "items": {"type": "string"}}}},
        "resources": {"type": "object", "additionalProperties": False, "properties": {
            "quotaCheckStrategy": {"enum": ["BlockUndeclared", "IgnoreUndeclared"]},
            "excludeResourcePrefixes": {"type": "array", "items": {"type": "string"}},
            "transformations": {"type": "array"}, "deviceClassMappings": {"type": "array"}}},
    },
}


def test_kueue_manifests_validate_against_the_crds():
    objs = kueue_objects()
    kinds = sorted((o["kind"], o["metadata"]["name"]) for o in objs)
    assert kinds == [("ClusterQueue", "llm-pipeline"), ("LocalQueue", "llm-pipeline"),
                     ("ResourceFlavor", "default-flavor"), ("ResourceFlavor", "h100")]
    for o in objs:
        validate_cr(o)
    # a misspelt field fails (the generated schemas are strict)
    cq = copy.deepcopy(next(o for o in objs if o["kind"] == "ClusterQueue"))
    cq["spec"]["cohort"] = "x"  # v1beta1's name; v1beta2 calls it cohortName
    with pytest.raises(ValueError, match="cohort"):
        validate_cr(cq)


def test_kueue_queues_fit_together_and_cover_the_chart():
    """LocalQueue -> ClusterQueue -> ResourceFlavors resolve; the ClusterQueue selects the llm-pipeline namespace;
    and every resource any stage's shape (jobs/cluster/values) or the RDMA profiles request is covered by the
    ClusterQueue or excluded in the Configuration: with Kueue's default quotaCheckStrategy BlockUndeclared
    (apis/config/v1beta2/configuration_types.go QuotaCheckBlockUndeclared) an undeclared one makes the workload
    inadmissible."""
    objs = kueue_objects()
    by = {(o["kind"], o["metadata"]["name"]): o for o in objs}
    lq = by[("LocalQueue", "llm-pipeline")]
    assert lq["metadata"]["namespace"] == NAMESPACE
    cq = by[("ClusterQueue", lq["spec"]["clusterQueue"])]
    assert cq["spec"]["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": NAMESPACE}}
    covered = set()
    for group in cq["spec"]["resourceGroups"]:
        for fl in group["flavors"]:
            assert ("ResourceFlavor", fl["name"]) in by
            assert [r["name"] for r in fl["resources"]] == group["coveredResources"]
        covered |= set(group["coveredResources"])
    config = yaml.safe_load((K8S / "kueue" / "controller_manager_config.yaml").read_text())
    excluded = config["resources"]["excludeResourcePrefixes"]

    requested = set()
    renders = [render(s, cfg(s), values=[shape(s)]) for s in ("collect", "clean", "pack", "tokenizer", "init", "pretrain", "sft",
                                                              "dpo", "reward", "evaluate", "quantize", "register")
               if cfg(s).is_file() and shape(s).is_file()]
    renders += [render_profile(p) for p in ("infiniband", "roce")]
    for objs_ in renders:
        for o in workloads(objs_):
            assert o["metadata"]["labels"].get("kueue.x-k8s.io/queue-name") is None  # only when kueue.queueName is set
            for _r, tpl in pod_templates(o):
                for c in tpl["spec"]["containers"] + tpl["spec"].get("initContainers", []):
                    requested |= set(c.get("resources", {}).get("requests", {})) | set(c.get("resources", {}).get("limits", {}))
    assert {"cpu", "memory", "nvidia.com/gpu", "ephemeral-storage", "rdma/rdma_shared_device_a"} <= requested
    missing = {r for r in requested if r not in covered and not any(r.startswith(p) for p in excluded)}
    assert not missing, f"resources no ClusterQueue covers and Kueue would refuse: {missing}"


def test_kueue_configuration_snippet():
    import jsonschema

    config = yaml.safe_load((K8S / "kueue" / "controller_manager_config.yaml").read_text())
    jsonschema.validate(config, KUEUE_CONFIGURATION_SCHEMA)
    assert "kubeflow.org/pytorchjob" in config["integrations"]["frameworks"]  # not in Kueue's default list
    assert "batch/job" in config["integrations"]["frameworks"]
    w = config["waitForPodsReady"]
    assert w["blockAdmission"] is True and w["timeout"] and w["requeuingStrategy"]["timestamp"] == "Eviction"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**config, "waitForPodsReady": {**w, "enable": True}}, KUEUE_CONFIGURATION_SCHEMA)  # v1beta1 only


def test_kueue_label_on_every_workload():
    """kueue.queueName labels the Job / Indexed Job / merge Job / PyTorchJob (Kueue's jobframework reads the
    label kueue.x-k8s.io/queue-name on the workload object, not on the pods)."""
    for stage in ("collect", "clean", "pretrain"):
        objs = render(stage, cfg(stage), "kueue.queueName=llm-pipeline", values=[shape(stage)])
        for o in workloads(objs):
            validate(o)
            assert o["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "llm-pipeline"


# ------------------------------------------------------------------ values layering: a profile before the site file

def test_make_takes_a_profile_and_a_site_file_in_order(tmp_path):
    make = shutil.which("make")
    if make is None:
        pytest.skip("make not found")
    site = tmp_path / "site.yaml"
    site.write_text(yaml.safe_dump({"interconnect": {"ncclEnv": {"NCCL_IB_HCA": "mlx5_0"}}}))
    vals = f"{PROFILES / 'infiniband.yaml'} {site}"
    out = subprocess.run([make, "-n", "-s", "render-pretrain", f"VALUES={vals}", "HELM_ARGS=", "HELM=helm"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    line = next(x for x in out.stdout.splitlines() if x.startswith("helm template "))
    args = shlex.split(line)[2:]
    files = [args[i + 1] for i, a in enumerate(args) if a == "-f"]
    assert files == ["jobs/cluster/values/pretrain.yaml", str(PROFILES / "infiniband.yaml"), str(site)]
    # rendered with exactly those arguments, the site's NCCL_IB_HCA wins over the profile's
    args = [a if not a.startswith("config=") else f"config={REPO / a.split('=', 1)[1]}" for a in args]
    args = [str(REPO / a) if a.startswith("jobs/") else a for a in args]
    args = [str(CHART) if a == "charts/llm-pipeline" else a for a in args]
    objs = [d for d in yaml.safe_load_all(helm_run("template", *args).stdout) if d]
    for _r, tpl in pod_templates(one(objs, "PyTorchJob")):
        assert env_of(tpl)["NCCL_IB_HCA"] == "mlx5_0" and env_of(tpl)["NCCL_SOCKET_IFNAME"] == "eth0"



def test_nccl_check_gets_the_profile_too():
    """The fabric check (stage nccl-check, a PyTorchJob through pytorchjob.yaml) measures the fabric the training
    stages will use: the same profile gives its pods the same RDMA resources, capability, networks and NCCL env."""
    if not (CLUSTER / "nccl-check.yaml").is_file():
        pytest.skip("no jobs/cluster/nccl-check.yaml")
    objs = render("nccl-check", CLUSTER / "nccl-check.yaml", values=[shape("pretrain"), PROFILES / "infiniband.yaml"])
    pj = one(objs, "PyTorchJob")
    validate(pj)
    train = one(render_profile("infiniband"), "PyTorchJob")
    for (_r, tpl), (_r2, ref) in zip(pod_templates(pj), pod_templates(train)):
        c, rc = main_container(tpl), main_container(ref)
        assert c["resources"] == rc["resources"] and c["securityContext"] == rc["securityContext"]
        assert tpl["metadata"]["annotations"]["k8s.v1.cni.cncf.io/networks"] == "ib-net"
        assert {k: v for k, v in env_of(tpl).items() if k.startswith("NCCL_")} == \
            {k: v for k, v in env_of(ref).items() if k.startswith("NCCL_")}
