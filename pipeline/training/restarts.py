"""The restart budget of a training stage on a cluster: how many times in a row it may start again from the same
checkpoint before it gives up.

On Kubernetes, the Kubeflow training operator (v1.8.1) recreates a PyTorchJob pod whose container exited with a code
of 128 or more (a signal: preemption, eviction, an OOM kill) with no bound: its ``backoffLimit`` counts container
restarts, which ``restartPolicy: Never`` keeps at 0. A pod that is killed the same way every time (it runs out of
memory at the same step, a node pool that keeps preempting it) would run forever. So the stage bounds it itself:
:func:`count_start`, on rank 0 once the resume step is known, records every start in ``<checkpoint root>/restarts.json``
(``{"job": ..., "step": ..., "starts": n}``) and raises :class:`RestartBudgetExceeded` (exit 1, which the operator
does not restart) when the stage has started more than ``LLMPIPE_MAX_RESTARTS`` + 1 times from the same step.
Restarts that reached a new checkpoint (a different resume step) start the count again, so a long run that is
preempted now and then never runs out.

``LLMPIPE_JOB_ID`` names one deploy (the Helm chart sets it, with ``LLMPIPE_MAX_RESTARTS``); another id starts
a new count. Without it (a local run, a test) nothing is counted or written.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Mapping

from pipeline.errors import ConfigError, PipelineError

RESTARTS_FILE = "restarts.json"
JOB_ENV = "LLMPIPE_JOB_ID"
LIMIT_ENV = "LLMPIPE_MAX_RESTARTS"
DEFAULT_LIMIT = 3


class RestartBudgetExceeded(PipelineError):
    """The stage started again from the same checkpoint more often than ``LLMPIPE_MAX_RESTARTS`` allows."""

    exit_code = 1


def restart_limit(env: Mapping[str, str]) -> int:
    """``LLMPIPE_MAX_RESTARTS`` (default 3): restarts allowed from one step; ConfigError when it is not a whole
    number >= 0."""
    raw = env.get(LIMIT_ENV, "").strip()
    if not raw:
        return DEFAULT_LIMIT
    try:
        limit = int(raw)
    except ValueError:
        limit = -1
    if limit < 0:
        raise ConfigError(f"{LIMIT_ENV}={raw!r} is not a whole number of restarts (0 or more)")
    return limit


def _read(path: Path) -> dict[str, Any]:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _write(path: Path, record: dict[str, Any]) -> None:
    """``record`` to ``path`` atomically: a temporary file beside it, then ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def count_start(stage: str, root: str | os.PathLike[str], step: int, *, main: bool = True,
                env: Mapping[str, str] | None = None, log: Callable[[str], None] = _stderr) -> int | None:
    """Count this start of ``stage`` from ``step`` (the resume step, 0 without a checkpoint) in
    ``<root>/restarts.json``; ``root`` is the stage's checkpoint folder. Returns the starts from this step in a row
    (1: the first), or None when nothing is counted (not rank 0, or no ``LLMPIPE_JOB_ID`` in ``env``, default
    ``os.environ``). Raises :class:`RestartBudgetExceeded` when the restarts from this step exceed the limit."""
    env = os.environ if env is None else env
    job = env.get(JOB_ENV, "").strip()
    if not main or not job:
        return None
    limit = restart_limit(env)
    path = Path(root) / RESTARTS_FILE
    before = _read(path)
    same = before.get("job") == job and before.get("step") == step and isinstance(before.get("starts"), int)
    starts = before["starts"] + 1 if same else 1
    _write(path, {"job": job, "step": step, "starts": starts})
    if starts - 1 > limit:
        raise RestartBudgetExceeded(
            f"{stage}: started {starts} times from step {step} without reaching a new checkpoint "
            f"({LIMIT_ENV}={limit}): giving up; the earlier pods' logs say why")
    if starts > 1:
        log(f"{stage}: restart {starts - 1}/{limit} from step {step} (job {job})")
    return starts
