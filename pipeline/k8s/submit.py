"""``llmpipe k8s submit``: create or replace a stage's rendered objects with the kubernetes client.

* Job, PyTorchJob: a Job's pod template cannot be updated, and a finished Job would not run
  again anyway, so an existing one is deleted (propagationPolicy Background: its pods go with
  it) and created anew; submit says so.
* ConfigMap: deleted and created anew too (with the Jobs that mount it), so the least-privilege
  role of k8s/rbac.yaml (create, get, list, watch, delete) is all submit needs.
* PersistentVolumeClaim: created when missing, never replaced (it holds data).
* Anything else (the chart renders nothing else today): created, or replaced in place.

Objects get helm's ownership annotations (``meta.helm.sh/release-name`` / ``-namespace``), so a
later ``helm upgrade --install`` of the same release adopts them rather than refusing them.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from pipeline.k8s.client import KINDS, K8sError, Kube, NotFound

FIRST = {"Namespace": 0, "ServiceAccount": 1, "Secret": 2, "ConfigMap": 3, "PersistentVolumeClaim": 4}
ON_EXISTS = {"Job": "recreate", "PyTorchJob": "recreate", "ConfigMap": "recreate", "PersistentVolumeClaim": "keep"}
DELETE_TIMEOUT = 120.0


def _plural(kind: str) -> str:
    low = kind.lower()
    if low.endswith(("s", "x", "ch", "sh")):
        return low + "es"
    if low.endswith("y") and low[-2:-1] not in "aeiou":
        return low[:-1] + "ies"
    return low + "s"


def resource(obj: dict) -> tuple[str, str]:
    """(apiVersion, plural) of an object."""
    kind, api_version = obj.get("kind", ""), obj.get("apiVersion", "")
    known = KINDS.get(kind)
    if known and known[0] == api_version:
        return known
    if not api_version or not kind:
        raise K8sError(f"a rendered object has no apiVersion/kind: {obj.get('metadata', {}).get('name', '?')}")
    return api_version, _plural(kind)


def ordered(objects: list[dict]) -> list[dict]:
    """Config first (the Jobs mount it), then the workloads in the order the chart rendered them."""
    return sorted(objects, key=lambda o: FIRST.get(o.get("kind", ""), 10))


def _gone(kube: Kube, api_version: str, plural: str, name: str, ns: str, what: str) -> None:
    deadline = time.monotonic() + DELETE_TIMEOUT
    pause = 0.1
    while kube.get(api_version, plural, name, what=f"read {what}", missing_ok=True, namespace=ns) is not None:
        if time.monotonic() > deadline:
            raise K8sError(f"{what} is still being deleted after {DELETE_TIMEOUT:.0f}s (finalizers?): "
                           f"`kubectl get {what} -n {ns} -o yaml` shows what holds it")
        time.sleep(pause)
        pause = min(pause * 2, 2.0)


def _create(kube: Kube, api_version: str, plural: str, ns: str, obj: dict, what: str) -> None:
    for attempt in range(20):
        try:
            kube.create(api_version, plural, obj, what=f"create {what}", namespace=ns)
            return
        except K8sError as exc:
            if exc.status != 409 or attempt == 19:
                raise
            time.sleep(0.5)  # the old object is still terminating


def apply(kube: Kube, obj: dict) -> str:
    """Create or replace one object; returns what was done, in words."""
    meta = obj.setdefault("metadata", {})
    ns = meta.get("namespace") or kube.namespace
    meta["namespace"] = ns
    name, kind = meta["name"], obj["kind"]
    what = f"{kind.lower()}/{name}"
    labels = meta.get("labels") or {}
    if labels.get("app.kubernetes.io/managed-by") == "Helm" and labels.get("app.kubernetes.io/instance"):
        # what helm checks before it adopts an object, so a later `helm upgrade --install` of the
        # same release takes these objects over instead of refusing them
        meta.setdefault("annotations", {}).update({"meta.helm.sh/release-name": labels["app.kubernetes.io/instance"],
                                                   "meta.helm.sh/release-namespace": ns})
    api_version, plural = resource(obj)
    try:
        existing = kube.get(api_version, plural, name, what=f"read {what}", missing_ok=True, namespace=ns)
    except NotFound as exc:
        if kind == "PyTorchJob" and "does not serve" in str(exc):
            raise K8sError(f"this cluster has no PyTorchJob kind (kubeflow.org/v1), needed for {what}: install the "
                           "Kubeflow training operator (k8s/README.md, step 5)", status=404) from None
        raise
    if existing is None:
        _create(kube, api_version, plural, ns, obj, what)
        return f"{what} created"
    on_exists = ON_EXISTS.get(kind, "replace")
    if on_exists == "keep":
        return f"{what} exists: left as it is"
    if on_exists == "replace":
        meta["resourceVersion"] = (existing.get("metadata") or {}).get("resourceVersion")
        kube.replace(api_version, plural, name, obj, what=f"replace {what}", namespace=ns)
        return f"{what} replaced"
    state = _finished(existing)
    kube.delete(api_version, plural, name, what=f"delete {what}", propagation="Background", namespace=ns,
                missing_ok=True)
    _gone(kube, api_version, plural, name, ns, what)
    _create(kube, api_version, plural, ns, obj, what)
    if kind == "ConfigMap":
        return f"{what} existed: deleted it and created it anew"
    return (f"{what} existed ({state}): deleted it (propagationPolicy Background, its pods go with it) "
            "and created it anew")


def _finished(obj: dict) -> str:
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if str(cond.get("status")) == "True" and cond.get("type") in ("Complete", "Succeeded", "Failed"):
            return cond["type"].lower()
    return "still running"


def submit(kube: Kube, objects: list[dict], out: TextIO | None = None) -> list[str]:
    out = out or sys.stdout
    done = []
    for obj in ordered(objects):
        line = apply(kube, obj)
        out.write(line + "\n")
        out.flush()
        done.append(line)
    return done
