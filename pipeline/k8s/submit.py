"""``llmpipe k8s submit``: create or replace a stage's rendered objects with the kubernetes client.

* Job, PyTorchJob: a Job's pod template cannot be updated, and a finished Job would not run
  again anyway, so an existing one is deleted (propagationPolicy Background: its pods go with
  it) and created anew; submit says so.
* ConfigMap: deleted and created anew too (with the Jobs that mount it), so the least-privilege
  role of k8s/rbac.yaml (create, get, list, watch, delete) is all submit needs.
* Secret, ServiceAccount: created, or replaced in place when they exist (the chart renders none).
* PersistentVolumeClaim: created when missing, never replaced (it holds data).
* Other namespaced kinds of an API group go through CustomObjectsApi (create or replace).

Objects get helm's ownership annotations (``meta.helm.sh/release-name`` / ``-namespace``), so a
later ``helm upgrade --install`` of the same release adopts them rather than refusing them.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, TextIO

from pipeline.k8s.client import PYTORCHJOB, K8sError, Kube, NotFound

FIRST = {"Namespace": 0, "ServiceAccount": 1, "Secret": 2, "ConfigMap": 3, "PersistentVolumeClaim": 4}
DELETE_TIMEOUT = 120.0


@dataclass
class Api:
    """How to create/read/replace/delete one kind, and what to do when it exists."""

    create: Callable[..., Any]
    read: Callable[..., Any]
    replace: Callable[..., Any] | None
    delete: Callable[..., Any]
    on_exists: str  # "replace" | "recreate" | "keep"


def _typed(kube: Kube, api: Any, snake: str, on_exists: str) -> Api:
    def named(verb: str) -> Callable[..., Any]:
        fn = getattr(api, f"{verb}_namespaced_{snake}")
        return lambda name, ns, **kw: fn(name, ns, **kw)

    create = getattr(api, f"create_namespaced_{snake}")
    return Api(lambda ns, body, **kw: create(ns, body, **kw), named("read"), named("replace"), named("delete"),
               on_exists)


def _custom(kube: Kube, group: str, version: str, plural: str, on_exists: str) -> Api:
    c = kube.custom
    return Api(
        lambda ns, body, **kw: c.create_namespaced_custom_object(group, version, ns, plural, body, **kw),
        lambda name, ns, **kw: c.get_namespaced_custom_object(group, version, ns, plural, name, **kw),
        lambda name, ns, body, **kw: c.replace_namespaced_custom_object(group, version, ns, plural, name, body, **kw),
        lambda name, ns, **kw: c.delete_namespaced_custom_object(group, version, ns, plural, name, **kw),
        on_exists,
    )


def _plural(kind: str) -> str:
    low = kind.lower()
    if low.endswith(("s", "x", "ch", "sh")):
        return low + "es"
    if low.endswith("y") and low[-2:-1] not in "aeiou":
        return low[:-1] + "ies"
    return low + "s"


def api_for(kube: Kube, obj: dict) -> Api:
    kind, api_version = obj.get("kind"), obj.get("apiVersion", "")
    typed = {
        ("v1", "ConfigMap"): (kube.core, "config_map", "recreate"),  # k8s/rbac.yaml grants no `update`
        ("v1", "Secret"): (kube.core, "secret", "replace"),
        ("v1", "ServiceAccount"): (kube.core, "service_account", "replace"),
        ("v1", "PersistentVolumeClaim"): (kube.core, "persistent_volume_claim", "keep"),
        ("batch/v1", "Job"): (kube.batch, "job", "recreate"),
    }
    if (api_version, kind) in typed:
        api, snake, on_exists = typed[(api_version, kind)]
        return _typed(kube, api, snake, on_exists)
    if (api_version, kind) == ("kubeflow.org/v1", "PyTorchJob"):
        return _custom(kube, *PYTORCHJOB, on_exists="recreate")
    if "/" in api_version:
        group, version = api_version.split("/", 1)
        return _custom(kube, group, version, _plural(kind), on_exists="replace")
    raise K8sError(f"submit cannot create a {kind} ({api_version}); apply the chart with "
                   "`helm upgrade --install` instead, or leave that object out of it")


def ordered(objects: list[dict]) -> list[dict]:
    """Config first (the Jobs mount it), then the workloads in the order the chart rendered them."""
    return sorted(objects, key=lambda o: FIRST.get(o.get("kind", ""), 10))


def _gone(kube: Kube, api: Api, name: str, ns: str, what: str) -> None:
    deadline = time.monotonic() + DELETE_TIMEOUT
    pause = 0.1
    while kube.call(api.read, name, ns, what=f"read {what}", missing_ok=True) is not None:
        if time.monotonic() > deadline:
            raise K8sError(f"{what} is still being deleted after {DELETE_TIMEOUT:.0f}s (finalizers?): "
                           f"`kubectl get {what} -n {ns} -o yaml` shows what holds it")
        time.sleep(pause)
        pause = min(pause * 2, 2.0)


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
    api = api_for(kube, obj)
    try:
        existing = kube.call(api.read, name, ns, what=f"read {what}", missing_ok=True)
    except NotFound as exc:
        if kind == "PyTorchJob" and "does not serve" in str(exc):
            raise K8sError(f"this cluster has no PyTorchJob kind (kubeflow.org/v1), needed for {what}: install the "
                           "Kubeflow training operator (k8s/README.md, step 5)", status=404) from None
        raise
    if existing is None:
        _create(kube, api, ns, obj, what)
        return f"{what} created"
    if api.on_exists == "keep":
        return f"{what} exists: left as it is"
    if api.on_exists == "replace":
        meta["resourceVersion"] = (existing.get("metadata") or {}).get("resourceVersion")
        kube.call(api.replace, name, ns, body=obj, what=f"replace {what}")
        return f"{what} replaced"
    state = _finished(existing)
    kube.call(api.delete, name, ns, propagation_policy="Background", what=f"delete {what}")
    _gone(kube, api, name, ns, what)
    _create(kube, api, ns, obj, what)
    if kind == "ConfigMap":
        return f"{what} existed: deleted it and created it anew"
    return (f"{what} existed ({state}): deleted it (propagationPolicy Background, its pods go with it) "
            "and created it anew")


def _create(kube: Kube, api: Api, ns: str, obj: dict, what: str) -> None:
    for attempt in range(20):
        try:
            kube.call(api.create, ns, obj, what=f"create {what}")
            return
        except K8sError as exc:
            if exc.status != 409 or attempt == 19:
                raise
            time.sleep(0.5)  # the old object is still terminating


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

