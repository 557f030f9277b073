"""The fabric check as the chart renders it (`make render-nccl-check`, real helm): a PyTorchJob valid against the
training operator's CRD schema, with exactly pretrain's pod shape, whose pods run `llmpipe fabric-check` with the
check's config instead of `llmpipe run pretrain`."""

from __future__ import annotations

import copy
import subprocess

import pytest
import yaml

from tests.helm.chart import CHART, REPO, helm, helm_run, one, pod_templates, render, validate

CLUSTER = REPO / "jobs" / "cluster"


def make_render(target: str, *args: str) -> list[dict]:
    out = subprocess.run(["make", "-s", target, f"HELM={helm()}", *args], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def _shape(tpl: dict) -> dict:
    """A pod template without what differs by design between two releases: names, labels, the config's hash,
    the container's arguments and the job id (a timestamp)."""
    t = copy.deepcopy(tpl)
    t["metadata"] = {k: v for k, v in t["metadata"].items() if k not in ("labels",)}
    t["metadata"]["annotations"].pop("llmpipe.io/config-sha256")
    (c,) = t["spec"]["containers"]
    c.pop("args")
    c["env"] = [e for e in c["env"] if e["name"] != "LLMPIPE_JOB_ID"]
    for v in t["spec"]["volumes"]:
        if v["name"] == "config":
            v["configMap"].pop("name")
    for ts in t["spec"].get("topologySpreadConstraints", []):
        ts.get("labelSelector", {}).get("matchLabels", {}).pop("app.kubernetes.io/instance", None)
    return t


def test_make_render_nccl_check_is_pretrains_pod_shape_running_the_check(tmp_path):
    objs = make_render("render-nccl-check")
    ptj = one(objs, "PyTorchJob")
    validate(ptj)  # the training operator v1.8.1 CRD schema (tests/helm/schemas)
    pre = one(make_render("render-pretrain"), "PyTorchJob")
    assert ptj["metadata"]["name"] == "llmpipe-nccl-check"
    assert ptj["metadata"]["labels"]["llmpipe.io/stage"] == "nccl-check"
    reps, pre_reps = ptj["spec"]["pytorchReplicaSpecs"], pre["spec"]["pytorchReplicaSpecs"]
    assert {k: v["replicas"] for k, v in reps.items()} == {k: v["replicas"] for k, v in pre_reps.items()} == {
        "Master": 1, "Worker": 7}
    assert ptj["spec"]["nprocPerNode"] == pre["spec"]["nprocPerNode"] == "8"
    for (name, tpl), (_, pre_tpl) in zip(pod_templates(ptj), pod_templates(pre)):
        assert _shape(tpl) == _shape(pre_tpl), name  # GPUs, resources, shm, tolerations, image, env, volumes
        (c,) = tpl["spec"]["containers"]
        assert c["args"] == ["fabric-check", "--config", "/etc/llmpipe/config.yaml", "--root", "/data/runs/default"]
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 8
    # a deadline (a hang in NCCL's setup must not hold 64 GPUs); pretrain's backoffLimit and cleanPodPolicy, so a
    # failed check keeps its Master's log (tests/k8s/test_k8s_nccl_check.py)
    assert ptj["spec"]["runPolicy"] == {**pre["spec"]["runPolicy"], "activeDeadlineSeconds": 1800}
    cm = one(objs, "ConfigMap")
    validate(cm)
    assert yaml.safe_load(cm["data"]["config.yaml"]) == yaml.safe_load((CLUSTER / "nccl-check.yaml").read_text())
    # another shape, the site's values, an override through the chart's stages map
    site = tmp_path / "site.yaml"
    site.write_text(yaml.safe_dump({"stages": {"nccl-check": {"nnodes": 2, "activeDeadlineSeconds": 600}}}))
    small = one(make_render("render-nccl-check", f"VALUES={site}"), "PyTorchJob")
    validate(small)
    assert small["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 1
    assert small["spec"]["runPolicy"]["activeDeadlineSeconds"] == 600
    # the interconnect profile the pretraining is deployed with reaches the check's pods the same way
    profile = CLUSTER / "values" / "profiles" / "infiniband.yaml"
    if profile.is_file():
        values = f"VALUES={profile} {site}"
        ib, ib_pre = (one(make_render(t, values), "PyTorchJob") for t in ("render-nccl-check", "render-pretrain"))
        validate(ib)
        for (_, tpl), (_, pre_tpl) in zip(pod_templates(ib), pod_templates(ib_pre)):
            (c,), (pc,) = tpl["spec"]["containers"], pre_tpl["spec"]["containers"]
            assert c["resources"] == pc["resources"] and c["securityContext"] == pc["securityContext"]
            assert [e for e in c["env"] if e["name"].startswith("NCCL_")] == [
                e for e in pc["env"] if e["name"].startswith("NCCL_")] != []
    one_node = one(make_render("render-nccl-check", "NCCL_CHECK_SHAPE=pretrain-350m"), "PyTorchJob")
    assert "Worker" not in one_node["spec"]["pytorchReplicaSpecs"]


def test_nccl_check_lints_and_needs_no_checkpoint_volume_on_s3():
    cfg = CLUSTER / "nccl-check.yaml"
    out = helm_run("lint", "--strict", str(CHART), "--set", "stage=nccl-check", "--set-file", f"config={cfg}",
                   "--set", "nnodes=2")
    assert "0 chart(s) failed" in out.stdout
    # pretrain on an s3 run root needs checkpointRoot; the check writes no checkpoint
    objs = render("nccl-check", cfg, "storage.type=s3", "runRoot=s3://b/run", "storage.s3.secretName=s3")
    validate(one(objs, "PyTorchJob"))


@pytest.mark.parametrize("action", ["wait", "logs", "status"])
def test_llmpipe_k8s_knows_the_check(action):
    from pipeline.cli import build_parser

    args = build_parser().parse_args(["k8s", action, "nccl-check"])
    assert args.stage == "nccl-check"
