"""``llmpipe k8s logs``: the logs of a stage's pods, prefixed with the pod name when there are
several; ``--follow`` streams every pod as it starts (new pods, such as the merge or a retried
pod, are picked up) until the stage finishes, then exits like ``wait`` does.
"""

from __future__ import annotations

import queue
import sys
import threading
import time
from typing import TextIO

from pipeline.k8s import ROLE_LABEL
from pipeline.k8s.client import Kube, NotFound
from pipeline.k8s.explain import explain_failure, group, pod_problems
from pipeline.k8s.state import Snapshot, meta, snapshot
from pipeline.k8s.wait import StageFailed


def main_container(pod: dict) -> str | None:
    containers = (pod.get("spec") or {}).get("containers") or []
    names = [c.get("name") for c in containers]
    return "llmpipe" if "llmpipe" in names else (names[0] if names else None)


def started(pod: dict) -> bool:
    """Whether the main container has a log to read (it ran or runs)."""
    name = main_container(pod)
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        if cs.get("name") == name:
            state, last = cs.get("state") or {}, cs.get("lastState") or {}
            return bool(state.get("running") or state.get("terminated") or last.get("terminated"))
    return False


def restarts(pod: dict) -> int:
    name = main_container(pod)
    return next((int(cs.get("restartCount") or 0) for cs in (pod.get("status") or {}).get("containerStatuses") or []
                 if cs.get("name") == name), 0)


def _pods(snap: Snapshot, role: str | None) -> list[dict]:
    return [p for p in snap.pods if role is None or (meta(p).get("labels") or {}).get(ROLE_LABEL) == role]


def _not_started(pod: dict) -> str:
    why = group(pod_problems(pod))
    phase = (pod.get("status") or {}).get("phase", "Pending")
    return why[0] if why else f"pod {meta(pod).get('name')}: {phase}, its container has not started"


def print_logs(kube: Kube, stage: str, tail: int | None = None, role: str | None = None,
               out: TextIO | None = None, err: TextIO | None = None) -> int:
    out, err = out or sys.stdout, err or sys.stderr
    snap = snapshot(kube, stage)
    pods = _pods(snap, role)
    if not snap.workloads and not pods:
        raise NotFound(f"no Job, PyTorchJob or pod of stage {stage} in namespace {kube.namespace}: "
                       f"submit it first (`llmpipe k8s submit {stage}`), or pick the namespace with -n")
    if not pods:
        err.write(f"no pods of stage {stage}{f' with role {role}' if role else ''} yet in namespace "
                  f"{kube.namespace} (`llmpipe k8s status {stage}` says why)\n")
        return 0
    prefix = len(pods) > 1
    for pod in pods:
        name = meta(pod).get("name")
        if not started(pod):
            err.write(f"[{name}] no log: {_not_started(pod)}\n")
            continue
        try:
            text = kube.pod_log(name, main_container(pod), tail=tail)
        except NotFound:
            err.write(f"[{name}] no log: the pod is gone\n")
            continue
        for line in text.splitlines():
            out.write(f"[{name}] {line}\n" if prefix else f"{line}\n")
    out.flush()
    return 0


class _Follower(threading.Thread):
    def __init__(self, kube: Kube, pod: dict, tail: int | None, lines: "queue.Queue[tuple[str, str | None]]"):
        super().__init__(daemon=True)
        self.kube, self.name_, self.tail, self.lines = kube, meta(pod)["name"], tail, lines
        self.container = main_container(pod)
        self.restarts = restarts(pod)
        self.error: str | None = None
        self.reported = False

    def run(self) -> None:
        try:
            for line in self.kube.follow_log(self.name_, self.container, self.tail):
                self.lines.put((self.name_, line))
        except Exception as exc:  # a pod deleted mid-stream, a dropped connection: say so, keep the others
            self.error = (str(exc).splitlines() or ["the stream broke"])[0][:200]
        finally:
            self.lines.put((self.name_, None))


def follow_logs(kube: Kube, stage: str, tail: int | None = None, role: str | None = None, interval: float = 2.0,
                out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Stream every pod of the stage until the stage has finished and every stream has ended."""
    out, err = out or sys.stdout, err or sys.stderr
    lines: queue.Queue[tuple[str, str | None]] = queue.Queue()
    followers: dict[str, _Follower] = {}
    reported: set[str] = set()
    next_look = 0.0
    snap = None
    while True:
        if time.monotonic() >= next_look:
            snap = snapshot(kube, stage)
            next_look = time.monotonic() + interval
            pods = _pods(snap, role)
            if not snap.workloads and not pods:
                raise NotFound(f"no Job, PyTorchJob or pod of stage {stage} in namespace {kube.namespace}: "
                               f"submit it first (`llmpipe k8s submit {stage}`)")
            for pod in pods:
                # by uid: the training operator recreates a failed replica under the same name
                name, uid = meta(pod)["name"], meta(pod).get("uid") or meta(pod)["name"]
                current = followers.get(uid)
                again = current is not None and not current.is_alive() and restarts(pod) > current.restarts
                if started(pod) and (current is None or again):
                    if again:
                        err.write(f"[{name}] container restarted ({restarts(pod)} restarts)\n")
                    followers[uid] = _Follower(kube, pod, tail, lines)
                    followers[uid].start()
                elif not started(pod):
                    why = _not_started(pod)
                    if pod_problems(pod) and why not in reported:
                        reported.add(why)
                        err.write(f"warning: {why}\n")
            finished = snap.failed or snap.succeeded
            if finished and not any(f.is_alive() for f in followers.values()) and lines.empty():
                break
        try:
            name, line = lines.get(timeout=0.2)
        except queue.Empty:
            continue
        if line is None:
            for f in followers.values():
                if f.name_ == name and f.error and not f.reported:
                    f.reported = True
                    err.write(f"[{name}] log stream ended: {f.error}\n")
            continue
        out.write(f"[{name}] {line}\n")
        out.flush()
    assert snap is not None
    if snap.failed:
        raise StageFailed(f"{stage} failed (namespace {kube.namespace}):", explain_failure(snap, kube))
    return 0
