"""Every pod our stages create passes the Pod Security level k8s/namespace.yaml enforces.

1. tests/k8s/podsecurity.py (the admission plugin's checks, offline) against the plugin's own unit-test
   cases (k8s.io/pod-security-admission v0.33.0 policy/check_*_test.go), a violating and a passing pod
   per control, its levels, versions and messages.
2. Each stage rendered as `make deploy-<stage>` renders it (the arguments are read from `make -n`);
   a training stage's PyTorchJob turned into the pods the training operator v1.8.1 creates
   (tests/k8s/operator.py) with the init container template we ship in k8s/training-operator/, and
   each pod admitted by the namespace's enforce level. With the operator's built-in template the
   Worker pods are refused with the API server's exact message: the check sees the real failure.
3. k8s/training-operator/ renders offline and its patch applies to the operator's Deployment.
"""

from __future__ import annotations

import copy
import json
import os
import shlex
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path

import pytest
import yaml

from tests.helm.chart import CHART, K8S_VERSION, REPO, SHARDED, SINGLE, TRAINING, helm, helm_run, render, template_args
from tests.helm.chart import kubectl as find_kubectl
from tests.k8s import operator as op
from tests.k8s import podsecurity as ps

K8S = REPO / "k8s"
OVERLAY = K8S / "training-operator"
CONFIGMAP_FILE = OVERLAY / "restricted-pytorch-init-container.yaml"
PATCH_FILE = OVERLAY / "deployment-patch.json"
NAMESPACE_DOC = yaml.safe_load((K8S / "namespace.yaml").read_text())
NAMESPACE = NAMESPACE_DOC["metadata"]["name"]


def C(name, **sc):
    """A container named name, with securityContext sc when given."""
    c = {"name": name, "image": "img:1"}
    if sc:
        c["securityContext"] = sc
    return c


def pod(*containers, init=(), meta=None, **spec):
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"} if meta is None else meta,
            "spec": {"initContainers": list(init), "containers": list(containers), **spec}}


# ------------------------------------------------------ 1. the checker, from the plugin's own tests

# (check function, pod, reason, detail): inputs and expectations of policy/check_*_test.go at v0.33.0
UPSTREAM_CASES = {
    "allowPrivilegeEscalation multiple containers": (
        ps.allow_privilege_escalation_1_8,
        pod(C("a"), C("b", allowPrivilegeEscalation=None), C("c", allowPrivilegeEscalation=True),
            C("d", allowPrivilegeEscalation=False)),
        "allowPrivilegeEscalation != false",
        'containers "a", "b", "c" must set securityContext.allowPrivilegeEscalation=false'),
    "appArmor unconfined pod": (
        ps.app_armor, pod(C("a"), securityContext={"appArmorProfile": {"type": "Unconfined"}}),
        "forbidden AppArmor profile", 'pod must not set AppArmor profile type to "Unconfined"'),
    "appArmor unconfined init container": (
        ps.app_armor, pod(C("foo"), init=[C("bar", appArmorProfile={"type": "Unconfined"})]),
        "forbidden AppArmor profile", 'container "bar" must not set AppArmor profile type to "Unconfined"'),
    "appArmor annotations": (
        ps.app_armor,
        pod(meta={"annotations": {f"{ps.APPARMOR_ANNOTATION_PREFIX}{k}": v for k, v in
                                  {"": "bogus", "a": "", "b": "runtime/default", "c": "localhost/", "d": "localhost/foo",
                                   "e": "unconfined", "f": "unknown"}.items()}}),
        "forbidden AppArmor profiles",
        "annotations must not set AppArmor profile type to "
        '"container.apparmor.security.beta.kubernetes.io/="bogus"", '
        '"container.apparmor.security.beta.kubernetes.io/e="unconfined"", '
        '"container.apparmor.security.beta.kubernetes.io/f="unknown""'),
    "capabilities_baseline multiple containers": (
        ps.capabilities_baseline,
        pod(C("a", capabilities={"add": ["FOO", "BAR"]}), C("b", capabilities={"add": ["BAR", "BAZ"]}),
            C("c", capabilities={"add": ["NET_BIND_SERVICE", "CHOWN"]})),
        "non-default capabilities", 'containers "a", "b" must not include "BAR", "BAZ", "FOO" in securityContext.capabilities.add'),
    "capabilities_restricted multiple containers": (
        ps.capabilities_restricted_1_22,
        pod(C("a", capabilities={"add": ["FOO", "BAR"]}), C("b", capabilities={"add": ["BAR", "BAZ"]}),
            C("c", capabilities={"add": ["NET_BIND_SERVICE", "CHOWN"], "drop": ["ALL", "FOO"]})),
        "unrestricted capabilities",
        'containers "a", "b" must set securityContext.capabilities.drop=["ALL"]; containers "a", "b", "c" must not include '
        '"BAR", "BAZ", "CHOWN", "FOO" in securityContext.capabilities.add'),
    "capabilities_restricted no security context": (
        ps.capabilities_restricted_1_25, pod(C("a"), os={"name": "linux"}),
        "unrestricted capabilities", 'container "a" must set securityContext.capabilities.drop=["ALL"]'),
    "hostNamespaces": (
        ps.host_namespaces, pod(C("a"), hostNetwork=True, hostPID=True, hostIPC=True),
        "host namespaces", "hostNetwork=true, hostPID=true, hostIPC=true"),
    "hostPathVolumes": (
        ps.host_path_volumes,
        pod(C("x"), volumes=[{"name": "a", "hostPath": {}}, {"name": "b", "hostPath": {}}, {"name": "c", "emptyDir": {}}]),
        "hostPath volumes", 'volumes "a", "b"'),
    "hostPorts one": (
        ps.host_ports, pod(C("a"), {"name": "b", "image": "i", "ports": [{"containerPort": 1, "hostPort": 20}]}),
        "hostPort", 'container "b" uses hostPort 20'),
    "hostPorts several": (
        ps.host_ports,
        pod({"name": "a", "ports": [{"hostPort": 0}]}, {"name": "b", "ports": [{"hostPort": 0}, {"hostPort": 10}, {"hostPort": 20}]},
            {"name": "c", "ports": [{"hostPort": 0}, {"hostPort": 10}, {"hostPort": 30}]}),
        "hostPort", 'containers "b", "c" use hostPorts 10, 20, 30'),
    "privileged": (
        ps.privileged, pod(C("a"), C("b", privileged=None), C("c", privileged=False), C("d", privileged=True),
                           C("e", privileged=True)),
        "privileged", 'containers "d", "e" must not set securityContext.privileged=true'),
    "procMount": (
        ps.proc_mount, pod(C("a"), C("b", procMount=None), C("c", procMount="Default"), C("d", procMount="Unmasked"),
                           C("e", procMount="other")),
        "procMount", 'containers "d", "e" must not set securityContext.procMount to "Unmasked", "other"'),
    "restrictedVolumes": (
        ps.restricted_volumes,
        pod(C("x"), volumes=[{"name": f"a{i}", k: {}} for i, k in enumerate(ps.ALLOWED_VOLUME_SOURCES, 1)]
            + [{"name": f"b{i}", k: {}} for i, k in enumerate(["hostPath", "gcePersistentDisk", "awsElasticBlockStore", "gitRepo",
                                                               "nfs", "iscsi", "glusterfs", "rbd", "flexVolume", "cinder", "cephfs",
                                                               "flocker", "fc", "azureFile", "vsphereVolume", "quobyte",
                                                               "azureDisk", "photonPersistentDisk", "portworxVolume", "scaleIO",
                                                               "storageos"], 1)]
            + [{"name": "c1"}]),
        "restricted volume types",
        'volumes "b1", "b2", "b3", "b4", "b5", "b6", "b7", "b8", "b9", "b10", "b11", "b12", "b13", "b14", "b15", "b16", "b17", '
        '"b18", "b19", "b20", "b21", "c1" use restricted volume types "awsElasticBlockStore", "azureDisk", "azureFile", '
        '"cephfs", "cinder", "fc", "flexVolume", "flocker", "gcePersistentDisk", "gitRepo", "glusterfs", "hostPath", "iscsi", '
        '"nfs", "photonPersistentDisk", "portworxVolume", "quobyte", "rbd", "scaleIO", "storageos", "unknown", "vsphereVolume"'),
    "runAsNonRoot not set": (
        ps.run_as_non_root, pod(C("a")), "runAsNonRoot != true", 'pod or container "a" must set securityContext.runAsNonRoot=true'),
    "runAsNonRoot pod false": (
        ps.run_as_non_root, pod(C("a"), securityContext={"runAsNonRoot": False}),
        "runAsNonRoot != true", "pod must not set securityContext.runAsNonRoot=false"),
    "runAsNonRoot containers false": (
        ps.run_as_non_root,
        pod(C("a"), C("b", runAsNonRoot=True), C("c", runAsNonRoot=False), C("d", runAsNonRoot=False),
            securityContext={"runAsNonRoot": True}),
        "runAsNonRoot != true", 'containers "c", "d" must not set securityContext.runAsNonRoot=false'),
    "runAsNonRoot pod nil, container fallthrough": (
        ps.run_as_non_root, pod(C("a"), C("b"), C("c", runAsNonRoot=True)),
        "runAsNonRoot != true", 'pod or containers "a", "b" must set securityContext.runAsNonRoot=true'),
    "runAsUser pod 0": (
        ps.run_as_user, pod(C("a"), securityContext={"runAsUser": 0}), "runAsUser=0", "pod must not set runAsUser=0"),
    "runAsUser containers 0": (
        ps.run_as_user, pod(C("a"), C("b", runAsUser=1), C("c", runAsUser=0), C("d", runAsUser=0), securityContext={"runAsUser": 1}),
        "runAsUser=0", 'containers "c", "d" must not set runAsUser=0'),
    "seLinuxOptions pod and containers": (
        ps.se_linux_1_31,
        pod(*[C(n, seLinuxOptions=o) for n, o in [("a", {"type": "container_t"}), ("b", {"type": "container_init_t"}),
                                                  ("c", {"type": "container_kvm_t"}), ("d", {"type": "container_engine_t"}),
                                                  ("e", {"type": "bar"}), ("f", {"user": "bar"}), ("g", {"role": "baz"})]],
            securityContext={"seLinuxOptions": {"type": "foo", "user": "bar", "role": "baz"}}),
        "seLinuxOptions",
        'pod and containers "e", "f", "g" set forbidden securityContext.seLinuxOptions: types "bar", "foo"; user may not be set; '
        "role may not be set"),
    "seLinuxOptions bad type": (
        ps.se_linux_1_31, pod(C("a"), securityContext={"seLinuxOptions": {"type": "bad"}}),
        "seLinuxOptions", 'pod set forbidden securityContext.seLinuxOptions: type "bad"'),
    "seccompProfile_baseline annotations": (
        ps.seccomp_baseline_1_0,
        pod(C("a"), C("b"), C("c"), meta={"annotations": {
            "seccomp.security.alpha.kubernetes.io/pod": "unconfined",
            "container.seccomp.security.alpha.kubernetes.io/a": "unconfined",
            "container.seccomp.security.alpha.kubernetes.io/b": "unknown",
            "container.seccomp.security.alpha.kubernetes.io/c": "runtime/default"}}),
        "seccompProfile",
        'forbidden annotations container.seccomp.security.alpha.kubernetes.io/a="unconfined", '
        'container.seccomp.security.alpha.kubernetes.io/b="unknown", seccomp.security.alpha.kubernetes.io/pod="unconfined"'),
    "seccompProfile_baseline pod and containers": (
        ps.seccomp_baseline_1_19,
        pod(C("a"), C("b", seccompProfile={"type": "RuntimeDefault"}), C("c", seccompProfile={"type": "Unconfined"}),
            C("d", seccompProfile={"type": "Unconfined"}), securityContext={"seccompProfile": {"type": "Unconfined"}}),
        "seccompProfile", 'pod and containers "c", "d" must not set securityContext.seccompProfile.type to "Unconfined"'),
    "seccompProfile_restricted not set": (
        ps.seccomp_restricted_1_25, pod(C("a"), os={"name": "linux"}),
        "seccompProfile", 'pod or container "a" must set securityContext.seccompProfile.type to "RuntimeDefault" or "Localhost"'),
    "seccompProfile_restricted containers invalid": (
        ps.seccomp_restricted_1_19,
        pod(C("a"), C("b", seccompProfile={"type": "RuntimeDefault"}), C("c", seccompProfile={"type": "Unconfined"}),
            C("d", seccompProfile={"type": "Unconfined"}), securityContext={"seccompProfile": {"type": "RuntimeDefault"}}),
        "seccompProfile", 'containers "c", "d" must not set securityContext.seccompProfile.type to "Unconfined"'),
    "seccompProfile_restricted pod nil, container fallthrough": (
        ps.seccomp_restricted_1_19, pod(C("a"), C("b"), C("c", seccompProfile={"type": "RuntimeDefault"})),
        "seccompProfile", 'pod or containers "a", "b" must set securityContext.seccompProfile.type to "RuntimeDefault" or "Localhost"'),
    "sysctls": (
        ps.sysctls_1_32, pod(C("a"), securityContext={"sysctls": [{"name": "a"}, {"name": "b"}, {"name": "net.ipv4.tcp_rmem"}]}),
        "forbidden sysctls", "a, b"),
    "sysctls new in 1.32, at 1.29": (
        ps.sysctls_1_29, pod(C("a"), securityContext={"sysctls": [{"name": "net.ipv4.tcp_wmem"}]}),
        "forbidden sysctls", "net.ipv4.tcp_wmem"),
    "windowsHostProcess": (
        ps.host_process,
        pod(C("a"), C("b", windowsOptions={}), C("c", windowsOptions={"hostProcess": None}), C("d", windowsOptions={"hostProcess": False}),
            C("e", windowsOptions={"hostProcess": True}), C("f", windowsOptions={"hostProcess": True}),
            securityContext={"windowsOptions": {"hostProcess": True}}),
        "hostProcess", 'pod and containers "e", "f" must not set securityContext.windowsOptions.hostProcess=true'),
}


@pytest.mark.parametrize("case", list(UPSTREAM_CASES))
def test_checks_match_the_admission_plugins_unit_tests(case):
    fn, p, reason, detail = UPSTREAM_CASES[case]
    meta, spec = p["metadata"], p["spec"]
    assert fn(meta, spec) == ps.CheckResult(False, reason, detail)


COMPLIANT = pod(C("app", allowPrivilegeEscalation=False, capabilities={"drop": ["ALL"], "add": ["NET_BIND_SERVICE"]}),
                init=[C("init", allowPrivilegeEscalation=False, capabilities={"drop": ["ALL"]}, runAsUser=1000)],
                securityContext={"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}, "runAsUser": 1000,
                                 "sysctls": [{"name": "net.ipv4.tcp_rmem"}], "seLinuxOptions": {"type": "container_engine_t"},
                                 "appArmorProfile": {"type": "RuntimeDefault"}},
                volumes=[{"name": f"v-{k}", k: {}} for k in ps.ALLOWED_VOLUME_SOURCES] + [{"name": "defaulted"}])


def test_every_check_passes_a_compliant_pod():
    for check, fn in ps.checks_for("baseline", "v1.33") + ps.checks_for("restricted", "v1.33"):
        assert fn(COMPLIANT["metadata"], ps.api_defaults(COMPLIANT["spec"])).allowed, (check.id, fn.__name__)
    assert ps.evaluate(COMPLIANT, "restricted", "v1.33").allowed


def _break(control: str) -> dict:
    """COMPLIANT with one control violated."""
    p = copy.deepcopy(COMPLIANT)
    s, app, init = p["spec"], p["spec"]["containers"][0], p["spec"]["initContainers"][0]
    if control == "HostProcess":
        app["securityContext"]["windowsOptions"] = {"hostProcess": True}
    elif control == "Host Namespaces":
        s["hostPID"] = True
    elif control == "Privileged Containers":
        init["securityContext"]["privileged"] = True
    elif control in ("Capabilities", "Capabilities (v1.22+)"):
        app["securityContext"]["capabilities"]["add"].append("SYS_ADMIN")
    elif control in ("HostPath Volumes", "Volume Types"):
        s["volumes"].append({"name": "host", "hostPath": {"path": "/"}})
    elif control == "Host Ports":
        app["ports"] = [{"containerPort": 80, "hostPort": 80}]
    elif control == "AppArmor":
        init["securityContext"]["appArmorProfile"] = {"type": "Unconfined"}
    elif control == "SELinux":
        app["securityContext"]["seLinuxOptions"] = {"user": "root"}
    elif control == "/proc Mount Type":
        app["securityContext"]["procMount"] = "Unmasked"
    elif control in ("Seccomp", "Seccomp (v1.19+)"):
        init["securityContext"]["seccompProfile"] = {"type": "Unconfined"}
    elif control == "Sysctls":
        s["securityContext"]["sysctls"].append({"name": "kernel.msgmax"})
    elif control == "Privilege Escalation (v1.8+)":
        del init["securityContext"]["allowPrivilegeEscalation"]
    elif control == "Running as Non-root":
        s["securityContext"]["runAsNonRoot"] = False
    elif control == "Running as Non-root user (v1.23+)":
        init["securityContext"]["runAsUser"] = 0
    else:
        raise AssertionError(control)
    return p


# the control a violation of each is reported under at each level (restricted replaces three baseline checks)
BASELINE_CONTROLS = ["AppArmor", "Capabilities", "Host Namespaces", "HostPath Volumes", "Host Ports", "Privileged Containers",
                     "/proc Mount Type", "SELinux", "Seccomp", "Sysctls", "HostProcess"]
RESTRICTED_ONLY = ["Privilege Escalation (v1.8+)", "Running as Non-root", "Running as Non-root user (v1.23+)"]
AS_RESTRICTED = {"Capabilities": "Capabilities (v1.22+)", "HostPath Volumes": "Volume Types", "Seccomp": "Seccomp (v1.19+)"}


@pytest.mark.parametrize("control", BASELINE_CONTROLS + RESTRICTED_ONLY)
def test_each_control_refuses_its_violation(control):
    p = _break(control)
    restricted = AS_RESTRICTED.get(control, control)
    assert ps.failed_controls(p, "restricted", "v1.33") == [restricted]
    assert ps.failed_controls(p, "baseline", "v1.33") == ([] if control in RESTRICTED_ONLY else [control])
    assert ps.failed_controls(p, "privileged", "v1.33") == []
    assert ps.rejection_message(p, "restricted", "v1.33").startswith('pods "p" is forbidden: violates PodSecurity "restricted:v1.33": ')


def test_every_control_is_covered():
    assert sorted({c.control for c in ps.CHECKS}) == sorted(BASELINE_CONTROLS + RESTRICTED_ONLY + list(AS_RESTRICTED.values()))
    tested = {fn for fn, *_ in UPSTREAM_CASES.values()}
    assert {c.id for c in ps.CHECKS} == {c.id for c in ps.CHECKS if {v[1] for v in c.versions} & tested}


def test_levels_and_versions():
    """policy/registry.go: which checks run, in which order, at level:version."""
    assert [c.id for c, _ in ps.checks_for("restricted", "v1.33")] == [
        "appArmorProfile", "hostNamespaces", "hostPorts", "privileged", "procMount", "seLinuxOptions", "sysctls",
        "windowsHostProcess", "allowPrivilegeEscalation", "capabilities_restricted", "restrictedVolumes", "runAsNonRoot",
        "runAsUser", "seccompProfile_restricted"]
    assert [c.id for c, _ in ps.checks_for("baseline", "v1.33")] == [
        "appArmorProfile", "capabilities_baseline", "hostNamespaces", "hostPathVolumes", "hostPorts", "privileged",
        "procMount", "seLinuxOptions", "seccompProfile_baseline", "sysctls", "windowsHostProcess"]
    assert ps.checks_for("privileged", "v1.33") == []
    assert ps.checks_for("restricted", "latest") == ps.checks_for("restricted", "v1.33") == ps.checks_for("restricted", "v1.40")
    # checks that came later
    assert "runAsUser" not in [c.id for c, _ in ps.checks_for("restricted", "v1.22")]
    assert "capabilities_baseline" in [c.id for c, _ in ps.checks_for("restricted", "v1.21")]
    rmem = pod(C("a"), securityContext={"sysctls": [{"name": "net.ipv4.tcp_rmem"}]})
    assert ps.forbidden_reasons(rmem, "baseline", "v1.31") == ["forbidden sysctls (net.ipv4.tcp_rmem)"]
    assert ps.forbidden_reasons(rmem, "baseline", "v1.32") == []
    engine = pod(C("a", seLinuxOptions={"type": "container_engine_t"}))
    assert ps.forbidden_reasons(engine, "baseline", "v1.30") and not ps.forbidden_reasons(engine, "baseline", "v1.31")
    windows = pod(C("a"), os={"name": "windows"}, securityContext={"runAsNonRoot": True})
    assert ps.forbidden_reasons(windows, "restricted", "v1.33") == []
    assert len(ps.forbidden_reasons(windows, "restricted", "v1.24")) == 3  # privilege escalation, capabilities, seccomp
    with pytest.raises(ValueError):
        ps.parse_version("1.33")


def test_rejection_message_is_the_api_servers():
    """admission/admission.go: EvaluatePod + apierrors.NewForbidden; reasons in check order, joined by ", "."""
    bare = pod(C("a"), meta={"name": "x"}, securityContext={"runAsUser": 0})
    assert ps.rejection_message(bare, "restricted", "v1.33") == (
        'pods "x" is forbidden: violates PodSecurity "restricted:v1.33": '
        'allowPrivilegeEscalation != false (container "a" must set securityContext.allowPrivilegeEscalation=false), '
        'unrestricted capabilities (container "a" must set securityContext.capabilities.drop=["ALL"]), '
        'runAsNonRoot != true (pod or container "a" must set securityContext.runAsNonRoot=true), '
        "runAsUser=0 (pod must not set runAsUser=0), "
        'seccompProfile (pod or container "a" must set securityContext.seccompProfile.type to "RuntimeDefault" or "Localhost")')
    assert ps.rejection_message(bare, "baseline", "v1.33") is None
    assert ps.rejection_message(pod(C("a"), meta={}, hostPID=True), "baseline", "latest") == (
        'pods is forbidden: violates PodSecurity "baseline:latest": host namespaces (hostPID=true)')
    assert ps.warning_message(bare, "restricted", "v1.33").startswith('would violate PodSecurity "restricted:v1.33": allowPrivilege')


def test_namespace_policy():
    """api/helpers.go: PolicyToEvaluate."""
    assert ps.namespace_policy(NAMESPACE_DOC) == ps.Policy(("restricted", "v1.33"), ("restricted", "v1.33"), ("restricted", "v1.33"))
    assert ps.namespace_policy({"metadata": {}}).enforce == ("privileged", "latest")
    enforce_only = {"metadata": {"labels": {ps.ENFORCE_LABEL: "baseline", ps.ENFORCE_VERSION_LABEL: "v1.30"}}}
    assert ps.namespace_policy(enforce_only).warn == ("baseline", "v1.30")  # warn follows a stricter enforce
    allowed, message, warnings = ps.admit_pod(pod(C("a"), hostPID=True, meta={"name": "h"}), enforce_only)
    assert not allowed and message.startswith('pods "h" is forbidden: violates PodSecurity "baseline:v1.30": host namespaces')
    warn_only = {"metadata": {"labels": {ps.WARN_LABEL: "restricted"}}}
    assert ps.admit_pod(pod(C("a")), warn_only)[0] is True and ps.admit_pod(pod(C("a")), warn_only)[2]
    with pytest.raises(ValueError):
        ps.namespace_policy({"metadata": {"labels": {ps.ENFORCE_LABEL: "strict"}}})


# --------------------------------------------------------------- 2. what our stages create

POLICY = ps.namespace_policy(NAMESPACE_DOC)
CLUSTER = REPO / "jobs" / "cluster"
JOB_STAGES = [s for s in SINGLE + SHARDED if (CLUSTER / f"{s}.yaml").is_file()]
VARIANTS = [(s, p.stem[len(s) + 1:]) for s in SHARDED for p in sorted(CLUSTER.glob(f"{s}-*.yaml"))]
TRAIN_STAGES = [s for s in TRAINING if (CLUSTER / f"{s}.yaml").is_file()]


@lru_cache(maxsize=None)
def make_deploy_args(stage: str, variant: str = "") -> tuple[str, ...]:
    """The arguments `make deploy-<stage> [VARIANT=v]` passes to `helm upgrade --install` (read from
    `make -n`, without a site VALUES file or HELM_ARGS)."""
    make = shutil.which("make")
    if make is None:
        pytest.skip("make not found")
    out = subprocess.run([make, "-n", "-s", f"deploy-{stage}", "VALUES=", "HELM_ARGS=", f"VARIANT={variant}",
                          f"K8S_NAMESPACE={NAMESPACE}", "CHART=charts/llm-pipeline"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stdout.splitlines() if " upgrade --install " in line]
    assert len(lines) == 1, out.stdout
    return tuple(shlex.split(lines[0].split(" upgrade --install ", 1)[1]))


def parse_deploy_args(args: tuple[str, ...]) -> dict:
    release, chart, *rest = args
    got = {"release": release, "chart": chart, "namespace": None, "config": None, "values": [], "sets": []}
    it = iter(rest)
    for a in it:
        if a == "-n":
            got["namespace"] = next(it)
        elif a == "--set-file":
            key, path = next(it).split("=", 1)
            assert key == "config", a
            got["config"] = path
        elif a in ("-f", "--values"):
            got["values"].append(next(it))
        elif a == "--set":
            got["sets"].append(next(it))
        else:
            raise AssertionError(f"unexpected argument {a!r} in make deploy's helm command: {args}")
    return got


def render_as_deployed(stage: str, *extra_sets: str, variant: str = "") -> list[dict]:
    """What `make deploy-<stage>` applies (+ extra --set as HELM_ARGS would add them)."""
    helm()
    d = parse_deploy_args(make_deploy_args(stage, variant))
    assert d["namespace"] == NAMESPACE and Path(REPO / d["chart"]).resolve() == CHART.resolve()
    sets = [s for s in d["sets"] if s != f"stage={stage}"]
    assert len(sets) == len(d["sets"]) - 1, d
    values = [REPO / v for v in d["values"]]
    if not variant:
        assert d["release"] == f"llmpipe-{stage}"
        return render(stage, REPO / d["config"], *sets, *extra_sets, values=values)
    # a variant's release is llmpipe-<stage>-<variant>: helm template with make's own arguments
    args = ["template", d["release"], str(CHART), "-n", NAMESPACE, "--set", f"stage={stage}",
            "--set-file", f"config={REPO / d['config']}"]
    for v in values:
        args += ["-f", str(v)]
    for s in sets + list(extra_sets):
        args += ["--set", s]
    return [doc for doc in yaml.safe_load_all(helm_run(*args).stdout) if doc]


@pytest.mark.parametrize("stage", TRAIN_STAGES + JOB_STAGES)
def test_render_uses_make_deploys_arguments(stage):
    """render() (tests/helm/chart.py) builds the same helm arguments as the Makefile."""
    d = parse_deploy_args(make_deploy_args(stage))
    sets = [s for s in d["sets"] if s != f"stage={stage}"]
    mine = template_args(stage, REPO / d["config"], *sets, values=[REPO / v for v in d["values"]], namespace=NAMESPACE)
    made = ["template", d["release"], str(CHART), "-n", d["namespace"], "--set", f"stage={stage}",
            "--set-file", f"config={REPO / d['config']}"]
    for v in d["values"]:
        made += ["-f", str(REPO / v)]
    for s in sets:
        made += ["--set", s]
    assert mine == made


@lru_cache(maxsize=1)
def shipped_template() -> str:
    cm = yaml.safe_load(CONFIGMAP_FILE.read_text())
    return cm["data"]["initContainer.yaml"]


def operator_pods(pytorchjob: dict, template: str) -> list[dict]:
    job = copy.deepcopy(pytorchjob)
    job["metadata"].setdefault("namespace", NAMESPACE)
    job["metadata"].setdefault("uid", "6f1c1d8e-0000-4000-8000-000000000001")
    return op.pods_for(job, init_template=template)


def job_pods(job: dict) -> list[dict]:
    """The pod a Job's controller creates, as far as Pod Security sees it: the template."""
    tpl = job["spec"]["template"]
    meta = dict(tpl.get("metadata") or {}, name=f"{job['metadata']['name']}-abcde", namespace=NAMESPACE)
    return [{"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": tpl["spec"]}]


def assert_admitted(p: dict) -> None:
    import kubernetes_validate

    allowed, message, warnings = ps.admit_pod(p, NAMESPACE_DOC)
    assert allowed, message
    assert warnings == [], warnings
    kubernetes_validate.validate(p, K8S_VERSION, strict=True)  # a Pod the API server would decode as is
    psc = p["spec"].get("securityContext") or {}
    for c in p["spec"].get("initContainers") or []:
        # runAsNonRoot with an image whose user is root (alpine) needs a numeric uid, or the kubelet refuses
        uid = (c.get("securityContext") or {}).get("runAsUser", psc.get("runAsUser"))
        assert isinstance(uid, int) and uid > 0, (p["metadata"]["name"], c["name"])


TRAIN_CASES = [(s, sets) for s in TRAIN_STAGES for sets in ((), ("nnodes=4",), ("nnodes=4", "elasticPolicy.maxRestarts=3"))]


@pytest.fixture(scope="module")
def training_jobs() -> dict:
    out = {}
    for stage, sets in TRAIN_CASES:
        jobs = [d for d in render_as_deployed(stage, *sets) if d["kind"] == "PyTorchJob"]
        assert len(jobs) == 1, (stage, sets)
        out[(stage, sets)] = jobs[0]
    return out


def test_namespace_enforces_a_level():
    assert POLICY.enforce == (NAMESPACE_DOC["metadata"]["labels"][ps.ENFORCE_LABEL],
                              NAMESPACE_DOC["metadata"]["labels"][ps.ENFORCE_VERSION_LABEL])
    assert POLICY.enforce[0] != "privileged"  # else nothing below would be checked


@pytest.mark.parametrize("stage, sets", TRAIN_CASES, ids=lambda v: "-".join(v) if isinstance(v, tuple) else v)
def test_training_pods_pass_with_the_shipped_init_container(training_jobs, stage, sets):
    job = training_jobs[(stage, sets)]
    assert op.validate(job) == [] and op.webhook_warnings(job) == []  # the operator's webhook admits the job
    pods = operator_pods(job, shipped_template())
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert len(pods) == sum(r["replicas"] for r in replicas.values())
    for p in pods:
        assert_admitted(p)
    for svc in op.services_for(dict(job, metadata=dict(job["metadata"], namespace=NAMESPACE))):
        assert len(svc["metadata"]["name"]) <= 63 and op._dns1035_errors(svc["metadata"]["name"]) == []
    if "Master" in replicas and "Worker" in replicas:
        workers = [p for p in pods if p["metadata"]["labels"][op.REPLICA_TYPE_LABEL] == "worker"]
        assert workers and all([c["name"] for c in p["spec"]["initContainers"]] == ["init-pytorch"] for p in workers)


@pytest.mark.parametrize("stage, sets", TRAIN_CASES, ids=lambda v: "-".join(v) if isinstance(v, tuple) else v)
def test_the_operators_default_init_container_is_refused(training_jobs, stage, sets):
    """The failure this fixes: every pod with the built-in init-pytorch is refused, with this message."""
    level, version = POLICY.enforce
    pods = operator_pods(training_jobs[(stage, sets)], op.DEFAULT_INIT_TEMPLATE)
    for p in pods:
        name = p["metadata"]["name"]
        if not p["spec"].get("initContainers"):
            assert ps.rejection_message(p, level, version) is None, name
            continue
        assert ps.rejection_message(p, level, version) == (
            f'pods "{name}" is forbidden: violates PodSecurity "{level}:{version}": '
            'allowPrivilegeEscalation != false (container "init-pytorch" must set securityContext.allowPrivilegeEscalation=false), '
            'unrestricted capabilities (container "init-pytorch" must set securityContext.capabilities.drop=["ALL"])')
        assert ps.failed_controls(p, level, version) == ["Privilege Escalation (v1.8+)", "Capabilities (v1.22+)"]
    if sets == ("nnodes=4",):
        refused = [p["metadata"]["name"] for p in pods if ps.rejection_message(p, level, version)]
        assert refused == [f"llmpipe-{stage}-worker-{i}" for i in range(3)]  # every Worker, not the Master


@pytest.mark.parametrize("stage, variant", [(s, "") for s in JOB_STAGES] + VARIANTS)
def test_job_pods_pass(stage, variant):
    jobs = [d for d in render_as_deployed(stage, variant=variant) if d["kind"] == "Job"]
    assert jobs
    for job in jobs:
        assert ps.warning_message(job["spec"]["template"], *POLICY.warn) is None  # no warning on the Job itself
        for p in job_pods(job):
            assert_admitted(p)


# ------------------------------------------------------------------ 3. k8s/training-operator/


def kubectl(*args: str, cwd: Path | None = None) -> str:
    out = subprocess.run([find_kubectl(), *args], capture_output=True, text=True, timeout=120, cwd=cwd)
    assert out.returncode == 0, out.stderr
    return out.stdout


# The operator's Deployment as training-operator v1.8.1 ships it (manifests/base/deployment.yaml in the
# namespace of manifests/overlays/standalone): only the facts the patch depends on.
OPERATOR_DEPLOYMENT = {
    "apiVersion": "apps/v1", "kind": "Deployment",
    "metadata": {"name": "training-operator", "namespace": "kubeflow", "labels": {"control-plane": "kubeflow-training-operator"}},
    "spec": {"selector": {"matchLabels": {"control-plane": "kubeflow-training-operator"}}, "replicas": 1,
             "template": {"metadata": {"labels": {"control-plane": "kubeflow-training-operator"}},
                          "spec": {"containers": [{"name": "training-operator", "image": "kubeflow/training-operator:v1-04f9f13",
                                                   "command": ["/manager"],
                                                   "securityContext": {"allowPrivilegeEscalation": False},
                                                   "volumeMounts": [{"name": "cert", "readOnly": True,
                                                                     "mountPath": "/tmp/k8s-webhook-server/serving-certs"}]}],
                                   "serviceAccountName": "training-operator",
                                   "volumes": [{"name": "cert", "secret": {"secretName": "training-operator-webhook-cert",
                                                                           "defaultMode": 420}}]}}}}


def test_overlay_renders_offline():
    docs = [d for d in yaml.safe_load_all(kubectl("kustomize", str(OVERLAY))) if d]
    assert [(d["kind"], d["metadata"]["name"], d["metadata"]["namespace"]) for d in docs] == [
        ("ConfigMap", "restricted-pytorch-init-container", "kubeflow")]
    assert docs[0]["data"]["initContainer.yaml"] == shipped_template()


def _check_patched(deploy: dict) -> None:
    cm = yaml.safe_load(CONFIGMAP_FILE.read_text())
    spec = deploy["spec"]["template"]["spec"]
    (c,) = [c for c in spec["containers"] if c["name"] == "training-operator"]
    flags = [a for a in c.get("args", []) if a.startswith(op.INIT_TEMPLATE_FLAG + "=")]
    assert len(flags) == 1
    path = flags[0].split("=", 1)[1]
    (vol,) = [v for v in spec["volumes"] if v.get("configMap", {}).get("name") == cm["metadata"]["name"]]
    (mount,) = [m for m in c["volumeMounts"] if m["name"] == vol["name"]]
    item = vol["configMap"].get("items") or [{"key": k, "path": k} for k in cm["data"]]
    files = {f"{mount['mountPath'].rstrip('/')}/{i['path']}": i["key"] for i in item}
    assert files.get(path) == "initContainer.yaml", (path, files)
    assert path == op.INIT_TEMPLATE_FILE_DEFAULT  # used even if the flag were lost
    assert mount.get("readOnly") is True
    assert deploy["metadata"]["namespace"] == cm["metadata"]["namespace"]
    assert {m["name"] for m in c["volumeMounts"]} >= {"cert"} and {v["name"] for v in spec["volumes"]} >= {"cert"}


def test_patch_applies_with_kubectl_patch(tmp_path):
    """The README's `kubectl patch --type=strategic --patch-file`, run locally on the Deployment."""
    src = tmp_path / "deployment.json"
    src.write_text(json.dumps(OPERATOR_DEPLOYMENT))
    out = kubectl("patch", "--local", "-f", str(src), "--type=strategic", "--patch-file", str(PATCH_FILE), "-o", "json")
    patched = json.loads(out)
    _check_patched(patched)
    c = patched["spec"]["template"]["spec"]["containers"][0]
    assert c["command"] == ["/manager"] and c["image"] == OPERATOR_DEPLOYMENT["spec"]["template"]["spec"]["containers"][0]["image"]


def test_patch_works_as_a_kustomize_patch(tmp_path):
    """For a site that manages the operator with kustomize: the same file as a `patches:` entry."""
    (tmp_path / "deployment.yaml").write_text(yaml.safe_dump(OPERATOR_DEPLOYMENT))
    shutil.copy(PATCH_FILE, tmp_path / PATCH_FILE.name)
    shutil.copy(CONFIGMAP_FILE, tmp_path / CONFIGMAP_FILE.name)
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "resources": ["deployment.yaml", CONFIGMAP_FILE.name], "patches": [{"path": PATCH_FILE.name}]}))
    docs = [d for d in yaml.safe_load_all(kubectl("kustomize", str(tmp_path))) if d]
    _check_patched(next(d for d in docs if d["kind"] == "Deployment"))


@pytest.mark.skipif(not os.environ.get("TRAINING_OPERATOR_DEPLOYMENT"),
                    reason="set TRAINING_OPERATOR_DEPLOYMENT to training-operator v1.8.1's manifests/base/deployment.yaml")
def test_patch_applies_to_the_upstream_deployment():
    upstream = Path(os.environ["TRAINING_OPERATOR_DEPLOYMENT"])
    patched = json.loads(kubectl("patch", "--local", "-f", str(upstream), "--type=strategic", "--patch-file", str(PATCH_FILE),
                                 "-o", "json"))
    patched["metadata"]["namespace"] = "kubeflow"  # the standalone overlay's namespace
    _check_patched(patched)
    assert not [a for a in (yaml.safe_load(upstream.read_text())["spec"]["template"]["spec"]["containers"][0].get("args") or [])]


def test_shipped_template_alone_passes_restricted():
    """The template is enough on its own (a pod without pod-level securityContext), and keeps the
    operator's container: name, image placeholder, command and resources."""
    (init,) = op.parse_init_containers(op.execute_init_template(shipped_template(), "j-master-0"))
    (default,) = op.parse_init_containers(op.execute_init_template(op.DEFAULT_INIT_TEMPLATE, "j-master-0"))
    assert {k: v for k, v in init.items() if k != "securityContext"} == default
    bare = pod({"name": "pytorch", "image": "i", "securityContext": init["securityContext"]}, init=[init])
    assert ps.forbidden_reasons(bare, *POLICY.enforce) == []
    sc = init["securityContext"]
    assert sc["runAsUser"] > 0 and sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
    assert set(init) <= op.CONTAINER_FIELDS and set(sc) <= op.SECURITY_CONTEXT_FIELDS  # nothing the operator drops
    assert "<" not in shipped_template()  # html/template would treat it as markup


def test_readme_applies_the_overlay():
    readme = (K8S / "README.md").read_text()
    assert "kubectl apply -k k8s/training-operator" in readme
    assert "--patch-file k8s/training-operator/deployment-patch.json" in readme
