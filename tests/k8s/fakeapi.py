"""A small Kubernetes API server on loopback, for testing ``pipeline.k8s`` with the real
kubernetes python client over real HTTP.

It speaks the part of the REST API that ``llmpipe k8s`` uses, with the API's own JSON shapes,
status codes and Status bodies:

* GET (one / list with ``labelSelector`` and ``fieldSelector``), POST, PUT, PATCH (merge patch),
  DELETE (``propagationPolicy``; Jobs orphan their pods by default, as the real API does) of
  configmaps, secrets, serviceaccounts, persistentvolumeclaims, pods, services, events (core/v1),
  jobs (batch/v1), deployments and replicasets (apps/v1) and pytorchjobs (kubeflow.org/v1, only when that
  "CRD" is installed);
* ``pods/{name}/log`` with ``container``, ``tailLines`` and ``follow=true`` (chunked stream
  until the container terminates); 400 while the container is waiting to start;
* bearer-token auth (401), per-verb denials (403 with the RBAC message), 404 for a missing
  namespace, 409 AlreadyExists / Conflict, 422 for an update of a Job's pod template;
* admission: Pod Security on every pod create (tests/k8s/podsecurity.py, the namespace's
  ``pod-security.kubernetes.io`` labels: ``namespace_labels``, by default those of k8s/namespace.yaml),
  and the training operator's validating webhook on PyTorchJob creates (tests/k8s/operator.py);
  ``Warning`` response headers for their warnings.

A simulator stands in for the Job controller, the training operator and the kubelet: a created
Job or PyTorchJob gets pods that start, write log lines and end the way the ``Scenario``
registered for that name says, with status fields, conditions and events as a real cluster sets
them. The PyTorchJob controller is the model of training-operator v1.8.1 in tests/k8s/operator.py,
run as a reconcile loop (``_reconcile_pytorchjob``: ReconcileJobs, ReconcilePods, ReconcileServices,
UpdateJobStatus); only what a *workload* does (exit codes, log lines) comes from the Scenario. A created
Deployment gets the Deployment and ReplicaSet controllers and its pods' kubelet of tests/k8s/deployments.py (a
rolling update, its status and conditions; the serving pods' behaviour per model version from ``serving``). Each
simulated behaviour names the upstream file and function it reproduces: training-operator v1.8.1
(github.com/kubeflow/training-operator), kubernetes v1.33 (k8s.io/kubernetes, k8s.io/apiserver
v0.33.0, k8s.io/pod-security-admission v0.33.0), controller-runtime v0.17.2 (the operator's).
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import yaml

from tests.k8s import deployments as dep
from tests.k8s import operator as op
from tests.k8s import podsecurity as ps

REPO = Path(__file__).resolve().parents[2]
NAMESPACE_FILE = REPO / "k8s" / "namespace.yaml"
INIT_TEMPLATE_FILE = REPO / "k8s" / "training-operator" / "restricted-pytorch-init-container.yaml"

# (path prefix, plural) -> (kind, apiVersion, qualified resource name used in messages, group)
RESOURCES = {
    ("api/v1", "configmaps"): ("ConfigMap", "v1", "configmaps", ""),
    ("api/v1", "secrets"): ("Secret", "v1", "secrets", ""),
    ("api/v1", "serviceaccounts"): ("ServiceAccount", "v1", "serviceaccounts", ""),
    ("api/v1", "persistentvolumeclaims"): ("PersistentVolumeClaim", "v1", "persistentvolumeclaims", ""),
    ("api/v1", "pods"): ("Pod", "v1", "pods", ""),
    ("api/v1", "services"): ("Service", "v1", "services", ""),
    ("api/v1", "events"): ("Event", "v1", "events", ""),
    ("apis/batch/v1", "jobs"): ("Job", "batch/v1", "jobs.batch", "batch"),
    ("apis/kubeflow.org/v1", "pytorchjobs"): ("PyTorchJob", "kubeflow.org/v1", "pytorchjobs.kubeflow.org", "kubeflow.org"),
    ("apis/apps/v1", "deployments"): ("Deployment", "apps/v1", "deployments.apps", "apps"),
    ("apis/apps/v1", "replicasets"): ("ReplicaSet", "apps/v1", "replicasets.apps", "apps"),
}
CUSTOM = {"pytorchjobs"}
PATH = re.compile(r"^/(?P<prefix>api/v1|apis/[^/]+/[^/]+)/namespaces/(?P<ns>[^/]+)/(?P<plural>[^/]+)"
                  r"(?:/(?P<name>[^/]+))?(?:/(?P<sub>log|status))?$")


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _get(obj: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(obj, dict):
            return None
        obj = obj.get(part)
    return obj


def label_match(labels: dict, selector: str | None) -> bool:
    """Equality and set-based label selectors, as the API server understands them (k8s.io/apimachinery
    v0.33.0 pkg/labels/selector.go: Parse, Requirement.Matches)."""
    if not selector:
        return True
    terms = re.findall(r"[^,(]+(?:\([^)]*\))?", selector)
    for term in (t.strip() for t in terms):
        if not term:
            continue
        m = re.match(r"^([\w./-]+)\s+(in|notin)\s+\(([^)]*)\)$", term)
        if m:
            key, op, values = m.group(1), m.group(2), {v.strip() for v in m.group(3).split(",")}
            if (op == "in") != (labels.get(key) in values):
                return False
        elif "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key.strip()) == value.strip():
                return False
        elif "=" in term:
            key, value = term.replace("==", "=").split("=", 1)
            if labels.get(key.strip()) != value.strip():
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


def field_match(obj: dict, selector: str | None) -> bool:
    """Field selectors (k8s.io/apimachinery pkg/fields/selector.go: ParseSelector; = / == / !=)."""
    for term in filter(None, (selector or "").split(",")):
        neg = "!=" in term
        key, value = term.split("!=" if neg else "=", 1)
        actual = _get(obj, key.replace("==", ""))
        if (str(actual) == value.lstrip("=")) == neg:
            return False
    return True


def merge_patch(target: Any, patch: Any) -> Any:
    """JSON merge patch, RFC 7386 (k8s.io/apiserver pkg/endpoints/handlers/patch.go: applyPatcher)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str, details: dict | None = None):
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details or {}

    def body(self) -> dict:
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": self.message,
                "reason": self.reason, "details": self.details, "code": self.code}


def namespace_labels_from_file(path: Path = NAMESPACE_FILE) -> dict:
    """The labels of the Namespace in k8s/namespace.yaml (its Pod Security levels)."""
    doc = next(d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d and d.get("kind") == "Namespace")
    return dict((doc.get("metadata") or {}).get("labels") or {})


def restricted_init_template(path: Path = INIT_TEMPLATE_FILE) -> str:
    """Our init container template for the training operator (the ConfigMap k8s/training-operator/ installs
    and deployment-patch.json mounts as --pytorch-init-container-template-file)."""
    doc = next(d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d and d.get("kind") == "ConfigMap")
    return doc["data"]["initContainer.yaml"]


def warning_header(text: str) -> str:
    """k8s.io/apimachinery v0.33.0 pkg/util/net/http.go: NewWarningHeader(299, "", text) (makeQuotedString),
    what k8s.io/apiserver pkg/endpoints/filters/warning.go adds for each admission warning."""
    return '299 - "' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def pod_qos_class(spec: dict) -> str:
    """kubernetes v1.33 pkg/apis/core/helper/qos/qos.go: ComputePodQOS, for cpu and memory: Guaranteed when
    every container has limits for both and requests equal to them (requests default to limits), BestEffort
    when none asks for either, else Burstable. The API server sets it on create (pkg/registry/core/pod/
    strategy.go: podStrategy.PrepareForCreate)."""
    containers = (spec.get("initContainers") or []) + (spec.get("containers") or [])
    any_set, guaranteed = False, True
    for c in containers:
        res = c.get("resources") or {}
        limits, requests = res.get("limits") or {}, res.get("requests") or {}
        for r in ("cpu", "memory"):
            if r in limits or r in requests:
                any_set = True
            if r not in limits or str(requests.get(r, limits[r])) != str(limits[r]):
                guaranteed = False
    if not any_set:
        return "BestEffort"
    return "Guaranteed" if guaranteed else "Burstable"


@dataclass
class Scenario:
    """What a simulated workload does: how its containers run and end. What the controllers do about
    it (restart, fail, clean up) is theirs: the Job controller as before, the training operator as
    tests/k8s/operator.py models it. ``outcome``:

    succeed      pods run ``steps`` ticks writing ``logs``, then exit 0 (after ``after`` succeeded, if set)
    fail         (Job) a pod exits ``exit_code`` with ``error_line`` as its last log line, backoffLimit+1 times;
                 (PyTorchJob) the ``replica`` pod (default master-0) exits ``exit_code`` (default 1: a real
                 error; 2: a config error) every time; with restartPolicy ExitCode the operator fails the job
                 at once (ReconcilePods: exit code below 128), the other pods run on until cleanPodPolicy
    oom          (Job) a pod is OOMKilled (exit 137), backoffLimit+1 times;
                 (PyTorchJob) the ``replica`` pod (default worker-0, else master-0) is OOMKilled every time:
                 with ExitCode the operator recreates it every time, without bound (see ``restart_budget``)
    restart      (PyTorchJob) the ``replica`` pod (default master-0) is killed (exit 137, "Killed") the first
                 ``times`` times, then runs and succeeds
    preempted    (PyTorchJob) the ``replica`` pod (default master-0) is terminated (exit 143, SIGTERM, as the
                 launcher exits when its node is preempted) the first ``times`` times, then succeeds
    imagepull    pods stay Pending: ErrImagePull, then ImagePullBackOff
    unschedulable pods stay Pending: PodScheduled=False, reason Unschedulable
    deadline     (Job) pods run, then the Job fails with DeadlineExceeded and its pods are deleted
    hang         pods run forever, writing a log line per tick
    createfail   (Job) no pods: a FailedCreate warning event on the Job (e.g. a quota)

    ``restart_budget``: the ``replica`` pod (default: rank 0, which counts) does what pipeline/training/
    restarts.py: count_start does: with LLMPIPE_JOB_ID in its env, a start that is more than
    LLMPIPE_MAX_RESTARTS + 1 in a row from the same step (``resume_step``: the sim never reaches a new
    checkpoint) exits 1 with "error: <stage>: started N times from step S without reaching a new
    checkpoint (LLMPIPE_MAX_RESTARTS=L): giving up; ...". Pod Security refusals are not a scenario: they
    follow from ``FakeKube.namespace_labels`` and ``FakeKube.init_template``.
    """

    outcome: str = "succeed"
    steps: int = 3
    logs: list[str] | None = None
    after: str | None = None
    exit_code: int = 1
    error_line: str = "error: no committed 'raw/' under /data/runs/default: run `llmpipe run collect` first"
    message: str = ""
    replica: str | None = None  # PyTorchJob: the pod an outcome hits, as "<replica type>-<index>" (master-0)
    times: int = 1  # restart / preempted: how many starts of that pod are killed
    restart_budget: bool = False
    resume_step: int = 1200


class _Refused(Exception):
    """A pod create the API server refused (its Status message)."""


@dataclass
class _Log:
    lines: list[str] = field(default_factory=list)
    closed: bool = False


class FakeKube:
    def __init__(self, namespaces: tuple[str, ...] = ("llm-pipeline",), token: str = "fake-token",
                 crds: tuple[str, ...] = ("pytorchjobs",), simulate: bool = True, tick: float = 0.05,
                 gc_delay: float = 0.3, delete_delay: float = 0.0):
        self.namespaces = set(namespaces)
        self.token = token
        self.crds = set(crds)
        self.simulate = simulate
        self.tick = tick
        self.gc_delay = gc_delay
        self.delete_delay = delete_delay
        self.store: dict[str, dict[tuple[str, str], dict]] = {plural: {} for _, plural in RESOURCES}
        self.logs: dict[tuple[str, str, str], _Log] = {}
        self.scenarios: dict[str, Scenario] = {}
        self.choose: Any = None  # optional: workload dict -> Scenario | None, for names not in `scenarios`
        self.denied: set[tuple[str, str]] = set()
        self.unavailable = False  # answer 503 to everything (an API server restarting)
        self.requests: list[tuple[str, str, str]] = []
        self.deletions: list[tuple[str, str, str | None]] = []
        # the namespace's labels (Pod Security levels: podsecurity.namespace_policy); k8s/namespace.yaml's
        self.namespace_labels: dict[str, str] = namespace_labels_from_file()
        # the training operator's --pytorch-init-container-template-file / -image / -max-tries
        # (cmd/training-operator.v1/main.go); the template defaults to the operator's built-in one
        # (initcontainer.go: initContainerTemplate), what a stock install uses; restricted_init_template()
        # is ours (k8s/training-operator/)
        self.init_template: str = op.DEFAULT_INIT_TEMPLATE
        self.init_image: str = op.INIT_CONTAINER_IMAGE_DEFAULT
        self.init_max_tries: int = op.INIT_MAX_TRIES_DEFAULT
        # the serving pods' registry and servers (tests/k8s/deployments.py: ServingModel); the Deployment
        # controller model's errors, if any (a test asserts there are none)
        self.serving = dep.ServingModel()
        self.controller_errors: list[str] = []
        self.previous_logs: dict[tuple[str, str, str], _Log] = {}  # a restarted container's last run (?previous=true)
        self.starts: dict[tuple[str, str], int] = {}  # (ns, pod name) -> container starts (all its pods)
        self._started_pods: dict[tuple[str, str], set[str]] = {}  # (ns, job uid) -> its pods that ever ran
        self.cond = threading.Condition(threading.RLock())
        self._tl = threading.local()  # the warnings of the request being served
        self.stopping = False
        self._rv = 1000
        self._server: ThreadingHTTPServer | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "FakeKube":
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                fake._handle(self, "GET")

            def do_POST(self) -> None:
                fake._handle(self, "POST")

            def do_PUT(self) -> None:
                fake._handle(self, "PUT")

            def do_PATCH(self) -> None:
                fake._handle(self, "PATCH")

            def do_DELETE(self) -> None:
                fake._handle(self, "DELETE")

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        if self._server:
            self._server.shutdown()
            self._server.server_close()

    def __enter__(self) -> "FakeKube":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def write_kubeconfig(self, path: Path, namespace: str | None = "llm-pipeline", token: str | None = None) -> Path:
        context: dict[str, Any] = {"cluster": "fake", "user": "tester"}
        if namespace:
            context["namespace"] = namespace
        doc = {
            "apiVersion": "v1", "kind": "Config", "current-context": "fake", "preferences": {},
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "tester", "user": {"token": token or self.token}}],
            "contexts": [{"name": "fake", "context": context}],
        }
        path.write_text(yaml.safe_dump(doc), encoding="utf-8")
        return path

    def deny(self, verb: str, resource: str) -> None:
        """Answer 403 to ``verb`` (get, list, create, update, patch, delete) on ``resource``
        (a plural, or ``pods/log``)."""
        self.denied.add((verb, resource))

    # ------------------------------------------------------------------ store helpers (tests use these too)
    def get(self, plural: str, name: str, ns: str = "llm-pipeline") -> dict | None:
        with self.cond:
            obj = self.store[plural].get((ns, name))
            return copy.deepcopy(obj) if obj else None

    def items(self, plural: str, ns: str = "llm-pipeline") -> list[dict]:
        with self.cond:
            return [copy.deepcopy(o) for (n, _), o in sorted(self.store[plural].items()) if n == ns]

    def log_of(self, pod: str, container: str = "llmpipe", ns: str = "llm-pipeline") -> list[str]:
        with self.cond:
            return list(self.logs.get((ns, pod, container), _Log()).lines)

    def _next_rv(self) -> str:
        self._rv += 1
        return str(self._rv)

    def _put(self, plural: str, obj: dict) -> dict:
        with self.cond:
            meta = obj["metadata"]
            meta["resourceVersion"] = self._next_rv()
            self.store[plural][(meta["namespace"], meta["name"])] = obj
            self.cond.notify_all()
            return obj

    def _new_meta(self, meta: dict, ns: str) -> dict:
        meta = copy.deepcopy(meta)
        meta.update(namespace=ns, uid=str(uuid.uuid4()), creationTimestamp=now(), generation=1)
        return meta

    # ------------------------------------------------------------------ HTTP
    def _handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        """One request through the API server's chain (k8s.io/apiserver v0.33.0 pkg/server/config.go:
        DefaultBuildHandlerChain): authentication (401 Unauthorized), authorization (403 with the RBAC
        authorizer's message, plugin/pkg/auth/authorizer/rbac/rbac.go; pkg/endpoints/handlers/responsewriters/
        errors.go: forbiddenMessage), then the REST handler; errors as metav1.Status bodies."""
        url = urlsplit(h.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        with self.cond:
            self.requests.append((method, url.path, url.query))
        self._tl.warnings = []
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length) if length else b""
        try:
            if self.unavailable:
                raise ApiError(503, "ServiceUnavailable", "the server is currently unable to handle the request")
            if h.headers.get("Authorization") != f"Bearer {self.token}":
                raise ApiError(401, "Unauthorized", "Unauthorized")
            m = PATH.match(url.path)
            if not m or (m["prefix"], m["plural"]) not in RESOURCES or (m["plural"] in CUSTOM and m["plural"] not in self.crds):
                return self._send(h, 404, b"404 page not found\n", "text/plain; charset=utf-8")
            ns, plural, name, sub = m["ns"], m["plural"], m["name"], m["sub"]
            verb = {"GET": "get" if name else "list", "POST": "create", "PUT": "update", "PATCH": "patch",
                    "DELETE": "delete"}[method]
            resource = f"{plural}/{sub}" if sub else plural
            if (verb, resource) in self.denied:
                kind = RESOURCES[(m["prefix"], plural)]
                where = f'in API group "{kind[3]}" in the namespace "{ns}"'
                raise ApiError(403, "Forbidden", f'{kind[2]} is forbidden: User "system:serviceaccount:ci:tester" '
                                                 f'cannot {verb} resource "{resource}" {where}',
                               {"group": kind[3], "kind": plural})
            if sub == "log":
                return self._log(h, ns, name, query)
            body = json.loads(raw) if raw else None
            if method == "GET" and name:
                return self._json(h, 200, self._read(m["prefix"], plural, ns, name))
            if method == "GET":
                return self._json(h, 200, self._list(m["prefix"], plural, ns, query))
            if method == "POST":
                return self._json(h, 201, self._create(m["prefix"], plural, ns, body))
            if method == "PUT":
                return self._json(h, 200, self._replace(m["prefix"], plural, ns, name, body))
            if method == "PATCH":
                if "json-patch" in (h.headers.get("Content-Type") or ""):
                    raise ApiError(415, "UnsupportedMediaType", "json-patch is not supported by this fake")
                return self._json(h, 200, self._patch(m["prefix"], plural, ns, name, body))
            if method == "DELETE":
                policy = (body or {}).get("propagationPolicy") or query.get("propagationPolicy")
                return self._json(h, 200, self._delete(m["prefix"], plural, ns, name, policy))
        except ApiError as err:
            self._json(h, err.code, err.body())
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _send(self, h: BaseHTTPRequestHandler, code: int, data: bytes, ctype: str) -> None:
        h.send_response(code)
        h.send_header("Content-Type", ctype)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def _json(self, h: BaseHTTPRequestHandler, code: int, obj: dict) -> None:
        data = json.dumps(obj).encode()
        h.send_response(code)
        h.send_header("Content-Type", "application/json")
        for text in getattr(self._tl, "warnings", None) or []:
            h.send_header("Warning", warning_header(text))
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def _warn(self, *texts: str) -> None:
        """An admission warning for the request being served (none when a simulated controller creates)."""
        if hasattr(self._tl, "warnings"):
            self._tl.warnings.extend(texts)

    def _not_found(self, prefix: str, plural: str, name: str) -> ApiError:
        kind, _, qual, group = RESOURCES[(prefix, plural)]
        return ApiError(404, "NotFound", f'{qual} "{name}" not found', {"name": name, "group": group, "kind": plural})

    def _read(self, prefix: str, plural: str, ns: str, name: str) -> dict:
        with self.cond:
            obj = self.store[plural].get((ns, name))
            if obj is None:
                raise self._not_found(prefix, plural, name)
            return copy.deepcopy(obj)

    def _list(self, prefix: str, plural: str, ns: str, query: dict) -> dict:
        if query.get("watch") in ("true", "1"):
            raise ApiError(400, "BadRequest", "watch is not implemented by this fake (llmpipe polls)")
        kind, api_version, _, _ = RESOURCES[(prefix, plural)]
        with self.cond:
            items = [copy.deepcopy(o) for (n, _), o in sorted(self.store[plural].items())
                     if n == ns and label_match(o["metadata"].get("labels") or {}, query.get("labelSelector"))
                     and field_match(o, query.get("fieldSelector"))]
            return {"kind": f"{kind}List", "apiVersion": api_version, "metadata": {"resourceVersion": str(self._rv)},
                    "items": items}

    def _create(self, prefix: str, plural: str, ns: str, body: dict | None, simulate: bool = True) -> dict:
        """POST (k8s.io/apiserver v0.33.0 pkg/endpoints/handlers/create.go, pkg/registry/generic/registry/
        store.go: Store.create): 404 for a missing namespace (the NamespaceLifecycle admission plugin), a name
        generated from generateName, 409 AlreadyExists, the kind's defaults and admission (_default_job,
        _admit_pytorchjob, _admit_pod); a Job or PyTorchJob then gets its controller (``simulate``)."""
        kind, api_version, qual, _ = RESOURCES[(prefix, plural)]
        if ns not in self.namespaces:
            raise ApiError(404, "NotFound", f'namespaces "{ns}" not found', {"name": ns, "kind": "namespaces"})
        if not isinstance(body, dict) or body.get("kind") != kind:
            raise ApiError(400, "BadRequest", f"the body of the request was not a {kind}")
        meta = body.get("metadata") or {}
        name = meta.get("name")
        if not name and meta.get("generateName"):
            name = meta["generateName"] + uuid.uuid4().hex[:5]
        if not name:
            raise ApiError(422, "Invalid", f'{kind} "" is invalid: metadata.name: Required value: name or generateName is required')
        if meta.get("namespace") not in (None, ns):
            raise ApiError(400, "BadRequest", "the namespace of the provided object does not match the namespace sent on the request")
        with self.cond:
            existing = self.store[plural].get((ns, name))
            if existing is not None:
                gone = " object is being deleted:" if existing["metadata"].get("deletionTimestamp") else ""
                raise ApiError(409, "AlreadyExists", f'{gone} {qual} "{name}" already exists'.strip(),
                               {"name": name, "kind": plural})
            obj = copy.deepcopy(body)
            obj["metadata"] = self._new_meta(meta, ns) | {"name": name}
            obj["metadata"].pop("generateName", None)
            obj["apiVersion"] = api_version
            if plural == "jobs":
                self._default_job(obj)
            if plural == "pytorchjobs":
                self._admit_pytorchjob(obj)
            if plural == "pods":
                self._admit_pod(obj, ns)
            if plural == "deployments":
                dep.admit_deployment(obj, self._invalid)
            self._put(plural, obj)
        if simulate and self.simulate and plural in ("jobs", "pytorchjobs"):
            target = self._run_job if plural == "jobs" else self._run_pytorchjob
            threading.Thread(target=self._guard, args=(target, ns, name, obj["metadata"]["uid"]), daemon=True).start()
        if simulate and self.simulate and plural == "deployments":  # the Deployment and ReplicaSet controllers
            threading.Thread(target=dep.DeploymentController(self, ns, name, obj["metadata"]["uid"]).run,
                             daemon=True).start()
        return copy.deepcopy(obj)

    def _admit_pytorchjob(self, job: dict) -> None:
        """A PyTorchJob create, in the API server's order (k8s.io/apiserver v0.33.0 pkg/registry/generic/registry/
        store.go: Store.create runs rest.BeforeCreate - the CRD's schema - before createValidation - the
        validating webhooks):

        1. the CRD's structural schema (training-operator v1.8.1 manifests/base/crds/kubeflow.org_pytorchjobs.yaml):
           ``spec.pytorchReplicaSpecs`` is required (422 Invalid), and its two defaults are applied -
           ``runPolicy.suspend: false`` and containers' ports ``protocol: TCP``;
        2. the operator's validating webhook (pkg/webhooks/pytorch/pytorchjob_webhook.go: ValidateCreate returns
           ``field.ErrorList.ToAggregate()``, a plain error, which controller-runtime v0.17.2
           pkg/webhook/admission/validator_custom.go: validatorForType.Handle answers with ``Denied(err.Error())``
           - pkg/webhook/admission/response.go: ValidationResponse: code 403, reason Forbidden - and the API server
           wraps as k8s.io/apiserver pkg/admission/plugin/webhook/errors/statuserror.go: ToStatusErr:
           'admission webhook "<name>" denied the request: <message>', code and reason kept): 403 Forbidden,
           message operator.webhook_denial(); its warnings (deprecated nProcPerNode) as Warning headers.

        Nothing else is defaulted in the stored object: v1.8.1 has no mutating webhook, the controller applies
        SetDefaults_PyTorchJob in memory (pytorchjob_controller.go: Reconcile, r.Scheme.Default)."""
        name = job["metadata"]["name"]
        spec = job.get("spec")
        if not isinstance(spec, dict) or spec.get("pytorchReplicaSpecs") is None:
            raise ApiError(422, "Invalid", f'PyTorchJob.kubeflow.org "{name}" is invalid: spec.pytorchReplicaSpecs: '
                                           "Required value", {"name": name, "group": "kubeflow.org", "kind": "PyTorchJob",
                                                              "causes": [{"reason": "FieldValueRequired",
                                                                          "message": "Required value",
                                                                          "field": "spec.pytorchReplicaSpecs"}]})
        if isinstance(spec.get("runPolicy"), dict):
            spec["runPolicy"].setdefault("suspend", False)
        for rspec in (spec.get("pytorchReplicaSpecs") or {}).values():
            pod_spec = (((rspec or {}).get("template") or {}).get("spec") or {})
            for c in (pod_spec.get("containers") or []) + (pod_spec.get("initContainers") or []):
                for port in c.get("ports") or []:
                    port.setdefault("protocol", "TCP")
        denial = op.webhook_denial(job)
        if denial:
            raise ApiError(403, "Forbidden", denial)
        self._warn(*op.webhook_warnings(job))

    def _admit_pod(self, pod: dict, ns: str) -> None:
        """Pod Security admission on a pod create (k8s.io/pod-security-admission v0.33.0 admission/admission.go:
        ValidatePod -> EvaluatePod, via tests/k8s/podsecurity.py: admit_pod) against the namespace's labels:
        refused with 403 Forbidden, 'pods "<name>" is forbidden: violates PodSecurity "<level>:<version>": ...'
        (admission/response.go: forbiddenResponse -> apimachinery NewForbidden; the name is the generated one,
        k8s.io/apiserver v0.33.0 pkg/registry/rest/create.go: AdmissionToValidateObjectFunc), else admitted with
        the warn level's warnings. Then what the API server sets on every new pod (kubernetes v1.33
        pkg/registry/core/pod/strategy.go: podStrategy.PrepareForCreate): status phase Pending and qosClass."""
        allowed, message, warnings = ps.admit_pod(pod, {"metadata": {"name": ns, "labels": dict(self.namespace_labels)}})
        if not allowed:
            raise ApiError(403, "Forbidden", message or "forbidden", {"name": pod["metadata"]["name"], "kind": "pods"})
        self._warn(*warnings)
        pod["status"] = {"phase": "Pending", "qosClass": pod_qos_class(pod.get("spec") or {})}

    def _default_job(self, job: dict) -> None:
        """A Job create: validation of restartPolicy and Indexed completions (kubernetes v1.33
        pkg/apis/batch/validation/validation.go: ValidateJob), the defaults (pkg/apis/batch/v1/defaults.go:
        SetDefaults_Job: completionMode, parallelism, completions, backoffLimit 6, suspend) and the generated
        selector and pod labels (pkg/registry/batch/job/strategy.go: jobStrategy.PrepareForCreate, generateSelector)."""
        name, uid = job["metadata"]["name"], job["metadata"]["uid"]
        spec = job.setdefault("spec", {})
        tmpl = spec.get("template") or {}
        policy = (tmpl.get("spec") or {}).get("restartPolicy")
        if policy not in ("Never", "OnFailure"):
            raise ApiError(422, "Invalid", f'Job.batch "{name}" is invalid: spec.template.spec.restartPolicy: '
                                           f'Required value: valid values: "OnFailure", "Never"')
        mode = spec.setdefault("completionMode", "NonIndexed")
        if mode == "Indexed" and not spec.get("completions"):
            raise ApiError(422, "Invalid", f'Job.batch "{name}" is invalid: spec.completions: Required value: '
                                           "when completion mode is Indexed")
        spec.setdefault("parallelism", 1)
        spec.setdefault("completions", 1)
        spec.setdefault("backoffLimit", 6)
        spec.setdefault("suspend", False)
        extra = {"batch.kubernetes.io/controller-uid": uid, "batch.kubernetes.io/job-name": name,
                 "controller-uid": uid, "job-name": name}
        spec["selector"] = {"matchLabels": {"batch.kubernetes.io/controller-uid": uid}}
        tmpl.setdefault("metadata", {}).setdefault("labels", {}).update(extra)
        job["metadata"].setdefault("labels", {})
        job["status"] = {}

    def _replace(self, prefix: str, plural: str, ns: str, name: str, body: dict | None) -> dict:
        """PUT: optimistic concurrency on resourceVersion (409 Conflict, k8s.io/apiserver pkg/registry/generic/
        registry/store.go: Store.Update), a Job's pod template immutable (kubernetes v1.33 pkg/apis/batch/
        validation/validation.go: ValidateJobSpecUpdate), status kept (it has its own subresource)."""
        kind, _, qual, _ = RESOURCES[(prefix, plural)]
        with self.cond:
            old = self.store[plural].get((ns, name))
            if old is None:
                raise self._not_found(prefix, plural, name)
            if not isinstance(body, dict) or (body.get("metadata") or {}).get("name") != name:
                raise ApiError(400, "BadRequest", "the name of the object does not match the name on the URL")
            rv = (body.get("metadata") or {}).get("resourceVersion")
            if rv and rv != old["metadata"]["resourceVersion"]:
                raise ApiError(409, "Conflict", f'Operation cannot be fulfilled on {qual} "{name}": the object has been '
                                                "modified; please apply your changes to the latest version and try again")
            if plural == "jobs" and (body.get("spec") or {}).get("template") != old["spec"].get("template"):
                raise ApiError(422, "Invalid", f'Job.batch "{name}" is invalid: spec.template: Invalid value: '
                                               "core.PodTemplateSpec{...}: field is immutable")
            obj = copy.deepcopy(body)
            keep = {k: old["metadata"][k] for k in ("uid", "creationTimestamp", "namespace", "generation") if k in old["metadata"]}
            obj["metadata"] = {**obj.get("metadata", {}), **keep}
            if "status" in old:
                obj["status"] = old["status"]
            if plural == "deployments":
                dep.prepare_for_update(obj, old, self._invalid)
            return copy.deepcopy(self._put(plural, obj))

    def _patch(self, prefix: str, plural: str, ns: str, name: str, body: Any) -> dict:
        """PATCH (merge patch only), with the Job template immutability of _replace."""
        with self.cond:
            old = self.store[plural].get((ns, name))
            if old is None:
                raise self._not_found(prefix, plural, name)
            obj = merge_patch(old, body)
            if plural == "jobs" and obj["spec"].get("template") != old["spec"].get("template"):
                raise ApiError(422, "Invalid", f'Job.batch "{name}" is invalid: spec.template: field is immutable')
            if plural == "deployments":
                dep.prepare_for_update(obj, old, self._invalid)
            return copy.deepcopy(self._put(plural, obj))

    @staticmethod
    def _invalid(message: str) -> ApiError:
        return ApiError(422, "Invalid", message)

    def _delete(self, prefix: str, plural: str, ns: str, name: str, policy: str | None, record: bool = True) -> dict:
        """A delete (``record``: one a client sent, kept in ``deletions``; the simulated controllers' are not).
        The garbage collector then deletes (Background, Foreground) or orphans the object's dependents, pods and
        Services (kubernetes v1.33 pkg/controller/garbagecollector; Jobs default to Orphan: pkg/registry/batch/
        job/strategy.go: DefaultGarbageCollectionPolicy)."""
        with self.cond:
            obj = self.store[plural].get((ns, name))
            if obj is None:
                raise self._not_found(prefix, plural, name)
            if record:
                self.deletions.append((plural, name, policy))
            effective = policy or ("Orphan" if plural == "jobs" else "Background")
            obj["metadata"]["deletionTimestamp"] = now()
            uid = obj["metadata"]["uid"]

        def remove() -> None:
            with self.cond:
                current = self.store[plural].get((ns, name))
                if current is not None and current["metadata"]["uid"] == uid:
                    del self.store[plural][(ns, name)]
                self.cond.notify_all()
            time.sleep(self.gc_delay)  # the garbage collector comes a little later
            with self.cond:
                for dependent in ("pods", "services"):
                    for key, child in list(self.store[dependent].items()):
                        refs = child["metadata"].get("ownerReferences") or []
                        if any(r.get("uid") == uid for r in refs):
                            if effective == "Orphan":
                                child["metadata"]["ownerReferences"] = [r for r in refs if r.get("uid") != uid]
                            else:
                                del self.store[dependent][key]
                                if dependent == "pods":
                                    self._close_logs(key[0], key[1])
                self.cond.notify_all()

        if self.delete_delay:
            threading.Timer(self.delete_delay, remove).start()
        else:
            with self.cond:
                del self.store[plural][(ns, name)]
                if plural == "pods":  # its containers are stopped: their log streams end
                    self._close_logs(ns, name)
            threading.Thread(target=remove, daemon=True).start()
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                "details": {"name": name, "kind": plural, "uid": uid}}

    # ------------------------------------------------------------------ logs
    def _log(self, h: BaseHTTPRequestHandler, ns: str, name: str, query: dict) -> None:
        """pods/{name}/log (kubernetes v1.33 pkg/registry/core/pod/strategy.go: LogLocation / validateContainer
        for the container choice and its messages; the kubelet's 400 while the container waits to start), with
        tailLines and follow (a chunked stream until the container's log ends)."""
        pod = self._read("api/v1", "pods", ns, name)
        names = [c["name"] for c in pod["spec"].get("containers") or []]
        init_names = [c["name"] for c in pod["spec"].get("initContainers") or []]
        container = query.get("container")
        if not container:
            if len(names) != 1:
                raise ApiError(400, "BadRequest", f"a container name must be specified for pod {name}, choose one of: "
                                                  f"[{' '.join(names)}]")
            container = names[0]
        if container not in names + init_names:
            raise ApiError(400, "BadRequest", f"container {container} is not valid for pod {name}")
        if query.get("previous") in ("true", "1"):  # the container's last terminated instance (the kubelet's
            # GetContainerLogs with previous: "previous terminated container %q in pod %q not found" without one)
            with self.cond:
                prev = self.previous_logs.get((ns, name, container))
            if prev is None:
                raise ApiError(400, "BadRequest", f'previous terminated container "{container}" in pod "{name}" not found')
            tail = int(query["tailLines"]) if query.get("tailLines") else None
            lines = prev.lines[-tail:] if tail else ([] if tail == 0 else prev.lines)
            return self._send(h, 200, "".join(ln + "\n" for ln in lines).encode(), "text/plain")
        statuses = ((pod.get("status") or {}).get("containerStatuses") or []) + \
            ((pod.get("status") or {}).get("initContainerStatuses") or [])
        cs = next((c for c in statuses if c["name"] == container), {})
        state = cs.get("state") or {}
        if not (state.get("running") or state.get("terminated") or (cs.get("lastState") or {}).get("terminated")):
            reason = (state.get("waiting") or {}).get("reason", "ContainerCreating")
            raise ApiError(400, "BadRequest", f'container "{container}" in pod "{name}" is waiting to start: {reason}')
        key = (ns, name, container)
        tail = int(query["tailLines"]) if query.get("tailLines") else None
        with self.cond:
            log = self.logs.setdefault(key, _Log())
            lines = log.lines[-tail:] if tail is not None else list(log.lines)
            if tail == 0:
                lines = []
            sent = len(log.lines)
        if query.get("follow") not in ("true", "1"):
            return self._send(h, 200, "".join(ln + "\n" for ln in lines).encode(), "text/plain")
        h.send_response(200)
        h.send_header("Content-Type", "text/plain")
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()

        def chunk(data: bytes) -> None:
            h.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            h.wfile.flush()

        try:
            if lines:
                chunk("".join(ln + "\n" for ln in lines).encode())
            while True:
                with self.cond:
                    while len(log.lines) == sent and not log.closed and not self.stopping:
                        self.cond.wait(1.0)
                    new, sent = log.lines[sent:], len(log.lines)
                    done = (log.closed or self.stopping) and not new
                if new:
                    chunk("".join(ln + "\n" for ln in new).encode())
                if done:
                    break
            h.wfile.write(b"0\r\n\r\n")
            h.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _close_logs(self, ns: str, pod: str) -> None:
        with self.cond:
            for key, log in self.logs.items():
                if key[0] == ns and key[1] == pod:
                    log.closed = True
            self.cond.notify_all()

    def write_log(self, ns: str, pod: str, container: str, line: str) -> None:
        with self.cond:
            self.logs.setdefault((ns, pod, container), _Log()).lines.append(line)
            self.cond.notify_all()

    # ------------------------------------------------------------------ the simulator
    def _scenario(self, obj: dict) -> Scenario:
        """The scenario registered for the workload's name, else what ``choose(obj)`` says, else success."""
        name = obj["metadata"]["name"]
        if name in self.scenarios:
            return self.scenarios[name]
        return (self.choose(obj) if self.choose else None) or Scenario()

    def _guard(self, target: Any, ns: str, name: str, uid: str) -> None:
        try:
            target(ns, name, uid)
        except _Gone:
            pass

    def _alive(self, plural: str, ns: str, name: str, uid: str) -> dict:
        with self.cond:
            obj = self.store[plural].get((ns, name))
            if self.stopping or obj is None or obj["metadata"]["uid"] != uid or obj["metadata"].get("deletionTimestamp"):
                raise _Gone()
            return obj

    def _sleep(self, plural: str, ns: str, name: str, uid: str, ticks: float = 1) -> None:
        time.sleep(self.tick * ticks)
        self._alive(plural, ns, name, uid)

    def _status(self, plural: str, ns: str, name: str, uid: str, **changes: Any) -> None:
        with self.cond:
            obj = self._alive(plural, ns, name, uid)
            obj.setdefault("status", {}).update(changes)
            self._put(plural, obj)

    def _condition(self, plural: str, ns: str, name: str, uid: str, kind: str, status: str, reason: str, message: str,
                   only: bool = False) -> None:
        """Set a Job condition (kubernetes v1.33 pkg/controller/job/job_controller.go: newCondition /
        ensureJobConditionStatus: lastProbeTime and lastTransitionTime)."""
        with self.cond:
            obj = self._alive(plural, ns, name, uid)
            conds = [c for c in obj.setdefault("status", {}).get("conditions") or [] if c["type"] != kind]
            if only:  # the training operator flips Running to False when the job ends
                for c in conds:
                    if c["type"] == "Running":
                        c["status"] = "False"
            t = now()
            conds.append({"type": kind, "status": status, "reason": reason, "message": message,
                          "lastTransitionTime": t, "lastProbeTime" if plural == "jobs" else "lastUpdateTime": t})
            obj["status"]["conditions"] = conds
            self._put(plural, obj)

    def event(self, ns: str, involved: dict, type_: str, reason: str, message: str,
              component: str = "fake-controller") -> None:
        """An event about ``involved``, recorded as client-go's recorder does: an identical one (same source,
        object, type, reason and message) is counted, not repeated (k8s.io/client-go tools/record/
        events_cache.go: EventCorrelator, eventObserve: count + 1, lastTimestamp)."""
        meta = involved["metadata"]
        obj_ref = {"kind": involved.get("kind"), "name": meta["name"], "namespace": ns,
                   "uid": meta.get("uid"), "apiVersion": involved.get("apiVersion")}
        with self.cond:
            for old in self.store["events"].values():
                if (old["involvedObject"] == obj_ref and old["type"] == type_ and old["reason"] == reason
                        and old["message"] == message and old["source"]["component"] == component):
                    old["count"] += 1
                    old["lastTimestamp"] = now()
                    self._put("events", old)
                    return
            ev = {"apiVersion": "v1", "kind": "Event",
                  "metadata": {"name": f"{meta['name']}.{uuid.uuid4().hex[:16]}", "namespace": ns,
                               "uid": str(uuid.uuid4()), "creationTimestamp": now()},
                  "involvedObject": obj_ref, "type": type_, "reason": reason, "message": message, "count": 1,
                  "firstTimestamp": now(), "lastTimestamp": now(), "source": {"component": component}}
            self._put("events", ev)

    def _make_pod(self, owner: dict, name: str, template: dict, labels: dict) -> dict:
        """A Job's pod from its template, created through the API (so Pod Security admission judges it:
        _Refused when it says no), with its containers waiting to be created."""
        ns = owner["metadata"]["namespace"]
        tmeta = template.get("metadata") or {}
        spec = copy.deepcopy(template.get("spec") or {})
        spec.setdefault("restartPolicy", "Never")
        pod = {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "labels": {**(tmeta.get("labels") or {}), **labels},
                         "annotations": dict(tmeta.get("annotations") or {}),
                         "ownerReferences": [{"apiVersion": owner["apiVersion"], "kind": owner["kind"],
                                              "name": owner["metadata"]["name"], "uid": owner["metadata"]["uid"],
                                              "controller": True, "blockOwnerDeletion": True}]},
            "spec": spec,
        }
        return self._create_pod(pod, ns)

    def _create_pod(self, pod: dict, ns: str) -> dict:
        """POST a controller's pod (admission included; _Refused with the API server's message), then what the
        kubelet shows at once: every container waiting (ContainerCreating; init containers PodInitializing)."""
        try:
            pod = self._create("api/v1", "pods", ns, pod, simulate=False)
        except ApiError as err:
            raise _Refused(err.message) from None
        name = pod["metadata"]["name"]

        def waiting(p: dict) -> None:
            spec = p["spec"]
            p["status"]["conditions"] = []
            p["status"]["containerStatuses"] = [
                {"name": c["name"], "image": c.get("image", ""), "imageID": "", "ready": False, "restartCount": 0,
                 "started": False, "state": {"waiting": {"reason": "PodInitializing" if spec.get("initContainers")
                                                         else "ContainerCreating"}}}
                for c in spec.get("containers") or []]
            if spec.get("initContainers"):
                p["status"]["initContainerStatuses"] = [
                    {"name": c["name"], "image": c.get("image", ""), "imageID": "", "ready": False, "restartCount": 0,
                     "started": False, "state": {"waiting": {"reason": "PodInitializing"}}}
                    for c in spec["initContainers"]]

        with self.cond:
            for c in (pod["spec"].get("containers") or []) + (pod["spec"].get("initContainers") or []):
                self.logs[(ns, name, c["name"])] = _Log()  # a new pod of an old name starts a new log
        return self._pod_update(ns, name, waiting, pod["metadata"]["uid"]) or pod

    def _pod_update(self, ns: str, name: str, fn: Any, uid: str | None = None) -> dict | None:
        """Change a pod in place (None when it is gone, or - with ``uid`` - replaced by another of its name)."""
        with self.cond:
            pod = self.store["pods"].get((ns, name))
            if pod is None or (uid is not None and pod["metadata"]["uid"] != uid):
                return None
            fn(pod)
            self._put("pods", pod)
            return copy.deepcopy(pod)

    def _pod_phase(self, ns: str, name: str, phase: str, state: dict, ready: bool = False, scheduled: bool = True,
                   extra: dict | None = None, uid: str | None = None) -> None:
        def change(pod: dict) -> None:
            st = pod["status"]
            st["phase"] = phase
            if phase != "Pending" or scheduled:
                st["conditions"] = [{"type": "PodScheduled", "status": "True", "lastTransitionTime": now()}]
                pod["spec"].setdefault("nodeName", "gpu-node-1")
            if phase in ("Running", "Succeeded", "Failed"):
                st.setdefault("startTime", now())
            for cs in st["containerStatuses"]:
                cs["state"] = copy.deepcopy(state)
                cs["ready"] = ready
                cs["started"] = "running" in state
                if "waiting" not in state:
                    cs["imageID"] = cs["image"] + "@sha256:" + "0" * 64
            st.update(extra or {})

        self._pod_update(ns, name, change, uid)

    def _container_name(self, pod: dict) -> str:
        return pod["spec"]["containers"][0]["name"]

    def _run_pod(self, plural: str, ns: str, owner: str, uid: str, pod: dict, sc: Scenario, index: int,
                 end: str, after: str | None = None) -> None:
        """The kubelet running one of a Job's pods to its end: 'ok', 'fail', 'oom' or 'hang' (container states
        and exit reasons as the kubelet reports them: kubernetes v1.33 pkg/kubelet/kubelet_pods.go:
        convertToAPIContainerStatuses; OOMKilled is the runtime's reason for exit 137 under a memory limit)."""
        name, container = pod["metadata"]["name"], self._container_name(pod)
        stage = (pod["metadata"]["labels"] or {}).get("llmpipe.io/stage", "?")
        self._sleep(plural, ns, owner, uid)
        self._pod_phase(ns, name, "Running", {"running": {"startedAt": now()}}, ready=True)
        lines = sc.logs or [f"== {stage} [{index}] step {i + 1}/{sc.steps}" for i in range(sc.steps)]
        for line in lines:
            self.write_log(ns, name, container, line.format(pod=name, index=index, stage=stage))
            self._sleep(plural, ns, owner, uid)
        while end == "hang" or (after and not self._succeeded(ns, after)):
            self.write_log(ns, name, container, f"== {stage} [{index}] still working")
            self._sleep(plural, ns, owner, uid, 2)
        if end == "ok":
            term = {"exitCode": 0, "reason": "Completed", "startedAt": now(), "finishedAt": now()}
            self._pod_phase(ns, name, "Succeeded", {"terminated": term})
        elif end == "fail":
            self.write_log(ns, name, container, sc.error_line)
            term = {"exitCode": sc.exit_code, "reason": "Error", "startedAt": now(), "finishedAt": now()}
            self._pod_phase(ns, name, "Failed", {"terminated": term})
        elif end == "oom":
            term = {"exitCode": 137, "reason": "OOMKilled", "startedAt": now(), "finishedAt": now()}
            self._pod_phase(ns, name, "Failed", {"terminated": term})
        self._close_logs(ns, name)

    def _succeeded(self, ns: str, name: str) -> bool:
        with self.cond:
            for plural in ("jobs", "pytorchjobs"):
                obj = self.store[plural].get((ns, name))
                for c in (obj or {}).get("status", {}).get("conditions") or []:
                    if c["type"] in ("Complete", "Succeeded") and c["status"] == "True":
                        return True
        return False

    def _stuck(self, plural: str, ns: str, owner: str, uid: str, pods: list[dict], outcome: str) -> None:
        """Pods that never start: image pull failures (the kubelet's ErrImagePull, then ImagePullBackOff, and a
        Warning event Failed "Failed to pull image ...": kubernetes v1.33 pkg/kubelet/images/image_manager.go:
        EnsureImageExists) or no node that fits (kube-scheduler: PodScheduled=False reason Unschedulable and a
        FailedScheduling event: pkg/scheduler/schedule_one.go: handleSchedulingFailure)."""
        for pod in pods:
            name, image = pod["metadata"]["name"], pod["spec"]["containers"][0].get("image", "?")
            if outcome == "imagepull":
                msg = (f'rpc error: code = NotFound desc = failed to pull and unpack image "{image}": failed to resolve '
                       f'reference "{image}": {image}: not found')
                self._pod_phase(ns, name, "Pending", {"waiting": {"reason": "ErrImagePull", "message": msg}})
                self.event(ns, pod, "Warning", "Failed", f'Failed to pull image "{image}": {msg}')
            else:
                msg = ("0/3 nodes are available: 1 node(s) had untolerated taint {node-role.kubernetes.io/control-plane: }, "
                       "2 Insufficient nvidia.com/gpu. preemption: 0/3 nodes are available: 3 No preemption victims "
                       "found for incoming pod.")

                def unschedulable(p: dict, msg: str = msg) -> None:
                    p["status"]["conditions"] = [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                                  "message": msg, "lastTransitionTime": now()}]

                self._pod_update(ns, name, unschedulable)
                self.event(ns, pod, "Warning", "FailedScheduling", msg)
        self._sleep(plural, ns, owner, uid, 2)
        if outcome == "imagepull":
            for pod in pods:
                image = pod["spec"]["containers"][0].get("image", "?")
                self._pod_phase(ns, pod["metadata"]["name"], "Pending",
                                {"waiting": {"reason": "ImagePullBackOff", "message": f'Back-off pulling image "{image}"'}})
        while True:
            self._sleep(plural, ns, owner, uid, 4)

    def _run_job(self, ns: str, name: str, uid: str) -> None:
        """The Job controller (kubernetes v1.33 pkg/controller/job/job_controller.go), as scripted by the
        Scenario, and the kubelet for its pods. A pod the API server refuses (Pod Security) is not created:
        the controller records a Warning event FailedCreate "Error creating: <the API's message>" on the Job
        (pkg/controller/controller_utils.go: RealPodControl.createPods, FailedCreatePodReason "FailedCreate")
        and keeps trying; the Job stays without pods."""
        try:
            self._run_job_pods(ns, name, uid)
        except _Refused as refused:
            job = self._alive("jobs", ns, name, uid)
            self._status("jobs", ns, name, uid, active=0, ready=0)
            self.event(ns, job, "Warning", "FailedCreate", f"Error creating: {refused}", component="job-controller")
            while True:
                self._sleep("jobs", ns, name, uid, 4)

    def _run_job_pods(self, ns: str, name: str, uid: str) -> None:
        """The Job controller's outcomes (kubernetes v1.33 pkg/controller/job/job_controller.go: syncJob):
        pods per completion index (indexed_job_utils.go: podGenerateNameWithIndex, the completion-index label and
        annotation), failed pods counted against backoffLimit (BackoffLimitExceeded "Job has reached the
        specified backoff limit"), activeDeadlineSeconds (DeadlineExceeded "Job was active longer than specified
        deadline", its pods deleted), success (SuccessCriteriaMet then Complete, CompletionsReached "Reached
        expected number of succeeded pods"); failures first get FailureTarget (v1.31+: the terminal condition
        waits for the pods to terminate), as scripted by the Scenario."""
        job = copy.deepcopy(self._alive("jobs", ns, name, uid))
        sc = self._scenario(job)
        spec = job["spec"]
        if spec.get("suspend"):
            self._condition("jobs", ns, name, uid, "Suspended", "True", "JobSuspended", "Job suspended")
            return
        if sc.outcome == "createfail":
            self._sleep("jobs", ns, name, uid)
            self.event(ns, job, "Warning", "FailedCreate", sc.message or
                       f'Error creating: pods "{name}-abcde" is forbidden: exceeded quota: compute, requested: '
                       "limits.memory=64Gi, used: limits.memory=100Gi, limited: limits.memory=128Gi")
            return
        indexed = spec["completionMode"] == "Indexed"
        n = int(spec["completions"])
        self._status("jobs", ns, name, uid, startTime=now(), active=n, ready=0, terminating=0, uncountedTerminatedPods={})

        def new_pod(i: int) -> dict:
            labels = {"batch.kubernetes.io/job-completion-index": str(i)} if indexed else {}
            pod_name = f"{name}-{i}-{uuid.uuid4().hex[:5]}" if indexed else f"{name}-{uuid.uuid4().hex[:5]}"
            tmpl = copy.deepcopy(spec["template"])
            if indexed:
                tmpl.setdefault("metadata", {}).setdefault("annotations", {})["batch.kubernetes.io/job-completion-index"] = str(i)
            return self._make_pod(job, pod_name, tmpl, labels)

        if sc.outcome in ("imagepull", "unschedulable"):
            self._stuck("jobs", ns, name, uid, [new_pod(i) for i in range(n)], sc.outcome)
            return
        if sc.outcome in ("fail", "oom"):
            failed = 0
            for _ in range(int(spec["backoffLimit"]) + 1):
                pod = new_pod(0)
                self._run_pod("jobs", ns, name, uid, pod, sc, 0, sc.outcome)
                failed += 1
                self._status("jobs", ns, name, uid, failed=failed)
            self._status("jobs", ns, name, uid, active=0, ready=0)
            msg = "Job has reached the specified backoff limit"
            self._condition("jobs", ns, name, uid, "FailureTarget", "True", "BackoffLimitExceeded", msg)
            self._condition("jobs", ns, name, uid, "Failed", "True", "BackoffLimitExceeded", msg)
            return
        pods = [new_pod(i) for i in range(n)]
        end = {"deadline": "hang", "hang": "hang"}.get(sc.outcome, "ok")
        threads = [threading.Thread(target=self._guard_pod, args=("jobs", ns, name, uid, p, sc, i, end), daemon=True)
                   for i, p in enumerate(pods)]
        for t in threads:
            t.start()
        if sc.outcome == "deadline":
            self._sleep("jobs", ns, name, uid, sc.steps + 2)
            msg = "Job was active longer than specified deadline"
            with self.cond:
                for pod in pods:
                    self.store["pods"].pop((ns, pod["metadata"]["name"]), None)
                    self._close_logs(ns, pod["metadata"]["name"])
            self._status("jobs", ns, name, uid, active=0, ready=0, failed=n)
            self._condition("jobs", ns, name, uid, "FailureTarget", "True", "DeadlineExceeded", msg)
            self._condition("jobs", ns, name, uid, "Failed", "True", "DeadlineExceeded", msg)
            return
        for t in threads:
            t.join()
        self._alive("jobs", ns, name, uid)
        self._status("jobs", ns, name, uid, active=0, ready=0, succeeded=n, completionTime=now(),
                     **({"completedIndexes": f"0-{n - 1}" if n > 1 else "0"} if indexed else {}))
        self._condition("jobs", ns, name, uid, "SuccessCriteriaMet", "True", "CompletionsReached", "Reached expected number of succeeded pods")
        self._condition("jobs", ns, name, uid, "Complete", "True", "CompletionsReached", "Reached expected number of succeeded pods")

    def _guard_pod(self, plural: str, ns: str, owner: str, uid: str, pod: dict, sc: Scenario, index: int, end: str) -> None:
        try:
            self._run_pod(plural, ns, owner, uid, pod, sc, index, end, after=sc.after)
        except _Gone:
            self._close_logs(ns, pod["metadata"]["name"])

    # ------------------------------------------------------------------ the training operator (v1.8.1)
    def _run_pytorchjob(self, ns: str, name: str, uid: str) -> None:
        """The PyTorchJob controller for one job: reconcile whenever the job, its pods or its Services change
        (controller-runtime watches: pytorchjob_controller.go: SetupWithManager), and again after a failed
        reconcile with a growing delay (controller-runtime's rate-limited requeue on an error). Ends with the
        job (deleted) or once it has finished and a reconcile changed nothing more."""
        last, failures, due = None, 0, 0.0
        while True:
            fingerprint = self._owned_fingerprint(ns, name, uid)
            if fingerprint != last or (due and time.monotonic() >= due):
                last = fingerprint
                try:
                    done = self._reconcile_pytorchjob(ns, name, uid)
                    failures, due = 0, 0.0
                except _Refused:
                    failures += 1
                    due = time.monotonic() + self.tick * min(2 ** failures, 16)
                    done = False
                if done:
                    return
            self._sleep("pytorchjobs", ns, name, uid)

    def _owned_fingerprint(self, ns: str, name: str, uid: str) -> tuple:
        with self.cond:
            job = self._alive("pytorchjobs", ns, name, uid)
            owned = sorted((plural, o["metadata"]["name"], o["metadata"]["resourceVersion"])
                           for plural in ("pods", "services") for (n, _), o in self.store[plural].items()
                           if n == ns and self._owner_uid(o) == uid)
            return (job["metadata"]["resourceVersion"], tuple(owned))

    @staticmethod
    def _owner_uid(obj: dict) -> str | None:
        refs = obj["metadata"].get("ownerReferences") or []
        return next((r.get("uid") for r in refs if r.get("controller")), None)

    def _reconcile_pytorchjob(self, ns: str, name: str, uid: str) -> bool:
        """One reconcile: pytorchjob_controller.go: Reconcile (SetDefaults_PyTorchJob in memory, then
        pkg/controller.v1/common/job.go: ReconcileJobs), with tests/k8s/operator.py for every decision.
        Returns whether the job is finished and nothing was left to do (the loop may stop). Raises _Refused
        when a pod create was refused (ReconcilePods returns the error: no status update this time).

        Replica types are visited Master then Worker (Go ranges over a map: random order; with a refused
        Worker the end state is the same: the Master is created on some try, the Workers never are)."""
        with self.cond:
            stored = self._alive("pytorchjobs", ns, name, uid)
            job = op.defaulted(copy.deepcopy(stored))
            # GetPodsForJob / GetServicesForJob: the job's label selector, adopted by controller reference
            pods = [copy.deepcopy(o) for (n, _), o in sorted(self.store["pods"].items())
                    if n == ns and self._owner_uid(o) == uid]
            services = {o["metadata"]["name"] for (n, _), o in self.store["services"].items()
                        if n == ns and self._owner_uid(o) == uid}
            status = copy.deepcopy(stored.get("status") or {})
        before = copy.deepcopy(status)
        if not status.get("conditions"):
            # pytorchjob_controller.go: onOwnerCreateFunc: Created, saved with the first status update
            op.update_job_conditions(status, op.JOB_CREATED, "True", op.KIND + "Created", f"PyTorchJob {name} is created.")
        run_policy = job["spec"]["runPolicy"]
        replicas = job["spec"]["pytorchReplicaSpecs"]
        deleted = False

        if op.is_finished(status):
            # ReconcileJobs: a finished job: CleanUpResources -> DeletePodsAndServices by cleanPodPolicy; a
            # succeeded job's active replicas count as succeeded. (CleanupJob: with ttlSecondsAfterFinished and
            # no completionTime - a job failed by ReconcilePods has none - it returns "job completion time is
            # nil, cannot cleanup" and the job is requeued forever; nothing visible comes of it here.)
            for pod_name in op.pods_to_delete(run_policy["cleanPodPolicy"], status, pods):
                deleted |= self._operator_delete(ns, stored, pod_name, services)
            if op.is_succeeded(status):
                for rs in (status.get("replicaStatuses") or {}).values():
                    rs["succeeded"] = int(rs.get("succeeded") or 0) + int(rs.pop("active", 0) or 0)
            changed = self._save_pytorchjob_status(ns, name, uid, before, status)
            return not (changed or deleted)

        if run_policy.get("suspend"):
            # ReconcileJobs: a suspended job loses its pods, its Running condition and gets Suspended
            for pod_name in op.pods_to_delete(run_policy["cleanPodPolicy"], status, pods):
                self._operator_delete(ns, stored, pod_name, services)
            for rs in (status.get("replicaStatuses") or {}).values():
                rs.pop("active", None)
            msg = f"PyTorchJob {name} is suspended."
            if op.is_running(status):
                op.update_job_conditions(status, op.JOB_RUNNING, "False", op.KIND + "Suspended", msg)
            if not op._is_true(status, op.JOB_SUSPENDED):
                op.update_job_conditions(status, op.JOB_SUSPENDED, "True", op.KIND + "Suspended", msg)
            self.event(ns, stored, "Normal", op.KIND + "Suspended", msg, component=op.CONTROLLER_NAME)
            self._save_pytorchjob_status(ns, name, uid, before, status)
            return False

        # ReconcileJobs: the backoff limit and the active deadline. exceedsBackoffLimit = a new failed pod, not
        # all replicas active, and NumRequeues+1 > backoffLimit - where NumRequeues is always 0 (the reconciler's
        # WorkQueue is pkg/common/util/fake_workqueue.go: FakeWorkQueue), so it trips on the first failure when
        # backoffLimit is 0 and never otherwise; pastBackoffLimit is core/job.go: PastBackoffLimit (container
        # restarts of Running pods: never with ExitCode, whose pods have restartPolicy Never).
        active = [p for p in pods if (p.get("status") or {}).get("phase") not in ("Succeeded", "Failed")
                  and not p["metadata"].get("deletionTimestamp")]  # k8sutil.FilterActivePods
        failed = sum(1 for p in pods if (p.get("status") or {}).get("phase") == "Failed")
        total = sum(int(r["replicas"]) for r in replicas.values())
        prev_failed = sum(int(r.get("failed") or 0) for r in (status.get("replicaStatuses") or {}).values())
        limit = run_policy.get("backoffLimit")
        failure = None
        if limit is not None and ((failed > prev_failed and len(active) != total and 0 + 1 > int(limit))
                                  or op.past_backoff_limit(int(limit), replicas, pods)):
            failure = f"Job {name} has failed because it has reached the specified backoff limit"
        elif self._past_active_deadline(run_policy, status):
            failure = f"Job {name} has failed because it was active longer than specified deadline"
        if failure:
            status.setdefault("completionTime", now())
            for pod_name in op.pods_to_delete(run_policy["cleanPodPolicy"], status, pods):  # not finished yet: all
                self._operator_delete(ns, stored, pod_name, services)
            self.event(ns, stored, "Normal", op.KIND + "Failed", failure, component=op.CONTROLLER_NAME)
            op.update_job_conditions(status, op.JOB_FAILED, "True", op.KIND + "Failed", failure)
            self._save_pytorchjob_status(ns, name, uid, before, status)
            return False

        for rtype in op._rtype_order(replicas):
            self._reconcile_pods(ns, stored, job, status, pods, rtype, services)
            self._reconcile_services(ns, job, rtype, services)

        # UpdateJobStatus (pytorchjob_controller.go): startTime, each replica type's selector, the conditions
        # (operator.update_job_status), completionTime in its Succeeded branch and its Failed branch (Never) only,
        # and the events those branches record
        status.setdefault("startTime", now())
        for rtype in replicas:
            rs = status.setdefault("replicaStatuses", {}).setdefault(rtype, {})
            selector = {**op.gen_labels(name), op.REPLICA_TYPE_LABEL: rtype.lower()}
            rs["selector"] = ",".join(f"{k}={v}" for k, v in sorted(selector.items()))  # FormatLabelSelector
        failed_before = op.is_failed(status)
        conditions_before = copy.deepcopy(status.get("conditions") or [])
        op.update_job_status(job, status)
        if status.get("completionTime") is None and (op.is_succeeded(status) or (op.is_failed(status) and not failed_before)):
            status["completionTime"] = now()
        for cond in status.get("conditions") or []:
            if cond in conditions_before or cond["type"] not in (op.JOB_SUCCEEDED, op.JOB_RESTARTING, op.JOB_FAILED):
                continue
            kind = "Warning" if cond["type"] == op.JOB_RESTARTING else "Normal"
            self.event(ns, stored, kind, cond["reason"], cond["message"], component=op.CONTROLLER_NAME)
        self._save_pytorchjob_status(ns, name, uid, before, status)
        return False

    @staticmethod
    def _past_active_deadline(run_policy: dict, status: dict) -> bool:
        """pkg/controller.v1/common/job.go: PastActiveDeadline: activeDeadlineSeconds since startTime."""
        ads, start = run_policy.get("activeDeadlineSeconds"), status.get("startTime")
        if ads is None or not start:
            return False
        started = dt.datetime.fromisoformat(start.replace("Z", "+00:00")).timestamp()
        return time.time() - started >= int(ads)

    def _reconcile_pods(self, ns: str, stored: dict, job: dict, status: dict, pods: list[dict], rtype: str,
                        services: set[str]) -> None:
        """pkg/controller.v1/common/pod.go: ReconcilePods for one replica type: a fresh replica status
        (core/status.go: InitializeReplicaStatuses); each missing index created (createNewPod: operator.pod_for
        with this server's init container settings; control/pod_control.go: RealPodControl.createPods records
        SuccessfulCreatePod "Created pod: <name>", or on an error FailedCreatePod "Error creating: <error>"
        as a Warning and returns it); for an existing pod the "pytorch" container's exit code (event
        ExitedWithCode "Pod: <ns>.<name> exited with code <n>"), a Failed pod restarted (deleted, Warning
        <Kind>Restarting; the next reconcile creates it again) or failing the job (Warning <Kind>Failed) by
        operator.reconcile_failed_pod, and the pod counted (core/status.go: UpdateJobReplicaStatuses)."""
        replicas = job["spec"]["pytorchReplicaSpecs"]
        rspec = replicas[rtype]
        rs = status.setdefault("replicaStatuses", {})[rtype] = {}
        mine = [p for p in pods if p["metadata"].get("labels", {}).get(op.REPLICA_TYPE_LABEL) == rtype.lower()]
        for index in range(int(rspec["replicas"])):
            slice_ = [p for p in mine if p["metadata"]["labels"].get(op.REPLICA_INDEX_LABEL) == str(index)]
            if not slice_:
                pod = op.pod_for(job, rtype, index, self.init_template, self.init_image, self.init_max_tries)
                pod["metadata"]["ownerReferences"][0]["uid"] = stored["metadata"]["uid"]
                try:
                    created = self._create_pod(pod, ns)
                except _Refused as refused:
                    self.event(ns, stored, *op.failed_create_pod_event(str(refused)), component=op.CONTROLLER_NAME)
                    raise
                self.event(ns, stored, "Normal", "SuccessfulCreatePod", f"Created pod: {created['metadata']['name']}",
                           component=op.CONTROLLER_NAME)
                self._start_kubelet(ns, created, stored)
                continue
            pod = slice_[0]
            st = pod.get("status") or {}
            exit_code = None
            for cs in st.get("containerStatuses") or []:
                term = (cs.get("state") or {}).get("terminated")
                if cs.get("name") == op.DEFAULT_CONTAINER_NAME and term is not None:
                    exit_code = int(term.get("exitCode", 0))
                    self.event(ns, stored, "Normal", "ExitedWithCode",
                               f"Pod: {ns}.{pod['metadata']['name']} exited with code {exit_code}",
                               component=op.CONTROLLER_NAME)
            if st.get("phase") == "Failed":
                action = op.reconcile_failed_pod(job, status, rtype, exit_code)
                if action == "restart":
                    self._operator_delete(ns, stored, pod["metadata"]["name"], set())
                    msg = f"job {job['metadata']['name']} is restarting because {rtype} replica(s) failed."
                    self.event(ns, stored, "Warning", op.KIND + "Restarting", msg, component=op.CONTROLLER_NAME)
                elif action == "fail":
                    msg = f'job "{job["metadata"]["name"]}" is failing because "{rtype}" replica(s) failed.'
                    self.event(ns, stored, "Warning", op.KIND + "Failed", msg, component=op.CONTROLLER_NAME)
            phase, gone = st.get("phase"), pod["metadata"].get("deletionTimestamp")
            key = {"Running": "failed" if gone else "active", "Succeeded": "succeeded", "Failed": "failed"}.get(phase)
            if key:
                rs[key] = int(rs.get(key) or 0) + 1

    def _reconcile_services(self, ns: str, job: dict, rtype: str, services: set[str]) -> None:
        """pkg/controller.v1/common/service.go: ReconcileServices: each missing Service of the replica type
        created (operator.services_for; control/service_control.go: CreateServicesWithControllerRef records
        SuccessfulCreateService "Created service: <name>")."""
        for svc in op.services_for(job):
            if svc["metadata"]["labels"][op.REPLICA_TYPE_LABEL] != rtype.lower() or svc["metadata"]["name"] in services:
                continue
            try:
                self._create("api/v1", "services", ns, svc, simulate=False)
            except ApiError:
                continue
            services.add(svc["metadata"]["name"])
            self.event(ns, job, "Normal", "SuccessfulCreateService", f"Created service: {svc['metadata']['name']}",
                       component=op.CONTROLLER_NAME)

    def _operator_delete(self, ns: str, job: dict, pod_name: str, services: set[str]) -> bool:
        """control/pod_control.go: RealPodControl.DeletePod (event SuccessfulDeletePod "Deleted pod: <name>")
        and, from DeletePodsAndServices, the Service of the same name (control/service_control.go: DeleteService,
        SuccessfulDeleteService "Deleted service: <name>")."""
        done = False
        with self.cond:
            current = self.store["pods"].get((ns, pod_name))
            terminating = current is not None and current["metadata"].get("deletionTimestamp")
        try:
            if terminating:  # DeletePod: "pod ... is terminating, skip deleting"
                raise ApiError(409, "Conflict", "terminating")
            self._delete("api/v1", "pods", ns, pod_name, None, record=False)
            self.event(ns, job, "Normal", "SuccessfulDeletePod", f"Deleted pod: {pod_name}", component=op.CONTROLLER_NAME)
            done = True
        except ApiError:
            pass
        if pod_name in services:
            try:
                self._delete("api/v1", "services", ns, pod_name, None, record=False)
                self.event(ns, job, "Normal", "SuccessfulDeleteService", f"Deleted service: {pod_name}",
                           component=op.CONTROLLER_NAME)
                done = True
            except ApiError:
                pass
        return done

    def _save_pytorchjob_status(self, ns: str, name: str, uid: str, before: dict, status: dict) -> bool:
        """pytorchjob_controller.go: UpdateJobStatusInApiServer (the status subresource), only when the status
        changed (ReconcileJobs compares with reflect.DeepEqual). Conditions get pkg/util/status.go: newCondition's
        lastUpdateTime / lastTransitionTime (setCondition keeps the old lastTransitionTime when the status is the
        same). Zero replica counts are left out, as Go's omitempty does."""
        for rs in (status.get("replicaStatuses") or {}).values():
            for k in ("active", "succeeded", "failed"):
                if not rs.get(k):
                    rs.pop(k, None)
        if status == before:
            return False
        old = {c["type"]: c for c in before.get("conditions") or []}
        t = now()
        for cond in status.get("conditions") or []:
            prev = old.get(cond["type"])
            if prev is not None and all(prev.get(k) == cond.get(k) for k in ("status", "reason", "message")):
                cond.update({k: prev[k] for k in ("lastUpdateTime", "lastTransitionTime") if k in prev})
                continue
            cond["lastUpdateTime"] = t
            cond["lastTransitionTime"] = prev["lastTransitionTime"] if prev and prev.get("status") == cond["status"] \
                and "lastTransitionTime" in prev else t
        with self.cond:
            obj = self._alive("pytorchjobs", ns, name, uid)
            obj["status"] = status
            self._put("pytorchjobs", obj)
        return True

    # ------------------------------------------------------------------ the kubelet, for the operator's pods
    def _start_kubelet(self, ns: str, pod: dict, job: dict) -> None:
        threading.Thread(target=self._kubelet, args=(ns, pod, job, self._scenario(job)), daemon=True).start()

    def _pod_alive(self, ns: str, name: str, uid: str) -> dict:
        with self.cond:
            pod = self.store["pods"].get((ns, name))
            if self.stopping or pod is None or pod["metadata"]["uid"] != uid or pod["metadata"].get("deletionTimestamp"):
                raise _Gone()
            return pod

    def _psleep(self, ns: str, name: str, uid: str, ticks: float = 1) -> None:
        time.sleep(self.tick * ticks)
        self._pod_alive(ns, name, uid)

    def _kubelet(self, ns: str, pod: dict, job: dict, sc: Scenario) -> None:
        """The kubelet running one pod of a PyTorchJob: scheduled, init containers, containers started, the
        Scenario's log lines and end. The workload's own protocol is simulated where the operator's decisions
        depend on it: every pod waits at the rendezvous until all the job's pods have started once (torchrun's
        static / c10d rendezvous: a Master whose Workers are never created waits forever), and rank 0 (the
        Master) ends only after the Workers have (it saves last)."""
        name, uid = pod["metadata"]["name"], pod["metadata"]["uid"]
        try:
            if sc.outcome in ("imagepull", "unschedulable"):
                self._stuck_pod(ns, pod, sc.outcome)
                return
            self._psleep(ns, name, uid)
            self._schedule(ns, name, uid)
            for init in pod["spec"].get("initContainers") or []:
                self._run_init_container(ns, pod, init)
            self._run_containers(ns, pod, job, sc)
        except _Gone:
            pass
        finally:
            self._close_logs_of(ns, name, uid)

    def _close_logs_of(self, ns: str, name: str, uid: str) -> None:
        with self.cond:
            pod = self.store["pods"].get((ns, name))
            if pod is None or pod["metadata"]["uid"] == uid:  # not a newer pod of the same name
                self._close_logs(ns, name)

    def _schedule(self, ns: str, name: str, uid: str) -> None:
        """kube-scheduler binds the pod: spec.nodeName and PodScheduled=True."""
        def bind(p: dict) -> None:
            p["spec"].setdefault("nodeName", "gpu-node-1")
            p["status"]["conditions"] = [{"type": "PodScheduled", "status": "True", "lastTransitionTime": now()}]
            p["status"]["startTime"] = now()

        if self._pod_update(ns, name, bind, uid) is None:
            raise _Gone()

    def _set_status(self, ns: str, name: str, uid: str, field_: str, cname: str, **changes: Any) -> None:
        def change(p: dict) -> None:
            for cs in p["status"].get(field_) or []:
                if cs["name"] == cname:
                    cs.update(changes)
                    if "state" in changes and "waiting" not in changes["state"]:
                        cs["imageID"] = cs["image"] + "@sha256:" + "0" * 64

        if self._pod_update(ns, name, change, uid) is None:
            raise _Gone()

    def _run_init_container(self, ns: str, pod: dict, init: dict) -> None:
        """An init container runs to completion before the containers start (phase Pending meanwhile). The
        operator's (initcontainer.go: initContainerTemplate: `nslookup <MasterAddr>` until it resolves, then
        exit 0) completes once the Master's Service exists."""
        name, uid, cname = pod["metadata"]["name"], pod["metadata"]["uid"], init["name"]
        self._set_status(ns, name, uid, "initContainerStatuses", cname, started=True,
                         state={"running": {"startedAt": now()}})
        m = re.search(r"nslookup\s+([\w.-]+)", " ".join(str(a) for a in (init.get("command") or []) + (init.get("args") or [])))
        while m and self.get("services", m.group(1), ns) is None:
            self.write_log(ns, name, cname, "waiting for master")
            self._psleep(ns, name, uid, 2)
        self._psleep(ns, name, uid)
        term = {"exitCode": 0, "reason": "Completed", "startedAt": now(), "finishedAt": now()}
        self._set_status(ns, name, uid, "initContainerStatuses", cname, started=False, ready=True,
                         state={"terminated": term})

    def _mark(self, ns: str, name: str, uid: str, phase: str, state: dict, ready: bool, restart: bool = False) -> None:
        """Every container of the pod to ``state``; the pod to ``phase`` (Ready with it); ``restart``: the
        container restarted in place (restartPolicy OnFailure / Always): lastState and restartCount."""
        def change(p: dict) -> None:
            st = p["status"]
            st["phase"] = phase
            for cs in st.get("containerStatuses") or []:
                if restart:
                    cs["lastState"] = cs.get("state") or {}
                    cs["restartCount"] = int(cs.get("restartCount") or 0) + 1
                cs["state"] = copy.deepcopy(state)
                cs["ready"] = ready
                cs["started"] = "running" in state
                if "waiting" not in state:
                    cs["imageID"] = cs["image"] + "@sha256:" + "0" * 64
            conds = [c for c in st.get("conditions") or [] if c["type"] != "Ready"]
            st["conditions"] = conds + [{"type": "Ready", "status": "True" if ready else "False",
                                         "lastTransitionTime": now()}]

        if self._pod_update(ns, name, change, uid) is None:
            raise _Gone()

    def _run_containers(self, ns: str, pod: dict, job: dict, sc: Scenario) -> None:
        name, uid = pod["metadata"]["name"], pod["metadata"]["uid"]
        container = pod["spec"]["containers"][0]["name"]
        labels = pod["metadata"].get("labels") or {}
        rtype, index = labels.get(op.REPLICA_TYPE_LABEL, "?"), labels.get(op.REPLICA_INDEX_LABEL, "0")
        env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0].get("env") or []}
        rank = env.get("RANK") or index
        stage = labels.get("llmpipe.io/stage", "?")
        job_key = (ns, job["metadata"]["uid"])
        first = True
        while True:
            with self.cond:
                attempt = self.starts[(ns, name)] = self.starts.get((ns, name), 0) + 1
                self.logs[(ns, name, container)] = _Log()  # a started container has a log of its own
            self._mark(ns, name, uid, "Running", {"running": {"startedAt": now()}}, ready=True)
            with self.cond:
                self._started_pods.setdefault(job_key, set()).add(name)
            if first:
                while not self._all_started(ns, job):
                    self._psleep(ns, name, uid)
                first = False
            lines, end = self._plan(sc, job, f"{rtype}-{index}", attempt, env, stage)
            for line in lines:  # one line a tick ("": a tick without a line)
                if line:
                    self.write_log(ns, name, container, line.format(pod=name, index=rank, stage=stage))
                self._psleep(ns, name, uid)
            while end[0] == "hang" or (sc.after and not self._succeeded(ns, sc.after)):
                self.write_log(ns, name, container, f"== {stage} [{rank}] still working")
                self._psleep(ns, name, uid, 2)
            if end[0] == "ok" and rtype == "master":
                while not self._workers_succeeded(ns, job):
                    self._psleep(ns, name, uid)
            if end[0] == "ok":
                term = {"exitCode": 0, "reason": "Completed", "startedAt": now(), "finishedAt": now()}
                self._mark(ns, name, uid, "Succeeded", {"terminated": term}, ready=False)
                return
            _, code, reason, line = end
            if line:
                self.write_log(ns, name, container, line)
            term = {"exitCode": code, "reason": reason, "startedAt": now(), "finishedAt": now()}
            if pod["spec"].get("restartPolicy") in ("OnFailure", "Always"):
                # the kubelet restarts the container in place (kubelet: computePodActions), after a back-off
                self._mark(ns, name, uid, "Running", {"terminated": term}, ready=False)
                self._close_logs(ns, name)
                self._psleep(ns, name, uid, 2)
                self._mark(ns, name, uid, "Running", {"waiting": {"reason": "CrashLoopBackOff"}}, ready=False, restart=True)
                self._psleep(ns, name, uid, 2)
                continue
            self._mark(ns, name, uid, "Failed", {"terminated": term}, ready=False)
            return

    def _all_started(self, ns: str, job: dict) -> bool:
        want = {op.replica_name(job["metadata"]["name"], rtype, i)
                for rtype, rspec in (job["spec"].get("pytorchReplicaSpecs") or {}).items()
                for i in range(int((rspec or {}).get("replicas") or 1))}
        with self.cond:
            return want <= self._started_pods.get((ns, job["metadata"]["uid"]), set())

    def _workers_succeeded(self, ns: str, job: dict) -> bool:
        """Every Worker pod of the job has succeeded (a failed one is recreated or fails the job)."""
        workers = (job["spec"].get("pytorchReplicaSpecs") or {}).get("Worker") or {}
        with self.cond:
            for i in range(int(workers.get("replicas") or 0) if workers else 0):
                pod = self.store["pods"].get((ns, op.replica_name(job["metadata"]["name"], "Worker", i)))
                if pod is None or self._owner_uid(pod) != job["metadata"]["uid"] or pod["status"].get("phase") != "Succeeded":
                    return False
        return True

    def _plan(self, sc: Scenario, job: dict, me: str, attempt: int, env: dict, stage: str) -> tuple[list[str], tuple]:
        """What this start of the pod ``me`` (``master-0``) does: its log lines and its end, ("ok",), ("hang",)
        or ("exit", exit code, reason, last log line)."""
        specs = job["spec"].get("pytorchReplicaSpecs") or {}
        rank0 = "master-0" if "Master" in specs else "worker-0"
        if sc.replica:
            target = sc.replica
        elif sc.restart_budget:
            target = rank0
        elif sc.outcome == "oom" and "Worker" in specs:
            target = "worker-0"
        else:
            target = rank0
        lines = list(sc.logs) if sc.logs else [f"== {{stage}} [{{index}}] step {i + 1}/{sc.steps}" for i in range(sc.steps)]
        if me != target:
            return lines, ("hang",) if sc.outcome in ("hang", "fail", "oom") else ("ok",)
        if sc.restart_budget and env.get("LLMPIPE_JOB_ID"):
            # pipeline/training/restarts.py: count_start: starts in a row from the same step, limit
            # LLMPIPE_MAX_RESTARTS (default 3): over it, RestartBudgetExceeded (exit 1, printed as "error: ...")
            limit = int(env.get("LLMPIPE_MAX_RESTARTS") or 3)
            if attempt - 1 > limit:
                line = (f"error: {stage}: started {attempt} times from step {sc.resume_step} without reaching a new "
                        f"checkpoint (LLMPIPE_MAX_RESTARTS={limit}): giving up; the earlier pods' logs say why")
                return [], ("exit", 1, "Error", line)
            if attempt > 1:
                notice = f"{stage}: restart {attempt - 1}/{limit} from step {sc.resume_step} (job {env['LLMPIPE_JOB_ID']})"
                lines = [notice, *lines]
        if sc.outcome == "fail":
            return lines, ("exit", sc.exit_code, "Error", sc.error_line)
        if sc.outcome == "oom":
            return lines, ("exit", 137, "OOMKilled", None)
        if sc.outcome == "restart" and attempt <= sc.times:  # one step, then killed while it works on
            return ["== {stage} [{index}] step 1/1"] + [""] * (sc.steps - 1), ("exit", 137, "Error", "Killed")
        if sc.outcome == "preempted" and attempt <= sc.times:
            return lines, ("exit", 143, "Error", "Terminated")
        if sc.outcome == "hang":
            return lines, ("hang",)
        return lines, ("ok",)

    def _stuck_pod(self, ns: str, pod: dict, outcome: str) -> None:
        """A pod that never starts (the same as _stuck, for one pod of the operator's)."""
        name, uid, image = pod["metadata"]["name"], pod["metadata"]["uid"], pod["spec"]["containers"][0].get("image", "?")
        self._psleep(ns, name, uid)
        if outcome == "imagepull":
            msg = (f'rpc error: code = NotFound desc = failed to pull and unpack image "{image}": failed to resolve '
                   f'reference "{image}": {image}: not found')
            self._pod_phase(ns, name, "Pending", {"waiting": {"reason": "ErrImagePull", "message": msg}}, uid=uid)
            self.event(ns, pod, "Warning", "Failed", f'Failed to pull image "{image}": {msg}', component="kubelet")
            self._psleep(ns, name, uid, 2)
            self._pod_phase(ns, name, "Pending",
                            {"waiting": {"reason": "ImagePullBackOff", "message": f'Back-off pulling image "{image}"'}},
                            uid=uid)
        else:
            msg = ("0/3 nodes are available: 1 node(s) had untolerated taint {node-role.kubernetes.io/control-plane: }, "
                   "2 Insufficient nvidia.com/gpu. preemption: 0/3 nodes are available: 3 No preemption victims "
                   "found for incoming pod.")

            def unschedulable(p: dict) -> None:
                p["status"]["conditions"] = [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                              "message": msg, "lastTransitionTime": now()}]

            self._pod_update(ns, name, unschedulable, uid)
            self.event(ns, pod, "Warning", "FailedScheduling", msg, component="default-scheduler")
        while True:
            self._psleep(ns, name, uid, 4)


class _Gone(Exception):
    """The simulated workload was deleted (or the server stops)."""
