"""k8s/: the cluster bootstrap builds with kustomize, validates against Kubernetes' schemas offline,
grants least privilege and passes Pod Security "restricted"."""

from __future__ import annotations

import copy
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.helm.chart import kubectl

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
K8S_VERSION = "1.33.0"  # the namespace pins Pod Security to v1.33 too
NAMESPACE = "llm-pipeline"


@pytest.fixture(scope="module")
def bundle() -> list[dict]:
    out = subprocess.run([kubectl(), "kustomize", str(K8S)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def _by_kind(bundle, kind):
    return [d for d in bundle if d["kind"] == kind]


def test_bundle_has_the_bootstrap_objects(bundle):
    names = {(d["kind"], d["metadata"]["name"]) for d in bundle}
    assert names >= {
        ("Namespace", NAMESPACE),
        ("ServiceAccount", "llmpipe-submitter"),
        ("ServiceAccount", "llmpipe-stage"),
        ("Role", "llmpipe-submitter"),
        ("RoleBinding", "llmpipe-submitter"),
        ("PersistentVolumeClaim", "llmpipe-data"),
        ("Deployment", "mlflow"),
        ("Service", "mlflow"),
        ("StatefulSet", "mlflow-postgres"),
        ("Deployment", "minio"),
    }
    for d in bundle:
        if d["kind"] != "Namespace":
            assert d["metadata"]["namespace"] == NAMESPACE, d["metadata"]["name"]
        assert d["metadata"]["labels"]["app.kubernetes.io/part-of"] == "llm-pipeline"


def test_every_object_validates_against_the_kubernetes_schema(bundle):
    import kubernetes_validate

    for d in bundle:
        kubernetes_validate.validate(d, K8S_VERSION, strict=True)
    # and every file on its own (someone may apply a single file)
    files = sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")
    assert len(files) >= 7
    # Kueue's and Volcano's objects (k8s/kueue, k8s/volcano) are custom resources: tests/helm/test_chart_cluster.py
    # validates them against schemas generated from those projects' CRDs
    crds = ("kueue.x-k8s.io/", "config.kueue.x-k8s.io/", "scheduling.volcano.sh/")
    for path in files:
        for d in yaml.safe_load_all(path.read_text()):
            if d and not d.get("apiVersion", "").startswith(crds):
                kubernetes_validate.validate(d, K8S_VERSION, strict=True)


def test_schema_validation_is_not_vacuous(bundle):
    import kubernetes_validate

    deploy = copy.deepcopy(next(d for d in bundle if d["kind"] == "Deployment"))
    deploy["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy_typo"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deploy, K8S_VERSION, strict=True)
    deploy = copy.deepcopy(next(d for d in bundle if d["kind"] == "Deployment"))
    deploy["spec"]["replicas"] = "one"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deploy, K8S_VERSION, strict=True)


def test_rbac_is_least_privilege(bundle):
    assert not _by_kind(bundle, "ClusterRole") and not _by_kind(bundle, "ClusterRoleBinding")
    (role,) = _by_kind(bundle, "Role")
    granted: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        for field in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule[field], f"wildcard in {field}: {rule}"
        assert not rule.get("resourceNames") and not rule.get("nonResourceURLs")
        for group in rule["apiGroups"]:
            for res in rule["resources"]:
                granted.setdefault((group, res), set()).update(rule["verbs"])
    # llmpipe k8s and helm v4 (tests/k8s/test_helm_rbac.py: the calls helm makes, from its source)
    manage = {"create", "get", "list", "watch", "update", "patch", "delete"}
    read = {"get", "list", "watch"}
    assert granted == {
        ("", "secrets"): {"get", "list", "create", "update", "delete"},  # helm's release records
        ("batch", "jobs"): manage,
        ("kubeflow.org", "pytorchjobs"): manage,
        ("", "configmaps"): manage,
        ("", "services"): manage,
        ("apps", "deployments"): manage,
        ("autoscaling", "horizontalpodautoscalers"): manage,
        ("policy", "poddisruptionbudgets"): manage,
        ("monitoring.coreos.com", "servicemonitors"): manage,
        ("apps", "replicasets"): read,
        ("", "pods"): read,
        ("", "pods/log"): read,
        ("", "events"): read,
        ("events.k8s.io", "events"): read,
    }
    (binding,) = _by_kind(bundle, "RoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "llmpipe-submitter", "namespace": NAMESPACE}]
    stage_sa = next(d for d in _by_kind(bundle, "ServiceAccount") if d["metadata"]["name"] == "llmpipe-stage")
    assert stage_sa["automountServiceAccountToken"] is False


def _pod_specs(bundle):
    for d in bundle:
        if d["kind"] in ("Deployment", "StatefulSet", "Job", "DaemonSet"):
            yield d["metadata"]["name"], d["spec"]["template"]["spec"]


RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret"}


def test_pods_meet_pod_security_restricted(bundle):
    """The checks of the "restricted" profile (kubernetes.io/docs/concepts/security/pod-security-standards)."""
    ns = next(d for d in bundle if d["kind"] == "Namespace")
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    specs = list(_pod_specs(bundle))
    assert len(specs) == 4  # mlflow, mlflow-postgres, minio, the mlflow-setup Job
    for name, spec in specs:
        psc = spec.get("securityContext", {})
        for flag in ("hostNetwork", "hostPID", "hostIPC"):
            assert not spec.get(flag), (name, flag)
        for vol in spec.get("volumes", []):
            assert set(vol) - {"name"} <= RESTRICTED_VOLUMES, (name, vol)
        for c in spec.get("initContainers", []) + spec["containers"]:
            csc = c.get("securityContext", {})
            where = f"{name}/{c['name']}"
            assert csc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True, where
            assert csc.get("runAsUser", psc.get("runAsUser", 1)) != 0, where
            assert csc.get("allowPrivilegeEscalation") is False, where
            assert csc["capabilities"]["drop"] == ["ALL"] and not csc["capabilities"].get("add"), where
            assert not csc.get("privileged"), where
            seccomp = csc.get("seccompProfile", psc.get("seccompProfile", {})).get("type")
            assert seccomp in ("RuntimeDefault", "Localhost"), where
            assert not any(p.get("hostPort") for p in c.get("ports", [])), where
            image = c["image"]
            assert re.search(r":[\w][\w.-]*$", image.rsplit("/", 1)[-1]) and not image.endswith(":latest"), f"{where}: unpinned {image}"
            assert "resources" in c and c["resources"].get("limits"), f"{where}: no resource limits"


def test_references_resolve(bundle):
    secrets = {d["metadata"]["name"]: d for d in _by_kind(bundle, "Secret")}
    claims = {d["metadata"]["name"] for d in _by_kind(bundle, "PersistentVolumeClaim")}
    for name, spec in _pod_specs(bundle):
        for c in spec.get("initContainers", []) + spec["containers"]:
            for env in c.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in secrets[ref["name"]]["stringData"], (name, ref)
            for src in c.get("envFrom", []):
                assert src["secretRef"]["name"] in secrets
        for vol in spec.get("volumes", []):
            if "persistentVolumeClaim" in vol:
                assert vol["persistentVolumeClaim"]["claimName"] in claims
    pods = {d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"] for d in bundle if d["kind"] in ("Deployment", "StatefulSet")}
    for svc in _by_kind(bundle, "Service"):
        sel = svc["spec"]["selector"]
        assert any(sel.items() <= labels.items() for labels in pods.values()), f"service {svc['metadata']['name']} selects no pod"
    rwx = next(d for d in _by_kind(bundle, "PersistentVolumeClaim") if d["metadata"]["name"] == "llmpipe-data")
    assert rwx["spec"]["accessModes"] == ["ReadWriteMany"]


def test_mlflow_server_uses_postgres_and_s3(bundle):
    server = next(d for d in _by_kind(bundle, "Deployment") if d["metadata"]["name"] == "mlflow")
    container = server["spec"]["template"]["spec"]["containers"][0]
    args = container["args"]
    assert args[:2] == ["server", "--app-name=basic-auth"]
    # the store from the environment, no password in the URI (libpq reads PGPASSWORD): tests/k8s/test_mlflow_auth.py
    env = {e["name"]: e for e in container["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"]["value"] == "postgresql+psycopg2://" and env["PGHOST"]["value"] == "mlflow-postgres"
    assert env["PGPASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-postgres", "key": "POSTGRES_PASSWORD"}
    assert not any("backend-store-uri" in a for a in args)
    assert "--artifacts-destination=s3://mlflow-artifacts" in args
    hosts = next(a for a in args if a.startswith("--allowed-hosts=")).split("=", 1)[1].split(",")
    assert "mlflow.llm-pipeline.svc:*" in hosts and "*" not in hosts


def test_secrets_are_marked_placeholders(bundle):
    text = (K8S / "mlflow" / "secrets.yaml").read_text()
    assert "PLACEHOLDER" in text
    for secret in _by_kind(bundle, "Secret"):
        values = secret["stringData"]
        assert any("CHANGE-ME" in v for v in values.values()), secret["metadata"]["name"]
        assert "data" not in secret  # nothing base64-hidden


def test_readme_pins_the_training_operator_and_make_target_applies_k8s():
    readme = (K8S / "README.md").read_text()
    assert re.search(r"kubectl apply --server-side -k \"github\.com/kubeflow/training-operator\.git/manifests/overlays/standalone\?ref=v\d+\.\d+\.\d+\"", readme)
    out = subprocess.run(["make", "-n", "bootstrap-cluster"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "kubectl apply -k k8s/" in out
