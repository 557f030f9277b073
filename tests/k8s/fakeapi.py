"""A small Kubernetes API server on loopback, for testing ``pipeline.k8s`` with the real
kubernetes python client over real HTTP.

It speaks the part of the REST API that ``llmpipe k8s`` uses, with the API's own JSON shapes,
status codes and Status bodies:

* GET (one / list with ``labelSelector`` and ``fieldSelector``), POST, PUT, PATCH (merge patch),
  DELETE (``propagationPolicy``; Jobs orphan their pods by default, as the real API does) of
  configmaps, secrets, serviceaccounts, persistentvolumeclaims, pods, events (core/v1),
  jobs (batch/v1) and pytorchjobs (kubeflow.org/v1, only when that "CRD" is installed);
* ``pods/{name}/log`` with ``container``, ``tailLines`` and ``follow=true`` (chunked stream
  until the container terminates); 400 while the container is waiting to start;
* bearer-token auth (401), per-verb denials (403 with the RBAC message), 404 for a missing
  namespace, 409 AlreadyExists / Conflict, 422 for an update of a Job's pod template.

A simulator stands in for the Job controller, the training operator and the kubelet: a
created Job or PyTorchJob gets pods that start, write log lines and end the way the
``Scenario`` registered for that name says (succeed, fail, oom, imagepull, unschedulable,
deadline, hang, createfail), with status fields and conditions as a real cluster sets them.
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

# (path prefix, plural) -> (kind, apiVersion, qualified resource name used in messages, group)
RESOURCES = {
    ("api/v1", "configmaps"): ("ConfigMap", "v1", "configmaps", ""),
    ("api/v1", "secrets"): ("Secret", "v1", "secrets", ""),
    ("api/v1", "serviceaccounts"): ("ServiceAccount", "v1", "serviceaccounts", ""),
    ("api/v1", "persistentvolumeclaims"): ("PersistentVolumeClaim", "v1", "persistentvolumeclaims", ""),
    ("api/v1", "pods"): ("Pod", "v1", "pods", ""),
    ("api/v1", "events"): ("Event", "v1", "events", ""),
    ("apis/batch/v1", "jobs"): ("Job", "batch/v1", "jobs.batch", "batch"),
    ("apis/kubeflow.org/v1", "pytorchjobs"): ("PyTorchJob", "kubeflow.org/v1", "pytorchjobs.kubeflow.org", "kubeflow.org"),
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
    """Equality and set-based label selectors, as the API server understands them."""
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
    for term in filter(None, (selector or "").split(",")):
        neg = "!=" in term
        key, value = term.split("!=" if neg else "=", 1)
        actual = _get(obj, key.replace("==", ""))
        if (str(actual) == value.lstrip("=")) == neg:
            return False
    return True


def merge_patch(target: Any, patch: Any) -> Any:
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


@dataclass
class Scenario:
    """How a simulated workload runs. ``outcome``:

    succeed      pods run ``steps`` ticks writing ``logs``, then exit 0 (after ``after`` succeeded, if set)
    fail         a pod exits ``exit_code`` with ``error_line`` as its last log line, backoffLimit+1 times
    oom          a pod is OOMKilled (exit 137), backoffLimit+1 times
    imagepull    pods stay Pending: ErrImagePull, then ImagePullBackOff
    unschedulable pods stay Pending: PodScheduled=False, reason Unschedulable
    deadline     pods run, then the Job fails with DeadlineExceeded and its pods are deleted
    restart      (PyTorchJob) the master is killed (exit 137), Restarting, recreated under its name, succeeds
    hang         pods run forever, writing a log line per tick
    createfail   no pods: a FailedCreate warning event on the Job (e.g. a quota)
    """

    outcome: str = "succeed"
    steps: int = 3
    logs: list[str] | None = None
    after: str | None = None
    exit_code: int = 1
    error_line: str = "error: no committed 'raw/' under /data/runs/default: run `llmpipe run collect` first"
    message: str = ""


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
        self.cond = threading.Condition(threading.RLock())
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
        url = urlsplit(h.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        with self.cond:
            self.requests.append((method, url.path, url.query))
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
        self._send(h, code, json.dumps(obj).encode(), "application/json")

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
            if plural == "pytorchjobs" and not (obj.get("spec") or {}).get("pytorchReplicaSpecs"):
                raise ApiError(422, "Invalid", f'PyTorchJob.kubeflow.org "{name}" is invalid: spec.pytorchReplicaSpecs: Required value')
            self._put(plural, obj)
        if simulate and self.simulate and plural in ("jobs", "pytorchjobs"):
            target = self._run_job if plural == "jobs" else self._run_pytorchjob
            threading.Thread(target=self._guard, args=(target, ns, name, obj["metadata"]["uid"]), daemon=True).start()
        return copy.deepcopy(obj)

    def _default_job(self, job: dict) -> None:
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
            return copy.deepcopy(self._put(plural, obj))

    def _patch(self, prefix: str, plural: str, ns: str, name: str, body: Any) -> dict:
        with self.cond:
            old = self.store[plural].get((ns, name))
            if old is None:
                raise self._not_found(prefix, plural, name)
            obj = merge_patch(old, body)
            if plural == "jobs" and obj["spec"].get("template") != old["spec"].get("template"):
                raise ApiError(422, "Invalid", f'Job.batch "{name}" is invalid: spec.template: field is immutable')
            return copy.deepcopy(self._put(plural, obj))

    def _delete(self, prefix: str, plural: str, ns: str, name: str, policy: str | None) -> dict:
        with self.cond:
            obj = self.store[plural].get((ns, name))
            if obj is None:
                raise self._not_found(prefix, plural, name)
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
                for key, pod in list(self.store["pods"].items()):
                    refs = pod["metadata"].get("ownerReferences") or []
                    if any(r.get("uid") == uid for r in refs):
                        if effective == "Orphan":
                            pod["metadata"]["ownerReferences"] = [r for r in refs if r.get("uid") != uid]
                        else:
                            del self.store["pods"][key]
                            self._close_logs(key[0], key[1])
                self.cond.notify_all()

        if self.delete_delay:
            threading.Timer(self.delete_delay, remove).start()
        else:
            with self.cond:
                del self.store[plural][(ns, name)]
            threading.Thread(target=remove, daemon=True).start()
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                "details": {"name": name, "kind": plural, "uid": uid}}

    # ------------------------------------------------------------------ logs
    def _log(self, h: BaseHTTPRequestHandler, ns: str, name: str, query: dict) -> None:
        pod = self._read("api/v1", "pods", ns, name)
        names = [c["name"] for c in pod["spec"].get("containers") or []]
        container = query.get("container")
        if not container:
            if len(names) != 1:
                raise ApiError(400, "BadRequest", f"a container name must be specified for pod {name}, choose one of: "
                                                  f"[{' '.join(names)}]")
            container = names[0]
        if container not in names:
            raise ApiError(400, "BadRequest", f"container {container} is not valid for pod {name}")
        cs = next((c for c in (pod.get("status") or {}).get("containerStatuses") or [] if c["name"] == container), {})
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

    def event(self, ns: str, involved: dict, type_: str, reason: str, message: str) -> None:
        meta = involved["metadata"]
        ev = {"apiVersion": "v1", "kind": "Event",
              "metadata": {"name": f"{meta['name']}.{uuid.uuid4().hex[:16]}", "namespace": ns},
              "involvedObject": {"kind": involved.get("kind"), "name": meta["name"], "namespace": ns,
                                 "uid": meta.get("uid"), "apiVersion": involved.get("apiVersion")},
              "type": type_, "reason": reason, "message": message, "count": 1,
              "firstTimestamp": now(), "lastTimestamp": now(), "source": {"component": "fake-controller"}}
        with self.cond:
            ev["metadata"] |= {"uid": str(uuid.uuid4()), "creationTimestamp": now()}
            self._put("events", ev)

    def _make_pod(self, owner: dict, name: str, template: dict, labels: dict) -> dict:
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
            "status": {"phase": "Pending", "qosClass": "Burstable", "conditions": [], "containerStatuses": [
                {"name": c["name"], "image": c.get("image", ""), "imageID": "", "ready": False, "restartCount": 0,
                 "started": False, "state": {"waiting": {"reason": "ContainerCreating"}}}
                for c in spec.get("containers") or []]},
        }
        with self.cond:
            pod["metadata"] = self._new_meta(pod["metadata"], ns)
            for c in spec.get("containers") or []:  # a new pod of an old name starts a new log
                self.logs[(ns, name, c["name"])] = _Log()
            self._put("pods", pod)
        return pod

    def _pod_update(self, ns: str, name: str, fn: Any) -> dict | None:
        with self.cond:
            pod = self.store["pods"].get((ns, name))
            if pod is None:
                return None
            fn(pod)
            self._put("pods", pod)
            return copy.deepcopy(pod)

    def _pod_phase(self, ns: str, name: str, phase: str, state: dict, ready: bool = False, scheduled: bool = True,
                   extra: dict | None = None) -> None:
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

        self._pod_update(ns, name, change)

    def _container_name(self, pod: dict) -> str:
        return pod["spec"]["containers"][0]["name"]

    def _run_pod(self, plural: str, ns: str, owner: str, uid: str, pod: dict, sc: Scenario, index: int,
                 end: str, after: str | None = None) -> None:
        """Run one pod to its end: 'ok', 'fail', 'oom' or 'hang'."""
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
        """Pods that never start: image pull failures or no node that fits."""
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

    def _run_pytorchjob(self, ns: str, name: str, uid: str) -> None:
        job = copy.deepcopy(self._alive("pytorchjobs", ns, name, uid))
        sc = self._scenario(job)
        full = f"{ns}/{name}"
        self._condition("pytorchjobs", ns, name, uid, "Created", "True", "PyTorchJobCreated", f"PyTorchJob {full} is created.")
        replicas: list[tuple[str, int, dict]] = []
        for rtype in ("Master", "Worker"):
            rs = job["spec"]["pytorchReplicaSpecs"].get(rtype)
            for i in range(int((rs or {}).get("replicas") or 0) if rs else 0):
                replicas.append((rtype, i, rs["template"]))
        pods, made = [], []
        for rtype, i, tmpl in replicas:
            labels = {"training.kubeflow.org/job-name": name, "training.kubeflow.org/operator-name": "pytorchjob-controller",
                      "training.kubeflow.org/replica-type": rtype.lower(), "training.kubeflow.org/replica-index": str(i)}
            if rtype == "Master":
                labels["training.kubeflow.org/job-role"] = "master"
            made.append((f"{name}-{rtype.lower()}-{i}", tmpl, labels))
            pods.append((rtype, self._make_pod(job, *made[-1])))
        counts = {rtype: {"active": 0, "succeeded": 0, "failed": 0} for rtype, _, _ in replicas}
        if sc.outcome in ("imagepull", "unschedulable"):
            self._stuck("pytorchjobs", ns, name, uid, [p for _, p in pods], sc.outcome)
            return
        for rtype, _ in pods:
            counts[rtype]["active"] += 1
        self._status("pytorchjobs", ns, name, uid, startTime=now(), replicaStatuses=copy.deepcopy(counts))
        self._condition("pytorchjobs", ns, name, uid, "Running", "True", "PyTorchJobRunning", f"PyTorchJob {full} is running.")
        if sc.outcome == "restart":  # the master is killed (preempted: exit 137), the operator recreates it
            killed = Scenario(steps=1, exit_code=137, error_line="Killed")
            self._run_pod("pytorchjobs", ns, name, uid, pods[0][1], killed, 0, "fail")
            self._condition("pytorchjobs", ns, name, uid, "Restarting", "True", "PyTorchJobRestarting",
                            f"PyTorchJob {full} is restarting because 1 Master replica(s) failed.")
            self._sleep("pytorchjobs", ns, name, uid, 3)
            with self.cond:
                self.store["pods"].pop((ns, made[0][0]), None)
            pods[0] = ("Master", self._make_pod(job, *made[0]))
            self._condition("pytorchjobs", ns, name, uid, "Restarting", "False", "PyTorchJobRunning", "")
        # the failing replica: the master for `fail`, the first worker (else the master) for `oom`
        failing = None
        if sc.outcome in ("fail", "oom"):
            types = [rt for rt, _ in pods]
            failing = "Worker" if sc.outcome == "oom" and "Worker" in types else "Master"
        failing_pod = next((p["metadata"]["name"] for rt, p in pods if rt == failing), None)
        threads = []
        for i, (rtype, pod) in enumerate(pods):
            if pod["metadata"]["name"] == failing_pod:
                end = sc.outcome
            else:
                end = "hang" if sc.outcome == "hang" or failing else "ok"
            t = threading.Thread(target=self._guard_pod, args=("pytorchjobs", ns, name, uid, pod, sc, i, end), daemon=True)
            threads.append((rtype, pod, end, t))
            t.start()
        for rtype, pod, end, t in threads:
            if end == "hang":
                continue
            t.join()
            counts[rtype]["active"] -= 1
            counts[rtype]["succeeded" if end == "ok" else "failed"] += 1
            self._status("pytorchjobs", ns, name, uid, replicaStatuses=copy.deepcopy(counts))
            if end in ("fail", "oom"):
                msg = f"PyTorchJob {full} is failed because 1 {rtype} replica(s) failed."
                self._condition("pytorchjobs", ns, name, uid, "Failed", "True", "PyTorchJobFailed", msg, only=True)
                with self.cond:  # cleanPodPolicy Running: the others are deleted
                    for _, other, e, _ in threads:
                        if e == "hang":
                            self.store["pods"].pop((ns, other["metadata"]["name"]), None)
                            self._close_logs(ns, other["metadata"]["name"])
                return
        if sc.outcome == "hang":
            while True:
                self._sleep("pytorchjobs", ns, name, uid, 4)
        self._status("pytorchjobs", ns, name, uid, completionTime=now())
        self._condition("pytorchjobs", ns, name, uid, "Succeeded", "True", "PyTorchJobSucceeded",
                        f"PyTorchJob {full} is successfully completed.", only=True)


class _Gone(Exception):
    """The simulated workload was deleted (or the server stops)."""
