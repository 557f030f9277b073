"""One writer per output: a second `llmpipe run` of an output another process is writing gets one line naming the
holder, before deleting anything of the first's; the lock dies with its process (SIGKILL included)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from pipeline.cli import main
from tests.conftest import write_configs

REPO = Path(__file__).resolve().parents[2]
HOLDER = """
import sys, time
from pipeline.runner import output_lock
from pipeline.storage import Storage
with output_lock(Storage(sys.argv[1]), "clean"):
    print("locked", flush=True)
    time.sleep(300)
"""


def test_a_second_writer_is_refused_and_the_lock_dies_with_its_holder(tmp_path, capsys):
    jobs = write_configs(tmp_path / "jobs")
    root = tmp_path / "root"
    assert main(["run", "collect", "-c", str(jobs / "collect.yaml"), "--root", str(root), "--no-progress"]) == 0
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(root)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        stale = root / "clean.tmp-0123456789"  # as if the holder were mid-write: must survive the refused run
        stale.mkdir()
        capsys.readouterr()
        code = main(["run", "clean", "-c", str(jobs / "clean.yaml"), "--root", str(root), "--no-progress"])
        err = capsys.readouterr().err
        assert code == 1 and f"'clean/' is being written by pid {holder.pid} on " in err, err
        assert len(err.strip().splitlines()) == 1 and stale.is_dir()
        holder.send_signal(signal.SIGKILL)  # what the OOM killer does
        holder.wait(timeout=30)
        time.sleep(0.2)
        assert main(["run", "clean", "-c", str(jobs / "clean.yaml"), "--root", str(root), "--no-progress"]) == 0
    finally:
        if holder.poll() is None:
            holder.kill()


CK_HOLDER = """
import sys, time
from pipeline.storage import Storage
from pipeline.training.checkpoint import CheckpointManager
from pipeline.training.config import PretrainConfig
m = CheckpointManager.for_stage("pretrain", PretrainConfig(max_steps=1, checkpoint_dir=sys.argv[2]), Storage(sys.argv[1]),
                                main=True)
print("locked", flush=True)
time.sleep(300)
"""


def test_one_training_run_per_checkpoint_folder(tmp_path):
    """Two runs (even of two run roots) sharing a checkpoint_dir: the second stops before writing a checkpoint."""
    import pytest

    from pipeline.errors import PipelineError
    from pipeline.storage import Storage
    from pipeline.training.checkpoint import CheckpointManager
    from pipeline.training.config import PretrainConfig

    ck = tmp_path / "shared-ck"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    holder = subprocess.Popen([sys.executable, "-c", CK_HOLDER, str(tmp_path / "root-a"), str(ck)], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        cfg = PretrainConfig(max_steps=1, checkpoint_dir=str(ck))
        with pytest.raises(PipelineError, match=f"checkpoint folder {ck} is being written by pid {holder.pid}"):
            CheckpointManager.for_stage("pretrain", cfg, Storage(str(tmp_path / "root-b")), main=True)
        # other ranks do not take it; after the holder is killed, the folder is free
        CheckpointManager.for_stage("pretrain", cfg, Storage(str(tmp_path / "root-b")), main=False)
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        CheckpointManager.for_stage("pretrain", cfg, Storage(str(tmp_path / "root-b")), main=True)
    finally:
        if holder.poll() is None:
            holder.kill()


def test_a_filesystem_without_locks_warns_and_goes_on(tmp_path, monkeypatch, capsys):
    """Some FUSE/CSI mounts have no record locks (lockf: ENOLCK): the stage runs, with one warning, rather than
    reporting a holder that does not exist."""
    import errno
    import fcntl

    from pipeline.storage import hold_lock

    def no_locks(*a, **k):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "lockf", no_locks)
    fh = hold_lock(str(tmp_path / ".locks" / "x.lock"), "'x/'")
    fh.close()
    assert "no file locks on this filesystem (No locks available); 'x/' is not protected" in capsys.readouterr().err
