"""The Deployment and ReplicaSet controllers and the kubelet of the serving pods, for tests/k8s/fakeapi.py: what
`llmpipe promote --rollout` watches when it rolls the serving Deployment to a new model version and back.

Each behaviour names the kubernetes v1.33 function it reproduces (github.com/kubernetes/kubernetes):

* the API server: SetDefaults_Deployment (pkg/apis/apps/v1/defaults.go: replicas 1, RollingUpdate 25%/25%,
  revisionHistoryLimit 10, progressDeadlineSeconds 600) and SetDefaults_PodSpec's restartPolicy Always
  (pkg/apis/core/v1/defaults.go); ValidateDeploymentSpec / ValidateDeploymentUpdate (pkg/apis/apps/validation/
  validation.go: a selector that matches the template's labels, restartPolicy Always, maxSurge and maxUnavailable
  not both 0, the selector immutable in apps/v1); deploymentStrategy.PrepareForCreate / PrepareForUpdate
  (pkg/registry/apps/deployment/strategy.go: generation 1, then +1 when the spec or the annotations change; status
  only through its subresource);
* the Deployment controller, RollingUpdate (pkg/controller/deployment/): rolloutRolling (rolling.go: scale the new
  ReplicaSet up, else old ones down, cleanupDeployment once complete, syncRolloutStatus); getNewReplicaSet
  (sync.go: the ReplicaSet whose template equals the Deployment's ignoring pod-template-hash,
  util/deployment_util.go FindNewReplicaSet / EqualIgnoreHash; created as <name>-<hash>, controller.ComputeHash,
  revision = max old revision + 1, an old one reused on a rollback gets the new revision and keeps the old one in
  revision-history: SetNewReplicaSetAnnotations; Progressing NewReplicaSetCreated / FoundNewReplicaSet);
  NewRSNewReplicas, ResolveFenceposts, MaxUnavailable (deployment_util.go); reconcileNewReplicaSet,
  reconcileOldReplicaSets, cleanupUnhealthyReplicas, scaleDownOldReplicaSetsForRollingUpdate (rolling.go);
  calculateStatus (sync.go: observedGeneration, replicas, updatedReplicas, readyReplicas, availableReplicas,
  unavailableReplicas, Available MinimumReplicasAvailable / MinimumReplicasUnavailable); syncRolloutStatus
  (progress.go: Progressing NewReplicaSetAvailable once DeploymentComplete, ReplicaSetUpdated on progress -
  DeploymentProgressing -, ProgressDeadlineExceeded once DeploymentTimedOut: no progress for
  progressDeadlineSeconds since the condition's lastUpdateTime; ReplicaFailure copied from the ReplicaSets:
  getReplicaFailures); SetDeploymentCondition (lastTransitionTime kept while the status stays); the
  ScalingReplicaSet events ("Scaled up replica set %s from %d to %d": scaleReplicaSetAndRecordEvent);
* the ReplicaSet controller (pkg/controller/replicaset/replica_set.go: manageReplicas creates pods from the template
  - controller_utils.go GetPodFromTemplate: generateName "<rs>-", the template's labels and annotations, a
  controller ownerReference - and deletes the surplus, not-ready pods first: getPodsToDelete / ActivePods;
  a create the API server refuses is a FailedCreate event and a ReplicaFailure condition: replica_set_utils.go
  calculateStatus; status replicas, readyReplicas, availableReplicas - Ready for minReadySeconds,
  podutil.IsPodAvailable - and observedGeneration);
* the garbage collector: a deleted Deployment's ReplicaSets and their pods go with it (propagationPolicy
  Background, pkg/controller/garbagecollector).

Not modelled: scaling events of a running rollout (dc.sync, proportional scaling of several active ReplicaSets),
paused Deployments, the Recreate strategy, terminating pods (a deleted pod is gone at once).

The kubelet of a serving pod plays what charts/llm-pipeline/templates/_serve.tpl renders: the init container
fetch-model resolves the pod's pinned version (annotation llmpipe.io/model-version) or else the alias, through
``ServingModel.resolve`` (a test wires the real MLflow registry there), and leaves served.json as its termination
message; then the server container loads, and becomes Ready (its startup probe: a generation answered), or
crash-loops, or stays not ready, as ``ServingModel.behaviour`` says for that version.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

HASH_LABEL = "pod-template-hash"  # apps.DefaultDeploymentUniqueLabelKey
REVISION = "deployment.kubernetes.io/revision"
REVISION_HISTORY = "deployment.kubernetes.io/revision-history"
DESIRED = "deployment.kubernetes.io/desired-replicas"
MAX_REPLICAS = "deployment.kubernetes.io/max-replicas"
SKIP_COPY = {REVISION, REVISION_HISTORY, DESIRED, MAX_REPLICAS, "kubectl.kubernetes.io/last-applied-configuration",
             "deprecated.deployment.rollback.to"}  # deployment_util.go annotationsToSkip
VERSION_ANNOTATION = "llmpipe.io/model-version"
SAFE = "bcdfghjklmnpqrstvwxz2456789"  # k8s.io/apimachinery pkg/util/rand: alphanums


@dataclass
class ServingModel:
    """What the serving pods find: ``resolve(name, alias)`` -> the version the alias points to (raise to fail the
    init container, as `llmpipe serve --fetch-only` fails on a missing alias); ``behaviour[version]``: "ready"
    (default), "crash" (the server exits 1 at every start: CrashLoopBackOff) or "unready" (runs, never answers
    a generation); ``load_ticks``: how long a server loads before its startup probe passes."""

    resolve: Callable[[str, str], int] | None = None
    behaviour: dict[int, str] = field(default_factory=dict)
    load_ticks: int = 3
    error_line: str = "error: the model does not load: CUDA out of memory"

    def version_for(self, name: str, alias: str) -> int:
        if self.resolve is None:
            raise LookupError(f"models:/{name}@{alias} does not exist in the registry")
        return int(self.resolve(name, alias))


# ------------------------------------------------------------------------------ the API server


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _ts(when: dt.datetime | None = None) -> str:
    return (when or _now()).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse(ts: str | None) -> dt.datetime | None:
    return dt.datetime.fromisoformat(ts.replace("Z", "+00:00")) if ts else None


def _labels_match(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in (selector.get("matchLabels") or {}).items())


def admit_deployment(obj: dict, invalid: Callable[[str], Exception]) -> None:
    """A Deployment create: defaults, validation, generation 1 and an empty status (see the module docstring)."""
    name = obj["metadata"]["name"]
    spec = obj.setdefault("spec", {})
    spec.setdefault("replicas", 1)
    strategy = spec.setdefault("strategy", {})
    strategy.setdefault("type", "RollingUpdate")
    if strategy["type"] == "RollingUpdate":
        ru = strategy.setdefault("rollingUpdate", {})
        ru.setdefault("maxUnavailable", "25%")
        ru.setdefault("maxSurge", "25%")
    spec.setdefault("revisionHistoryLimit", 10)
    spec.setdefault("progressDeadlineSeconds", 600)
    tspec = spec.setdefault("template", {}).setdefault("spec", {})
    tspec.setdefault("restartPolicy", "Always")
    _validate(name, spec, invalid)
    obj["metadata"]["generation"] = 1
    obj["status"] = {}


def _validate(name: str, spec: dict, invalid: Callable[[str], Exception]) -> None:
    sel = (spec.get("selector") or {}).get("matchLabels") or {}
    if not sel:
        raise invalid(f'Deployment.apps "{name}" is invalid: spec.selector: Required value')
    labels = ((spec.get("template") or {}).get("metadata") or {}).get("labels") or {}
    if not _labels_match(spec["selector"], labels):
        raise invalid(f'Deployment.apps "{name}" is invalid: spec.template.metadata.labels: Invalid value: '
                      f'{json.dumps(labels)}: `selector` does not match template `labels`')
    if spec["template"]["spec"].get("restartPolicy") != "Always":
        raise invalid(f'Deployment.apps "{name}" is invalid: spec.template.spec.restartPolicy: Unsupported value: '
                      f'"{spec["template"]["spec"].get("restartPolicy")}": supported values: "Always"')
    ru = (spec.get("strategy") or {}).get("rollingUpdate") or {}
    if spec["strategy"]["type"] == "RollingUpdate" and str(ru.get("maxSurge")) in ("0", "0%") \
            and str(ru.get("maxUnavailable")) in ("0", "0%"):
        raise invalid(f'Deployment.apps "{name}" is invalid: spec.strategy.rollingUpdate.maxUnavailable: Invalid value: '
                      "0: may not be 0 when `maxSurge` is 0")


def prepare_for_update(new: dict, old: dict, invalid: Callable[[str], Exception]) -> None:
    """A Deployment update (PUT or PATCH): status kept, generation +1 when the spec or the annotations changed, the
    selector immutable."""
    name = old["metadata"]["name"]
    new["status"] = copy.deepcopy(old.get("status") or {})
    if new.get("spec", {}).get("selector") != old["spec"].get("selector"):
        raise invalid(f'Deployment.apps "{name}" is invalid: spec.selector: Invalid value: {json.dumps(new["spec"].get("selector"))}'
                      ": field is immutable")
    _validate(name, new["spec"], invalid)
    if new["spec"] != old["spec"] or (new["metadata"].get("annotations") or {}) != (old["metadata"].get("annotations") or {}):
        new["metadata"]["generation"] = int(old["metadata"].get("generation") or 1) + 1


# ------------------------------------------------------------------------------ helpers of the controllers


def pct_or_int(value: Any, total: int, round_up: bool) -> int:
    """k8s.io/apimachinery pkg/util/intstr: GetScaledValueFromIntOrPercent."""
    text = str(value)
    if text.endswith("%"):
        raw = int(text[:-1]) * total / 100
        return int(-(-raw // 1)) if round_up else int(raw // 1)
    return int(text)


def resolve_fenceposts(d: dict) -> tuple[int, int]:
    """deployment_util.go: ResolveFenceposts (surge rounds up, unavailable down; both 0 -> unavailable 1)."""
    ru = d["spec"]["strategy"].get("rollingUpdate") or {}
    desired = int(d["spec"]["replicas"])
    surge = pct_or_int(ru.get("maxSurge", 0), desired, True)
    unavailable = pct_or_int(ru.get("maxUnavailable", 0), desired, False)
    if surge == 0 and unavailable == 0:
        unavailable = 1
    return surge, unavailable


def max_unavailable(d: dict) -> int:
    """deployment_util.go: MaxUnavailable."""
    replicas = int(d["spec"]["replicas"])
    if d["spec"]["strategy"]["type"] != "RollingUpdate" or replicas == 0:
        return 0
    return min(resolve_fenceposts(d)[1], replicas)


def compute_hash(template: dict, collision_count: int | None) -> str:
    """pkg/controller/controller_utils.go: ComputeHash (fnv-32a over the template, then the collision count), encoded
    with rand.SafeEncodeString. The bytes hashed differ (Go's DeepHashObject vs JSON here); what matters is that equal
    templates hash equal."""
    h = 0x811C9DC5
    for b in json.dumps(template, sort_keys=True).encode() + (str(collision_count).encode() if collision_count else b""):
        h = ((h ^ b) * 0x01000193) & 0xFFFFFFFF
    return "".join(SAFE[ord(c) % len(SAFE)] for c in str(h))


def _without_hash(template: dict) -> dict:
    t = copy.deepcopy(template)
    (t.get("metadata") or {}).get("labels", {}).pop(HASH_LABEL, None)
    return t


def revision(obj: dict) -> int:
    try:
        return int((obj["metadata"].get("annotations") or {}).get(REVISION) or 0)
    except ValueError:
        return 0


def _replicas(rs: dict) -> int:
    return int(rs["spec"].get("replicas") or 0)


def _cond(status: dict, kind: str) -> dict | None:
    return next((c for c in status.get("conditions") or [] if c.get("type") == kind), None)


def set_condition(status: dict, kind: str, value: str, reason: str, message: str) -> None:
    """deployment_util.go: SetDeploymentCondition (no change for the same status and reason; lastTransitionTime kept
    while the status stays)."""
    current = _cond(status, kind)
    if current is not None and current["status"] == value and current["reason"] == reason:
        return
    t = _ts()
    cond = {"type": kind, "status": value, "lastUpdateTime": t, "lastTransitionTime": t, "reason": reason,
            "message": message}
    if current is not None and current["status"] == value:
        cond["lastTransitionTime"] = current["lastTransitionTime"]
    status["conditions"] = [c for c in status.get("conditions") or [] if c.get("type") != kind] + [cond]


def _pod_ready_since(pod: dict) -> dt.datetime | None:
    cond = _cond(pod.get("status") or {}, "Ready")
    if not cond or cond.get("status") != "True" or (pod["metadata"].get("deletionTimestamp")):
        return None
    return _parse(cond.get("lastTransitionTime")) or _now()


# ------------------------------------------------------------------------------ the controllers


class DeploymentController:
    """One Deployment's controllers (Deployment, its ReplicaSets) and its pods' kubelets, as a reconcile loop."""

    def __init__(self, fake: Any, ns: str, name: str, uid: str):
        self.fake, self.ns, self.name, self.uid = fake, ns, name, uid
        self.kubelets: set[str] = set()

    # ---------------------------------------------------------------- store access
    def _deployment(self) -> dict | None:
        with self.fake.cond:
            d = self.fake.store["deployments"].get((self.ns, self.name))
            if self.fake.stopping or d is None or d["metadata"]["uid"] != self.uid or d["metadata"].get("deletionTimestamp"):
                return None
            return copy.deepcopy(d)

    def _replicasets(self) -> list[dict]:
        """ListReplicaSets: the ReplicaSets whose controller is this Deployment, oldest first."""
        with self.fake.cond:
            rss = [copy.deepcopy(rs) for (n, _), rs in self.fake.store["replicasets"].items()
                   if n == self.ns and self.fake._owner_uid(rs) == self.uid]
        return sorted(rss, key=lambda r: (r["metadata"]["creationTimestamp"], r["metadata"]["name"]))

    def _pods_of(self, rs: dict) -> list[dict]:
        with self.fake.cond:
            return [copy.deepcopy(p) for (n, _), p in self.fake.store["pods"].items()
                    if n == self.ns and self.fake._owner_uid(p) == rs["metadata"]["uid"]]

    def _put_rs(self, rs: dict) -> dict:
        with self.fake.cond:
            cur = self.fake.store["replicasets"].get((self.ns, rs["metadata"]["name"]))
            if cur is None or cur["metadata"]["uid"] != rs["metadata"]["uid"]:
                return rs
            if cur["spec"] != rs["spec"] or cur["metadata"].get("annotations") != rs["metadata"].get("annotations"):
                rs["metadata"]["generation"] = int(cur["metadata"].get("generation") or 1) + 1
            self.fake._put("replicasets", rs)
            return copy.deepcopy(rs)

    def _put_status(self, d: dict, status: dict, annotations: dict | None = None) -> None:
        """UpdateStatus (and the revision annotation, which the controller updates on the object)."""
        with self.fake.cond:
            cur = self.fake.store["deployments"].get((self.ns, self.name))
            if cur is None or cur["metadata"]["uid"] != self.uid:
                return
            changed = cur.get("status") != status
            if annotations is not None and (cur["metadata"].get("annotations") or {}) != annotations:
                cur["metadata"]["annotations"] = annotations  # a metadata update by the controller: no generation bump
                changed = True
            if changed:
                cur["status"] = copy.deepcopy(status)
                self.fake._put("deployments", cur)

    # ---------------------------------------------------------------- the loop
    def run(self) -> None:
        try:
            while True:
                d = self._deployment()
                if d is None:
                    self._collect_garbage()
                    return
                for rs in self._replicasets():
                    self._sync_replicaset(rs)
                self._sync_deployment(d)
                time.sleep(self.fake.tick)
        except Exception as exc:  # noqa: BLE001 - recorded: a bug here must fail the test, not hang it
            if type(exc).__name__ != "_Gone":
                self.fake.controller_errors.append(f"deployment {self.name}: {exc!r}")
                raise

    def _collect_garbage(self) -> None:
        with self.fake.cond:
            for key, rs in list(self.fake.store["replicasets"].items()):
                if key[0] == self.ns and self.fake._owner_uid(rs) == self.uid:
                    for pkey, pod in list(self.fake.store["pods"].items()):
                        if pkey[0] == self.ns and self.fake._owner_uid(pod) == rs["metadata"]["uid"]:
                            del self.fake.store["pods"][pkey]
                            self.fake._close_logs(*pkey)
                    del self.fake.store["replicasets"][key]
            self.fake.cond.notify_all()

    # ---------------------------------------------------------------- the ReplicaSet controller
    def _sync_replicaset(self, rs: dict) -> None:
        """replica_set.go: syncReplicaSet -> manageReplicas, then calculateStatus."""
        pods = [p for p in self._pods_of(rs) if not p["metadata"].get("deletionTimestamp")]
        want, failure = _replicas(rs), None
        if len(pods) < want:
            for _ in range(want - len(pods)):
                try:
                    pods.append(self._create_pod(rs))
                except Exception as exc:  # noqa: BLE001 - fakeapi._Refused: the API server's message
                    failure = str(exc)
                    self.fake.event(self.ns, rs, "Warning", "FailedCreate", f"Error creating: {failure}",
                                    component="replicaset-controller")
                    break
        elif len(pods) > want:
            # getPodsToDelete: ActivePods ranks not-ready pods (and pending ones) first, then the newest
            pods.sort(key=lambda p: (_pod_ready_since(p) is not None, p["metadata"]["creationTimestamp"]))
            doomed, pods = pods[: len(pods) - want], pods[len(pods) - want:]
            for pod in doomed:
                try:
                    self.fake._delete("api/v1", "pods", self.ns, pod["metadata"]["name"], None, record=False)
                except Exception:  # noqa: BLE001 - already gone
                    pass
        min_ready = int(rs["spec"].get("minReadySeconds") or 0)
        ready = [p for p in pods if _pod_ready_since(p) is not None]
        available = [p for p in ready if _pod_ready_since(p) + dt.timedelta(seconds=min_ready) <= _now()]
        status = copy.deepcopy(rs.get("status") or {})
        status.update(replicas=len(pods), readyReplicas=len(ready), availableReplicas=len(available),
                      fullyLabeledReplicas=len(pods), observedGeneration=rs["metadata"].get("generation", 1))
        # replica_set_utils.go calculateStatus: ReplicaFailure set on a failed create, removed after one that worked
        if failure and _cond(status, "ReplicaFailure") is None:
            status["conditions"] = (status.get("conditions") or []) + [
                {"type": "ReplicaFailure", "status": "True", "reason": "FailedCreate", "message": failure,
                 "lastTransitionTime": _ts()}]
        elif not failure and _cond(status, "ReplicaFailure") is not None:
            status["conditions"] = [c for c in status["conditions"] if c["type"] != "ReplicaFailure"]
            if not status["conditions"]:
                status.pop("conditions")
        if status != rs.get("status"):
            rs["status"] = status
            with self.fake.cond:
                cur = self.fake.store["replicasets"].get((self.ns, rs["metadata"]["name"]))
                if cur is not None and cur["metadata"]["uid"] == rs["metadata"]["uid"]:
                    cur["status"] = status
                    self.fake._put("replicasets", cur)

    def _create_pod(self, rs: dict) -> dict:
        """controller_utils.go: GetPodFromTemplate (generateName "<rs>-", the template's labels and annotations, a
        controller ownerReference), created through the API (admission included)."""
        tmpl = rs["spec"]["template"]
        pod = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {"generateName": rs["metadata"]["name"] + "-",
                            "labels": dict((tmpl.get("metadata") or {}).get("labels") or {}),
                            "annotations": dict((tmpl.get("metadata") or {}).get("annotations") or {}),
                            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": rs["metadata"]["name"],
                                                 "uid": rs["metadata"]["uid"], "controller": True,
                                                 "blockOwnerDeletion": True}]},
               "spec": copy.deepcopy(tmpl.get("spec") or {})}
        created = self.fake._create_pod(pod, self.ns)
        threading.Thread(target=kubelet, args=(self.fake, self.ns, created), daemon=True).start()
        return created

    # ---------------------------------------------------------------- the Deployment controller
    def _sync_deployment(self, d: dict) -> None:
        rss = self._replicasets()
        new = next((rs for rs in rss if _without_hash(rs["spec"]["template"]) == d["spec"]["template"]), None)
        olds = [rs for rs in rss if new is None or rs["metadata"]["uid"] != new["metadata"]["uid"]]
        status = copy.deepcopy(d.get("status") or {})
        annotations = dict(d["metadata"].get("annotations") or {})
        new_revision = max([revision(rs) for rs in olds] or [0]) + 1
        if new is None:
            new = self._new_replicaset(d, rss, new_revision)
            annotations[REVISION] = str(new_revision)
            if d["spec"].get("progressDeadlineSeconds") is not None:
                set_condition(status, "Progressing", "True", "NewReplicaSetCreated",
                              f'Created new replica set "{new["metadata"]["name"]}"')
            self._put_status(d, status, annotations)
            d["status"], d["metadata"]["annotations"] = status, annotations
        else:
            rs_ann = dict(new["metadata"].get("annotations") or {})
            changed = False
            for k, v in annotations.items():  # copyDeploymentAnnotationsToReplicaSet
                if k not in SKIP_COPY and rs_ann.get(k) != v:
                    rs_ann[k], changed = v, True
            old_rev = revision(new)
            if old_rev < new_revision:  # a rollback to this ReplicaSet: SetNewReplicaSetAnnotations
                if REVISION in rs_ann:
                    history = [h for h in rs_ann.get(REVISION_HISTORY, "").split(",") if h]
                    rs_ann[REVISION_HISTORY] = ",".join(history + [str(old_rev)])
                rs_ann[REVISION] = str(new_revision)
                changed = True
            if changed:
                new["metadata"]["annotations"] = rs_ann
                new = self._put_rs(new)
            if annotations.get(REVISION) != rs_ann[REVISION] or (
                    d["spec"].get("progressDeadlineSeconds") is not None and _cond(status, "Progressing") is None):
                annotations[REVISION] = rs_ann[REVISION]
                if _cond(status, "Progressing") is None and d["spec"].get("progressDeadlineSeconds") is not None:
                    set_condition(status, "Progressing", "True", "FoundNewReplicaSet",
                                  f'Found new replica set "{new["metadata"]["name"]}"')
                self._put_status(d, status, annotations)
                d["status"], d["metadata"]["annotations"] = status, annotations
        all_rss = olds + [new]
        # rolloutRolling
        if self._reconcile_new(d, all_rss, new) or self._reconcile_old(d, all_rss, olds, new):
            return self._sync_rollout_status(d, self._replicasets(), self._find(new))
        if self._complete(d, d.get("status") or {}):
            self._cleanup(d, olds)
        self._sync_rollout_status(d, self._replicasets(), self._find(new))

    def _find(self, rs: dict) -> dict:
        return next((r for r in self._replicasets() if r["metadata"]["uid"] == rs["metadata"]["uid"]), rs)

    def _new_replicaset(self, d: dict, rss: list[dict], new_revision: int) -> dict:
        """sync.go: getNewReplicaSet, the create branch (NewRSNewReplicas replicas; revision and replica annotations)."""
        h = compute_hash(d["spec"]["template"], (d.get("status") or {}).get("collisionCount"))
        template = copy.deepcopy(d["spec"]["template"])
        template.setdefault("metadata", {}).setdefault("labels", {})[HASH_LABEL] = h
        selector = copy.deepcopy(d["spec"]["selector"])
        selector.setdefault("matchLabels", {})[HASH_LABEL] = h
        surge, _ = resolve_fenceposts(d)
        desired = int(d["spec"]["replicas"])
        current = sum(_replicas(rs) for rs in rss)
        replicas = min(max(desired + surge - current, 0), desired)  # NewRSNewReplicas with a new (0-replica) RS
        annotations = {k: v for k, v in (d["metadata"].get("annotations") or {}).items() if k not in SKIP_COPY}
        annotations.update({REVISION: str(new_revision), DESIRED: str(desired), MAX_REPLICAS: str(desired + surge)})
        rs = {"apiVersion": "apps/v1", "kind": "ReplicaSet",
              "metadata": {"name": f"{d['metadata']['name']}-{h}", "labels": dict(template["metadata"]["labels"]),
                           "annotations": annotations,
                           "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment", "name": d["metadata"]["name"],
                                                "uid": self.uid, "controller": True, "blockOwnerDeletion": True}]},
              "spec": {"replicas": replicas, "minReadySeconds": int(d["spec"].get("minReadySeconds") or 0),
                       "selector": selector, "template": template}}
        created = self.fake._create("apis/apps/v1", "replicasets", self.ns, rs, simulate=False)
        if replicas:
            self.fake.event(self.ns, d, "Normal", "ScalingReplicaSet",
                            f"Scaled up replica set {created['metadata']['name']} from 0 to {replicas}",
                            component="deployment-controller")
        return created

    def _scale(self, d: dict, rs: dict, count: int) -> bool:
        """scaleReplicaSetAndRecordEvent."""
        before = _replicas(rs)
        if before == count:
            return False
        rs["spec"]["replicas"] = count
        ann = dict(rs["metadata"].get("annotations") or {})
        surge, _ = resolve_fenceposts(d)
        ann.update({DESIRED: str(d["spec"]["replicas"]), MAX_REPLICAS: str(int(d["spec"]["replicas"]) + surge)})
        rs["metadata"]["annotations"] = ann
        self._put_rs(rs)
        way = "up" if count > before else "down"
        self.fake.event(self.ns, d, "Normal", "ScalingReplicaSet",
                        f"Scaled {way} replica set {rs['metadata']['name']} from {before} to {count}",
                        component="deployment-controller")
        return True

    def _reconcile_new(self, d: dict, all_rss: list[dict], new: dict) -> bool:
        """rolling.go: reconcileNewReplicaSet with deployment_util.go NewRSNewReplicas."""
        desired = int(d["spec"]["replicas"])
        if _replicas(new) == desired:
            return False
        if _replicas(new) > desired:
            return self._scale(d, new, desired)
        surge, _ = resolve_fenceposts(d)
        current = sum(_replicas(rs) for rs in all_rss)
        if current >= desired + surge:
            return False
        count = _replicas(new) + min(desired + surge - current, desired - _replicas(new))
        return self._scale(d, new, count)

    def _reconcile_old(self, d: dict, all_rss: list[dict], olds: list[dict], new: dict) -> bool:
        """rolling.go: reconcileOldReplicaSets -> cleanupUnhealthyReplicas, scaleDownOldReplicaSetsForRollingUpdate."""
        active = [rs for rs in olds if _replicas(rs) > 0]
        if not active:
            return False
        all_pods = sum(_replicas(rs) for rs in all_rss)
        min_available = int(d["spec"]["replicas"]) - max_unavailable(d)
        new_unavailable = _replicas(new) - int((new.get("status") or {}).get("availableReplicas") or 0)
        max_scaled_down = all_pods - min_available - new_unavailable
        if max_scaled_down <= 0:
            return False
        cleaned = 0
        for rs in active:  # cleanupUnhealthyReplicas, oldest first
            if cleaned >= max_scaled_down:
                break
            unhealthy = _replicas(rs) - int((rs.get("status") or {}).get("availableReplicas") or 0)
            if unhealthy <= 0:
                continue
            n = min(max_scaled_down - cleaned, unhealthy)
            self._scale(d, rs, _replicas(rs) - n)
            cleaned += n
        active = [self._find(rs) for rs in active]
        available = sum(int((rs.get("status") or {}).get("availableReplicas") or 0) for rs in active + [self._find(new)])
        scaled = 0
        if available > min_available:  # scaleDownOldReplicaSetsForRollingUpdate
            total = available - min_available
            for rs in active:
                if scaled >= total:
                    break
                if _replicas(rs) == 0:
                    continue
                n = min(_replicas(rs), total - scaled)
                self._scale(d, rs, _replicas(rs) - n)
                scaled += n
        return cleaned + scaled > 0

    @staticmethod
    def _complete(d: dict, status: dict) -> bool:
        """deployment_util.go: DeploymentComplete."""
        want = int(d["spec"]["replicas"])
        return (int(status.get("updatedReplicas") or 0) == want and int(status.get("replicas") or 0) == want
                and int(status.get("availableReplicas") or 0) == want
                and int(status.get("observedGeneration") or 0) >= int(d["metadata"].get("generation") or 1))

    def _cleanup(self, d: dict, olds: list[dict]) -> None:
        """sync.go: cleanupDeployment: old ReplicaSets without replicas beyond revisionHistoryLimit, oldest first."""
        limit = int(d["spec"].get("revisionHistoryLimit", 10))
        idle = [rs for rs in olds if _replicas(rs) == 0 and not int((rs.get("status") or {}).get("replicas") or 0)]
        for rs in sorted(idle, key=revision)[: max(0, len(idle) - limit)]:
            self.fake._delete("apis/apps/v1", "replicasets", self.ns, rs["metadata"]["name"], "Background", record=False)

    def _sync_rollout_status(self, d: dict, rss: list[dict], new: dict) -> None:
        """progress.go: syncRolloutStatus over sync.go: calculateStatus."""
        d = self._deployment() or d
        old = d.get("status") or {}
        owned = [rs for rs in rss if rs["metadata"]["uid"] != new["metadata"]["uid"]] + [new]
        st = lambda rs, k: int((rs.get("status") or {}).get(k) or 0)  # noqa: E731
        available = sum(st(rs, "availableReplicas") for rs in owned)
        total = sum(_replicas(rs) for rs in owned)
        status = {"observedGeneration": int(d["metadata"].get("generation") or 1),
                  "replicas": sum(st(rs, "replicas") for rs in owned), "updatedReplicas": st(new, "replicas"),
                  "readyReplicas": sum(st(rs, "readyReplicas") for rs in owned), "availableReplicas": available,
                  "unavailableReplicas": max(total - available, 0),
                  "conditions": copy.deepcopy(old.get("conditions") or [])}
        if "collisionCount" in old:
            status["collisionCount"] = old["collisionCount"]
        if available >= int(d["spec"]["replicas"]) - max_unavailable(d):
            set_condition(status, "Available", "True", "MinimumReplicasAvailable", "Deployment has minimum availability.")
        else:
            set_condition(status, "Available", "False", "MinimumReplicasUnavailable",
                          "Deployment does not have minimum availability.")
        deadline = d["spec"].get("progressDeadlineSeconds")
        current = _cond(old, "Progressing")
        complete_before = status["replicas"] == status["updatedReplicas"] and current is not None \
            and current["reason"] == "NewReplicaSetAvailable"
        rs_name = new["metadata"]["name"]
        if deadline is not None and not complete_before:
            if self._complete(d, status):
                set_condition(status, "Progressing", "True", "NewReplicaSetAvailable",
                              f'ReplicaSet "{rs_name}" has successfully progressed.')
            elif self._progressing(old, status):
                # the same reason with a fresh lastUpdateTime: progress.go removes and sets the condition
                t = _ts()
                keep = current["lastTransitionTime"] if current is not None and current["status"] == "True" else t
                status["conditions"] = [c for c in status["conditions"] if c["type"] != "Progressing"] + [
                    {"type": "Progressing", "status": "True", "lastUpdateTime": t, "lastTransitionTime": keep,
                     "reason": "ReplicaSetUpdated", "message": f'ReplicaSet "{rs_name}" is progressing.'}]
            elif self._timed_out(deadline, status):
                set_condition(status, "Progressing", "False", "ProgressDeadlineExceeded",
                              f'ReplicaSet "{rs_name}" has timed out progressing.')
        failure = next((c for rs in [new] + owned for c in (rs.get("status") or {}).get("conditions") or []
                        if c["type"] == "ReplicaFailure"), None)
        status["conditions"] = [c for c in status["conditions"] if c["type"] != "ReplicaFailure"]
        if failure:  # getReplicaFailures: the new ReplicaSet's first
            status["conditions"].append({**failure, "lastUpdateTime": failure["lastTransitionTime"]})
        if not status["conditions"]:
            status.pop("conditions")
        self._put_status(d, status)

    @staticmethod
    def _progressing(old: dict, new: dict) -> bool:
        """deployment_util.go: DeploymentProgressing."""
        g = lambda s, k: int(s.get(k) or 0)  # noqa: E731
        return (g(new, "updatedReplicas") > g(old, "updatedReplicas")
                or g(new, "replicas") - g(new, "updatedReplicas") < g(old, "replicas") - g(old, "updatedReplicas")
                or g(new, "readyReplicas") > g(old, "readyReplicas")
                or g(new, "availableReplicas") > g(old, "availableReplicas"))

    @staticmethod
    def _timed_out(deadline: int, status: dict) -> bool:
        """deployment_util.go: DeploymentTimedOut."""
        cond = _cond(status, "Progressing")
        if cond is None or cond["reason"] == "NewReplicaSetAvailable":
            return False
        if cond["reason"] == "ProgressDeadlineExceeded":
            return True
        return _parse(cond["lastUpdateTime"]) + dt.timedelta(seconds=int(deadline)) < _now()


# ------------------------------------------------------------------------------ the kubelet of a serving pod


def kubelet(fake: Any, ns: str, pod: dict) -> None:
    """A serving pod (see the module docstring): scheduled, fetch-model, then the server."""
    from tests.k8s.fakeapi import _Gone, _Log  # the fake's "the pod is gone" signal, a container's log

    name, uid = pod["metadata"]["name"], pod["metadata"]["uid"]
    model: ServingModel = fake.serving
    try:
        fake._psleep(ns, name, uid)
        fake._schedule(ns, name, uid)
        spec = pod["spec"]
        env, version = {}, 0
        for c in spec.get("initContainers") or []:
            env = {e["name"]: e.get("value") for e in c.get("env") or []}
            version = _fetch(fake, ns, pod, c, model, env)
        (server,) = spec["containers"]
        sname = server["name"]
        mname = env.get("LLMPIPE_MODEL_NAME", "?")
        crashes = 1
        while True:
            fake._mark(ns, name, uid, "Running", {"running": {"startedAt": _ts()}}, ready=False)
            with fake.cond:  # a started container has a log of its own; the last run's stays as "previous"
                if (ns, name, sname) in fake.logs and fake.logs[(ns, name, sname)].lines:
                    fake.previous_logs[(ns, name, sname)] = fake.logs[(ns, name, sname)]
                fake.logs[(ns, name, sname)] = _Log()
            fake.write_log(ns, name, sname, f"INFO model={mname} model_version={version} serving {mname} version {version}")
            fake._psleep(ns, name, uid, model.load_ticks)
            behaviour = model.behaviour.get(version, "ready")
            if behaviour == "ready":
                fake._mark(ns, name, uid, "Running", {"running": {"startedAt": _ts()}}, ready=True)
                fake.write_log(ns, name, sname, f'INFO model={mname} model_version={version} "POST /v1/completions '
                                                "HTTP/1.1\" 200")
                while True:
                    fake._psleep(ns, name, uid, 4)
            if behaviour == "unready":
                while True:
                    fake.write_log(ns, name, sname, f"INFO model={mname} model_version={version} still loading")
                    fake._psleep(ns, name, uid, 4)
            fake.write_log(ns, name, sname, model.error_line)
            term = {"exitCode": 1, "reason": "Error", "startedAt": _ts(), "finishedAt": _ts()}
            fake._mark(ns, name, uid, "Running", {"terminated": term}, ready=False)
            fake._psleep(ns, name, uid)
            fake._mark(ns, name, uid, "Running", {"waiting": {"reason": "CrashLoopBackOff",
                                                              "message": f"back-off restarting failed container {sname}"}},
                       ready=False, restart=True)
            # the kubelet's restart back-off doubles at each crash (10s, 20s, ... up to 5 min: kubelet.go
            # MaxContainerBackOff, pkg/kubelet/kuberuntime/kuberuntime_manager.go doBackOff)
            backoff = min(2 ** crashes, 32)
            crashes += 1
            fake._psleep(ns, name, uid, backoff)
    except _Gone:
        pass
    finally:
        fake._close_logs_of(ns, name, uid)


def _fetch(fake: Any, ns: str, pod: dict, init: dict, model: ServingModel, env: dict) -> int:
    """The init container: the pinned version, else the alias; a failure exits 1 and is restarted (restartPolicy
    Always: the kubelet restarts a failed init container with a back-off, the pod stays Pending)."""
    name, uid, cname = pod["metadata"]["name"], pod["metadata"]["uid"], init["name"]
    pinned = (pod["metadata"].get("annotations") or {}).get(VERSION_ANNOTATION, "")
    mname, alias = env.get("LLMPIPE_MODEL_NAME", "?"), env.get("LLMPIPE_MODEL_ALIAS", "?")
    uri = f"models:/{mname}/{pinned}" if pinned else f"models:/{mname}@{alias}"
    restarts = 0
    while True:
        fake._set_status(ns, name, uid, "initContainerStatuses", cname, started=True, restartCount=restarts,
                         state={"running": {"startedAt": _ts()}})
        fake.write_log(ns, name, cname, f"fetch-model: {uri} -> /models")
        fake._psleep(ns, name, uid)
        try:
            version = int(pinned) if pinned else model.version_for(mname, alias)
        except Exception as exc:  # noqa: BLE001 - what `llmpipe serve --fetch-only` prints, then exit 1
            fake.write_log(ns, name, cname, f"error: {exc}")
            term = {"exitCode": 1, "reason": "Error", "startedAt": _ts(), "finishedAt": _ts()}
            fake._set_status(ns, name, uid, "initContainerStatuses", cname, started=False, state={"terminated": term})
            restarts += 1
            fake._psleep(ns, name, uid, 3)
            continue
        served = {"name": mname, "version": version, "alias": None if pinned else alias,
                  "uri": f"models:/{mname}/{version}", "folder": f"/models/v{version}/hf", "run_id": None}
        term = {"exitCode": 0, "reason": "Completed", "message": json.dumps(served, indent=2) + "\n",
                "startedAt": _ts(), "finishedAt": _ts()}
        fake._set_status(ns, name, uid, "initContainerStatuses", cname, started=False, ready=True,
                         state={"terminated": term})
        return version
