"""Bad input and bad config give one clear line, never a traceback; a killed stage commits nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.data.documents import CLEAN_SCHEMA, DocumentWriter
from pipeline.storage import Storage
from tests.conftest import CORPUS, write_configs

LLMPIPE = [str(Path(sys.executable).parent / "llmpipe")]


def cli(*args, **kw):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([*LLMPIPE, *map(str, args)], capture_output=True, text=True, env=env, timeout=600, **kw)


def assert_clear_error(proc, code, *fragments):
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("error: "), proc.stderr
    for frag in fragments:
        assert frag in proc.stderr, proc.stderr


def test_missing_upstream_output(tmp_path):
    assert_clear_error(cli("run", "clean", "--root", tmp_path), 1, "needs 'raw/'", "llmpipe run collect")


def test_config_typo_and_bad_value(tmp_path):
    bad = tmp_path / "clean.yaml"
    bad.write_text("dedup:\n  treshold: 0.9\n")
    assert_clear_error(cli("run", "clean", "--config", bad, "--root", tmp_path), 2, str(bad), "dedup.treshold", "threshold")
    assert_clear_error(cli("run", "pack", "--root", tmp_path, "--set", "seq_len=16"), 2, "seq_len", "greater than or equal to 32")


def test_collect_glob_matching_nothing(tmp_path):
    cfg = tmp_path / "collect.yaml"
    cfg.write_text(f"sources:\n  - paths: ['{tmp_path}/nothing/*.txt']\n")
    assert_clear_error(cli("run", "collect", "--config", cfg, "--root", tmp_path / "run"), 1, "nothing/*.txt")


def test_pipeline_validates_all_configs_before_running(tmp_path):
    jobs = write_configs(tmp_path / "jobs", pack="seq_len: 5\n")
    proc = cli("pipeline", "--config-dir", jobs, "--root", tmp_path / "run")
    assert_clear_error(proc, 2, "pack.yaml", "seq_len")
    assert not (tmp_path / "run" / "raw").exists()


def test_rank_outside_world(tmp_path):
    assert_clear_error(cli("run", "clean", "--root", tmp_path, "--rank", 3, "--world-size", 2), 1)


def test_help_teaches():
    out = cli("run", "--help").stdout
    for frag in ("--rank", "--world-size", "--merge", "--set", "--force", "examples:"):
        assert frag in out


def _big_clean(root: Path, docs: int) -> None:
    """A committed clean/ artifact of many real-text documents, to give pack something to chew on."""
    texts = [t for t in (CORPUS / "ru" / "fortunes.txt").read_text(encoding="utf-8").split("\n%\n") if t.strip()]
    storage = Storage(str(root))
    out = storage.begin("clean")
    writer = DocumentWriter(out, CLEAN_SCHEMA, 10_000)
    for i in range(docs):
        writer.write({"id": f"d{i}", "text": texts[i % len(texts)] + f" {i}", "source": "t", "lang_hint": "ru",
                      "lang": "ru", "lang_score": 0.9})
    out.commit({"stage": "clean", "config_hash": "synthetic", "inputs": {}, "metrics": {"parts": writer.close()}})


def test_pack_killed_half_way_commits_nothing_and_rerun_completes(tmp_path):
    jobs = write_configs(tmp_path / "jobs")
    root = tmp_path / "run"
    assert cli("pipeline", "--config-dir", jobs, "--root", root, "--until", "tokenizer", "--no-progress").returncode == 0
    _big_clean(root, 40_000)
    args = ["run", "pack", "--config", jobs / "pack.yaml", "--root", root, "--set", "batch_size=1", "--no-progress"]
    proc = subprocess.Popen([*LLMPIPE, *map(str, args)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    parts = root / "shards.parts" / "w001"
    deadline = time.time() + 120
    started = False
    while time.time() < deadline and proc.poll() is None:
        tmp = list(parts.glob("rank-00000.tmp-*/*.bin")) if parts.exists() else []
        if tmp and any(f.stat().st_size > 0 for f in tmp):
            started = True
            break
        time.sleep(0.02)
    assert started, "pack finished or failed before it could be killed: " + (proc.stderr.read().decode() if proc.stderr else "")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (root / "shards" / "manifest.json").exists()
    assert not (root / "shards").exists()
    assert not list(parts.glob("rank-00000/manifest.json"))
    done = cli(*args)
    assert done.returncode == 0, done.stderr
    assert (root / "shards" / "manifest.json").exists()
    assert not list(root.glob("**/*.tmp-*")), "stale temporaries left behind"
