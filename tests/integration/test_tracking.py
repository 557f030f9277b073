"""MLflow tracking, registration, promotion and lineage against a real `mlflow server` process.

The chain is real: collect -> clean -> tokenizer -> pack -> init on the committed fixtures, under
`llmpipe pipeline` (parent run + nested stage runs). The evaluation artifact that `register` reads
is committed by the test with evaluate's metric contract, so the gates can be steered.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.storage import Storage
from tests.conftest import write_configs


def _client(url):
    from mlflow.tracking import MlflowClient

    return MlflowClient(url, registry_uri=url)


def _commit_eval(root: str, label: str, **metrics: float) -> None:
    """An `eval/` artifact as the evaluate stage writes it (its manifest metrics contract)."""
    storage = Storage(root)
    storage.remove("eval")
    out = storage.begin("eval")
    out.write_json("results.json", {"models": {label: metrics}})
    out.commit({"stage": "evaluate", "config_hash": json.dumps(metrics, sort_keys=True), "inputs": {},
                "metrics": {"models": {label: metrics}, "report": "report.md"}})


@pytest.fixture(scope="module")
def tracked_root(tmp_path_factory, mlflow_server):
    """A run root whose data stages and init ran under `llmpipe pipeline` with a tracking server."""
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    mp.setenv("MLFLOW_EXPERIMENT_NAME", "test-tracking")
    mp.delenv("LLMPIPE_TRACKING", raising=False)
    base = tmp_path_factory.mktemp("tracked")
    cfg = write_configs(base / "jobs")
    (cfg / "init.yaml").write_text("source: random\npreset: tiny\nmax_position_embeddings: 128\n", encoding="utf-8")
    root = str(base / "root")
    assert main(["pipeline", "--config-dir", str(cfg), "--root", root, "--until", "init", "--no-progress"]) == 0
    yield root, base
    mp.undo()


def test_pipeline_parent_run_with_a_nested_run_per_stage(tracked_root, mlflow_server):
    root, _ = tracked_root
    client = _client(mlflow_server)
    exp = client.get_experiment_by_name("test-tracking")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parents = [r for r in runs if r.data.tags.get("llmpipe.kind") == "pipeline"]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    nested = {r.data.tags["llmpipe.stage"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(nested) == {"collect", "clean", "tokenizer", "pack", "init"}
    storage = Storage(root)
    for stage, out in [("collect", "raw"), ("clean", "clean"), ("tokenizer", "tokenizer"), ("pack", "shards"), ("init", "models/init")]:
        run = nested[stage]
        manifest = storage.manifest(out)
        assert manifest["mlflow_run_id"] == run.info.run_id  # the manifest points at its run
        assert run.info.status == "FINISHED"
        assert run.data.tags["llmpipe.config_hash"] == manifest["config_hash"]
        assert run.data.tags["llmpipe.fingerprint"] == manifest["fingerprint"]
        arts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert "manifest.json" in arts
    # params = the resolved config, flattened; metrics = the manifest's numbers
    assert nested["tokenizer"].data.params["vocab_size"] == "800"
    assert nested["pack"].data.params["seq_len"] == "64"
    clean_metrics = nested["clean"].data.metrics
    assert clean_metrics["documents_in"] == storage.manifest("clean")["metrics"]["documents_in"]
    assert clean_metrics["kept"] + clean_metrics["dropped"] == clean_metrics["documents_in"]
    by_reason = {k: v for k, v in clean_metrics.items() if k.startswith("dropped_by_reason.")}
    assert by_reason and sum(by_reason.values()) == clean_metrics["dropped"]
    assert nested["init"].data.metrics["params_total"] > 0
    # the pipeline's own timings on the parent
    assert set(k.split(".", 1)[1] for k in parent.data.metrics if k.startswith("seconds.")) == set(nested)


def test_rerun_records_up_to_date_stages_under_a_new_parent(tracked_root, mlflow_server, capsys):
    root, base = tracked_root
    assert main(["pipeline", "--config-dir", str(base / "jobs"), "--root", root, "--until", "clean", "--no-progress"]) == 0
    assert "up to date" in capsys.readouterr().out
    client = _client(mlflow_server)
    exp = client.get_experiment_by_name("test-tracking")
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`llmpipe.status` = 'up to date'")
    made_by = {r.data.tags["llmpipe.stage"]: r.data.tags["llmpipe.made_by_run"] for r in runs}
    storage = Storage(root)
    assert made_by["collect"] == storage.manifest("raw")["mlflow_run_id"]
    assert made_by["clean"] == storage.manifest("clean")["mlflow_run_id"]


def _register_cfg(base: Path, **gates: str) -> Path:
    path = base / "register.yaml"
    path.write_text(
        "model: models/init\neval: eval\neval_label: init\nname: tiny-llama\nalias: candidate\nauto_promote: true\n"
        "promote:\n  gates:\n"
        "    - {metric: val_perplexity, better: lower, max_regression_pct: 5}\n"
        "    - {metric: lm_eval_mc_acc, better: higher, min: 0.25}\n",
        encoding="utf-8",
    )
    return path


def test_register_promote_and_lineage(tracked_root, mlflow_server, capsys):
    import mlflow

    root, base = tracked_root
    cfg = _register_cfg(base)
    client = _client(mlflow_server)

    # version 1: first candidate, no champion yet -> promoted by the stage's promote section
    _commit_eval(root, "init", val_perplexity=100.0, lm_eval_mc_acc=0.40)
    assert main(["run", "register", "--config", str(cfg), "--root", root, "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "tiny-llama version 1" in out and "champion -> version 1" in out
    v1 = client.get_model_version_by_alias("tiny-llama", "champion")
    assert v1.version == "1"
    assert client.get_model_version_by_alias("tiny-llama", "candidate").version == "1"
    tags = v1.tags
    storage = Storage(root)
    assert tags["llmpipe.fingerprint"] == storage.manifest("models/init")["fingerprint"]
    assert tags["llmpipe.data_fingerprint"] == storage.manifest("clean")["fingerprint"]  # init saw no shards
    assert tags["llmpipe.tokenizer_fingerprint"] == storage.manifest("tokenizer")["fingerprint"]
    assert {"lineage.models/init", "lineage.tokenizer", "lineage.clean", "lineage.raw"} <= set(tags)
    assert float(tags["metric.val_perplexity"]) == 100.0
    assert tags["promotion.decision"] == "promoted" and tags["promotion.compared_with"] == "none"
    registration = json.loads(Path(storage.path("registry", "registration.json")).read_text())
    assert registration["version"] == 1 and registration["promotion"]["decision"] == "promoted"

    # the registered model is a transformers text-generation model with its tokenizer
    mlflow.set_tracking_uri(mlflow_server)
    pipe = mlflow.transformers.load_model("models:/tiny-llama@champion")
    assert pipe.task == "text-generation"
    text = pipe("Москва", max_new_tokens=4, do_sample=False)[0]["generated_text"]
    assert text.startswith("Москва")

    # a second registration of the same inputs is up to date (no new version)
    assert main(["run", "register", "--config", str(cfg), "--root", root, "--no-progress"]) == 0
    assert "up to date" in capsys.readouterr().out
    assert len(client.search_model_versions("name='tiny-llama'")) == 1

    # version 2: perplexity 20% worse -> the gate rejects it; champion stays on 1
    _commit_eval(root, "init", val_perplexity=120.0, lm_eval_mc_acc=0.45)
    no_promote = base / "register-nopromote.yaml"
    no_promote.write_text(cfg.read_text().replace("auto_promote: true", "auto_promote: false"), encoding="utf-8")
    assert main(["run", "register", "--config", str(no_promote), "--root", root, "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["promote", "--config", str(cfg), "--root", root, "--dry-run"]) == 3
    dry = capsys.readouterr().out
    assert "val_perplexity" in dry and "+20.00% worse than the champion (limit 5%)" in dry
    assert "promotion.decision" not in client.get_model_version("tiny-llama", "2").tags  # dry run: nothing recorded
    assert main(["promote", "--config", str(cfg), "--root", root]) == 3
    capsys.readouterr()
    assert client.get_model_version_by_alias("tiny-llama", "champion").version == "1"
    v2 = client.get_model_version("tiny-llama", "2")
    assert v2.tags["promotion.decision"] == "rejected" and v2.tags["promotion.compared_with"] == "1"

    # version 3: better on both -> promoted; the old champion is marked superseded
    _commit_eval(root, "init", val_perplexity=90.0, lm_eval_mc_acc=0.50)
    assert main(["run", "register", "--config", str(no_promote), "--root", root, "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["promote", "--config", str(cfg), "--root", root, "--json"]) == 0
    decision = json.loads(capsys.readouterr().out)
    assert decision["decision"] == "promoted" and decision["champion_before"] == 1 and decision["champion_version"] == 3
    assert client.get_model_version_by_alias("tiny-llama", "champion").version == "3"
    assert client.get_model_version("tiny-llama", "1").tags["promotion.superseded_by"] == "3"

    # lineage: from the alias back to the raw data and its sources
    assert main(["lineage", "models:/tiny-llama@champion", "--root", root]) == 0
    text = capsys.readouterr().out
    order = [text.index(f"    {a} ") for a in ("models/init", "tokenizer", "clean", "raw")]
    assert order == sorted(order)
    assert "en-fortunes (" in text and "corpus/en/*.txt" in text
    assert "version 3 (aliases: " in text and "champion" in text
    assert main(["lineage", "models:/tiny-llama/2", "--root", root, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["version"] == 2 and info["chain"][0]["artifact"] == "models/init"
    assert info["chain"][-1]["artifact"] == "raw"


def test_bad_model_uris_and_missing_aliases_are_one_line(tracked_root, mlflow_server, capsys):
    root, _ = tracked_root
    assert main(["lineage", "tiny-llama@champion", "--root", root]) == 1
    assert "is not a model URI" in capsys.readouterr().err
    assert main(["lineage", "models:/tiny-llama@nope", "--root", root]) == 1
    err = capsys.readouterr().err
    assert "does not resolve" in err and "aliases:" in err
    # a version that does not exist: the versions that do (not the aliases)
    assert main(["lineage", "models:/tiny-llama/999", "--root", root]) == 1
    err = capsys.readouterr().err
    assert "models:/tiny-llama/999 does not resolve; its versions: 1, 2" in err, err


def test_unreachable_server_warns_and_the_stage_still_commits(tmp_path, monkeypatch, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    monkeypatch.delenv("LLMPIPE_TRACKING", raising=False)
    cfg = write_configs(tmp_path / "jobs")
    root = str(tmp_path / "root")
    assert main(["pipeline", "--config-dir", str(cfg), "--root", root, "--until", "collect", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "warning: mlflow:" in err and "unreachable" in err
    manifest = Storage(root).manifest("raw")
    assert manifest is not None and manifest["mlflow_run_id"] is None


def test_embedded_sqlite_store_under_a_local_root(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("LLMPIPE_TRACKING", raising=False)
    cfg = write_configs(tmp_path / "jobs")
    root = tmp_path / "root"
    assert main(["pipeline", "--config-dir", str(cfg), "--root", str(root), "--until", "collect", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert (root / "mlflow" / "mlflow.db").exists()
    assert f"mlflow ui --backend-store-uri sqlite:///{root}/mlflow/mlflow.db" in out
    client = _client(f"sqlite:///{root}/mlflow/mlflow.db")
    run_id = Storage(str(root)).manifest("raw")["mlflow_run_id"]
    run = client.get_run(run_id)
    assert run.info.artifact_uri.startswith(f"file://{root}/mlflow/artifacts")
    assert "manifest.json" in {a.path for a in client.list_artifacts(run_id)}


def test_pretrain_step_metrics_reach_the_stage_run(tracked_root, mlflow_server, tmp_path):
    root, _ = tracked_root
    cfg = tmp_path / "pretrain.yaml"
    cfg.write_text("micro_batch_size: 4\nglobal_batch_tokens: 512\nmax_steps: 6\nlr: 3.0e-3\nwarmup_steps: 1\n"
                   "checkpoint_every: 3\neval_every: 3\neval_max_blocks: 8\nlog_every: 1\n"
                   "generation: {every: 0}\ncpu_peak_flops: 1.0e+11\n", encoding="utf-8")
    assert main(["run", "pretrain", "--config", str(cfg), "--root", root, "--no-progress"]) == 0
    manifest = Storage(root).manifest("models/pretrain")
    client = _client(mlflow_server)
    run_id = manifest["mlflow_run_id"]
    loss = client.get_metric_history(run_id, "loss")
    assert sorted(m.step for m in loss) == [1, 2, 3, 4, 5, 6]  # one point per optimizer step, live from the loop
    local = [json.loads(line) for line in Path(root, "checkpoints", "pretrain", "metrics.jsonl").read_text().splitlines()]
    by_step = {r["step"]: r["loss"] for r in local if "loss" in r}
    assert {m.step: m.value for m in loss} == pytest.approx(by_step)
    assert {m.step for m in client.get_metric_history(run_id, "val_loss")} == {0, 3, 6}  # before training, then every 3
    assert client.get_metric_history(run_id, "tokens_per_s")
