"""Run-root storage: atomic commit, manifests as the commit marker, stale temporaries."""

import json
import os

import pytest

from pipeline.errors import InputError
from pipeline.storage import MANIFEST, Storage, fingerprint, sha256_file


def test_commit_is_atomic_and_manifest_lists_files(tmp_path):
    st = Storage(str(tmp_path / "root"))
    out = st.begin("thing")
    out.write_text("a.txt", "hello")
    out.write_json("sub/b.json", {"x": 1})
    assert st.manifest("thing") is None  # nothing visible before commit
    assert not (tmp_path / "root" / "thing").exists()
    m = out.commit({"stage": "t", "config_hash": "h", "inputs": {}})
    assert st.manifest("thing")["fingerprint"] == m["fingerprint"] == fingerprint(m)
    files = {f["path"]: f for f in m["files"]}
    assert set(files) == {"a.txt", "sub/b.json"}
    assert files["a.txt"]["size"] == 5
    assert files["a.txt"]["sha256"] == sha256_file(st.fs, st.path("thing", "a.txt"))
    assert not [p for p in os.listdir(tmp_path / "root") if ".tmp-" in p]


def test_recommit_replaces_and_abort_leaves_nothing(tmp_path):
    st = Storage(str(tmp_path))
    out = st.begin("x")
    out.write_text("old.txt", "1")
    out.commit({"stage": "t"})
    out2 = st.begin("x")
    out2.write_text("new.txt", "2")
    out2.commit({"stage": "t"})
    assert sorted(os.listdir(tmp_path / "x")) == [MANIFEST, "new.txt"]
    out3 = st.begin("x")
    out3.write_text("partial.txt", "3")
    out3.abort()
    assert sorted(os.listdir(tmp_path / "x")) == [MANIFEST, "new.txt"]
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


def test_stale_temporaries_removed_on_begin(tmp_path):
    st = Storage(str(tmp_path))
    (tmp_path / "x.tmp-deadbeef").mkdir()
    (tmp_path / "x.tmp-deadbeef" / "half.bin").write_bytes(b"\0" * 10)
    st.begin("x")
    assert not (tmp_path / "x.tmp-deadbeef").exists()


def test_folder_without_manifest_is_not_committed(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "data").write_text("half")
    assert Storage(str(tmp_path)).manifest("x") is None


def test_corrupt_manifest_is_a_clear_error(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / MANIFEST).write_text("{nope")
    with pytest.raises(InputError, match="not valid JSON"):
        Storage(str(tmp_path)).manifest("x")


def test_put_local_and_recorded_checksums(tmp_path):
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f.txt").write_text("abc")
    (src / "g.txt").write_text("xyz")
    st = Storage(str(tmp_path / "root"))
    out = st.begin("y")
    out.put_local(str(src))
    out.write_text("h.bin", "12")
    out.record("h.bin", 2, "precomputed")
    m = out.commit({"stage": "t"})
    files = {f["path"]: f["sha256"] for f in m["files"]}
    assert set(files) == {"d/f.txt", "g.txt", "h.bin"}
    assert files["h.bin"] == "precomputed"
    assert json.loads((tmp_path / "root" / "y" / MANIFEST).read_text())["stage"] == "t"


def test_storage_options_env_must_be_json(monkeypatch, tmp_path):
    monkeypatch.setenv("LLMPIPE_STORAGE_OPTIONS", "not json")
    with pytest.raises(InputError, match="LLMPIPE_STORAGE_OPTIONS"):
        Storage(str(tmp_path))
