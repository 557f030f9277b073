"""`llmpipe k8s submit`: real helm renders the chart, the real kubernetes client creates the
objects in the fake API server; Jobs are deleted (Background) and recreated, never updated."""

from __future__ import annotations

import pytest
import yaml

from tests.k8s.conftest import REAL_CHART, REPO, error_lines

STAGE_LABEL = "llmpipe.io/stage"


def _completion(objs: list[dict]) -> list[str]:
    return [o["metadata"]["name"] for o in objs
            if (o["metadata"].get("annotations") or {}).get("llmpipe.io/completion") == "true"]


def test_submit_sharded_stage_creates_configmap_indexed_job_and_merge(fake, helm, llmpipe, monkeypatch):
    monkeypatch.setenv("HELM", helm)
    rc, out, err = llmpipe("k8s", "submit", "clean", "--chart", str(REAL_CHART), "--set", "workers=3")
    assert rc == 0, err
    jobs = fake.items("jobs")
    assert {j["metadata"]["labels"][STAGE_LABEL] for j in jobs} == {"clean"}
    part = [j for j in jobs if j["spec"].get("completionMode") == "Indexed"]
    assert len(part) == 1 and part[0]["spec"]["completions"] == 3
    assert part[0]["spec"]["template"]["metadata"]["labels"][STAGE_LABEL] == "clean"
    merge = [j for j in jobs if j not in part]
    assert len(merge) == 1 and _completion(jobs) == [merge[0]["metadata"]["name"]]
    command = " ".join(merge[0]["spec"]["template"]["spec"]["containers"][0].get("command", [])
                       + merge[0]["spec"]["template"]["spec"]["containers"][0].get("args", []))
    assert "--merge" in command and "--world-size 3" in command
    # the ConfigMap carries the stage config verbatim
    cms = fake.items("configmaps")
    assert any(yaml.safe_load(v) == yaml.safe_load((REPO / "jobs/cluster/clean.yaml").read_text())
               for cm in cms for v in (cm.get("data") or {}).values())
    for obj in cms + jobs:
        assert f"{obj['kind'].lower()}/{obj['metadata']['name']} created" in out
        assert obj["metadata"]["annotations"]["meta.helm.sh/release-name"] == "llmpipe-clean"  # helm can adopt it
        assert obj["metadata"]["annotations"]["meta.helm.sh/release-namespace"] == "llm-pipeline"


def test_submit_training_stage_creates_a_pytorchjob_through_custom_objects(fake, helm, llmpipe, monkeypatch):
    monkeypatch.setenv("HELM", helm)
    rc, out, err = llmpipe("k8s", "submit", "pretrain", "--chart", str(REAL_CHART), "--set", "nnodes=2")
    assert rc == 0, err
    (ptj,) = fake.items("pytorchjobs")
    assert ptj["metadata"]["labels"][STAGE_LABEL] == "pretrain"
    assert _completion([ptj]) == [ptj["metadata"]["name"]]
    specs = ptj["spec"]["pytorchReplicaSpecs"]
    assert specs["Master"]["replicas"] == 1 and specs["Worker"]["replicas"] == 1
    assert ("POST", "/apis/kubeflow.org/v1/namespaces/llm-pipeline/pytorchjobs", "") in fake.requests
    assert not fake.items("jobs")
    assert f"pytorchjob/{ptj['metadata']['name']} created" in out


def test_resubmit_replaces_the_configmap_and_recreates_jobs(fake, chart, llmpipe, tmp_path):
    fake.delete_delay = 0.4  # the old Job stays "terminating" for a while, as with a real garbage collector
    rc, _, err = llmpipe("k8s", "submit", "clean", "--wait", "--interval", "0.1")
    assert rc == 0, err
    before = {j["metadata"]["name"]: j["metadata"]["uid"] for j in fake.items("jobs")}
    cm_rv = fake.get("configmaps", "llmpipe-clean-config")["metadata"]["resourceVersion"]
    config = tmp_path / "clean.yaml"
    config.write_text("samples_per_reason: 7\n")
    rc, out, err = llmpipe("k8s", "submit", "clean", "--config", str(config), "--set", "workers=4")
    assert rc == 0, err
    assert "configmap/llmpipe-clean-config existed: deleted it and created it anew" in out
    for name in before:
        assert (f"job/{name} existed (complete): deleted it (propagationPolicy Background, its pods go with it) "
                "and created it anew") in out
        assert ("jobs", name, "Background") in fake.deletions
    after = {j["metadata"]["name"]: j["metadata"]["uid"] for j in fake.items("jobs")}
    assert after.keys() == before.keys() and not set(after.values()) & set(before.values())
    cm = fake.get("configmaps", "llmpipe-clean-config")
    assert cm["metadata"]["resourceVersion"] != cm_rv
    assert "samples_per_reason: 7" in cm["data"]["config.yaml"]
    assert fake.get("jobs", "llmpipe-clean-part")["spec"]["completions"] == 4
    assert not [r for r in fake.requests if r[0] == "PUT" and "/jobs/" in r[1]], "a Job must never be updated in place"


def test_dry_run_prints_the_objects_and_touches_nothing(fake, chart, llmpipe):
    rc, out, err = llmpipe("k8s", "submit", "pack", "--dry-run", "-n", "team-a")
    assert rc == 0, err
    docs = list(yaml.safe_load_all(out))
    assert [d["kind"] for d in docs][0] == "ConfigMap"
    assert {d["metadata"]["name"] for d in docs} == {"llmpipe-pack-config", "llmpipe-pack-part", "llmpipe-pack-merge"}
    assert fake.requests == []


def test_a_bad_stage_config_fails_before_anything_is_rendered(fake, chart, llmpipe, tmp_path):
    config = tmp_path / "clean.yaml"
    config.write_text("samples_per_reasn: 5\n")
    rc, out, err = llmpipe("k8s", "submit", "clean", "--config", str(config))
    assert rc == 2
    assert err.startswith("error: ") and "samples_per_reasn" in err and "Traceback" not in err
    assert fake.requests == []


def test_helm_errors_are_one_line(fake, chart, llmpipe, monkeypatch):
    rc, _, err = llmpipe("k8s", "submit", "clean", "--set", "bogus=1")
    assert rc == 1
    (line,) = err.strip().splitlines()
    assert line.startswith("error: helm template failed for clean:") and "bogus" in line
    monkeypatch.setenv("HELM", "/nonexistent/helm")
    rc, _, err = llmpipe("k8s", "submit", "clean")
    assert rc == 1 and err.strip() == "error: $HELM is '/nonexistent/helm', which is not an executable"
    rc, _, err = llmpipe("k8s", "submit", "clean", "--chart", "/nonexistent")
    assert rc == 1 and err.strip().startswith("error: no Helm chart at /nonexistent")
    assert fake.requests == []


def test_missing_namespace_and_missing_pytorchjob_kind_are_explained(tmp_path, chart, llmpipe, monkeypatch):
    from tests.k8s.fakeapi import FakeKube

    with FakeKube(crds=()) as server:  # a cluster without the Kubeflow training operator
        monkeypatch.setenv("KUBECONFIG", str(server.write_kubeconfig(tmp_path / "kc")))
        monkeypatch.delenv("LLMPIPE_NAMESPACE", raising=False)
        rc, _, err = llmpipe("k8s", "submit", "pretrain")
        assert rc == 1
        assert error_lines(err) == ["error: this cluster has no PyTorchJob kind (kubeflow.org/v1), needed for "
                                    "pytorchjob/llmpipe-pretrain: install the Kubeflow training operator (k8s/README.md, "
                                    "step 5)"]
        rc, _, err = llmpipe("k8s", "submit", "collect", "-n", "nope")
        assert rc == 1
        assert error_lines(err) == ["error: namespace nope does not exist: create it (`kubectl create namespace nope`) "
                                    "or pick another with -n / $LLMPIPE_NAMESPACE"]


@pytest.mark.parametrize("stage,finisher", [("pack", "Job llmpipe-pack-merge"), ("sft", "PyTorchJob llmpipe-sft"),
                                            ("tokenizer", "Job llmpipe-tokenizer")])
def test_the_real_charts_objects_are_followed_to_the_end(fake, helm, llmpipe, monkeypatch, stage, finisher):
    """What wait / logs rely on (stage labels on the pod templates, one completion object) holds
    for charts/llm-pipeline."""
    from tests.k8s.fakeapi import Scenario

    monkeypatch.setenv("HELM", helm)
    monkeypatch.setenv("LLMPIPE_CHART", str(REAL_CHART))
    fake.scenarios["llmpipe-pack-merge"] = Scenario(after="llmpipe-pack-part")
    config = REPO / "jobs" / "cluster" / f"{stage}.yaml"
    if not config.exists():
        config = REPO / "jobs" / "demo" / f"{stage}.yaml"
    rc, out, err = llmpipe("k8s", "submit", stage, "--config", str(config), "--wait", "--interval", "0.1",
                           "--set", "workers=2", "--set", "nnodes=2")
    assert rc == 0, err
    assert f"{stage} succeeded ({finisher}) in " in out
    rc, out, err = llmpipe("k8s", "logs", stage)
    assert rc == 0 and out.count(f"== {stage} [") >= 2, err
