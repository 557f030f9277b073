"""The embedded MLflow store's URIs are escaped: a run root whose name holds ``#`` or ``%20`` keeps its SQLite
database and artefacts inside it (before: artefacts went outside the root, or SQLite retried for 100 s and the run's
tracking was lost)."""

from __future__ import annotations

from pipeline import tracking
from pipeline.cli import main
from pipeline.storage import Storage
from tests.conftest import write_configs


def test_roots_with_hash_and_percent_keep_their_mlflow_store_inside(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LLMPIPE_TRACKING", "on")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    jobs = write_configs(tmp_path / "jobs")
    for name in ("run#1", "run%20two"):
        root = tmp_path / name
        uri = tracking.resolve_uri(Storage(str(root)))
        assert tracking.sqlite_path(uri) == str(root / "mlflow" / "mlflow.db")
        assert main(["run", "collect", "-c", str(jobs / "collect.yaml"), "--root", str(root), "--no-progress"]) == 0
        err = capsys.readouterr().err
        assert "warning: mlflow" not in err, err
        assert (root / "mlflow" / "mlflow.db").is_file()
        assert any((root / "mlflow" / "artifacts").rglob("*")), "artefacts were written outside the root"
        assert not (tmp_path / "run").exists() and not (tmp_path / "run two").exists()
