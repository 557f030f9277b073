"""A stage writes only to names it owns (issue: `--set output=mlflow` replaced the MLflow store with parquet files):
the platform's folders, another stage's artifact and a folder that is no artifact are refused before anything is
deleted; the stage's own earlier output is still replaced as before."""

from __future__ import annotations

from pathlib import Path

from pipeline.cli import main
from tests.conftest import write_configs


def _file_set(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def test_outputs_other_owners_hold_are_refused_before_anything_is_deleted(tmp_path, capsys):
    jobs = write_configs(tmp_path / "jobs")
    root = tmp_path / "root"
    assert main(["run", "collect", "-c", str(jobs / "collect.yaml"), "--root", str(root), "--no-progress"]) == 0
    # what other owners hold: an MLflow store, checkpoints, collect's raw/, a user's folder
    (root / "mlflow").mkdir(exist_ok=True)
    (root / "mlflow" / "mlflow.db").write_bytes(b"precious")
    (root / "checkpoints" / "pretrain" / "step-10").mkdir(parents=True)
    (root / "checkpoints" / "pretrain" / "step-10" / "COMPLETE").write_text("")
    from pipeline.storage import Storage

    out = Storage(str(root)).begin("shards")  # pack's artifact
    out.write_text("index.json", "{}")
    out.commit({"stage": "pack", "config_hash": "x", "inputs": {}, "metrics": {}})
    (root / "notes").mkdir()
    (root / "notes" / "todo.txt").write_text("mine")
    before = _file_set(root)
    capsys.readouterr()
    cases = [("mlflow", "would replace the MLflow store"), ("checkpoints", "would replace training checkpoints"),
             ("checkpoints/pretrain", "would replace training checkpoints"),
             ("shards", "is pack stage's artifact"), ("notes", "exists and is not an artifact (no manifest.json")]
    for output, message in cases:
        code = main(["run", "clean", "-c", str(jobs / "clean.yaml"), "--root", str(root), "--no-progress",
                     "--set", f"output={output}"])
        err = capsys.readouterr().err
        assert code == 2 and message in err, (output, err)
        assert len(err.strip().splitlines()) == 1, err
        assert _file_set(root) == before, output
    assert (root / "mlflow" / "mlflow.db").read_bytes() == b"precious"
    # the stage's own output: written, and replaced by a forced rerun as before
    assert main(["run", "clean", "-c", str(jobs / "clean.yaml"), "--root", str(root), "--no-progress",
                 "--set", "output=clean-mine"]) == 0
    assert main(["run", "clean", "-c", str(jobs / "clean.yaml"), "--root", str(root), "--no-progress",
                 "--set", "output=clean-mine", "--force"]) == 0
    # and pack may not write over clean's artifact either
    code = main(["run", "pack", "-c", str(jobs / "pack.yaml"), "--root", str(root), "--no-progress",
                 "--set", "input=clean-mine", "--set", "output=clean-mine"])
    assert code == 2
