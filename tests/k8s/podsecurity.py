"""Pod Security admission, offline: the baseline and restricted checks of Kubernetes v1.33.

Why this exists. The namespace (k8s/namespace.yaml) enforces Pod Security "restricted" at v1.33, and
the pods that matter are created by the Kubeflow training operator, not by us, so the tests must
judge a Pod exactly as the API server's PodSecurity admission plugin does - same checks, same
version semantics, same forbidden reasons - without a cluster.

What was looked at first (offline checkers that install from PyPI here):
- checkov 3.3.30: its Kubernetes checks (CKV_K8S_*) are best-practice lints (probes, limits, image
  digests, "high UID") with no Pod Security levels or versions; of the restricted controls it misses
  the volume-type allow-list, hostPath (only the docker socket), procMount, SELinux, sysctls,
  AppArmor, Windows hostProcess, the capability allow-lists, and it prints its own messages.
  Tried on a pod with a hostPath volume: not flagged.
- k8s-policy-guard 1.0.0: its own approximation of the standards mixed with extra rules
  (readOnlyRootFilesystem, service accounts), no policy versions, its own messages.
- kyverno, kubescape, polaris, kube-linter: no PyPI wheel that runs offline here (polaris on PyPI is
  an unrelated package); kubernetes' pod-security-admission itself is Go, and there is no Go toolchain.
None covers every control with the admission plugin's semantics, so the checks are written here.

Source. k8s.io/pod-security-admission at v0.33.0 (the release of Kubernetes v1.33; policy/ is the same
up to v0.33.13): policy/check_*.go for each check, policy/registry.go for which checks apply at a
level and version (restricted = its own checks + the baseline checks it does not override; checks
ordered by ID, baseline first), policy/checks.go for how reasons and details are joined,
admission/admission.go (EvaluatePod) and admission/response.go (forbiddenResponse ->
k8s.io/apimachinery pkg/api/errors: NewForbidden) for the messages, api/helpers.go for the namespace
labels. Control names are those of https://kubernetes.io/docs/concepts/security/pod-security-standards/.
Each check's docstring names its control and file.

Input: a Pod (or a pod template, or a bare PodSpec) as a dict; evaluate() first applies the one API
default that matters (a volume that names no source becomes an emptyDir, see api_defaults).
The user-namespace relaxation (RelaxPolicyForUserNamespacePods) is off, as in a default v1.33 API server.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

LEVELS = ("privileged", "baseline", "restricted")
LATEST = "latest"
ENFORCE_LABEL = "pod-security.kubernetes.io/enforce"
ENFORCE_VERSION_LABEL = "pod-security.kubernetes.io/enforce-version"
AUDIT_LABEL = "pod-security.kubernetes.io/audit"
AUDIT_VERSION_LABEL = "pod-security.kubernetes.io/audit-version"
WARN_LABEL = "pod-security.kubernetes.io/warn"
WARN_VERSION_LABEL = "pod-security.kubernetes.io/warn-version"


@dataclass(frozen=True)
class CheckResult:
    """policy/checks.go: CheckResult."""
    allowed: bool
    reason: str = ""
    detail: str = ""


ALLOWED = CheckResult(True)


@dataclass
class AggregateResult:
    """policy/checks.go: AggregateCheckResult (ForbiddenReason, ForbiddenDetail)."""
    allowed: bool
    reasons: list[str] = field(default_factory=list)
    details: list[str] = field(default_factory=list)

    def forbidden_reason(self) -> str:
        return ", ".join(self.reasons)

    def forbidden_detail(self) -> str:
        """`reason (detail), reason, ...` - what the admission messages print."""
        return ", ".join(f"{r} ({d})" if d else r for r, d in zip(self.reasons, self.details))

    def forbidden(self) -> list[str]:
        """One `reason (detail)` per failed check."""
        return [f"{r} ({d})" if d else r for r, d in zip(self.reasons, self.details)]


# ------------------------------------------------------------------------------------ helpers


def _spec_meta(obj: dict) -> tuple[dict, dict]:
    """(metadata, spec) of a Pod, a pod template, or a PodSpec."""
    if "containers" in obj:
        return {}, obj
    return obj.get("metadata") or {}, obj.get("spec") or {}


def _g(d: dict | None, *path):
    """A nested value, None for missing or null (a nil pointer in Go)."""
    for key in path:
        if not isinstance(d, dict):
            return None
        d = d.get(key)
    return d


def _containers(spec: dict) -> list[dict]:
    """policy/visitor.go: visitContainers: initContainers, containers, ephemeralContainers."""
    return list(spec.get("initContainers") or []) + list(spec.get("containers") or []) + \
        list(spec.get("ephemeralContainers") or [])


def _join_quote(items) -> str:
    """policy/helpers.go: joinQuote."""
    items = list(items)
    return '"' + '", "'.join(items) + '"' if items else ""


def _pluralize(singular: str, plural: str, count: int) -> str:
    """policy/helpers.go: pluralize."""
    return singular if count == 1 else plural


def _windows(spec: dict) -> bool:
    return _g(spec, "os", "name") == "windows"


def _is_zero(v) -> bool:
    return v is not None and not isinstance(v, bool) and v == 0


RELAX_FOR_USER_NAMESPACE_PODS = False


def _relax_for_user_namespace(spec: dict) -> bool:
    """policy/helpers.go: relaxPolicyForUserNamespacePod (off unless the API server opts in)."""
    return RELAX_FOR_USER_NAMESPACE_PODS and spec.get("hostUsers") is False


# ------------------------------------------------------------------------------ the checks


def host_process(meta: dict, spec: dict) -> CheckResult:
    """Control "HostProcess" (baseline). policy/check_windowsHostProcess.go: windowsHostProcess_1_0."""
    bad = [c.get("name", "") for c in _containers(spec) if _g(c, "securityContext", "windowsOptions", "hostProcess") is True]
    setters = ["pod"] if _g(spec, "securityContext", "windowsOptions", "hostProcess") is True else []
    if bad:
        setters.append(f"{_pluralize('container', 'containers', len(bad))} {_join_quote(bad)}")
    if setters:
        return CheckResult(False, "hostProcess",
                           f"{' and '.join(setters)} must not set securityContext.windowsOptions.hostProcess=true")
    return ALLOWED


def host_namespaces(meta: dict, spec: dict) -> CheckResult:
    """Control "Host Namespaces" (baseline). policy/check_hostNamespaces.go: hostNamespaces_1_0."""
    used = [f"{f}=true" for f in ("hostNetwork", "hostPID", "hostIPC") if spec.get(f) is True]
    return CheckResult(False, "host namespaces", ", ".join(used)) if used else ALLOWED


def privileged(meta: dict, spec: dict) -> CheckResult:
    """Control "Privileged Containers" (baseline). policy/check_privileged.go: privileged_1_0."""
    bad = [c.get("name", "") for c in _containers(spec) if _g(c, "securityContext", "privileged") is True]
    if bad:
        return CheckResult(False, "privileged", f"{_pluralize('container', 'containers', len(bad))} {_join_quote(bad)} "
                                                "must not set securityContext.privileged=true")
    return ALLOWED


CAPABILITIES_ALLOWED_1_0 = frozenset({"AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD",
                                      "NET_BIND_SERVICE", "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT"})


def capabilities_baseline(meta: dict, spec: dict) -> CheckResult:
    """Control "Capabilities" (baseline). policy/check_capabilities_baseline.go: capabilitiesBaseline_1_0."""
    bad, caps = [], set()
    for c in _containers(spec):
        added = _g(c, "securityContext", "capabilities", "add") or []
        wrong = [a for a in added if a not in CAPABILITIES_ALLOWED_1_0]
        if wrong:
            bad.append(c.get("name", ""))
            caps.update(wrong)
    if bad:
        return CheckResult(False, "non-default capabilities",
                           f"{_pluralize('container', 'containers', len(bad))} {_join_quote(bad)} must not include "
                           f"{_join_quote(sorted(caps))} in securityContext.capabilities.add")
    return ALLOWED


def host_path_volumes(meta: dict, spec: dict) -> CheckResult:
    """Control "HostPath Volumes" (baseline). policy/check_hostPathVolumes.go: hostPathVolumes_1_0."""
    bad = [v.get("name", "") for v in spec.get("volumes") or [] if v.get("hostPath") is not None]
    if bad:
        return CheckResult(False, "hostPath volumes", f"{_pluralize('volume', 'volumes', len(bad))} {_join_quote(bad)}")
    return ALLOWED


def host_ports(meta: dict, spec: dict) -> CheckResult:
    """Control "Host Ports" (baseline). policy/check_hostPorts.go: hostPorts_1_0 (port numbers sorted as
    strings, as sets.String.List does)."""
    bad, ports = [], set()
    for c in _containers(spec):
        used = [str(p["hostPort"]) for p in c.get("ports") or [] if p.get("hostPort") not in (None, 0)]
        if used:
            bad.append(c.get("name", ""))
            ports.update(used)
    if bad:
        return CheckResult(False, "hostPort",
                           f"{_pluralize('container', 'containers', len(bad))} {_join_quote(bad)} "
                           f"{_pluralize('uses', 'use', len(bad))} {_pluralize('hostPort', 'hostPorts', len(ports))} "
                           f"{', '.join(sorted(ports))}")
    return ALLOWED


APPARMOR_ANNOTATION_PREFIX = "container.apparmor.security.beta.kubernetes.io/"


def app_armor(meta: dict, spec: dict) -> CheckResult:
    """Control "AppArmor" (baseline). policy/check_appArmorProfile.go: appArmorProfile_1_0: profile types
    RuntimeDefault/Localhost only; annotations runtime/default, localhost/* or empty."""
    def ok_type(t):
        return t in ("RuntimeDefault", "Localhost")

    setters, values = [], set()
    t = _g(spec, "securityContext", "appArmorProfile")
    if t is not None and not ok_type(t.get("type")):
        setters.append("pod")
        values.add(str(t.get("type") or ""))
    bad = []
    for c in _containers(spec):
        t = _g(c, "securityContext", "appArmorProfile")
        if t is not None and not ok_type(t.get("type")):
            bad.append(c.get("name", ""))
            values.add(str(t.get("type") or ""))
    if bad:
        setters.append(f"{_pluralize('container', 'containers', len(bad))} {_join_quote(bad)}")
    annotations = sorted(f'{k}="{v}"' for k, v in (meta.get("annotations") or {}).items()
                         if k.startswith(APPARMOR_ANNOTATION_PREFIX)
                         and not (v == "" or v == "runtime/default" or v.startswith("localhost/")))
    value_list = sorted(values) + annotations
    if annotations:
        setters.append(_pluralize("annotation", "annotations", len(annotations)))
    if setters:
        return CheckResult(False, _pluralize("forbidden AppArmor profile", "forbidden AppArmor profiles", len(value_list)),
                           f"{' and '.join(setters)} must not set AppArmor profile type to {_join_quote(value_list)}")
    return ALLOWED


def _se_linux(allowed_types: frozenset) -> Callable[[dict, dict], CheckResult]:
    def check(meta: dict, spec: dict) -> CheckResult:
        bad_types: set[str] = set()
        flags = {"user": False, "role": False}

        def valid(opts: dict) -> bool:
            ok = True
            if (opts.get("type") or "") not in allowed_types:
                ok = False
                bad_types.add(opts.get("type") or "")
            for k in ("user", "role"):
                if opts.get(k):
                    ok = False
                    flags[k] = True
            return ok

        setters = []
        opts = _g(spec, "securityContext", "seLinuxOptions")
        if opts is not None and not valid(opts):
            setters.append("pod")
        bad = [c.get("name", "") for c in _containers(spec)
               if _g(c, "securityContext", "seLinuxOptions") is not None and not valid(c["securityContext"]["seLinuxOptions"])]
        if bad:
            setters.append(f"{_pluralize('container', 'containers', len(bad))} {_join_quote(bad)}")
        if setters:
            data = []
            if bad_types:
                data.append(f"{_pluralize('type', 'types', len(bad_types))} {_join_quote(sorted(bad_types))}")
            if flags["user"]:
                data.append("user may not be set")
            if flags["role"]:
                data.append("role may not be set")
            return CheckResult(False, "seLinuxOptions",
                               f"{' and '.join(setters)} set forbidden securityContext.seLinuxOptions: {'; '.join(data)}")
        return ALLOWED
    return check


se_linux_1_0 = _se_linux(frozenset({"", "container_t", "container_init_t", "container_kvm_t"}))
se_linux_1_0.__doc__ = """Control "SELinux" (baseline). policy/check_seLinuxOptions.go: seLinuxOptions1_0."""
se_linux_1_31 = _se_linux(frozenset({"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}))
se_linux_1_31.__doc__ = """Control "SELinux" (baseline). policy/check_seLinuxOptions.go: seLinuxOptions1_31 (adds container_engine_t)."""
se_linux_1_0.__name__, se_linux_1_31.__name__ = "se_linux_1_0", "se_linux_1_31"


def proc_mount(meta: dict, spec: dict) -> CheckResult:
    """Control "/proc Mount Type" (baseline). policy/check_procMount.go: procMount_1_0."""
    if _relax_for_user_namespace(spec):
        return ALLOWED
    bad, kinds = [], set()
    for c in _containers(spec):
        pm = _g(c, "securityContext", "procMount")
        if pm is not None and pm != "Default":
            bad.append(c.get("name", ""))
            kinds.add(pm)
    if bad:
        return CheckResult(False, "procMount", f"{_pluralize('container', 'containers', len(bad))} {_join_quote(bad)} "
                                               f"must not set securityContext.procMount to {_join_quote(sorted(kinds))}")
    return ALLOWED


SECCOMP_POD_ANNOTATION = "seccomp.security.alpha.kubernetes.io/pod"
SECCOMP_CONTAINER_ANNOTATION_PREFIX = "container.seccomp.security.alpha.kubernetes.io/"


def _valid_seccomp(t) -> bool:
    """policy/check_seccompProfile_baseline.go: validSeccomp."""
    return t in ("Localhost", "RuntimeDefault")


def seccomp_baseline_1_0(meta: dict, spec: dict) -> CheckResult:
    """Control "Seccomp" (baseline), policy versions before v1.19 (annotations).
    policy/check_seccompProfile_baseline.go: seccompProfileBaseline_1_0."""
    def ok(v: str) -> bool:
        return v in ("runtime/default", "docker/default") or v.startswith("localhost/")

    ann = meta.get("annotations") or {}
    bad = set()
    if SECCOMP_POD_ANNOTATION in ann and not ok(ann[SECCOMP_POD_ANNOTATION]):
        bad.add(f'{SECCOMP_POD_ANNOTATION}="{ann[SECCOMP_POD_ANNOTATION]}"')
    for c in _containers(spec):
        key = SECCOMP_CONTAINER_ANNOTATION_PREFIX + c.get("name", "")
        if key in ann and not ok(ann[key]):
            bad.add(f'{key}="{ann[key]}"')
    if bad:
        return CheckResult(False, "seccompProfile",
                           f"forbidden {_pluralize('annotation', 'annotations', len(bad))} {', '.join(sorted(bad))}")
    return ALLOWED


def seccomp_baseline_1_19(meta: dict, spec: dict) -> CheckResult:
    """Control "Seccomp" (baseline): not Unconfined. policy/check_seccompProfile_baseline.go:
    seccompProfileBaseline_1_19."""
    setters, values = [], set()
    prof = _g(spec, "securityContext", "seccompProfile")
    if prof is not None and not _valid_seccomp(prof.get("type")):
        setters.append("pod")
        values.add(str(prof.get("type") or ""))
    bad = []
    for c in _containers(spec):
        prof = _g(c, "securityContext", "seccompProfile")
        if prof is not None and not _valid_seccomp(prof.get("type")):
            bad.append(c.get("name", ""))
            values.add(str(prof.get("type") or ""))
    if bad:
        setters.append(f"{_pluralize('container', 'containers', len(bad))} {_join_quote(bad)}")
    if setters:
        return CheckResult(False, "seccompProfile", f"{' and '.join(setters)} must not set securityContext.seccompProfile.type "
                                                    f"to {_join_quote(sorted(values))}")
    return ALLOWED


SYSCTLS_1_0 = frozenset({"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.tcp_syncookies",
                         "net.ipv4.ping_group_range", "net.ipv4.ip_unprivileged_port_start"})
SYSCTLS_1_27 = SYSCTLS_1_0 | {"net.ipv4.ip_local_reserved_ports"}
SYSCTLS_1_29 = SYSCTLS_1_27 | {"net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
                               "net.ipv4.tcp_keepalive_probes"}
SYSCTLS_1_32 = SYSCTLS_1_29 | {"net.ipv4.tcp_rmem", "net.ipv4.tcp_wmem"}


def _sysctls(allowed: frozenset) -> Callable[[dict, dict], CheckResult]:
    def check(meta: dict, spec: dict) -> CheckResult:
        bad = [s.get("name", "") for s in _g(spec, "securityContext", "sysctls") or [] if s.get("name") not in allowed]
        return CheckResult(False, "forbidden sysctls", ", ".join(bad)) if bad else ALLOWED
    return check


sysctls_1_0, sysctls_1_27, sysctls_1_29, sysctls_1_32 = (_sysctls(s) for s in (SYSCTLS_1_0, SYSCTLS_1_27, SYSCTLS_1_29, SYSCTLS_1_32))
for _fn, _v in ((sysctls_1_0, "V1Dot0"), (sysctls_1_27, "V1Dot27"), (sysctls_1_29, "V1Dot29"), (sysctls_1_32, "V1Dot32")):
    _fn.__name__ = f"sysctls{_v}"
    _fn.__doc__ = f"""Control "Sysctls" (baseline). policy/check_sysctls.go: sysctls{_v}."""


# restricted


def allow_privilege_escalation_1_8(meta: dict, spec: dict) -> CheckResult:
    """Control "Privilege Escalation (v1.8+)" (restricted). policy/check_allowPrivilegeEscalation.go:
    allowPrivilegeEscalation_1_8: every container must set allowPrivilegeEscalation=false."""
    bad = [c.get("name", "") for c in _containers(spec) if _g(c, "securityContext", "allowPrivilegeEscalation") is not False]
    if bad:
        return CheckResult(False, "allowPrivilegeEscalation != false",
                           f"{_pluralize('container', 'containers', len(bad))} {_join_quote(bad)} "
                           "must set securityContext.allowPrivilegeEscalation=false")
    return ALLOWED


def allow_privilege_escalation_1_25(meta: dict, spec: dict) -> CheckResult:
    """Control "Privilege Escalation (v1.8+)" (restricted). policy/check_allowPrivilegeEscalation.go:
    allowPrivilegeEscalation_1_25 (Windows pods exempt)."""
    return ALLOWED if _windows(spec) else allow_privilege_escalation_1_8(meta, spec)


def capabilities_restricted_1_22(meta: dict, spec: dict) -> CheckResult:
    """Control "Capabilities (v1.22+)" (restricted). policy/check_capabilities_restricted.go:
    capabilitiesRestricted_1_22: drop ALL, add nothing but NET_BIND_SERVICE."""
    missing, adding, caps = [], [], set()
    for c in _containers(spec):
        cap = _g(c, "securityContext", "capabilities")
        if cap is None:
            missing.append(c.get("name", ""))
            continue
        if "ALL" not in (cap.get("drop") or []):
            missing.append(c.get("name", ""))
        wrong = [a for a in cap.get("add") or [] if a != "NET_BIND_SERVICE"]
        if wrong:
            adding.append(c.get("name", ""))
            caps.update(wrong)
    details = []
    if missing:
        details.append(f"{_pluralize('container', 'containers', len(missing))} {_join_quote(missing)} "
                       'must set securityContext.capabilities.drop=["ALL"]')
    if adding:
        details.append(f"{_pluralize('container', 'containers', len(adding))} {_join_quote(adding)} "
                       f"must not include {_join_quote(sorted(caps))} in securityContext.capabilities.add")
    return CheckResult(False, "unrestricted capabilities", "; ".join(details)) if details else ALLOWED


def capabilities_restricted_1_25(meta: dict, spec: dict) -> CheckResult:
    """Control "Capabilities (v1.22+)" (restricted). policy/check_capabilities_restricted.go:
    capabilitiesRestricted_1_25 (Windows pods exempt)."""
    return ALLOWED if _windows(spec) else capabilities_restricted_1_22(meta, spec)


ALLOWED_VOLUME_SOURCES = ("configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "image", "persistentVolumeClaim",
                          "projected", "secret")
RESTRICTED_VOLUME_SOURCES = ("hostPath", "gcePersistentDisk", "awsElasticBlockStore", "gitRepo", "nfs", "iscsi",
                             "glusterfs", "rbd", "flexVolume", "cinder", "cephfs", "flocker", "fc", "azureFile",
                             "vsphereVolume", "quobyte", "azureDisk", "photonPersistentDisk", "portworxVolume", "scaleIO",
                             "storageos")


def restricted_volumes(meta: dict, spec: dict) -> CheckResult:
    """Control "Volume Types" (restricted). policy/check_restrictedVolumes.go: restrictedVolumes_1_0."""
    bad, kinds = [], set()
    for v in spec.get("volumes") or []:
        if any(v.get(k) is not None for k in ALLOWED_VOLUME_SOURCES):
            continue
        bad.append(v.get("name", ""))
        kinds.add(next((k for k in RESTRICTED_VOLUME_SOURCES if v.get(k) is not None), "unknown"))
    if bad:
        return CheckResult(False, "restricted volume types",
                           f"{_pluralize('volume', 'volumes', len(bad))} {_join_quote(bad)} {_pluralize('uses', 'use', len(bad))} "
                           f"{_pluralize('restricted volume type', 'restricted volume types', len(kinds))} {_join_quote(sorted(kinds))}")
    return ALLOWED


def run_as_non_root(meta: dict, spec: dict) -> CheckResult:
    """Control "Running as Non-root" (restricted). policy/check_runAsNonRoot.go: runAsNonRoot_1_0: the pod
    sets runAsNonRoot=true (and no container false), or every container sets it true."""
    if _relax_for_user_namespace(spec):
        return ALLOWED
    setters = []
    pod_value = _g(spec, "securityContext", "runAsNonRoot")
    pod_ok = False
    if pod_value is not None:
        if pod_value is False:
            setters.append("pod")
        else:
            pod_ok = True
    explicit, implicit = [], []
    for c in _containers(spec):
        v = _g(c, "securityContext", "runAsNonRoot")
        if v is not None:
            if v is False:
                explicit.append(c.get("name", ""))
        elif not pod_ok:
            implicit.append(c.get("name", ""))
    if explicit:
        setters.append(f"{_pluralize('container', 'containers', len(explicit))} {_join_quote(explicit)}")
    if setters:
        return CheckResult(False, "runAsNonRoot != true", f"{' and '.join(setters)} must not set securityContext.runAsNonRoot=false")
    if implicit:
        return CheckResult(False, "runAsNonRoot != true",
                           f"pod or {_pluralize('container', 'containers', len(implicit))} {_join_quote(implicit)} "
                           "must set securityContext.runAsNonRoot=true")
    return ALLOWED


def run_as_user(meta: dict, spec: dict) -> CheckResult:
    """Control "Running as Non-root user (v1.23+)" (restricted). policy/check_runAsUser.go: runAsUser_1_23."""
    if _relax_for_user_namespace(spec):
        return ALLOWED
    setters = ["pod"] if _is_zero(_g(spec, "securityContext", "runAsUser")) else []
    bad = [c.get("name", "") for c in _containers(spec) if _is_zero(_g(c, "securityContext", "runAsUser"))]
    if bad:
        setters.append(f"{_pluralize('container', 'containers', len(bad))} {_join_quote(bad)}")
    if setters:
        return CheckResult(False, "runAsUser=0", f"{' and '.join(setters)} must not set runAsUser=0")
    return ALLOWED


def seccomp_restricted_1_19(meta: dict, spec: dict) -> CheckResult:
    """Control "Seccomp (v1.19+)" (restricted). policy/check_seccompProfile_restricted.go:
    seccompProfileRestricted_1_19: RuntimeDefault or Localhost, on the pod or on every container."""
    setters, values = [], set()
    pod_set = False
    prof = _g(spec, "securityContext", "seccompProfile")
    if prof is not None:
        if not _valid_seccomp(prof.get("type")):
            setters.append("pod")
            values.add(str(prof.get("type") or ""))
        else:
            pod_set = True
    explicit, implicit = [], []
    for c in _containers(spec):
        prof = _g(c, "securityContext", "seccompProfile")
        if prof is not None:
            if not _valid_seccomp(prof.get("type")):
                explicit.append(c.get("name", ""))
                values.add(str(prof.get("type") or ""))
        elif not pod_set:
            implicit.append(c.get("name", ""))
    if explicit:
        setters.append(f"{_pluralize('container', 'containers', len(explicit))} {_join_quote(explicit)}")
    if setters:
        return CheckResult(False, "seccompProfile", f"{' and '.join(setters)} must not set securityContext.seccompProfile.type "
                                                    f"to {_join_quote(sorted(values))}")
    if implicit:
        return CheckResult(False, "seccompProfile",
                           f"pod or {_pluralize('container', 'containers', len(implicit))} {_join_quote(implicit)} "
                           'must set securityContext.seccompProfile.type to "RuntimeDefault" or "Localhost"')
    return ALLOWED


def seccomp_restricted_1_25(meta: dict, spec: dict) -> CheckResult:
    """Control "Seccomp (v1.19+)" (restricted). policy/check_seccompProfile_restricted.go:
    seccompProfileRestricted_1_25 (Windows pods exempt)."""
    return ALLOWED if _windows(spec) else seccomp_restricted_1_19(meta, spec)


# ------------------------------------------------------------------------------ the registry


@dataclass(frozen=True)
class Check:
    """policy/checks.go: Check (ID, Level, Versions) and VersionedCheck (MinimumVersion, CheckPod,
    OverrideCheckIDs); control: the Pod Security Standards control it implements."""
    id: str
    level: str
    control: str
    versions: tuple  # ((major, minor), fn, overrides)


CHECKS = (
    Check("appArmorProfile", "baseline", "AppArmor", (((1, 0), app_armor, ()),)),
    Check("capabilities_baseline", "baseline", "Capabilities", (((1, 0), capabilities_baseline, ()),)),
    Check("hostNamespaces", "baseline", "Host Namespaces", (((1, 0), host_namespaces, ()),)),
    Check("hostPathVolumes", "baseline", "HostPath Volumes", (((1, 0), host_path_volumes, ()),)),
    Check("hostPorts", "baseline", "Host Ports", (((1, 0), host_ports, ()),)),
    Check("privileged", "baseline", "Privileged Containers", (((1, 0), privileged, ()),)),
    Check("procMount", "baseline", "/proc Mount Type", (((1, 0), proc_mount, ()),)),
    Check("seLinuxOptions", "baseline", "SELinux", (((1, 0), se_linux_1_0, ()), ((1, 31), se_linux_1_31, ()))),
    Check("seccompProfile_baseline", "baseline", "Seccomp",
          (((1, 0), seccomp_baseline_1_0, ()), ((1, 19), seccomp_baseline_1_19, ()))),
    Check("sysctls", "baseline", "Sysctls", (((1, 0), sysctls_1_0, ()), ((1, 27), sysctls_1_27, ()),
                                             ((1, 29), sysctls_1_29, ()), ((1, 32), sysctls_1_32, ()))),
    Check("windowsHostProcess", "baseline", "HostProcess", (((1, 0), host_process, ()),)),
    Check("allowPrivilegeEscalation", "restricted", "Privilege Escalation (v1.8+)",
          (((1, 8), allow_privilege_escalation_1_8, ()), ((1, 25), allow_privilege_escalation_1_25, ()))),
    Check("capabilities_restricted", "restricted", "Capabilities (v1.22+)",
          (((1, 22), capabilities_restricted_1_22, ("capabilities_baseline",)),
           ((1, 25), capabilities_restricted_1_25, ("capabilities_baseline",)))),
    Check("restrictedVolumes", "restricted", "Volume Types", (((1, 0), restricted_volumes, ("hostPathVolumes",)),)),
    Check("runAsNonRoot", "restricted", "Running as Non-root", (((1, 0), run_as_non_root, ()),)),
    Check("runAsUser", "restricted", "Running as Non-root user (v1.23+)", (((1, 23), run_as_user, ()),)),
    Check("seccompProfile_restricted", "restricted", "Seccomp (v1.19+)",
          (((1, 19), seccomp_restricted_1_19, ("seccompProfile_baseline",)),
           ((1, 25), seccomp_restricted_1_25, ("seccompProfile_baseline",)))),
)
MAX_VERSION = max(v[0] for c in CHECKS for v in c.versions)


def parse_version(version: str | None) -> tuple[int, int]:
    """api/helpers.go: ParseVersion ("latest" or "v1.<minor>"), "latest" resolved to the newest version
    any check has (registry.go: EvaluatePod clamps newer versions to it as well)."""
    if version in (None, LATEST):
        return MAX_VERSION
    m = re.fullmatch(r"v1\.([0-9]|[1-9][0-9]*)", version)
    if not m:
        raise ValueError(f'{version!r}: must be "latest" or "v1.x"')
    return min((1, int(m.group(1))), MAX_VERSION)


def _version_str(version) -> str:
    """api/helpers.go: Version.String."""
    return LATEST if version in (None, LATEST) else version if isinstance(version, str) else f"v{version[0]}.{version[1]}"


def checks_for(level: str, version: str = LATEST) -> list[tuple[Check, Callable]]:
    """policy/registry.go: populate + EvaluatePod: the (check, function) pairs run for level:version, in
    the order the plugin runs them (baseline IDs sorted, then restricted IDs sorted; restricted leaves
    out the baseline checks its checks override)."""
    if level not in LEVELS:
        raise ValueError(f"level {level!r}: must be one of {', '.join(LEVELS)}")
    if level == "privileged":
        return []
    v = parse_version(version) if isinstance(version, str) or version is None else version

    def at(check: Check):
        found = [entry for entry in check.versions if entry[0] <= v]
        return found[-1] if found else None

    chosen = {c.id: (c, at(c)) for c in CHECKS if at(c) is not None and (c.level == "baseline" or level == "restricted")}
    overridden = {o for c, entry in chosen.values() if c.level == "restricted" for o in entry[2]}
    ordered = sorted((c for c in CHECKS if c.level == "baseline"), key=lambda c: c.id) + \
        sorted((c for c in CHECKS if c.level == "restricted"), key=lambda c: c.id)
    return [(c, chosen[c.id][1][1]) for c in ordered if c.id in chosen and c.id not in overridden]


VOLUME_SOURCES = ALLOWED_VOLUME_SOURCES + RESTRICTED_VOLUME_SOURCES


def api_defaults(spec: dict) -> dict:
    """The one API-server default before admission that changes a verdict: a volume with no source
    becomes an emptyDir (k8s.io/kubernetes pkg/apis/core/v1/defaults.go: SetDefaults_Volume); unknown
    keys never reach admission (the decoder drops them)."""
    volumes = spec.get("volumes")
    if not volumes or all(any(v.get(k) is not None for k in VOLUME_SOURCES) for v in volumes):
        return spec
    fixed = [v if any(v.get(k) is not None for k in VOLUME_SOURCES) else {"name": v.get("name", ""), "emptyDir": {}}
             for v in volumes]
    return dict(spec, volumes=fixed)


def evaluate(pod: dict, level: str = "restricted", version: str = LATEST, defaults: bool = True) -> AggregateResult:
    """policy/registry.go: EvaluatePod + policy/checks.go: AggregateCheckResults (after api_defaults
    unless defaults=False: the plugin's unit tests call the checks on undefaulted pods)."""
    meta, spec = _spec_meta(pod)
    if defaults:
        spec = api_defaults(spec)
    reasons, details = [], []
    for _check, fn in checks_for(level, version):
        r = fn(meta, spec)
        if not r.allowed:
            reasons.append(r.reason or "unknown forbidden reason")
            details.append(r.detail)
    return AggregateResult(not reasons, reasons, details)


def forbidden_reasons(pod: dict, level: str = "restricted", version: str = LATEST) -> list[str]:
    """`reason (detail)` for each failed check; empty when the pod passes."""
    return evaluate(pod, level, version).forbidden()


def failed_controls(pod: dict, level: str = "restricted", version: str = LATEST) -> list[str]:
    """The Pod Security Standards controls the pod fails."""
    meta, spec = _spec_meta(pod)
    spec = api_defaults(spec)
    return [c.control for c, fn in checks_for(level, version) if not fn(meta, spec).allowed]


def rejection_message(pod: dict, level: str = "restricted", version: str = LATEST, resource: str = "pods") -> str | None:
    """The API server's error for a pod create the enforce level refuses, None when admitted:
    admission/admission.go: EvaluatePod (`violates PodSecurity %q: %s` with LevelVersion.String()
    `level:version`) inside k8s.io/apimachinery pkg/api/errors: NewForbidden (`%s %q is forbidden: %v`)."""
    result = evaluate(pod, level, version)
    if result.allowed:
        return None
    name = ((pod.get("metadata") or {}).get("name")) or ""
    err = f'violates PodSecurity "{level}:{_version_str(version)}": {result.forbidden_detail()}'
    return f'{resource} "{name}" is forbidden: {err}' if name else f"{resource} is forbidden: {err}"


def warning_message(pod: dict, level: str = "restricted", version: str = LATEST) -> str | None:
    """admission/admission.go: EvaluatePod's warn-mode message (also what a Job or Deployment whose pod
    template fails gets: pod controllers are only warned and audited, never refused)."""
    result = evaluate(pod, level, version)
    if result.allowed:
        return None
    return f'would violate PodSecurity "{level}:{_version_str(version)}": {result.forbidden_detail()}'


@dataclass(frozen=True)
class Policy:
    """api/helpers.go: Policy (Enforce, Audit, Warn as (level, version))."""
    enforce: tuple[str, str]
    audit: tuple[str, str]
    warn: tuple[str, str]


def namespace_policy(namespace: dict) -> Policy:
    """api/helpers.go: PolicyToEvaluate with the API server's default configuration (privileged:latest
    everywhere): the namespace's pod-security.kubernetes.io labels; warn follows a stricter enforce when
    the warn level is not set. Invalid values raise (the plugin would fall back and log)."""
    labels = ((namespace.get("metadata") or {}).get("labels")) or {}
    for key in (ENFORCE_LABEL, AUDIT_LABEL, WARN_LABEL):
        if key in labels and labels[key] not in LEVELS:
            raise ValueError(f"{key}={labels[key]!r}: must be one of {', '.join(LEVELS)}")
    for key in (ENFORCE_VERSION_LABEL, AUDIT_VERSION_LABEL, WARN_VERSION_LABEL):
        if key in labels:
            parse_version(labels[key])
    enforce = (labels.get(ENFORCE_LABEL, "privileged"), labels.get(ENFORCE_VERSION_LABEL, LATEST))
    audit = (labels.get(AUDIT_LABEL, "privileged"), labels.get(AUDIT_VERSION_LABEL, LATEST))
    warn = (labels.get(WARN_LABEL, "privileged"), labels.get(WARN_VERSION_LABEL, LATEST))
    if WARN_LABEL not in labels and ENFORCE_LABEL in labels and LEVELS.index(enforce[0]) > LEVELS.index(warn[0]):
        warn = (enforce[0], labels.get(WARN_VERSION_LABEL, enforce[1]))
    return Policy(enforce, audit, warn)


def admit_pod(pod: dict, namespace: dict) -> tuple[bool, str | None, list[str]]:
    """admission/admission.go: ValidatePod -> EvaluatePod for a pod create in that namespace:
    (allowed, the API server's error when refused, warnings)."""
    policy = namespace_policy(namespace)
    message = rejection_message(pod, *policy.enforce)
    if message:
        return False, message, []
    warning = warning_message(pod, *policy.warn)
    return True, None, [warning] if warning else []
