"""Workers die with their parent: SIGKILL of `llmpipe run clean` (what the OOM killer does to the biggest process)
leaves no spawn worker or resource tracker behind (before: they stayed blocked for ever)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import write_configs

REPO = Path(__file__).resolve().parents[2]
SITE = """
import os
if os.environ.get("TEST_SLOW_PART"):
    import time
    import pipeline.runner as _r

    _orig = _r._part_worker

    def _slow(*a, **k):
        time.sleep(120)  # a long clean part
        return _orig(*a, **k)

    _r._part_worker = _slow
"""


def _children(pid: int) -> set[int]:
    out = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.add(int(entry))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_killing_the_parent_takes_its_workers_along(tmp_path):
    jobs = write_configs(tmp_path / "jobs")
    root = tmp_path / "root"
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO), os.environ.get("PYTHONPATH", "")]),
           "LLMPIPE_TRACKING": "off"}
    llmpipe = str(Path(sys.executable).parent / "llmpipe")
    subprocess.run([llmpipe, "run", "collect", "-c", str(jobs / "collect.yaml"), "--root", str(root), "--no-progress"],
                   cwd=REPO, env=env, check=True, capture_output=True)
    parent = subprocess.Popen([llmpipe, "run", "clean", "-c", str(jobs / "clean.yaml"), "--root", str(root),
                               "--no-progress", "--set", "workers=2"], cwd=REPO, env={**env, "TEST_SLOW_PART": "1"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        kids: set[int] = set()
        deadline = time.time() + 120
        while time.time() < deadline and len(kids) < 3:  # two workers and the resource tracker
            kids |= _children(parent.pid)
            time.sleep(0.5)
        time.sleep(3)  # the workers are in their initializer, then asleep in the part
        kids |= _children(parent.pid)
        assert len(kids) >= 2, kids
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=30)
        deadline = time.time() + 30
        while time.time() < deadline and any(_alive(k) for k in kids):
            time.sleep(0.5)
        assert not [k for k in kids if _alive(k)], "workers outlived their killed parent"
    finally:
        for k in _children(parent.pid) | set():
            try:
                os.kill(k, signal.SIGKILL)
            except OSError:
                pass
        if parent.poll() is None:
            parent.kill()
