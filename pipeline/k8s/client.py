"""The Kubernetes API through the official python client, every failure turned into one line.

``Kube`` loads the kubeconfig (``--kubeconfig``, else ``$KUBECONFIG``, else ``~/.kube/config``,
else the pod's service account when running in a cluster), picks the namespace
(``-n``, else ``$LLMPIPE_NAMESPACE``, else the kubeconfig context's, else ``llm-pipeline``) and
wraps every call so that an ``ApiException`` or a connection error becomes a ``K8sError``
with one line: unauthorized, forbidden (with the RBAC message), not found, unreachable.
Objects are handled as plain dicts in the API's own JSON shape (camelCase), whether they
came from a typed API (Job, Pod) or from ``CustomObjectsApi`` (PyTorchJob).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

from pipeline.errors import PipelineError
from pipeline.k8s import DEFAULT_NAMESPACE

PYTORCHJOB = ("kubeflow.org", "v1", "pytorchjobs")
IN_CLUSTER_NS = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


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
    """The ``message`` of the API's Status body, else the HTTP reason."""
    body = getattr(exc, "body", None)
    if body:
        try:
            data = json.loads(body)
            if isinstance(data, dict) and data.get("message"):
                return str(data["message"])
        except (ValueError, TypeError):
            text = body.decode() if isinstance(body, bytes) else str(body)
            return text.strip().splitlines()[0] if text.strip() else str(exc.reason)
    return str(getattr(exc, "reason", "") or exc)


def _is_status(exc: Any) -> bool:
    try:
        return json.loads(exc.body).get("kind") == "Status"
    except Exception:
        return False


class Kube:
    """A connection to one cluster and namespace."""

    def __init__(self, namespace: str | None = None, kubeconfig: str | None = None, context: str | None = None,
                 request_timeout: float = 30.0):
        from kubernetes import client, config
        from kubernetes.config.config_exception import ConfigException

        cfg = client.Configuration()
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
        self.api = client.ApiClient(cfg)
        self.core = client.CoreV1Api(self.api)
        self.batch = client.BatchV1Api(self.api)
        self.custom = client.CustomObjectsApi(self.api)

    # ------------------------------------------------------------------ calls
    def call(self, fn: Callable[..., Any], *args: Any, what: str, missing_ok: bool = False, stream: bool = False,
             **kwargs: Any) -> Any:
        """Call one API method; the API's JSON comes back as a dict (text for logs), or the open
        response when ``stream``. ``what`` names the call in errors.

        Responses are read raw rather than through the client's typed models: the models reject
        objects that lack a field the OpenAPI spec calls required, which real servers do send.
        """
        import pydantic
        import urllib3
        from kubernetes.client.exceptions import ApiException

        kwargs["_preload_content"] = False
        if not stream:
            kwargs.setdefault("_request_timeout", self.timeout)
        try:
            resp = fn(*args, **kwargs)
            if stream:
                return resp
            data = resp.data
        except ApiException as exc:
            if exc.status == 404 and missing_ok and _is_status(exc):  # the object is missing, not its kind
                return None
            raise self.error(exc, what) from None
        except urllib3.exceptions.HTTPError as exc:
            reason = getattr(exc, "reason", None) or exc
            raise K8sError(f"cannot reach the Kubernetes API at {self.server} ({self.config_source}) to {what}: "
                           f"{_short(reason)}") from None
        except pydantic.ValidationError as exc:  # a request body that does not fit the API schema
            err = exc.errors()[0]
            loc = ".".join(str(x) for x in err["loc"][1:])
            raise K8sError(f"cannot {what}: {loc}: {err['msg']} (the Kubernetes API schema of client "
                           f"{_client_version()} does not allow it)") from None
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
        if exc.status == 403:
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

    # ------------------------------------------------------------------ listing
    def list_jobs(self, selector: str) -> list[dict]:
        res = self.call(self.batch.list_namespaced_job, self.namespace, label_selector=selector, what="list Jobs")
        return [_with_kind(o, "Job", "batch/v1") for o in res.get("items") or []]

    def list_pytorchjobs(self, selector: str) -> list[dict]:
        """PyTorchJobs; an empty list when the training operator's CRD is not installed."""
        try:
            res = self.call(self.custom.list_namespaced_custom_object, *PYTORCHJOB[:2], self.namespace, PYTORCHJOB[2],
                            label_selector=selector, what="list PyTorchJobs")
        except NotFound:
            return []
        return [_with_kind(o, "PyTorchJob", "kubeflow.org/v1") for o in res.get("items") or []]

    def list_pods(self, selector: str) -> list[dict]:
        res = self.call(self.core.list_namespaced_pod, self.namespace, label_selector=selector, what="list pods")
        return [_with_kind(o, "Pod", "v1") for o in res.get("items") or []]

    def warning_events(self, name: str) -> list[dict]:
        """Warning events about one object, oldest first."""
        res = self.call(self.core.list_namespaced_event, self.namespace,
                        field_selector=f"involvedObject.name={name},type=Warning", what="list events")
        items = [e for e in res.get("items") or [] if e.get("type") == "Warning"]
        return sorted(items, key=lambda e: e.get("lastTimestamp") or e.get("eventTime") or "")

    def pod_log(self, pod: str, container: str | None = None, tail: int | None = None) -> str:
        kwargs: dict[str, Any] = {"container": container} if container else {}
        if tail is not None:
            kwargs["tail_lines"] = tail
        text = self.call(self.core.read_namespaced_pod_log, pod, self.namespace, what=f"read the log of pod {pod}",
                         **kwargs)
        return text if isinstance(text, str) else ""


def _with_kind(obj: dict, kind: str, api_version: str) -> dict:
    obj.setdefault("kind", kind)
    obj.setdefault("apiVersion", api_version)
    return obj


def _client_version() -> str:
    import kubernetes

    return kubernetes.__version__


def _short(reason: Any) -> str:
    text = str(reason)
    for marker in ("Connection refused", "Name or service not known", "timed out", "No route to host",
                   "certificate verify failed", "Temporary failure in name resolution"):
        if marker.lower() in text.lower():
            return marker.lower()
    return text.splitlines()[0][:200] if text else "connection failed"
