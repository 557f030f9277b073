"""Why a stage failed or does not start, one line per cause, from the API's own status fields.

* container ``terminated.reason: OOMKilled`` (now or as the last state) -> with the memory limit
* container ``waiting.reason: ImagePullBackOff / ErrImagePull / InvalidImageName`` -> with the image
* container ``waiting.reason: CreateContainerConfigError`` (a missing Secret/ConfigMap key), crash loops
* container exit codes (with the last ``error:`` line of its log when a client is given)
* pod condition ``PodScheduled=False, reason Unschedulable`` -> with the scheduler's message
* Job condition ``Failed`` with reason ``BackoffLimitExceeded`` / ``DeadlineExceeded`` / others
* PyTorchJob condition ``Failed`` -> with its message
* Warning events of a workload that has no pods (``FailedCreate``: quota, admission, service account),
  and the pod-create failures of one that lacks some of its pods (the training operator's
  ``FailedCreatePod``: e.g. Pod Security refusing its Worker pods while the Master waits for them)

The same cause on many pods is one line ("pod X and 7 more: ...").
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from pipeline.k8s.client import K8sError, Kube
from pipeline.k8s.state import Snapshot, Workload, duration, meta

IMAGE_REASONS = ("ImagePullBackOff", "ErrImagePull", "InvalidImageName", "ErrImageNeverPull", "RegistryUnavailable")
CONFIG_REASONS = ("CreateContainerConfigError", "CreateContainerError", "RunContainerError")
SIGNALS = {137: "SIGKILL", 143: "SIGTERM", 139: "SIGSEGV", 134: "SIGABRT"}
MAX_LINE = 300
# Warning events of a controller that could not create a pod: the Job controller's (kubernetes
# pkg/controller/controller_utils.go) and the training operator's (pkg/controller.v1/control/pod_control.go)
CREATE_FAILED = ("FailedCreate", "FailedCreatePod")


@dataclass(frozen=True)
class Problem:
    pod: str
    text: str  # without the pod's name, so that the same cause on many pods groups
    fatal: bool = False  # cannot fix itself (wait --fail-fast stops on it)
    container: str | None = None
    kind: str = ""  # "exit": its log tail explains it; "image": the kubelet's pull error (an event) does
    image: str | None = None


def _clip(text: str, limit: int = MAX_LINE) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _container_spec(pod: dict, name: str) -> dict:
    spec = pod.get("spec") or {}
    for c in (spec.get("containers") or []) + (spec.get("initContainers") or []):
        if c.get("name") == name:
            return c
    return {}


def memory_limit(pod: dict, container: str) -> str | None:
    return (((_container_spec(pod, container).get("resources") or {}).get("limits") or {}).get("memory"))


def _exit_text(term: dict) -> str:
    code = term.get("exitCode")
    signal = SIGNALS.get(code) if isinstance(code, int) else None
    text = f"exited with code {code}" + (f" ({signal})" if signal else "")
    reason = term.get("reason")
    if reason and reason not in ("Error", "Completed"):
        text += f", {reason}" + (f": {_clip(term['message'], 160)}" if term.get("message") else "")
    return text


def pod_problems(pod: dict) -> list[Problem]:
    """Everything wrong with one pod that its status shows, one Problem per cause."""
    name = meta(pod).get("name", "?")
    status = pod.get("status") or {}
    out: list[Problem] = []
    statuses = (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or [])
    for cs in statuses:
        cname = cs.get("name", "?")
        state, last = cs.get("state") or {}, cs.get("lastState") or {}
        term = state.get("terminated") or {}
        last_term = last.get("terminated") or {}
        waiting = state.get("waiting") or {}
        if "OOMKilled" in (term.get("reason"), last_term.get("reason")):
            limit = memory_limit(pod, cname)
            where = f"memory limit {limit}" if limit else "no memory limit: the node ran out of memory"
            out.append(Problem(name, f"container {cname} was OOMKilled ({where}): raise resources.limits.memory "
                                     "or lower the batch size / workers", fatal=True, container=cname))
            continue
        wreason = waiting.get("reason")
        if wreason in IMAGE_REASONS:
            image = cs.get("image") or _container_spec(pod, cname).get("image") or "?"
            detail = waiting.get("message") or ""
            detail = "" if not detail or detail.startswith("Back-off pulling image") else f": {_clip(detail, 200)}"
            out.append(Problem(name, f"cannot pull image {image} ({wreason}){detail}", fatal=True, container=cname,
                               kind="image", image=image))
        elif wreason in CONFIG_REASONS:
            out.append(Problem(name, f"container {cname} cannot start ({wreason}): {_clip(waiting.get('message', ''))}",
                               fatal=True, container=cname))
        elif wreason == "CrashLoopBackOff":
            restarts = cs.get("restartCount", 0)
            tail = f"; last {_exit_text(last_term)}" if last_term else ""
            out.append(Problem(name, f"container {cname} is crash-looping ({restarts} restarts{tail})",
                               container=cname, kind="exit" if last_term else ""))
        elif term and term.get("exitCode") not in (0, None):
            out.append(Problem(name, f"container {cname} {_exit_text(term)}", container=cname, kind="exit"))
    for cond in status.get("conditions") or []:
        if cond.get("type") == "PodScheduled" and str(cond.get("status")) == "False" and cond.get("reason") == "Unschedulable":
            out.append(Problem(name, f"Unschedulable: {_clip(cond.get('message') or 'no node fits the pod')}"))
    if status.get("reason") in ("Evicted", "DeadlineExceeded", "Preempting", "NodeLost", "UnexpectedAdmissionError"):
        out.append(Problem(name, f"{status['reason']}: {_clip(status.get('message') or '')}".rstrip(": ")))
    return out


def workload_failure(w: Workload) -> str:
    """One line for a Failed Job / PyTorchJob."""
    cond = w.failed_condition() or {}
    reason, message = cond.get("reason") or "Failed", _clip(cond.get("message") or "")
    if w.kind == "PyTorchJob":
        return f"PyTorchJob {w.name} failed: {message or reason}"
    if reason == "BackoffLimitExceeded":
        limit = w.spec.get("backoffLimit", 6)
        return f"Job {w.name}: BackoffLimitExceeded: {w.failed} pod(s) failed, more than backoffLimit {limit} allows"
    if reason == "DeadlineExceeded":
        ads = w.spec.get("activeDeadlineSeconds")
        limit = f"activeDeadlineSeconds {ads} ({duration(ads)})" if ads else "its activeDeadlineSeconds"
        return f"Job {w.name}: DeadlineExceeded: still running after {limit}; raise activeDeadlineSeconds or add resources"
    return f"Job {w.name}: {reason}" + (f": {message}" if message else "")


def group(problems: list[Problem]) -> list[str]:
    """One line per distinct cause, naming the first pod and how many more share it."""
    seen: dict[str, list[str]] = {}
    for p in problems:
        pods = seen.setdefault(p.text, [])
        if p.pod not in pods:
            pods.append(p.pod)
    lines = []
    for text, pods in seen.items():
        who = f"pod {pods[0]}" + (f" and {len(pods) - 1} more" if len(pods) > 1 else "")
        lines.append(f"{who}: {text}")
    return lines


def _last_error_line(kube: "Kube", pod: str, container: str | None) -> str | None:
    try:
        text = kube.pod_log(pod, container, tail=50)
    except K8sError:
        return None
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.lower().startswith("error:") or "Error:" in ln or "Error " in ln]
    chosen = (errors or lines or [None])[-1]
    return _clip(chosen, 240) if chosen else None


def _pull_error(kube: "Kube", pod: str, image: str) -> str | None:
    """The kubelet's own words for a failed pull (the pod's 'Failed to pull image' event), without
    the gRPC wrapping and the image name it repeats."""
    try:
        events = kube.warning_events(pod)
    except K8sError:
        return None
    for ev in reversed(events):
        msg = ev.get("message") or ""
        if msg.startswith("Failed to pull image"):
            msg = re.sub(r"^Failed to pull image \S+: ", "", msg)
            msg = re.sub(r"rpc error: code = \w+ desc = ", "", msg)
            msg = msg.replace(f' "{image}"', "").replace(f"{image}: ", "")
            return _clip(msg, 200)
    return None


def _with_details(problems: list[Problem], kube: "Kube | None", limit: int = 3) -> list[Problem]:
    """Add the last error line of the log to container exits, and the registry's answer to pull
    failures (a few pods at most: each is one more API call)."""
    if kube is None:
        return problems
    out, looked = [], 0
    for p in problems:
        if p.kind in ("exit", "image") and looked < limit:
            looked += 1
            if p.kind == "exit":
                line = _last_error_line(kube, p.pod, p.container)
                extra = f"; log: {line}" if line else ""
            else:
                line = _pull_error(kube, p.pod, p.image or "")
                extra = f": {line}" if line and line not in p.text else ""
            p = dataclasses.replace(p, text=p.text + extra)
        out.append(p)
    return out


def _events(kube: "Kube | None", w: Workload, reasons: tuple[str, ...] = ()) -> list[str]:
    """The workload's last Warning event (of one of ``reasons``, when given), not one about an earlier
    object of the same name."""
    if kube is None:
        return []
    try:
        events = kube.warning_events(w.name)
    except K8sError:
        return []
    events = [e for e in events if (e.get("involvedObject") or {}).get("uid") in (None, "", w.uid)
              and (not reasons or e.get("reason") in reasons)]
    if not events:
        return []
    last = events[-1]
    return [f"{w.kind} {w.name}: {last.get('reason', 'Warning')}: {_clip(last.get('message') or '')}"]


def explain_failure(snap: Snapshot, kube: "Kube | None" = None) -> list[str]:
    """Why the stage failed: the failed workloads, then the causes on their pods."""
    lines = [workload_failure(w) for w in snap.failed]
    problems: list[Problem] = []
    for w in snap.failed:
        pods = snap.pods_of(w)
        found = [p for pod in pods for p in pod_problems(pod)]
        if not found and not pods:
            lines += _events(kube, w)
        problems += found
    if not problems:  # a failure whose pods are gone or fine: look at all the stage's pods
        problems = [p for pod in snap.pods for p in pod_problems(pod)]
    return lines + group(_with_details(problems, kube))


def explain_stuck(snap: Snapshot, kube: "Kube | None" = None) -> tuple[list[str], bool]:
    """What keeps an unfinished stage from progressing; and whether any of it is fatal."""
    lines: list[str] = []
    problems: list[Problem] = []
    for w in snap.workloads:
        if w.state in ("Succeeded", "Failed"):
            continue
        if w.state == "Suspended":
            queue = (meta(w.obj).get("labels") or {}).get("kueue.x-k8s.io/queue-name")
            lines.append(f"{w.kind} {w.name} is suspended" + (f": queued in Kueue queue {queue}, waiting for admission"
                                                               if queue else ": waiting to be resumed"))
            continue
        pods = snap.pods_of(w)
        if not pods:
            lines += _events(kube, w)
        elif len(pods) < w.total:  # some pods were never created: say why, if a controller said so
            lines += _events(kube, w, CREATE_FAILED)
        for pod in pods:
            if (pod.get("status") or {}).get("phase") != "Succeeded":
                problems += pod_problems(pod)
    return lines + group(_with_details(problems, kube)), any(p.fatal for p in problems)
