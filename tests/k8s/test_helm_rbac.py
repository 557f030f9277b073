"""helm v4 run as the llmpipe-submitter ServiceAccount (k8s/rbac.yaml): every API call it makes to install, upgrade,
roll back and uninstall each release the pipeline deploys (every stage of jobs/cluster, the serving release with
its autoscaler, disruption budget and ServiceMonitor) is granted by the Role.

The calls come from helm's source at the version we install (.cache/bin/helm, v4.1.4; github.com/helm/helm tag
v4.1.4), per command: its release records (``STORAGE``) and the objects the chart renders (``OBJECTS``, with the kind
of each object of the rendered manifests). Each entry names the file and function it reproduces. No Kubernetes API
server exists here, so this is the table, not a recording of a real helm run.
"""

from __future__ import annotations

import subprocess

import pytest
import yaml

from pipeline.stages import ORDER
from tests.helm.chart import CHART, find_helm
from tests.k8s.conftest import REPO

RBAC = REPO / "k8s" / "rbac.yaml"
CLUSTER = REPO / "jobs" / "cluster"

# helm's release storage: the Secrets driver (pkg/storage/driver/secrets.go), reached through pkg/storage/storage.go:
# Get -> Secrets.Get (get); History / Deployed / DeployedAll / Last -> Secrets.Query (list); Create -> create;
# Update -> update; Delete (removeLeastRecent / deleteReleaseVersion, uninstall) -> Secrets.Delete: get, then delete.
STORAGE: dict[str, set[str]] = {
    # pkg/cmd/upgrade.go (--install): action.History.Run (list); pkg/action/install.go RunWithContext: availableName
    # -> Releases.History (list), Releases.Create (create); recordRelease -> Releases.Update (update)
    "upgrade --install (new release)": {"list", "create", "update"},
    # pkg/action/upgrade.go prepareUpgrade: Releases.Last, Releases.Deployed (list); performUpgrade: Releases.Create
    # (create); releasingUpgrade / RunWithContext: Releases.Update of the old and the new revision (update);
    # storage.go removeLeastRecent with --history-max (default 10): deleteReleaseVersion (get, delete)
    "upgrade": {"list", "create", "update", "get", "delete"},
    # pkg/action/rollback.go prepareRollback: Releases.Last, Releases.History (list), Releases.Get of the target
    # revision (get); Run: Releases.Create (create), Releases.Update (update); performRollback: DeployedAll (list);
    # removeLeastRecent (get, delete)
    "rollback": {"list", "get", "create", "update", "delete"},
    # pkg/action/uninstall.go Run: Releases.History (list), Releases.Update (uninstalling; update),
    # Releases.Delete of every revision (get, delete)
    "uninstall": {"list", "update", "get", "delete"},
}

# the rendered objects (pkg/kube/client.go)
OBJECTS: dict[str, set[str]] = {
    # pkg/action/validate.go existingResourceConflict: helper.Get (get); install.go performInstall: KubeClient.Create
    # -> makeCreateApplyFunc: patchResourceServerSide, types.ApplyPatchType (patch; ServerSideApply true by default),
    # or createResource, helper.Create (create; --server-side=false)
    "upgrade --install (new release)": {"get", "patch", "create"},
    # client.go update: helper.Get per target (get); absent -> createApplyFunc (patch or create); present ->
    # patchResourceServerSide (patch), patchResourceClientSide (patch; --server-side=false), replaceResource,
    # helper.Replace (update; --force-replace), upgradeClientSideFieldManager (patch, JSON patch); the objects the new
    # revision drops: Client.Update -> deleteResource (delete)
    "upgrade": {"get", "patch", "create", "update", "delete"},
    # rollback.go performRollback: KubeClient.Update as upgrade; a failed one deletes what it created (delete)
    "rollback": {"get", "patch", "create", "update", "delete"},
    # uninstall.go deleteRelease: KubeClient.Delete -> deleteResource, helper.DeleteWithOptions (delete)
    "uninstall": {"delete"},
    # --wait (watcher, the default of a bare --wait: pkg/cmd/flags.go AddWaitFlag): pkg/kube/statuswait.go
    # Wait / WaitForDelete -> kstatus watcher.NewDefaultStatusWatcher: an informer per kind (list, watch)
    "--wait": {"list", "watch"},
}

# kstatus' status reader of a Deployment reads its ReplicaSets, and theirs their Pods (sigs.k8s.io/cli-utils
# pkg/kstatus/polling/statusreaders: NewDeploymentResourceReader, replicaset reader): helm --wait on the serving release
WAIT_READS = {("apps", "deployments"): [("apps", "replicasets"), ("", "pods")]}

# (group, kind) -> resource
RESOURCES = {
    ("", "ConfigMap"): "configmaps", ("", "Service"): "services", ("batch", "Job"): "jobs",
    ("kubeflow.org", "PyTorchJob"): "pytorchjobs", ("apps", "Deployment"): "deployments",
    ("autoscaling", "HorizontalPodAutoscaler"): "horizontalpodautoscalers",
    ("policy", "PodDisruptionBudget"): "poddisruptionbudgets", ("monitoring.coreos.com", "ServiceMonitor"): "servicemonitors",
}


def granted() -> set[tuple[str, str, str]]:
    """(verb, group, resource) the Role grants."""
    role = next(d for d in yaml.safe_load_all(RBAC.read_text())
                if d and d["kind"] == "Role" and d["metadata"]["name"] == "llmpipe-submitter")
    out = set()
    for rule in role["rules"]:
        assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"] and not rule.get("resourceNames")
        out |= {(v, g, r) for v in rule["verbs"] for g in rule["apiGroups"] for r in rule["resources"]}
    return out


def _helm() -> str:
    helm = find_helm()
    if helm is None:
        pytest.skip("helm not found: `make tools`")
    version = subprocess.run([helm, "version", "--short"], capture_output=True, text=True, check=True).stdout
    assert version.startswith("v4."), f"the table is helm v4's (v4.1.4); this helm is {version}"
    return helm


def _releases() -> dict[str, list[str]]:
    """Every release `make deploy-*` installs: release name -> helm template arguments."""
    out = {}
    for stage in ORDER:
        for cfg in sorted([CLUSTER / f"{stage}.yaml", *CLUSTER.glob(f"{stage}-*.yaml")]):  # a stage and its VARIANTs
            if not cfg.exists():
                continue
            name = cfg.stem
            values = next((p for p in (CLUSTER / "values" / f"{name}.yaml", CLUSTER / "values" / f"{stage}.yaml") if p.exists()), None)
            args = ["--set", f"stage={stage}", "--set-file", f"config={cfg}"] + (["-f", str(values)] if values else [])
            out[f"llmpipe-{name}"] = args
    for variant in ("serve", "serve-cpu"):
        out[f"llmpipe-{variant}"] = ["--set", "stage=serve", "-f", str(CLUSTER / "values" / f"{variant}.yaml"),
                                     "--set", "serving.autoscaling.enabled=true", "--set", "serving.podDisruptionBudget.enabled=true",
                                     "--set", "serving.metrics.serviceMonitor.enabled=true"]
    return out


def _kinds(helm: str, release: str, args: list[str]) -> set[tuple[str, str]]:
    out = subprocess.run([helm, "template", release, str(CHART), "-n", "llm-pipeline", *args], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, f"{release}: {out.stderr}"
    kinds = set()
    for d in yaml.safe_load_all(out.stdout):
        if d:
            group = d["apiVersion"].rsplit("/", 1)[0] if "/" in d["apiVersion"] else ""
            kinds.add((group, d["kind"]))
    return kinds


def test_the_role_grants_every_call_helm_makes_for_every_release():
    helm = _helm()
    have = granted()
    releases = _releases()
    assert {"llmpipe-clean", "llmpipe-pretrain", "llmpipe-serve", "llmpipe-serve-cpu"} <= set(releases)
    seen: set[tuple[str, str]] = set()
    missing = []
    for release, args in releases.items():
        kinds = _kinds(helm, release, args)
        seen |= kinds
        for command, verbs in STORAGE.items():
            missing += [(release, command, v, "", "secrets") for v in verbs if (v, "", "secrets") not in have]
        for group, kind in kinds:
            assert (group, kind) in RESOURCES, f"{release} renders {group}/{kind}: add it to the Role and to RESOURCES"
            res = RESOURCES[(group, kind)]
            for command, verbs in OBJECTS.items():
                missing += [(release, command, v, group, res) for v in verbs if (v, group, res) not in have]
            for g, r in WAIT_READS.get((group, res), []):
                missing += [(release, "--wait", v, g, r) for v in ("list",) if (v, g, r) not in have]
    assert not missing, "the Role lacks:\n" + "\n".join(map(str, sorted(set(missing))))
    # every kind the chart can render was rendered (a stage, the serving release with all its options)
    assert seen == set(RESOURCES), set(RESOURCES) - seen


def test_the_role_grants_nothing_helm_and_llmpipe_do_not_use():
    have = granted()
    objects = set().union(*OBJECTS.values())
    expected = {(v, "", "secrets") for v in set().union(*STORAGE.values())}
    expected |= {(v, g, r) for (g, _), r in RESOURCES.items() for v in objects}
    expected |= {(v, g, r) for g, r in [("apps", "replicasets"), ("", "pods"), ("", "pods/log"), ("", "events"),
                                         ("events.k8s.io", "events")] for v in ("get", "list", "watch")}
    assert have == expected, {"extra": sorted(have - expected), "missing": sorted(expected - have)}
    # never: pods create (a pod would run as anyone), roles / bindings (privilege escalation), the namespace
    assert not any(r in ("roles", "rolebindings", "namespaces", "serviceaccounts") for _, _, r in have)
    assert ("create", "", "pods") not in have


def test_helm_source_citations_name_the_installed_version():
    assert "v4.1.4" in (__doc__ or "") and "v4.1.4" in RBAC.read_text()
