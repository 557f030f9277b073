"""The serving Deployments (charts/llm-pipeline, stage=serve): find the ones that follow a registered model's alias,
roll them to the version the alias moves to and back, and what ``llmpipe k8s status`` shows about them.

A rollout is one change to the pod template: the annotation ``llmpipe.io/model-version`` (the serving pods' init
container fetches models:/NAME/<that version> instead of resolving the alias), plus ``kubernetes.io/change-cause``
on the Deployment (``kubectl rollout history`` shows it). The Deployment controller replaces the pods as the
Deployment's strategy says; this module watches the Deployment's status as ``kubectl rollout status`` does
(k8s.io/kubectl pkg/polymorphichelpers/rollout_status.go: DeploymentStatusViewer.Status): the rollout is complete
once ``status.observedGeneration`` has reached ``metadata.generation`` and every replica is updated and available
with no old one left; it failed when the controller set ``Progressing=False`` with reason ``ProgressDeadlineExceeded``
(kubernetes pkg/controller/deployment/progress.go: syncRolloutStatus, util/deployment_util.go: DeploymentTimedOut:
no progress for ``spec.progressDeadlineSeconds``), or when our own time limit ran out first.

Rolling back is the same patch with the previous value (or without the annotation, when there was none): the
template then equals the previous ReplicaSet's again, which the controller scales back up (sync.go: getNewReplicaSet
finds it by EqualIgnoreHash and gives it a new revision) while it scales the failed one down (rolling.go:
cleanupUnhealthyReplicas). The alias goes back first, so a pod that resolves it (no annotation) gets the previous
champion too.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, TextIO

from pipeline.errors import PipelineError
from pipeline.k8s.client import K8sError, Kube, cluster_configured
from pipeline.k8s.state import age, meta

SERVE_SELECTOR = "llmpipe.io/stage=serve"
VERSION_ANNOTATION = "llmpipe.io/model-version"
NAME_ANNOTATION = "llmpipe.io/model-name"
ALIAS_ANNOTATION = "llmpipe.io/model-alias"
CHANGE_CAUSE = "kubernetes.io/change-cause"
FETCH_CONTAINER = "fetch-model"
ROLLED_BACK = 4  # `llmpipe promote`'s exit status when the new version was rolled back


class RolloutError(PipelineError):
    """The new version did not become ready: alias and Deployments went back (``exit_code`` 4)."""

    exit_code = ROLLED_BACK


def _annotations(obj: dict) -> dict:
    return meta(obj).get("annotations") or {}


def template_version(deploy: dict) -> str | None:
    """The version the Deployment's pod template pins (None: its pods resolve the alias)."""
    tmpl = ((deploy.get("spec") or {}).get("template") or {})
    return ((tmpl.get("metadata") or {}).get("annotations") or {}).get(VERSION_ANNOTATION) or None


def selector_of(deploy: dict) -> str:
    labels = (((deploy.get("spec") or {}).get("selector") or {}).get("matchLabels") or {})
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def list_serving(kube: Kube) -> list[dict]:
    return sorted(kube.list("Deployment", labels=SERVE_SELECTOR, what="list the serving Deployments"),
                  key=lambda d: meta(d).get("name", ""))


def find(kube: Kube, model: str, alias: str) -> list[dict]:
    """The serving Deployments of ``model`` that follow ``alias``."""
    return [d for d in list_serving(kube)
            if _annotations(d).get(NAME_ANNOTATION) == model and _annotations(d).get(ALIAS_ANNOTATION) == alias]


# ------------------------------------------------------------------------------------------ rollout state


def rollout_state(deploy: dict) -> tuple[str, str]:
    """("complete" | "progressing" | "failed", why), as kubectl rollout status decides for a Deployment
    (rollout_status.go: DeploymentStatusViewer.Status)."""
    name = meta(deploy).get("name", "?")
    status = deploy.get("status") or {}
    generation = int(meta(deploy).get("generation") or 0)
    if generation > int(status.get("observedGeneration") or 0):
        return "progressing", f'waiting for deployment "{name}" spec update to be observed'
    cond = next((c for c in status.get("conditions") or [] if c.get("type") == "Progressing"), None)
    if cond is not None and cond.get("reason") == "ProgressDeadlineExceeded":
        return "failed", f'deployment "{name}" exceeded its progress deadline ({cond.get("message") or ""})'.replace(" ()", "")
    want = int(((deploy.get("spec") or {}).get("replicas")) if (deploy.get("spec") or {}).get("replicas") is not None else 1)
    updated = int(status.get("updatedReplicas") or 0)
    replicas = int(status.get("replicas") or 0)
    available = int(status.get("availableReplicas") or 0)
    if updated < want:
        return "progressing", f"{updated} out of {want} new replicas have been updated"
    if replicas > updated:
        return "progressing", f"{replicas - updated} old replicas are pending termination"
    if available < updated:
        return "progressing", f"{available} of {updated} updated replicas are available"
    return "complete", f"{available}/{want} pods ready"


def served_version(pod: dict) -> str | None:
    """What the pod's init container fetched (its termination message: served.json), if it has finished."""
    for cs in ((pod.get("status") or {}).get("initContainerStatuses") or []):
        if cs.get("name") != FETCH_CONTAINER:
            continue
        for state in (cs.get("state") or {}, cs.get("lastState") or {}):
            message = (state.get("terminated") or {}).get("message")
            if message:
                try:
                    return str(json.loads(message)["version"])
                except (ValueError, KeyError, TypeError):
                    return None
    return None


def pod_version(pod: dict) -> str:
    """The version a serving pod runs: what its init container fetched, else what its annotation pins, else
    "@alias" (still resolving the alias)."""
    pinned = _annotations(pod).get(VERSION_ANNOTATION)
    fetched = served_version(pod)
    if fetched and pinned and fetched != pinned:
        return f"{fetched} (pinned {pinned})"
    return fetched or pinned or "?"


def _ready(pod: dict) -> bool:
    return any(c.get("type") == "Ready" and str(c.get("status")) == "True"
               for c in (pod.get("status") or {}).get("conditions") or [])


def _last_log_line(kube: Kube, pod: str, container: str, previous: bool) -> str | None:
    """The last error line (else the last line) of a container's log; ``previous``: of its last terminated run, what
    a crash-looping container said before it died (the kubelet's log of the current run may be just starting)."""
    from pipeline.k8s.client import api_path

    try:
        text = kube.request("GET", api_path("v1", "pods", kube.namespace, pod, "log"), what=f"read the log of pod {pod}",
                            query={"container": container, "tailLines": 50, "previous": "true" if previous else None})
    except K8sError:
        return None
    lines = [ln.strip() for ln in (text if isinstance(text, str) else "").splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.lower().startswith("error") or "Error" in ln or "Traceback" in ln]
    chosen = (errors or lines or [None])[-1]
    return " ".join(chosen.split())[:240] if chosen else None


def _why_not_ready(kube: Kube, deploy: dict, version: str | None) -> str:
    """The causes on the pods of ``version`` (crash loops with their last log line, image pulls, scheduling), or
    that they run and are not ready (the startup probe: no generation answered yet)."""
    from pipeline.k8s.explain import Problem, pod_problems

    try:
        pods = kube.list_pods(selector_of(deploy))
    except K8sError:
        return ""
    mine = [p for p in pods if _annotations(p).get(VERSION_ANNOTATION) == version and not _ready(p)]
    lines: list[str] = []
    for pod in mine[:2]:
        name = meta(pod).get("name", "?")
        problems = pod_problems(pod)
        if not problems:  # running again between two crashes: what the last run did
            again = next((cs for cs in (pod.get("status") or {}).get("containerStatuses") or []
                          if int(cs.get("restartCount") or 0) and ((cs.get("lastState") or {}).get("terminated"))), None)
            if again is None:
                lines.append(f"pod {name}: not ready")
                continue
            code = again["lastState"]["terminated"].get("exitCode")
            problems = [Problem(name, f"container {again['name']} is crash-looping ({again['restartCount']} restarts; "
                                      f"last exited with code {code})", container=again["name"], kind="exit")]
        text = problems[0].text
        cname = problems[0].container
        if problems[0].kind == "exit" and cname:
            restarts = next((int(cs.get("restartCount") or 0) for cs in (pod.get("status") or {}).get("containerStatuses") or []
                             if cs.get("name") == cname), 0)
            line = _last_log_line(kube, name, cname, previous=restarts > 0)
            text += f"; log: {line}" if line else ""
        lines.append(f"pod {name}: {text}")
        if problems[0].kind == "exit":
            break  # one crash with its log says it; the others crash the same way
    return "; ".join(lines)


# ------------------------------------------------------------------------------------------ the rollout


@dataclass
class Target:
    """A serving Deployment to roll, and what its template pinned before."""

    name: str
    before: str | None
    generation: int = 0
    patched: bool = False
    last: tuple[str, str] = ("progressing", "")
    pods: str = ""


@dataclass
class Rollout:
    kube: Kube
    model: str
    alias: str
    targets: list[Target] = field(default_factory=list)
    timeout: float = 1800.0
    interval: float = 2.0
    out: TextIO = sys.stdout
    sleep: Callable[[float], None] = time.sleep
    clock: Callable[[], float] = time.monotonic

    @classmethod
    def plan(cls, kube: Kube, model: str, alias: str, **kw: Any) -> "Rollout":
        """Look for the serving Deployments before anything changes (a missing permission fails here)."""
        return cls(kube, model, alias, [Target(meta(d)["name"], template_version(d)) for d in find(kube, model, alias)], **kw)

    def where(self) -> str:
        return ", ".join(f"deployment/{t.name}" for t in self.targets) + f" (namespace {self.kube.namespace})"

    def _patch(self, target: Target, version: str | None, cause: str) -> None:
        body = {"metadata": {"annotations": {CHANGE_CAUSE: cause}},
                "spec": {"template": {"metadata": {"annotations": {VERSION_ANNOTATION: version}}}}}
        obj = self.kube.patch("apps/v1", "deployments", target.name, body,
                              what=f"roll deployment/{target.name} to {self.model} version {version or '@' + self.alias}")
        target.generation = int(meta(obj).get("generation") or 0)

    def roll(self, version: int, cause: str) -> None:
        for t in self.targets:
            self._patch(t, str(version), cause)
            t.patched = True

    def restore(self, cause: str) -> list[str]:
        """The templates as they were, for the targets that were patched; the ones that could not be, in words."""
        failed = []
        for t in self.targets:
            if t.patched:
                try:
                    self._patch(t, t.before, cause)
                    t.patched = False
                except K8sError as exc:
                    failed.append(f"deployment/{t.name} could not be patched back ({exc})")
        return failed

    def wait(self, timeout: float) -> bool:
        """Until every target is complete (True), one failed, or ``timeout`` seconds passed (False); each target's
        last state and a pod count are in ``target.last`` / ``target.pods``."""
        start = self.clock()
        pending = list(self.targets)
        while True:
            for t in list(pending):
                d = self.kube.get("apps/v1", "deployments", t.name, what=f"read deployment/{t.name}")
                t.last = rollout_state(d)
                st = d.get("status") or {}
                t.pods = f"{int(st.get('availableReplicas') or 0)}/{int((d.get('spec') or {}).get('replicas') or 0)}"
                if t.last[0] == "failed":
                    return False
                if t.last[0] == "complete" and int(meta(d).get("generation") or 0) >= t.generation:
                    pending.remove(t)
            if not pending:
                return True
            if self.clock() - start >= timeout:
                for t in pending:
                    t.last = ("failed", f"not ready after {timeout:g}s: {t.last[1]}")
                return False
            self.sleep(self.interval)


def rollback_alias(client: Any, model: str, alias: str, previous: int | None, failed: int, why: str) -> None:
    """The alias back where it was (removed when there was no champion before), and the failed version tagged."""
    if previous is not None:
        client.set_registered_model_alias(model, alias, str(previous))
        try:
            client.delete_model_version_tag(model, str(previous), "promotion.superseded_by")
        except Exception:  # noqa: BLE001 - the tag is informational; the alias is what matters
            pass
    else:
        client.delete_registered_model_alias(model, alias)
    client.set_model_version_tag(model, str(failed), "promotion.decision", "rolled-back")
    client.set_model_version_tag(model, str(failed), "promotion.rollback", why[:5000])


def plan_for_promote(args: Any, model: str, alias: str, out: TextIO = sys.stdout) -> Rollout | None:
    """The serving Deployments `llmpipe promote` rolls (None: none to roll). ``--rollout``: there must be one, and a
    cluster error is an error; by default a cluster is looked at only when one is configured, and a cluster error is
    a note (the alias still moves); ``--no-rollout`` never gets here."""
    from pipeline.k8s.wait import parse_duration

    try:
        timeout = parse_duration(args.rollout_timeout)
    except PipelineError:
        raise PipelineError(f"--rollout-timeout {args.rollout_timeout!r}: give seconds or a number with s, m, h or d "
                            "(e.g. 900, 15m)") from None
    if not timeout:
        raise PipelineError("--rollout-timeout must be above 0: a rollout that never ends cannot be rolled back")
    if args.rollout_interval <= 0:
        raise PipelineError("--rollout-interval must be > 0 seconds")
    if not args.rollout and not cluster_configured(args.kubeconfig):
        return None
    try:
        kube = Kube(args.namespace, args.kubeconfig, args.context, request_timeout=15.0)
        plan = Rollout.plan(kube, model, alias, timeout=timeout, interval=args.rollout_interval, out=out)
    except K8sError as exc:
        if args.rollout:
            raise PipelineError(f"--rollout: {exc}") from None
        out.write(f"rollout: no serving Deployment looked for ({exc}); only the alias moves (--no-rollout: do not look)\n")
        return None
    if not plan.targets:
        if args.rollout:
            raise PipelineError(f"--rollout: no serving Deployment of models:/{model}@{alias} in namespace "
                                f"{kube.namespace} (label {SERVE_SELECTOR}, annotations {NAME_ANNOTATION}={model}, "
                                f"{ALIAS_ANNOTATION}={alias}): `make deploy-serve` installs one; -n picks the namespace")
        return None
    return plan


def follow(client: Any, plan: Rollout, result: dict, dry_run: bool = False) -> int:
    """After ``registry.promote`` (``result``): roll ``plan``'s Deployments to the champion; if they do not all become
    ready within ``plan.timeout``, move the alias (when this promote moved it) and the Deployments back. Prints one
    line either way; returns the exit status (0, or ROLLED_BACK)."""
    new = result["champion_version"] if not dry_run else result["candidate_version"]
    moved = result["decision"] == "promoted"
    if new is None or result["decision"] not in ("promoted", "already-champion", "would-promote"):
        return 0
    plan.targets = [t for t in plan.targets if t.before != str(new) and not (t.before is None and _serves(plan, t, new))]
    if not plan.targets:
        return 0
    if dry_run:
        plan.out.write(f"rollout: would roll {plan.where()} to {plan.model} version {new}, and back if its pods are not "
                       f"ready within {plan.timeout:.0f}s (dry run)\n")
        return 0
    timeout = plan.timeout
    t0 = plan.clock()
    try:
        plan.roll(new, f"llmpipe promote: {plan.model} version {new} ({plan.alias})")
    except K8sError as exc:  # not rolled (or only some): put back what changed, then say so
        alias, stuck = _undo(client, plan, result, f"the rollout could not start: {exc}")
        raise PipelineError(f"rollout of {plan.model} version {new} could not start ({exc}); {alias}, "
                            + ("; ".join(stuck) if stuck else "the Deployments are as they were")) from None
    ok = plan.wait(timeout)
    took = plan.clock() - t0
    if ok:
        pods = ", ".join(f"deployment/{t.name} {t.pods} pods ready" for t in plan.targets)
        plan.out.write(f"rollout: {pods} on {plan.model} version {new} ({took:.0f}s)\n")
        return 0
    bad = next(t for t in plan.targets if t.last[0] == "failed")
    deploy = plan.kube.get("apps/v1", "deployments", bad.name, what=f"read deployment/{bad.name}")
    causes = _why_not_ready(plan.kube, deploy, str(new))
    why = bad.last[1] + (f"; {causes}" if causes else "")
    alias, stuck = _undo(client, plan, result, why)
    if stuck:
        raise RolloutError(f"rollout of {plan.model} version {new} failed ({why}); {alias}, but " + "; ".join(stuck))
    back = plan.wait(timeout)
    names = ", ".join(f"deployment/{t.name}" for t in plan.targets)
    where = ("the previous version" if moved else "its previous pods")
    state = (f"{names} is back on {where} (" + ", ".join(f"{t.pods} pods ready" for t in plan.targets) + ")" if back
             else f"{names} is rolling back to {where} (" + "; ".join(t.last[1] for t in plan.targets) + ")")
    plan.out.write(f"rolled back: {plan.model} version {new} did not become ready on {plan.where()} within "
                   f"{took:.0f}s ({why}); {alias} and {state}\n")
    plan.out.flush()
    return ROLLED_BACK


def _serves(plan: Rollout, target: Target, version: int) -> bool:
    """Every pod of an unpinned Deployment already runs ``version`` (it resolved the alias after it moved)."""
    try:
        deploy = plan.kube.get("apps/v1", "deployments", target.name, what=f"read deployment/{target.name}")
        pods = plan.kube.list_pods(selector_of(deploy))
    except K8sError:
        return False
    return bool(pods) and all(served_version(p) == str(version) for p in pods)


def _undo(client: Any, plan: Rollout, result: dict, why: str) -> tuple[str, list[str]]:
    """The alias first (pods that resolve it then get the previous champion), then the Deployments' templates.
    Returns what became of the alias, in words, and the Deployments that could not be put back."""
    new, before = result["champion_version"], result["champion_before"]
    if result["decision"] == "promoted":
        rollback_alias(client, plan.model, plan.alias, before, new, why)
        said = (f"{plan.alias} is back on version {before}" if before is not None
                else f"{plan.alias} is removed again (there was none before)")
    else:
        said = f"{plan.alias} stays on version {new} (this promote did not move it)"
    return said, plan.restore(f"llmpipe promote: back from {plan.model} version {new}: {why}"[:1000])


# ------------------------------------------------------------------------------------------ status


HEADER = ("SERVING", "MODEL", "PINNED", "READY", "UP-TO-DATE", "ROLLOUT", "AGE")
POD_HEADER = ("POD", "VERSION", "READY", "STATUS", "RESTARTS", "AGE")


def _pod_state(pod: dict) -> str:
    status = pod.get("status") or {}
    for cs in status.get("initContainerStatuses") or []:
        waiting = (cs.get("state") or {}).get("waiting") or {}
        term = (cs.get("state") or {}).get("terminated") or {}
        if (cs.get("state") or {}).get("running"):
            return f"Init:{cs.get('name')}"
        if waiting.get("reason") and waiting["reason"] != "PodInitializing":
            return f"Init:{waiting['reason']}"
        if term and term.get("exitCode") not in (0, None):
            return "Init:Error"
    for cs in status.get("containerStatuses") or []:
        waiting = (cs.get("state") or {}).get("waiting") or {}
        if waiting.get("reason"):
            return waiting["reason"]
        if (cs.get("state") or {}).get("terminated"):
            return (cs["state"]["terminated"].get("reason") or "Terminated")
    return status.get("phase") or "Pending"


def status_lines(kube: Kube) -> list[str]:
    """The serving Deployments of the namespace, each with its pods and the model version each pod runs."""
    deployments = list_serving(kube)
    if not deployments:
        return []
    rows: list[tuple[str, ...]] = [HEADER]
    pod_rows: dict[str, list[tuple[str, ...]]] = {}
    for d in deployments:
        name, ann, st = meta(d)["name"], _annotations(d), d.get("status") or {}
        want = (d.get("spec") or {}).get("replicas")
        state, why = rollout_state(d)
        rows.append((f"deployment/{name}", f"{ann.get(NAME_ANNOTATION, '?')}@{ann.get(ALIAS_ANNOTATION, '?')}",
                     template_version(d) or "-", f"{int(st.get('readyReplicas') or 0)}/{want if want is not None else '?'}",
                     str(int(st.get("updatedReplicas") or 0)), state if state != "progressing" else f"progressing: {why}",
                     age(meta(d).get("creationTimestamp"))))
        pods = sorted(kube.list_pods(selector_of(d)), key=lambda p: meta(p).get("creationTimestamp") or "")
        pod_rows[name] = [POD_HEADER] + [
            (meta(p).get("name", "?"), pod_version(p),
             f"{sum(1 for c in (p.get('status') or {}).get('containerStatuses') or [] if c.get('ready'))}/"
             f"{len((p.get('spec') or {}).get('containers') or [])}",
             _pod_state(p), str(sum(int(c.get("restartCount") or 0) for c in (p.get("status") or {}).get("containerStatuses") or [])),
             age(meta(p).get("creationTimestamp"))) for p in pods]
    lines = _table(rows)
    for d in deployments:
        name = meta(d)["name"]
        if len(pod_rows[name]) > 1:
            lines += ["  " + ln for ln in _table(pod_rows[name])]
        state, why = rollout_state(d)
        if state == "failed":
            version = template_version(d)
            causes = _why_not_ready(kube, d, version) if version else ""
            lines.append(f"deployment/{name}: {why}" + (f"; {causes}" if causes else ""))
    return lines


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(r)).rstrip() for r in rows]
