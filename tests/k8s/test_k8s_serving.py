"""Serving the champion on the fake API server: `llmpipe promote` rolls the serving Deployment (charts/llm-pipeline,
stage=serve) to the version it moves the alias to, and rolls both back when the new pods do not become ready;
`llmpipe k8s status` shows the version each serving pod runs.

The registry is a real MLflow store (SQLite) that `llmpipe promote` reads and writes through MLflow's client. The
cluster is tests/k8s/fakeapi.py with the Deployment / ReplicaSet controllers of tests/k8s/deployments.py (kubernetes
v1.33 pkg/controller/deployment: the rolling update, its status, Progressing / ProgressDeadlineExceeded); the serving
pods' init container resolves the pinned version or else the alias in that same MLflow store, as
`llmpipe serve --fetch-only` does, and each version's server becomes ready, crash-loops or never answers as the test
says (``fake.serving.behaviour``)."""

from __future__ import annotations

import io
import json
import re
import shutil
import time
from pathlib import Path

import pytest
import yaml

from tests.k8s.conftest import error_lines
from tests.k8s.deployments import compute_hash
from tests.k8s.fakeapi import FakeKube

MODEL = "llm-pipeline"
FAST = ("--rollout-interval", "0.05")


# ------------------------------------------------------------------------------ a real MLflow registry


@pytest.fixture(scope="module")
def registry_template(tmp_path_factory) -> Path:
    """A SQLite MLflow store with versions 1, 2, 3 of llm-pipeline (each better on val_perplexity): champion 1,
    candidate 2. Made once (MLflow's schema migrations take seconds), copied per test."""
    from mlflow.tracking import MlflowClient

    folder = tmp_path_factory.mktemp("registry")
    client = MlflowClient(f"sqlite:///{folder}/mlflow.db", registry_uri=f"sqlite:///{folder}/mlflow.db")
    client.create_registered_model(MODEL)
    for v in (1, 2, 3):
        client.create_model_version(MODEL, f"file://{folder}/model-{v}", tags={"metric.val_perplexity": str(20 - v)})
    client.set_registered_model_alias(MODEL, "champion", "1")
    client.set_registered_model_alias(MODEL, "candidate", "2")
    return folder / "mlflow.db"


@pytest.fixture
def registry(registry_template, tmp_path, monkeypatch, fake):
    """The store, $MLFLOW_TRACKING_URI pointing at it, and the fake's serving pods resolving its aliases."""
    from mlflow.tracking import MlflowClient

    db = tmp_path / "mlflow.db"
    shutil.copy(registry_template, db)
    uri = f"sqlite:///{db}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("LLMPIPE_TRACKING", raising=False)  # (tests/conftest.py turns tracking off by default)
    client = MlflowClient(uri, registry_uri=uri)
    fake.serving.resolve = lambda name, alias: int(MlflowClient(uri, registry_uri=uri).get_model_version_by_alias(name, alias).version)
    fake.serving.load_ticks = 3
    return client


def champion(client) -> str:
    return str(client.get_model_version_by_alias(MODEL, "champion").version)


# ------------------------------------------------------------------------------ the serving release


def deploy_serve(fake: FakeKube, chart: Path, *sets: str) -> dict:
    """What `make deploy-serve` installs, rendered by helm from the chart and created through the API, then its first
    rollout waited for."""
    from pipeline.k8s.client import Kube
    from pipeline.k8s.render import render
    from pipeline.k8s.submit import submit

    kube = Kube()
    site = ["mlflow.trackingUri=http://mlflow.llm-pipeline.svc:5000", "serving.replicas=2", "serving.progressDeadlineSeconds=2",
            *sets]
    objects = render("serve", Path(__file__), kube.namespace, chart, [], site)  # (serve has no config: any file)
    assert sorted(o["kind"] for o in objects) == ["Deployment", "Service"]
    submit(kube, objects, out=io.StringIO())
    return wait_rolled_out(fake)


def deployment(fake: FakeKube, name: str = "llmpipe-serve") -> dict:
    return fake.get("deployments", name)


def wait_rolled_out(fake: FakeKube, name: str = "llmpipe-serve", timeout: float = 30) -> dict:
    from pipeline.k8s.serving import rollout_state

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        d = deployment(fake, name)
        if rollout_state(d)[0] == "complete":
            return d
        time.sleep(0.05)
    raise AssertionError(f"not rolled out: {json.dumps(deployment(fake, name)['status'])}")


def serving_pods(fake: FakeKube) -> list[dict]:
    return [p for p in fake.items("pods") if p["metadata"]["labels"].get("llmpipe.io/stage") == "serve"]


def fetched(pod: dict) -> int:
    """The version the pod's init container fetched (its termination message, served.json)."""
    (cs,) = pod["status"]["initContainerStatuses"]
    return json.loads(cs["state"]["terminated"]["message"])["version"]


def replicasets(fake: FakeKube) -> dict[str, dict]:
    return {rs["metadata"]["name"]: rs for rs in fake.items("replicasets")}


@pytest.fixture(autouse=True)
def _no_controller_errors(fake):
    yield
    assert fake.controller_errors == []


# ------------------------------------------------------------------------------ promote rolls out


def test_promote_rolls_the_serving_pods_to_the_new_champion(fake, chart, registry, llmpipe):
    deploy_serve(fake, chart)
    assert sorted(fetched(p) for p in serving_pods(fake)) == [1, 1]  # they resolved champion -> 1 at start
    rc, out, err = llmpipe("promote", "--name", MODEL, *FAST)
    assert rc == 0, err
    assert "decision: version 2 promoted to champion (was version 1)" in out
    lines = [ln for ln in out.splitlines() if ln.startswith("rollout:")]
    assert len(lines) == 1 and re.fullmatch(r"rollout: deployment/llmpipe-serve 2/2 pods ready on llm-pipeline "
                                            r"version 2 \(\d+s\)", lines[0]), out
    assert champion(registry) == "2"
    d = deployment(fake)
    assert d["spec"]["template"]["metadata"]["annotations"]["llmpipe.io/model-version"] == "2"
    assert d["metadata"]["annotations"]["kubernetes.io/change-cause"] == "llmpipe promote: llm-pipeline version 2 (champion)"
    assert d["metadata"]["annotations"]["deployment.kubernetes.io/revision"] == "2"
    pods = serving_pods(fake)
    assert len(pods) == 2 and all(fetched(p) == 2 and p["metadata"]["annotations"]["llmpipe.io/model-version"] == "2"
                                  for p in pods)
    # the old ReplicaSet stays, scaled to 0, for a later rollback (revisionHistoryLimit)
    sizes = {name: rs["spec"]["replicas"] for name, rs in replicasets(fake).items()}
    assert sorted(sizes.values()) == [0, 2]
    # one PATCH of the Deployment, a JSON merge patch of the pod template's annotation
    patches = [r for r in fake.requests if r[0] == "PATCH"]
    assert [p[1] for p in patches] == ["/apis/apps/v1/namespaces/llm-pipeline/deployments/llmpipe-serve"]

    rc, out, _ = llmpipe("k8s", "status", "serve")
    assert rc == 0
    assert re.search(r"deployment/llmpipe-serve\s+llm-pipeline@champion\s+2\s+2/2\s+2\s+complete", out), out
    rows = [ln.split() for ln in out.splitlines() if ln.strip().startswith("llmpipe-serve-")]
    assert len(rows) == 2 and all(r[1] == "2" and r[2] == "1/1" and r[3] == "Running" for r in rows), out

    # promoting again: already champion, nothing to roll
    rc, out, _ = llmpipe("promote", "--name", MODEL, "--rollout", *FAST)
    assert rc == 0 and "is already champion" in out and "rollout:" not in out
    assert len([r for r in fake.requests if r[0] == "PATCH"]) == 1


def test_new_pods_that_never_become_ready_roll_back_alias_and_deployment(fake, chart, registry, llmpipe):
    """The Deployment controller gives up after progressDeadlineSeconds without progress (Progressing=False,
    ProgressDeadlineExceeded); promote then moves champion back to version 1, patches the template back (no
    annotation: the ReplicaSet of version 1 is the Deployment's again) and says so in one line."""
    deploy_serve(fake, chart)
    fake.serving.behaviour[2] = "crash"
    rc, out, err = llmpipe("promote", "--name", MODEL, *FAST)
    assert rc == 4, (out, err)
    assert "decision: version 2 promoted to champion (was version 1)" in out  # what the gates decided, first
    (line,) = [ln for ln in out.splitlines() if ln.startswith("rolled back:")]
    assert re.fullmatch(
        r"rolled back: llm-pipeline version 2 did not become ready on deployment/llmpipe-serve \(namespace llm-pipeline\) "
        r"within \d+s \(deployment \"llmpipe-serve\" exceeded its progress deadline \(ReplicaSet \"llmpipe-serve-\w+\" has "
        r"timed out progressing\.\); pod llmpipe-serve-\w+-\w+: container server (is crash-looping \(\d+ restarts; last "
        r"exited with code 1\)|exited with code 1); log: error: the model does not load: CUDA out of memory\); champion is "
        r"back on version 1 "
        r"and deployment/llmpipe-serve is back on the previous version \(2/2 pods ready\)", line), line
    # the registry: champion back, the failed version says why
    assert champion(registry) == "1"
    tags = registry.get_model_version(MODEL, "2").tags
    assert tags["promotion.decision"] == "rolled-back" and "exceeded its progress deadline" in tags["promotion.rollback"]
    assert "promotion.superseded_by" not in registry.get_model_version(MODEL, "1").tags
    # the cluster: the template as before the promote, the version-1 pods serving, the failed ReplicaSet at 0
    d = wait_rolled_out(fake)
    assert "llmpipe.io/model-version" not in (d["spec"]["template"]["metadata"].get("annotations") or {})
    assert d["metadata"]["annotations"]["kubernetes.io/change-cause"].startswith(
        "llmpipe promote: back from llm-pipeline version 2: deployment \"llmpipe-serve\" exceeded its progress deadline")
    assert sorted(fetched(p) for p in serving_pods(fake)) == [1, 1]
    rss = replicasets(fake)
    assert sorted(rs["spec"]["replicas"] for rs in rss.values()) == [0, 2]
    back = next(rs for rs in rss.values() if rs["spec"]["replicas"] == 2)
    # the rollback reused version 1's ReplicaSet: a new revision, the old one kept in revision-history
    assert back["metadata"]["annotations"]["deployment.kubernetes.io/revision"] == "3"
    assert back["metadata"]["annotations"]["deployment.kubernetes.io/revision-history"] == "1"
    # during the failed rollout the old pods were never below the replicas (maxUnavailable 0)
    rc, out, _ = llmpipe("k8s", "status", "serve")
    rows = [ln.split() for ln in out.splitlines() if ln.strip().startswith("llmpipe-serve-")]
    assert sorted(r[1] for r in rows) == ["1", "1"], out


def test_a_rollout_slower_than_the_timeout_is_rolled_back_too(fake, chart, registry, llmpipe):
    """Pods that run but never answer a generation (never Ready), under a generous progress deadline: promote's own
    --rollout-timeout ends the wait; back to the pinned version the Deployment had (2, from an earlier rollout)."""
    deploy_serve(fake, chart, "serving.progressDeadlineSeconds=600")
    assert llmpipe("promote", "--name", MODEL, *FAST)[0] == 0  # champion 2, pinned
    registry.set_registered_model_alias(MODEL, "candidate", "3")
    fake.serving.behaviour[3] = "unready"
    rc, out, err = llmpipe("promote", "--name", MODEL, "--rollout-timeout", "1.5", *FAST)
    assert rc == 4, (out, err)
    (line,) = [ln for ln in out.splitlines() if ln.startswith("rolled back:")]
    assert "llm-pipeline version 3 did not become ready" in line
    assert "(not ready after 1.5s: 1 out of 2 new replicas have been updated; pod llmpipe-serve-" in line
    assert ": not ready)" in line
    assert "champion is back on version 2 and deployment/llmpipe-serve is back on the previous version (2/2 pods ready)" in line
    assert champion(registry) == "2"
    d = wait_rolled_out(fake)
    assert d["spec"]["template"]["metadata"]["annotations"]["llmpipe.io/model-version"] == "2"
    assert sorted(fetched(p) for p in serving_pods(fake)) == [2, 2]


def test_status_shows_a_stuck_rollout_and_why(fake, chart, registry, llmpipe):
    deploy_serve(fake, chart)
    from pipeline.k8s.client import Kube

    fake.serving.behaviour[3] = "crash"
    Kube().patch("apps/v1", "deployments", "llmpipe-serve",
                 {"spec": {"template": {"metadata": {"annotations": {"llmpipe.io/model-version": "3"}}}}}, what="pin 3")
    deadline = time.monotonic() + 20
    while "ProgressDeadlineExceeded" not in json.dumps(deployment(fake)["status"]) and time.monotonic() < deadline:
        time.sleep(0.1)
    rc, out, _ = llmpipe("k8s", "status")  # every stage, then the serving Deployments
    assert rc == 0
    assert re.search(r"deployment/llmpipe-serve\s+llm-pipeline@champion\s+3\s+2/2\s+1\s+failed", out), out
    versions = sorted(ln.split()[1] for ln in out.splitlines() if ln.strip().startswith("llmpipe-serve-"))
    assert versions == ["1", "1", "3"], out
    assert re.search(r"CrashLoopBackOff|Running", out)
    (why,) = [ln for ln in out.splitlines() if ln.startswith("deployment/llmpipe-serve: ")]
    assert 'exceeded its progress deadline' in why and "CUDA out of memory" in why
    assert re.search(r"container server (is crash-looping \(\d+ restarts; last exited with code 1\)|exited with code 1); "
                     r"log: error: the model does not load", why), why


# ------------------------------------------------------------------------------ when there is nothing to roll


def test_without_a_serving_release_promote_only_moves_the_alias_and_rollout_demands_one(fake, chart, registry, llmpipe):
    rc, out, err = llmpipe("promote", "--name", MODEL, "--rollout", *FAST)
    assert rc == 1
    (msg,) = error_lines(err)[:1]
    assert msg.startswith("error: --rollout: no serving Deployment of models:/llm-pipeline@champion in namespace "
                          "llm-pipeline") and "make deploy-serve" in msg
    assert champion(registry) == "1"  # looked up before anything moved
    rc, out, _ = llmpipe("promote", "--name", MODEL, *FAST)  # auto: nothing to roll, nothing said about it
    assert rc == 0 and champion(registry) == "2" and "rollout" not in out


def test_no_rollout_and_dry_run_leave_the_deployment_alone(fake, chart, registry, llmpipe):
    deploy_serve(fake, chart)
    rc, out, _ = llmpipe("promote", "--name", MODEL, "--dry-run", *FAST)
    assert rc == 0 and "would be promoted" in out
    assert "rollout: would roll deployment/llmpipe-serve (namespace llm-pipeline) to llm-pipeline version 2" in out
    assert champion(registry) == "1"
    rc, out, _ = llmpipe("promote", "--name", MODEL, "--no-rollout")
    assert rc == 0 and champion(registry) == "2" and "rollout" not in out
    assert not [r for r in fake.requests if r[0] == "PATCH"]
    assert "llmpipe.io/model-version" not in (deployment(fake)["spec"]["template"]["metadata"].get("annotations") or {})


def test_promote_already_champion_brings_a_lagging_deployment_to_it(fake, chart, registry, llmpipe):
    """The alias moved without a rollout (the register stage's auto_promote, --no-rollout): the pods pinned to the old
    version; promote says "already champion" and rolls them to it."""
    deploy_serve(fake, chart, "serving.model.version=1")
    registry.set_registered_model_alias(MODEL, "champion", "2")
    rc, out, err = llmpipe("promote", "--name", MODEL, *FAST)
    assert rc == 0, err
    assert "version 2 is already champion" in out
    assert re.search(r"^rollout: deployment/llmpipe-serve 2/2 pods ready on llm-pipeline version 2 \(\d+s\)$", out, re.M)
    assert sorted(fetched(p) for p in serving_pods(fake)) == [2, 2]


def test_no_cluster_configured_means_no_look(registry_template, tmp_path, monkeypatch, capsys):
    """Without a kubeconfig (a laptop, the demo) promote never tries to reach a cluster."""
    from mlflow.tracking import MlflowClient

    from pipeline.cli import main

    db = tmp_path / "mlflow.db"
    shutil.copy(registry_template, db)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    monkeypatch.delenv("LLMPIPE_TRACKING", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "none"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert main(["promote", "--name", MODEL]) == 0
    assert "rollout" not in capsys.readouterr().out
    assert str(MlflowClient(f"sqlite:///{db}", registry_uri=f"sqlite:///{db}").get_model_version_by_alias(MODEL, "champion").version) == "2"
    assert main(["promote", "--name", MODEL, "--rollout"]) == 1
    assert "no kubeconfig" in capsys.readouterr().err


# ------------------------------------------------------------------------------ permissions


def test_the_submitter_role_is_enough_and_a_refused_patch_moves_the_alias_back(fake, chart, registry, llmpipe):
    from tests.k8s.test_k8s_rbac import granted

    deploy_serve(fake, chart)
    allowed = granted()
    assert {("get", "deployments"), ("list", "deployments"), ("patch", "deployments")} <= allowed
    for verb in ("get", "list", "create", "update", "patch", "delete"):
        for res in ("deployments", "replicasets", "pods", "pods/log", "events", "services"):
            if (verb, res) not in allowed:
                fake.deny(verb, res)
    rc, out, err = llmpipe("promote", "--name", MODEL, *FAST)
    assert rc == 0 and "rollout: deployment/llmpipe-serve 2/2 pods ready" in out, err
    rc, out, err = llmpipe("k8s", "status")
    assert rc == 0 and "forbidden" not in out + err and "deployment/llmpipe-serve" in out
    # an account without patch: the alias does not stay moved
    fake.deny("patch", "deployments")
    registry.set_registered_model_alias(MODEL, "candidate", "3")
    rc, out, err = llmpipe("promote", "--name", MODEL, *FAST)
    assert rc == 1
    (msg,) = error_lines(err)[:1]
    assert msg.startswith("error: rollout of llm-pipeline version 3 could not start (forbidden: ")
    assert msg.endswith("champion is back on version 2, the Deployments are as they were")
    assert champion(registry) == "2"


# ------------------------------------------------------------------------------ the controller model itself


def test_deployment_api_semantics(fake, chart):
    """What the rollout relies on from the API server and the controller (tests/k8s/deployments.py): a pod
    template change bumps metadata.generation and observedGeneration follows; the selector is immutable; a template
    whose labels the selector does not match is refused; the ReplicaSet is named <deployment>-<template hash>."""
    from pipeline.k8s.client import K8sError, Kube

    fake.serving.resolve = lambda name, alias: 1
    d = deploy_serve(fake, chart, "serving.replicas=1")
    assert d["metadata"]["generation"] == 1 and d["status"]["observedGeneration"] == 1
    (rs,) = fake.items("replicasets")
    tmpl = d["spec"]["template"]
    assert rs["metadata"]["name"] == "llmpipe-serve-" + compute_hash(tmpl, None)
    assert rs["spec"]["template"]["metadata"]["labels"]["pod-template-hash"] == rs["metadata"]["name"].rsplit("-", 1)[1]
    kube = Kube()
    obj = kube.patch("apps/v1", "deployments", "llmpipe-serve",
                     {"spec": {"template": {"metadata": {"annotations": {"x": "1"}}}}}, what="touch")
    assert obj["metadata"]["generation"] == 2
    assert wait_rolled_out(fake)["status"]["observedGeneration"] == 2
    with pytest.raises(K8sError, match="field is immutable"):
        kube.patch("apps/v1", "deployments", "llmpipe-serve", {"spec": {"selector": {"matchLabels": {"a": "b"}}}}, what="x")
    bad = yaml.safe_load(yaml.safe_dump(d))
    bad["metadata"] = {"name": "other"}
    bad["spec"]["template"]["metadata"]["labels"] = {"app": "x"}
    bad.pop("status")
    with pytest.raises(K8sError, match="`selector` does not match template `labels`"):
        kube.create("apps/v1", "deployments", bad, what="create")
    # deleting the Deployment takes its ReplicaSets and pods with it (the garbage collector)
    kube.delete("apps/v1", "deployments", "llmpipe-serve", what="delete")
    deadline = time.monotonic() + 10
    while (fake.items("replicasets") or serving_pods(fake)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not fake.items("replicasets") and not serving_pods(fake)


def test_rolling_update_keeps_the_serving_capacity(fake, chart):
    """maxSurge 1, maxUnavailable 0 (the chart's default): during a rollout the available pods never drop below the
    replicas, and the total never exceeds replicas + 1 (rolling.go: reconcileNewReplicaSet / NewRSNewReplicas,
    reconcileOldReplicaSets)."""
    from pipeline.k8s.client import Kube
    from pipeline.k8s.serving import rollout_state

    fake.serving.resolve = lambda name, alias: 1
    deploy_serve(fake, chart, "serving.replicas=3")
    samples = []
    Kube().patch("apps/v1", "deployments", "llmpipe-serve",
                 {"spec": {"template": {"metadata": {"annotations": {"llmpipe.io/model-version": "2"}}}}}, what="roll")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        d = deployment(fake)
        st = d["status"]
        samples.append((int(st.get("availableReplicas") or 0), len(serving_pods(fake))))
        if rollout_state(d)[0] == "complete" and d["metadata"]["generation"] == 2:
            break
        time.sleep(0.01)
    else:
        raise AssertionError(deployment(fake)["status"])
    assert min(a for a, _ in samples) >= 3 and max(n for _, n in samples) <= 4
    assert sorted(fetched(p) for p in serving_pods(fake)) == [2, 2, 2]
    events = [e["message"] for e in fake.items("events") if e["reason"] == "ScalingReplicaSet"]
    assert any(m.startswith("Scaled down replica set") for m in events)
