"""The Kubernetes API through the official python client, every failure turned into one line.

``Kube`` loads the kubeconfig (``--kubeconfig``, else ``$KUBECONFIG``, else ``~/.kube/config``,
else the pod's service account when running in a cluster) with the client's own loader (so
exec plugins, OIDC and token refresh work as in kubectl), picks the namespace (``-n``, else
``$LLMPIPE_NAMESPACE``, else the kubeconfig context's, else ``llm-pipeline``), and sends
requests through the client's ``ApiClient`` (auth, TLS, proxies, retries). An ``ApiException``
or a connection error becomes a ``K8sError`` with one line: unauthorized, forbidden (with the
RBAC message), not found, unreachable.

Requests name the REST path themselves instead of going through the generated
``CoreV1Api`` / ``BatchV1Api`` classes: importing those builds some thousand pydantic models
(seconds of start-up for every ``llmpipe k8s`` command), and their typed responses reject
objects that lack a field the OpenAPI spec calls required, which real servers do send.
Objects are plain dicts in the API's JSON shape (camelCase), whatever their kind.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Iterator

from pipeline.errors import PipelineError
from pipeline.k8s import DEFAULT_NAMESPACE

# kubernetes (and urllib3) are imported inside the functions that talk to the cluster: `llmpipe --help`
# imports this module (through k8s.cli), and `import kubernetes` alone takes ~0.8 s.

# the authorizer's 403 ('... is forbidden: User "x" cannot create resource "jobs" in API group ...'); other
# 403s are admission's (a webhook's denial, Pod Security, a quota), which no Role binding fixes
RBAC_DENIAL = re.compile(r'cannot [\w*]+ resource "')
IN_CLUSTER_NS = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
# kind -> (group/version, plural) for what llmpipe k8s reads and writes
KINDS = {
    "ConfigMap": ("v1", "configmaps"),
    "Secret": ("v1", "secrets"),
    "ServiceAccount": ("v1", "serviceaccounts"),
    "PersistentVolumeClaim": ("v1", "persistentvolumeclaims"),
    "Pod": ("v1", "pods"),
    "Event": ("v1", "events"),
    "Job": ("batch/v1", "jobs"),
    "PyTorchJob": ("kubeflow.org/v1", "pytorchjobs"),
    "Deployment": ("apps/v1", "deployments"),
}


class K8sError(PipelineError):
    """A problem talking to the cluster: config, reachability, permissions, missing objects."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class NotFound(K8sError):
    pass


def _kubeconfig_paths(explicit: str | None) -> str:
    return explicit or os.environ.get("KUBECONFIG") or str(Path("~/.kube/config").expanduser())


def _existing(paths: str) -> list[str]:
    return [p for p in (os.path.expanduser(x) for x in paths.split(os.pathsep)) if p and os.path.exists(p)]


def _in_cluster() -> bool:
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST")) and Path("/var/run/secrets/kubernetes.io/serviceaccount/token").exists()


def cluster_configured(kubeconfig: str | None = None) -> bool:
    """Whether there is a cluster to talk to at all: a kubeconfig file, or a pod's service account."""
    return bool(_existing(_kubeconfig_paths(kubeconfig))) or (_in_cluster() and not kubeconfig)


def context_namespace(kubeconfig: str | None = None, context: str | None = None) -> str | None:
    """The namespace of the kubeconfig's (current or named) context, if it sets one; never raises."""
    try:
        from kubernetes import config

        paths = _kubeconfig_paths(kubeconfig)
        if not _existing(paths):
            return IN_CLUSTER_NS.read_text().strip() if _in_cluster() and IN_CLUSTER_NS.exists() else None
        contexts, current = config.list_kube_config_contexts(config_file=paths)
        chosen = next((c for c in contexts if c.get("name") == context), None) if context else current
        return ((chosen or {}).get("context") or {}).get("namespace")
    except Exception:  # a broken kubeconfig is reported when we connect, not here
        return None


def resolve_namespace(explicit: str | None, kubeconfig: str | None = None, context: str | None = None) -> str:
    return explicit or os.environ.get("LLMPIPE_NAMESPACE") or context_namespace(kubeconfig, context) or DEFAULT_NAMESPACE


def _status_message(exc: Any) -> str:
    """The ``message`` of the API's Status body, else the first line of the body, else the HTTP reason."""
    body = getattr(exc, "body", None)
    if body:
        text = body.decode("utf-8", "replace") if isinstance(body, bytes) else str(body)
        try:
            data = json.loads(text)
            if isinstance(data, dict) and data.get("message"):
                return str(data["message"])
        except ValueError:
            if text.strip():
                return text.strip().splitlines()[0]
    return str(getattr(exc, "reason", "") or exc)


def _is_status(exc: Any) -> bool:
    try:
        return json.loads(exc.body).get("kind") == "Status"
    except Exception:
        return False


def api_path(api_version: str, plural: str, namespace: str, name: str | None = None, sub: str | None = None) -> str:
    base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    path = f"{base}/namespaces/{namespace}/{plural}"
    return path + (f"/{name}" if name else "") + (f"/{sub}" if sub else "")


class Kube:
    """A connection to one cluster and namespace."""

    def __init__(self, namespace: str | None = None, kubeconfig: str | None = None, context: str | None = None,
                 request_timeout: float = 30.0):
        from kubernetes import config
        from kubernetes.client import ApiClient, Configuration
        from kubernetes.config.config_exception import ConfigException

        cfg = Configuration()
        paths = _kubeconfig_paths(kubeconfig)
        try:
            if _existing(paths):
                config.load_kube_config(config_file=paths, context=context, client_configuration=cfg, persist_config=False)
                where = f"kubeconfig {paths}"
            elif _in_cluster() and not kubeconfig:
                config.load_incluster_config(client_configuration=cfg)
                where = "the pod's service account"
            else:
                raise K8sError(f"no kubeconfig at {paths}: set $KUBECONFIG or --kubeconfig, or create ~/.kube/config "
                               "(`kubectl config view` shows what you have)")
        except ConfigException as exc:
            raise K8sError(f"cannot use {paths}: {str(exc).strip().splitlines()[0]}") from None
        except (OSError, ValueError) as exc:  # unreadable or malformed YAML, missing cert files
            raise K8sError(f"cannot use {paths}: {exc}") from None
        cfg.retries = 2
        self.config_source = where
        self.server = cfg.host
        self.namespace = resolve_namespace(namespace, kubeconfig, context)
        self.timeout = request_timeout
        self.api = ApiClient(cfg)

    # ------------------------------------------------------------------ one request
    def request(self, method: str, path: str, *, what: str, query: dict[str, Any] | None = None, body: Any = None,
                missing_ok: bool = False, stream: bool = False, content_type: str = "application/json") -> Any:
        """One API call. Returns the JSON body as a dict (text for logs; None for a missing object
        when ``missing_ok``), or the open urllib3 response when ``stream``."""
        import urllib3
        from kubernetes.client.exceptions import ApiException

        headers = {"Accept": "application/json, */*"}
        if body is not None:
            headers["Content-Type"] = content_type
        params = self.api.param_serialize(method=method, resource_path=path,
                                          query_params=[(k, v) for k, v in (query or {}).items() if v is not None],
                                          header_params=headers, body=body, auth_settings=["BearerToken"])
        try:
            resp = self.api.call_api(*params, _request_timeout=None if stream else self.timeout)
            if not 200 <= resp.status <= 299:
                resp.read()
                raise ApiException.from_response(http_resp=resp, body=None, data=None)
            if stream:
                return resp.response
            data = resp.read()
        except ApiException as exc:
            if exc.status == 404 and missing_ok and _is_status(exc):  # the object is missing, not its kind
                return None
            raise self.error(exc, what) from None
        except urllib3.exceptions.HTTPError as exc:
            reason = getattr(exc, "reason", None) or exc
            raise K8sError(f"cannot reach the Kubernetes API at {self.server} ({self.config_source}) to {what}: "
                           f"{_short(reason)}") from None
        text = data.decode("utf-8", "replace") if isinstance(data, bytes) else str(data or "")
        if "json" in (resp.headers.get("content-type") or ""):
            return json.loads(text) if text.strip() else None
        return text

    def error(self, exc: Any, what: str) -> K8sError:
        err = self._error(exc, what)
        err.status = exc.status
        return err

    def _error(self, exc: Any, what: str) -> K8sError:
        msg = _status_message(exc)
        if exc.status == 401:
            return K8sError(f"unauthorized at {self.server}: the credentials from {self.config_source} were rejected "
                            f"(log in again or refresh the token) [{what}]")
        if exc.status == 403 and RBAC_DENIAL.search(msg):
            return K8sError(f"forbidden: {msg} (bind your account to the llmpipe-submitter Role of k8s/rbac.yaml "
                            f"in namespace {self.namespace})")
        if exc.status == 404:
            if not _is_status(exc):
                return NotFound(f"the API at {self.server} does not serve this kind of object ({what}): {msg}; "
                                "is its CRD installed?")
            if msg.startswith("namespaces "):
                return NotFound(f"namespace {self.namespace} does not exist: create it (`kubectl create namespace "
                                f"{self.namespace}`) or pick another with -n / $LLMPIPE_NAMESPACE")
            return NotFound(f"not found in namespace {self.namespace}: {msg}")
        return K8sError(f"the Kubernetes API refused to {what}: {exc.status} {msg}")

    # ------------------------------------------------------------------ objects
    def get(self, api_version: str, plural: str, name: str, *, what: str, missing_ok: bool = False,
            namespace: str | None = None) -> dict | None:
        return self.request("GET", api_path(api_version, plural, namespace or self.namespace, name), what=what,
                            missing_ok=missing_ok)

    def create(self, api_version: str, plural: str, body: dict, *, what: str, namespace: str | None = None) -> dict:
        return self.request("POST", api_path(api_version, plural, namespace or self.namespace), body=body, what=what)

    def replace(self, api_version: str, plural: str, name: str, body: dict, *, what: str,
                namespace: str | None = None) -> dict:
        return self.request("PUT", api_path(api_version, plural, namespace or self.namespace, name), body=body,
                            what=what)

    def patch(self, api_version: str, plural: str, name: str, body: dict, *, what: str,
              namespace: str | None = None) -> dict:
        """A JSON merge patch (RFC 7386: a key set to None is removed), which every kind accepts."""
        return self.request("PATCH", api_path(api_version, plural, namespace or self.namespace, name), body=body,
                            what=what, content_type="application/merge-patch+json")

    def delete(self, api_version: str, plural: str, name: str, *, what: str, propagation: str = "Background",
               namespace: str | None = None, missing_ok: bool = False) -> Any:
        body = {"apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": propagation}
        return self.request("DELETE", api_path(api_version, plural, namespace or self.namespace, name), body=body,
                            what=what, missing_ok=missing_ok)

    def list(self, kind: str, *, what: str, labels: str | None = None, fields: str | None = None) -> list[dict]:
        api_version, plural = KINDS[kind]
        res = self.request("GET", api_path(api_version, plural, self.namespace), what=what,
                           query={"labelSelector": labels, "fieldSelector": fields})
        items = (res or {}).get("items") or []
        for obj in items:  # list items of typed kinds come without kind/apiVersion
            obj.setdefault("kind", kind)
            obj.setdefault("apiVersion", api_version)
        return items

    def list_jobs(self, selector: str) -> list[dict]:
        return self.list("Job", labels=selector, what="list Jobs")

    def list_pytorchjobs(self, selector: str) -> list[dict]:
        """PyTorchJobs; an empty list when the training operator's CRD is not installed."""
        try:
            return self.list("PyTorchJob", labels=selector, what="list PyTorchJobs")
        except NotFound:
            return []

    def list_pods(self, selector: str) -> list[dict]:
        return self.list("Pod", labels=selector, what="list pods")

    def warning_events(self, name: str) -> list[dict]:
        """Warning events about one object, oldest first."""
        items = self.list("Event", fields=f"involvedObject.name={name},type=Warning", what="list events")
        items = [e for e in items if e.get("type") == "Warning"]
        return sorted(items, key=lambda e: e.get("lastTimestamp") or e.get("eventTime") or "")

    def pod_log(self, pod: str, container: str | None = None, tail: int | None = None) -> str:
        text = self.request("GET", api_path("v1", "pods", self.namespace, pod, "log"), what=f"read the log of pod {pod}",
                            query={"container": container, "tailLines": tail})
        return text if isinstance(text, str) else ""

    def follow_log(self, pod: str, container: str | None = None, tail: int | None = None) -> Iterator[str]:
        """The pod's log line by line as it is written, until the container ends."""
        from kubernetes.watch.watch import iter_resp_lines

        resp = self.request("GET", api_path("v1", "pods", self.namespace, pod, "log"), stream=True,
                            what=f"follow the log of pod {pod}",
                            query={"container": container, "tailLines": tail, "follow": "true"})
        try:
            yield from iter_resp_lines(resp)
        finally:
            resp.release_conn()


def _short(reason: Any) -> str:
    text = str(reason)
    for marker in ("Connection refused", "Name or service not known", "timed out", "No route to host",
                   "certificate verify failed", "Temporary failure in name resolution"):
        if marker.lower() in text.lower():
            return marker.lower()
    return text.splitlines()[0][:200] if text else "connection failed"
