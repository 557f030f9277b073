"""Processes that serve HTTP on this machine's loopback: a free port, waiting until one answers, stopping one.

One place for what `make demo`'s serving step (scripts/demo_serve.py), `make bench-serve` and the tests that start
real servers (`mlflow server`, `llmpipe serve`) all do.
"""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.request
from pathlib import Path


class ServerDidNotStart(RuntimeError):
    """The process exited, or did not answer within the time given."""


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for processes of this machine only)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, *, timeout: float = 300.0, what: str = "server",
              log: Path | None = None, interval: float = 0.5) -> bytes:
    """Poll ``url`` until it answers 200 and return the body; raise ServerDidNotStart (with the tail of ``log``)
    as soon as ``proc`` exits, or after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return resp.read()
        except OSError:
            pass
        exited = proc.poll()
        if exited is not None or time.monotonic() > deadline:
            why = f"exited with {exited}" if exited is not None else f"did not answer {url} within {timeout:.0f} s"
            tail = ""
            if log is not None and Path(log).exists():
                tail = "; its log ends:\n" + Path(log).read_text(errors="replace")[-2000:]
            raise ServerDidNotStart(f"{what} {why}{tail}")
        time.sleep(interval)


def stop(proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``timeout`` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
