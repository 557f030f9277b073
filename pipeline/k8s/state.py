"""What a stage is doing on the cluster: its Jobs / PyTorchJobs ("workloads") and their pods.

Everything here reads the API's status fields as they are; ``explain`` turns the bad ones
into sentences. A workload's state is one of Pending, Suspended (e.g. queued by Kueue),
Running, Succeeded, Failed.
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass, field
from typing import Any

from pipeline.k8s import COMPLETION_ANNOTATION, PART_OF_SELECTOR, ROLE_LABEL, STAGE_LABEL
from pipeline.k8s.client import Kube

ROLE_ORDER = {"part": 0, "single": 1, "train": 1, "merge": 2}


def _true(cond: dict) -> bool:
    return str(cond.get("status")) == "True"


def meta(obj: dict) -> dict:
    return obj.get("metadata") or {}


@dataclass
class Workload:
    obj: dict

    @property
    def kind(self) -> str:
        return self.obj.get("kind", "Job")

    @property
    def name(self) -> str:
        return meta(self.obj).get("name", "?")

    @property
    def uid(self) -> str | None:
        return meta(self.obj).get("uid")

    @property
    def stage(self) -> str:
        return (meta(self.obj).get("labels") or {}).get(STAGE_LABEL, "?")

    @property
    def role(self) -> str:
        return (meta(self.obj).get("labels") or {}).get(ROLE_LABEL, "train" if self.kind == "PyTorchJob" else "single")

    @property
    def completion(self) -> bool:
        return str((meta(self.obj).get("annotations") or {}).get(COMPLETION_ANNOTATION, "")).lower() == "true"

    @property
    def spec(self) -> dict:
        return self.obj.get("spec") or {}

    @property
    def status(self) -> dict:
        return self.obj.get("status") or {}

    def conditions(self) -> list[dict]:
        return list(self.status.get("conditions") or [])

    def condition(self, kind: str) -> dict | None:
        return next((c for c in self.conditions() if c.get("type") == kind and _true(c)), None)

    @property
    def state(self) -> str:
        if self.kind == "PyTorchJob":
            if self.condition("Succeeded"):
                return "Succeeded"
            if self.condition("Failed"):
                return "Failed"
            if self.condition("Suspended") or (self.spec.get("runPolicy") or {}).get("suspend"):
                return "Suspended"
            if self.condition("Running") or self.condition("Restarting"):
                return "Running"
            return "Pending"
        if self.condition("Complete"):
            return "Succeeded"
        if self.condition("Failed") or self.condition("FailureTarget"):
            return "Failed"
        if self.spec.get("suspend") or self.condition("Suspended"):
            return "Suspended"
        return "Running" if (self.status.get("active") or 0) > 0 else "Pending"

    def failed_condition(self) -> dict | None:
        return self.condition("Failed") or self.condition("FailureTarget")

    @property
    def total(self) -> int:
        """Pods that must succeed: Job completions, or the PyTorchJob's replicas."""
        if self.kind == "PyTorchJob":
            specs = self.spec.get("pytorchReplicaSpecs") or {}
            return sum(int((s or {}).get("replicas") or 1) for s in specs.values()) or 1
        return int(self.spec.get("completions") or 1)

    @property
    def succeeded(self) -> int:
        if self.kind == "PyTorchJob":
            return sum(int((r or {}).get("succeeded") or 0) for r in (self.status.get("replicaStatuses") or {}).values())
        return int(self.status.get("succeeded") or 0)

    @property
    def failed(self) -> int:
        if self.kind == "PyTorchJob":
            return sum(int((r or {}).get("failed") or 0) for r in (self.status.get("replicaStatuses") or {}).values())
        return int(self.status.get("failed") or 0)


@dataclass
class Snapshot:
    namespace: str
    stage: str | None
    workloads: list[Workload] = field(default_factory=list)
    pods: list[dict] = field(default_factory=list)

    def finishers(self) -> list[Workload]:
        """The workloads whose success means the stage is done (all of them if none is marked)."""
        marked = [w for w in self.workloads if w.completion]
        return marked or list(self.workloads)

    @property
    def failed(self) -> list[Workload]:
        return [w for w in self.workloads if w.state == "Failed"]

    @property
    def succeeded(self) -> bool:
        return bool(self.workloads) and all(w.state == "Succeeded" for w in self.finishers())

    def pods_of(self, workload: Workload) -> list[dict]:
        return [p for p in self.pods if owner_uid(p) == workload.uid]

    def phases(self) -> dict[str, int]:
        counts = {"Pending": 0, "Running": 0, "Succeeded": 0, "Failed": 0}
        for pod in self.pods:
            phase = (pod.get("status") or {}).get("phase") or "Pending"
            counts[phase] = counts.get(phase, 0) + 1
        return counts

    def by_stage(self) -> dict[str, "Snapshot"]:
        stages: dict[str, Snapshot] = {}
        for w in self.workloads:
            stages.setdefault(w.stage, Snapshot(self.namespace, w.stage)).workloads.append(w)
        for snap in stages.values():
            uids = {w.uid for w in snap.workloads}
            snap.pods = [p for p in self.pods if owner_uid(p) in uids]
        return stages


def owner_uid(pod: dict) -> str | None:
    refs = meta(pod).get("ownerReferences") or []
    ctrl = next((r for r in refs if r.get("controller")), refs[0] if refs else None)
    return (ctrl or {}).get("uid")


def pod_sort_key(pod: dict) -> tuple:
    labels = meta(pod).get("labels") or {}
    index = labels.get("batch.kubernetes.io/job-completion-index") or labels.get("training.kubeflow.org/replica-index") or "0"
    rtype = labels.get("training.kubeflow.org/replica-type", "")
    return (ROLE_ORDER.get(labels.get(ROLE_LABEL, ""), 1), rtype != "master", int(index) if str(index).isdigit() else 0,
            meta(pod).get("creationTimestamp") or "", meta(pod).get("name", ""))


def snapshot(kube: Kube, stage: str | None) -> Snapshot:
    """One consistent-enough look at the stage (or every llm-pipeline stage when ``stage`` is None)."""
    selector = f"{STAGE_LABEL}={stage}" if stage else PART_OF_SELECTOR
    workloads = [Workload(o) for o in kube.list_jobs(selector) + kube.list_pytorchjobs(selector)]
    workloads.sort(key=lambda w: (w.stage, ROLE_ORDER.get(w.role, 1), w.name))
    pods = kube.list_pods(selector)
    uids = {w.uid for w in workloads}
    # pods of a replaced Job linger until the garbage collector removes them: keep only current ones
    pods = [p for p in pods if owner_uid(p) in uids or not meta(p).get("ownerReferences")]
    pods.sort(key=pod_sort_key)
    return Snapshot(kube.namespace, stage, workloads, pods)


def age(timestamp: Any, now: float | None = None) -> str:
    """'3m12s' since an RFC 3339 timestamp (or a datetime)."""
    if not timestamp:
        return "-"
    if isinstance(timestamp, str):
        try:
            when = dt.datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
        except ValueError:
            return "-"
    else:
        when = timestamp
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return duration(max(0.0, (now or time.time()) - when.timestamp()))


def duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"
