"""MLflow tracking: one parent run per pipeline run, one nested run per stage.

Where runs go:

* ``$MLFLOW_TRACKING_URI`` when set (a server on a cluster: ``http://mlflow.llm-pipeline:5000``);
* else the embedded default: SQLite under the run root, ``<root>/mlflow/mlflow.db``, with artefacts
  in ``<root>/mlflow/artifacts`` (``mlflow ui --backend-store-uri sqlite:///<root>/mlflow/mlflow.db``);
* nothing with ``LLMPIPE_TRACKING=off`` (or an object-store root and no tracking URI).

A stage run holds: params = the resolved config (flattened, dotted keys), tags (stage, config hash,
output fingerprint, code version, run root), metrics = the numeric metrics of the manifest, step
metrics while training (loss, lr, grad norm, tokens/s ... from the training loops), and the
stage's report files (the stage's ``ARTIFACTS`` globs) plus ``manifest.json``.

Tracking never stops the work: an unreachable server, a bad URI or a failing call prints one
warning and the stage goes on with its local files (manifest, metrics.jsonl) as the record.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import math
import os
import re
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Iterable, Iterator

# mlflow (~1.5 s to import) and transformers (hf_callback) are imported where they are used: the
# runner imports this module for every stage, tracking can be off, and most stages never train.

EXPERIMENT_DEFAULT = "llm-pipeline"
PARENT_ENV = "LLMPIPE_MLFLOW_PARENT_RUN_ID"
_KEY_BAD = re.compile(r"[^A-Za-z0-9_\-. /]")
_PARAM_VALUE_MAX = 6000

_active: "Tracker | None" = None  # the stage run of this process, for step metrics


def warn(message: str) -> None:
    print(f"warning: mlflow: {message}", file=sys.stderr, flush=True)


def disabled_by_env() -> bool:
    return os.environ.get("LLMPIPE_TRACKING", "").strip().lower() in ("0", "off", "false", "no", "none")


def resolve_uri(storage: Any) -> str | None:
    """The tracking URI for a run root, or None when tracking is off."""
    if disabled_by_env():
        return None
    env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if env:
        return env
    if storage is not None and storage.is_local:
        return sqlite_uri(storage.path("mlflow", "mlflow.db"))
    return None


def sqlite_uri(path: str) -> str:
    """``sqlite:///`` + the absolute path, percent-encoded: SQLAlchemy decodes the path part, so a root named with
    ``%20`` or ``#`` would otherwise open another file (or none)."""
    return "sqlite:///" + urllib.parse.quote(os.path.abspath(path), safe="/")


def sqlite_path(uri: str) -> str | None:
    """The file of a ``sqlite:///`` URI (decoded), else None."""
    return urllib.parse.unquote(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def embedded_artifact_root(uri: str) -> str | None:
    """Artefacts of the embedded SQLite store live beside it (not in ./mlruns of the caller's cwd), as a file URI
    with the path percent-encoded (a ``#`` in the root would otherwise end the path)."""
    path = sqlite_path(uri)
    return Path(os.path.dirname(path), "artifacts").as_uri() if path else None


def ui_command(uri: str) -> str:
    if uri.startswith("sqlite:///"):
        return f"mlflow ui --backend-store-uri {uri} --port 5000"
    return f"open {uri}"


def reachable(uri: str, timeout: float = 3.0) -> str | None:
    """None when the tracking server answers; else why not (one line). Non-HTTP URIs are local."""
    if not uri.startswith(("http://", "https://")):
        return None
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as resp:  # noqa: S310
            if resp.status >= 400:
                return f"{uri}/health answered HTTP {resp.status}"
        return None
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):  # behind auth: the server is up, mlflow has the credentials
            return None
        return f"{uri}/health answered HTTP {exc.code}"
    except Exception as exc:  # noqa: BLE001
        return f"{uri} is unreachable ({getattr(exc, 'reason', exc)})"


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists of scalars stay values, lists of dicts get indices."""
    out: dict[str, Any] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(obj, list) and any(isinstance(v, dict) for v in obj):
        for i, v in enumerate(obj):
            out.update(flatten(v, f"{prefix}{i}."))
    else:
        out[prefix[:-1]] = obj
    return out


def metric_key(key: str) -> str:
    return _KEY_BAD.sub("_", key)[:250]


def numeric_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in flatten(metrics).items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if math.isfinite(float(v)):
            out[metric_key(k)] = float(v)
    return out


def params_of(config: dict[str, Any]) -> dict[str, str]:
    out = {}
    for k, v in flatten(config).items():
        text = v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)
        out[metric_key(k)] = text[:_PARAM_VALUE_MAX]
    return out


class Tracker:
    """One MLflow run (a stage or a pipeline), or a no-op when tracking is off or broken."""

    def __init__(self, uri: str | None):
        self.uri = uri
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self._client: Any = None

    @property
    def on(self) -> bool:
        return self._client is not None and self.run_id is not None

    def _fail(self, what: str, exc: BaseException) -> None:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        warn(f"{what} failed ({msg[:300]}); tracking is off for this run, local files keep the record")
        self._client = None

    def start(self, name: str, *, parent: str | None = None, tags: dict[str, str] | None = None) -> "Tracker":
        if not self.uri:
            return self
        why = reachable(self.uri)
        if why:
            warn(f"{why}; going on without tracking (metrics stay in the local files)")
            return self
        try:
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
            if sqlite_path(self.uri):
                os.makedirs(os.path.dirname(sqlite_path(self.uri)), exist_ok=True)  # type: ignore[arg-type]
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
            self.experiment_id = experiment_id(self._client, self.uri)
            all_tags = {"mlflow.runName": name, **(tags or {})}
            if parent:
                all_tags["mlflow.parentRunId"] = parent
            run = self._client.create_run(self.experiment_id, tags=all_tags, run_name=name)
            self.run_id = run.info.run_id
        except Exception as exc:  # noqa: BLE001
            self._fail(f"starting a run at {self.uri}", exc)
        return self

    # -- logging; each call is guarded
    def params(self, params: dict[str, str]) -> None:
        if not self.on:
            return
        try:
            from mlflow.entities import Param

            items = [Param(k, v) for k, v in params.items()]
            for i in range(0, len(items), 100):
                self._client.log_batch(self.run_id, params=items[i : i + 100])
        except Exception as exc:  # noqa: BLE001
            self._fail("logging params", exc)

    def tags(self, tags: dict[str, Any]) -> None:
        if not self.on:
            return
        try:
            from mlflow.entities import RunTag

            items = [RunTag(k, str(v)[:5000]) for k, v in tags.items() if v is not None]
            for i in range(0, len(items), 100):
                self._client.log_batch(self.run_id, tags=items[i : i + 100])
        except Exception as exc:  # noqa: BLE001
            self._fail("logging tags", exc)

    def metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if not self.on or not metrics:
            return
        try:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            items = [Metric(k, v, now, step or 0) for k, v in metrics.items()]
            for i in range(0, len(items), 1000):
                self._client.log_batch(self.run_id, metrics=items[i : i + 1000])
        except Exception as exc:  # noqa: BLE001
            self._fail("logging metrics", exc)

    def artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        if not self.on:
            return
        try:
            self._client.log_artifact(self.run_id, local_path, artifact_path)
        except Exception as exc:  # noqa: BLE001
            self._fail(f"uploading {os.path.basename(local_path)}", exc)

    def end(self, status: str = "FINISHED") -> None:
        if not self.on:
            return
        try:
            self._client.set_terminated(self.run_id, status)
        except Exception as exc:  # noqa: BLE001
            self._fail("closing the run", exc)


def experiment_id(client: Any, uri: str) -> str:
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or EXPERIMENT_DEFAULT
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    return client.create_experiment(name, artifact_location=embedded_artifact_root(uri))


# ------------------------------------------------------------------------------ step metrics


def log_step(record: dict[str, Any], step: int | None = None) -> None:
    """Step metrics from a training loop (rank 0) into the stage run of this process, if any."""
    if _active is None or not _active.on:
        return
    step = int(record.get("step", step or 0) or 0)
    _active.metrics({k: v for k, v in numeric_metrics(record).items() if k != "step"}, step=step)


def hf_callback() -> Any:
    """A transformers TrainerCallback forwarding the Trainer's logs to the stage run."""
    from transformers import TrainerCallback

    class MlflowForward(TrainerCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
            if logs and state.is_world_process_zero:
                log_step(dict(logs), step=state.global_step)

    return MlflowForward()


# ------------------------------------------------------------------------------ stage runs


@contextlib.contextmanager
def stage_run(stage: str, storage: Any, config: dict[str, Any], chash: str) -> Iterator[Tracker]:
    """The nested MLflow run around one stage's work; made the process's active run for step metrics."""
    global _active
    tracker = Tracker(resolve_uri(storage)).start(
        stage,
        parent=os.environ.get(PARENT_ENV) or None,
        tags={"llmpipe.stage": stage, "llmpipe.config_hash": chash, "llmpipe.run_root": storage.uri},
    )
    tracker.params(params_of(config))
    previous, _active = _active, tracker
    try:
        yield tracker
    except BaseException:
        tracker.end("FAILED")
        raise
    finally:
        _active = previous


def finish_stage(tracker: Tracker, artifacts: Iterable[str], storage: Any, name: str, manifest: dict[str, Any]) -> None:
    """After the commit: metrics, tags and report artefacts (``artifacts``: globs of the stage's report files)
    of the committed output, then close the run."""
    if not tracker.on:
        return
    try:
        _log_committed(tracker, artifacts, storage, name, manifest)
    except Exception as exc:  # noqa: BLE001 - the output is committed; tracking must not fail the stage now
        tracker._fail("logging the committed output", exc)
        return
    tracker.end()


def _log_committed(tracker: Tracker, artifacts: Iterable[str], storage: Any, name: str, manifest: dict[str, Any]) -> None:
    tracker.metrics(numeric_metrics(manifest.get("metrics") or {}))
    tracker.tags({"llmpipe.fingerprint": manifest.get("fingerprint"), "llmpipe.code_version": manifest.get("code_version"),
                  "llmpipe.output": storage.url(name)})
    patterns = list(artifacts)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "manifest.json")
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(manifest, fh, indent=2, ensure_ascii=False)
        tracker.artifact(path)
        for entry in manifest.get("files", []):
            rel = entry["path"]
            if not any(fnmatch.fnmatch(rel, p) for p in patterns):
                continue
            local = os.path.join(tmp, "files", rel)
            os.makedirs(os.path.dirname(local), exist_ok=True)
            storage.fs.get(storage.path(name, rel), local)
            tracker.artifact(local, os.path.dirname(rel) or None)


def note_up_to_date(stage: str, storage: Any, manifest: dict[str, Any]) -> None:
    """A stage the pipeline skipped still shows in the parent run, pointing at the run that made it."""
    parent = os.environ.get(PARENT_ENV)
    if not parent:
        return
    tracker = Tracker(resolve_uri(storage)).start(
        stage, parent=parent,
        tags={"llmpipe.stage": stage, "llmpipe.status": "up to date", "llmpipe.config_hash": manifest.get("config_hash", ""),
              "llmpipe.fingerprint": manifest.get("fingerprint", ""), "llmpipe.made_by_run": manifest.get("mlflow_run_id") or ""},
    )
    tracker.metrics(numeric_metrics(manifest.get("metrics") or {}))
    tracker.end()


@contextlib.contextmanager
def pipeline_run(storage: Any, name: str, tags: dict[str, str]) -> Iterator[Tracker]:
    """The parent run of `llmpipe pipeline`: stage runs started meanwhile (in this process or in
    launcher subprocesses, through the environment) nest under it."""
    tracker = Tracker(resolve_uri(storage)).start(name, tags={"llmpipe.kind": "pipeline", "llmpipe.run_root": storage.uri, **tags})
    old = os.environ.get(PARENT_ENV)
    if tracker.on:
        os.environ[PARENT_ENV] = tracker.run_id  # type: ignore[assignment]
    try:
        yield tracker
    except BaseException:
        tracker.end("FAILED")
        raise
    else:
        tracker.end()
    finally:
        if old is None:
            os.environ.pop(PARENT_ENV, None)
        else:
            os.environ[PARENT_ENV] = old
