"""``llmpipe k8s wait``: poll a stage's workloads until the completion object succeeds, a
workload fails, or the timeout passes; show progress and explain what goes wrong.

Polling (every ``interval`` seconds, a few list calls) rather than watches: it needs only
``list`` permission, survives API server restarts and is cheap at this scale.
"""

from __future__ import annotations

import datetime as dt
import shutil
import sys
import time
from typing import TextIO

from pipeline.errors import PipelineError
from pipeline.k8s.client import K8sError, Kube, NotFound
from pipeline.k8s.explain import explain_failure, explain_stuck
from pipeline.k8s.state import Snapshot, duration, snapshot

API_GRACE = 300.0  # seconds the API may be unreachable during a wait before wait gives up


def transient(exc: K8sError) -> bool:
    """Unreachable, or a server-side 5xx / 429: worth retrying."""
    return (exc.status is None and "cannot reach" in str(exc)) or (exc.status or 0) >= 500 or exc.status == 429


class StageFailed(PipelineError):
    """The stage's Job or PyTorchJob failed; the message is the explanation, one line per cause."""

    exit_code = 1

    def __init__(self, headline: str, lines: list[str]):
        self.lines = lines
        super().__init__("\n".join([headline] + [f"  {ln}" for ln in lines]))


class WaitTimeout(StageFailed):
    exit_code = 124  # like timeout(1)


def parse_duration(text: str | float | None) -> float | None:
    """'90', '90s', '15m', '2h', '1d' -> seconds; None or 0 -> no limit."""
    if text is None:
        return None
    if isinstance(text, (int, float)):
        return float(text) or None
    value = str(text).strip().lower()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        seconds = float(value[:-1]) * units[value[-1]] if value and value[-1] in units else float(value)
    except ValueError:
        raise PipelineError(f"--timeout {text!r}: give seconds or a number with s, m, h or d (e.g. 90, 15m, 2h)") from None
    if seconds < 0:
        raise PipelineError(f"--timeout {text!r} is negative")
    return seconds or None


class Progress:
    """One status line: rewritten in place on a terminal, printed when it changes otherwise."""

    def __init__(self, out: TextIO, heartbeat: float = 60.0):
        self.out = out
        self.tty = bool(getattr(out, "isatty", lambda: False)())
        self.showing = False
        self.last_key: str | None = None
        self.last_print = 0.0
        self.heartbeat = heartbeat

    def update(self, key: str, line: str) -> None:
        now = time.monotonic()
        if self.tty:  # one line that fits, or the terminal wraps it and \r no longer rewrites it
            width = shutil.get_terminal_size().columns - 1
            self.out.write("\r\033[K" + (line if len(line) <= width else line[: max(width - 3, 10)] + "..."))
            self.showing = True
        elif key != self.last_key or now - self.last_print >= self.heartbeat:
            self.out.write(line + "\n")
            self.last_print = now
        self.last_key = key
        self.out.flush()

    def write(self, line: str) -> None:
        if self.showing:
            self.out.write("\r\033[K")
            self.showing = False
        self.out.write(line + "\n")
        self.out.flush()

    def close(self) -> None:
        if self.showing:
            self.out.write("\n")
            self.showing = False
        self.out.flush()


def progress_line(snap: Snapshot, elapsed: float) -> tuple[str, str]:
    """(what changed, the line): pods by phase, completions, workload states, elapsed."""
    phases = snap.phases()
    done = sum(min(w.succeeded, w.total) for w in snap.workloads)
    total = sum(w.total for w in snap.workloads)
    states = ", ".join(f"{w.kind} {w.name} {w.state}" for w in snap.workloads)
    key = (f"{done}/{total} done; pods {phases['Running']} running, {phases['Pending']} pending, "
           f"{phases['Succeeded']} succeeded, {phases['Failed']} failed; {states}")
    return key, f"[{duration(elapsed):>6}] {snap.stage}: {key}"


def wait_for(kube: Kube, stage: str, timeout: float | None = None, interval: float = 5.0, fail_fast: bool = False,
             out: TextIO | None = None) -> Snapshot:
    """Block until the stage finishes. Returns the final snapshot; raises StageFailed / WaitTimeout."""
    out = out or sys.stderr
    progress = Progress(out)
    start = last_ok = time.monotonic()
    warned: set[str] = set()
    try:
        while True:
            try:
                snap = snapshot(kube, stage)
                last_ok = time.monotonic()
            except K8sError as exc:  # an API server restart or a network blip must not end a days-long wait
                if not transient(exc) or time.monotonic() - last_ok > API_GRACE:
                    raise
                note = f"warning: {exc} (retrying for up to {duration(API_GRACE)})"
                if note not in warned:
                    warned.add(note)
                    progress.write(note)
                time.sleep(interval)
                continue
            elapsed = time.monotonic() - start
            if not snap.workloads:
                raise NotFound(f"no Job or PyTorchJob of stage {stage} in namespace {kube.namespace}: submit it first "
                               f"(`llmpipe k8s submit {stage}`), or pick the namespace with -n")
            if snap.failed:
                lines = explain_failure(snap, kube)
                progress.close()
                raise StageFailed(f"{stage} failed after {duration(elapsed)} (namespace {kube.namespace}):", lines)
            if snap.succeeded:
                key, line = progress_line(snap, elapsed)
                progress.update(key, line)
                progress.close()
                return snap
            stuck, fatal = explain_stuck(snap, kube)
            for line in stuck:
                if line not in warned:
                    warned.add(line)
                    progress.write(f"warning: {line}")
            if fail_fast and fatal:
                progress.close()
                raise StageFailed(f"{stage} cannot finish (--fail-fast, after {duration(elapsed)}):", stuck)
            key, line = progress_line(snap, elapsed)
            progress.update(key, line)
            if timeout is not None and elapsed >= timeout:
                progress.close()
                why = stuck or [line.split("] ", 1)[-1]]
                raise WaitTimeout(f"{stage} did not finish within {duration(timeout)} (namespace {kube.namespace}):", why)
            pause = interval if timeout is None else max(0.0, min(interval, timeout - elapsed))
            time.sleep(pause)
    finally:
        progress.close()


def _seconds(timestamp: str | None) -> float | None:
    try:
        return dt.datetime.fromisoformat(str(timestamp).replace("Z", "+00:00")).timestamp() if timestamp else None
    except ValueError:
        return None


def summary(snap: Snapshot, waited: float) -> str:
    """'clean succeeded (Job llmpipe-clean-merge) in 12m03s': the stage's own start to finish when
    the status says so, else how long we waited."""
    finishers = ", ".join(f"{w.kind} {w.name}" for w in snap.finishers())
    starts = [t for t in (_seconds(w.status.get("startTime")) for w in snap.workloads) if t is not None]
    ends = [t for t in (_seconds(w.status.get("completionTime")) for w in snap.finishers()) if t is not None]
    if starts and ends and max(ends) >= min(starts):
        took = f"in {duration(max(ends) - min(starts))}"
    else:
        took = f"(waited {duration(waited)})"
    return f"{snap.stage} succeeded ({finishers}) {took}"
