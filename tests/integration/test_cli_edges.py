"""Filesystem and manifest trouble at the edge is one line naming the path, never a traceback: --root naming a file,
a root under a file, a manifest that is valid JSON but not an object (run and show)."""

from __future__ import annotations

import json

from pipeline.cli import main
from tests.conftest import write_configs


def test_filesystem_errors_and_odd_manifests_are_one_line(tmp_path, capsys):
    jobs = write_configs(tmp_path / "jobs")
    a_file = tmp_path / "not-a-folder"
    a_file.write_text("x")
    for root in (a_file, a_file / "sub"):
        capsys.readouterr()
        code = main(["run", "collect", "-c", str(jobs / "collect.yaml"), "--root", str(root), "--no-progress"])
        err = capsys.readouterr().err
        assert code in (1, 2) and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
        assert str(a_file) in err and "Traceback" not in err
    root = tmp_path / "root"
    assert main(["run", "collect", "-c", str(jobs / "collect.yaml"), "--root", str(root), "--no-progress"]) == 0
    (root / "raw" / "manifest.json").write_text(json.dumps(["not", "an", "object"]))
    for argv in (["show", "collect", "--root", str(root)],
                 ["run", "clean", "-c", str(jobs / "clean.yaml"), "--root", str(root), "--no-progress"]):
        capsys.readouterr()
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 1 and "holds a JSON list, not a manifest object" in err, (argv, err)
        assert len(err.strip().splitlines()) == 1


def test_read_only_commands_do_not_create_a_mistyped_root(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("LLMPIPE_TRACKING", "on")
    typo = tmp_path / "runs" / "dmeo"
    for argv in (["show", "collect", "--root", str(typo)], ["summary", "--root", str(typo)],
                 ["lineage", "models:/llm-pipeline-demo@champion", "--root", str(typo)]):
        capsys.readouterr()
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 1 and f"no run root at {typo}: check --root" in err, (argv, err)
        assert not typo.exists() and not typo.parent.exists(), argv


def test_a_read_only_root_is_one_line(tmp_path, capsys, monkeypatch):
    """A read-only run root (a PVC mounted read-only, a folder of another user). The tests run as root, which the
    kernel lets write anywhere, so the refusal is simulated where the kernel would give it: the first folder created
    under the root raises PermissionError, as os.mkdir does there."""
    import pathlib

    jobs = write_configs(tmp_path / "jobs")
    root = tmp_path / "ro-root"
    root.mkdir()
    real_mkdir = pathlib.Path.mkdir

    def mkdir(self, *a, **k):
        if str(self).startswith(str(root) + "/"):
            raise PermissionError(13, "Permission denied", str(self))
        return real_mkdir(self, *a, **k)

    monkeypatch.setattr(pathlib.Path, "mkdir", mkdir)
    capsys.readouterr()
    code = main(["run", "collect", "-c", str(jobs / "collect.yaml"), "--root", str(root), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith(f"error: {root}/") and err.rstrip().endswith("Permission denied"), err
    assert len(err.strip().splitlines()) == 1
