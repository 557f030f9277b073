"""`make demo` in small: every stage from collect to register + promote, through `llmpipe pipeline`,
on the committed kk/ru/en fixtures, with the embedded MLflow store, then `llmpipe summary` and
`llmpipe lineage`. The configs are jobs/demo's, shrunk (fewer steps, shorter sequences), so this
test breaks when the shipped demo configs stop working together.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from pipeline.cli import main
from pipeline.stages import ORDER
from pipeline.storage import Storage
from tests.conftest import write_configs

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "jobs" / "demo"

SMALL: dict[str, dict] = {
    "init": {"max_position_embeddings": 128},
    "pretrain": {"micro_batch_size": 4, "global_batch_tokens": 512, "max_steps": 12, "warmup_steps": 2,
                 "phases": [{"name": "broad", "shards": "shards", "until_step": 8,
                             "mix": {"kk": 2.0, "ru": 1.0, "en": 0.5}},
                            {"name": "strict", "shards": "shards-clean"}],
                 "checkpoint_every": 6, "eval_every": 6, "eval_max_blocks": 8, "log_every": 2,
                 "generation": {"every": 12, "prompts": ["Қазақстан", "The"], "max_new_tokens": 6}},
    "sft": {"max_steps": 8, "max_length": 128, "micro_batch_size": 8, "log_every": 4,
            "generation": {"max_new_tokens": 6}},
    "dpo": {"max_steps": 4, "max_length": 128, "log_every": 2, "generation": {"max_new_tokens": 6}},
    "reward": {"max_steps": 4, "max_length": 128, "log_every": 2},
    "evaluate": {"perplexity": {"max_blocks": 4}, "heldout": {"max_documents": 4}, "max_length": 64,
                 "generation": {"max_new_tokens": 6}, "lm_eval": {"limit": 4},
                 # the run's validation documents only (the fixtures have no fetch_corpus held-out files)
                 "continuation": {"files": {"kk": [], "ru": [], "en": []}, "items_per_language": 20,
                                  "context_chars": 60, "continuation_chars": 30},
                 "tool_use": {"files": [str(REPO / "tests" / "fixtures" / "posttrain" / "tools_eval.jsonl")],
                              "max_items": 6, "max_new_tokens": 12}},
    "quantize": {"max_blocks": 2, "llamacpp": "off", "greedy_tokens": 4, "calibration": {"samples": 4}, "awq": {"n_grid": 4}},
}


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _absolute_data(cfg: dict) -> dict:
    for key in ("data", "eval_data"):
        for src in cfg.get(key) or []:
            if not Path(src["path"]).is_absolute():
                src["path"] = str(REPO / src["path"])
    return cfg


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    mp.delenv("LLMPIPE_TRACKING", raising=False)  # the embedded SQLite store, as in `make demo`
    base = tmp_path_factory.mktemp("demo")
    jobs = write_configs(base / "jobs")  # collect, clean, tokenizer, pack over the fixtures
    # the demo's second-phase data: its strict clean variant, and pack-clean with the small pack settings
    strict = yaml.safe_load((DEMO / "clean-strict.yaml").read_text(encoding="utf-8"))
    (jobs / "clean-strict.yaml").write_text(yaml.safe_dump({**strict, "workers": 1}), encoding="utf-8")
    pack = yaml.safe_load((jobs / "pack.yaml").read_text(encoding="utf-8"))
    pack.update(yaml.safe_load((DEMO / "pack-clean.yaml").read_text(encoding="utf-8")),
                seq_len=pack["seq_len"], blocks_per_shard=pack["blocks_per_shard"], val_fraction=pack["val_fraction"],
                workers=1)
    (jobs / "pack-clean.yaml").write_text(yaml.safe_dump(pack), encoding="utf-8")
    for stage in ORDER[4:]:
        cfg = yaml.safe_load((DEMO / f"{stage}.yaml").read_text(encoding="utf-8"))
        cfg = _absolute_data(_merge(cfg, SMALL.get(stage, {})))
        (jobs / f"{stage}.yaml").write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    root = base / "root"
    code = main(["pipeline", "--config-dir", str(jobs), "--root", str(root), "--no-progress"])
    yield code, root, jobs
    mp.undo()


def test_the_whole_pipeline_ends_with_a_promoted_model(demo_run, capsys):
    code, root, _ = demo_run
    assert code == 0
    storage = Storage(str(root))
    for stage_output in ("raw", "clean", "clean-strict", "tokenizer", "shards", "shards-clean", "models/init",
                         "models/pretrain", "models/sft",
                         "models/dpo", "models/reward", "eval", "quantized", "registry"):
        manifest = storage.manifest(stage_output)
        assert manifest is not None, stage_output
        assert manifest["mlflow_run_id"], f"{stage_output} has no MLflow run"
    reg = json.loads((root / "registry" / "registration.json").read_text())
    assert reg["version"] == 1 and reg["alias"] == "candidate"
    assert reg["promotion"]["decision"] == "promoted"  # the first version: no champion to beat

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root}/mlflow/mlflow.db", registry_uri=f"sqlite:///{root}/mlflow/mlflow.db")
    champ = client.get_model_version_by_alias("llm-pipeline-demo", "champion")
    assert str(champ.version) == "1"
    # trained on both data phases: the tag names each phase's shards
    assert champ.tags["llmpipe.data_fingerprint"] == ";".join(
        sorted(f"{a}={storage.manifest(a)['fingerprint']}" for a in ("shards", "shards-clean")))
    phases = storage.manifest("models/pretrain")["metrics"]["phases"]
    assert phases["broad"]["shards"] == "shards" and phases["strict"]["shards"] == "shards-clean"
    assert phases["strict"]["steps"] == [8, 12]
    # the broad phase's language mix: what it drew of each language, tokens and epochs
    broad = phases["broad"]
    assert broad["mix"] == {"kk": 2.0, "ru": 1.0, "en": 0.5} and set(broad["languages"]) >= {"kk", "ru", "en"}
    assert sum(v["tokens"] for v in broad["languages"].values()) == broad["tokens"] == 8 * 512
    assert float(champ.tags["metric.val_perplexity"]) == pytest.approx(
        storage.manifest("eval")["metrics"]["models"]["dpo"]["val_perplexity"])
    # the demo's SFT trained on the tool-use fixture too, and evaluate scored function calling and the generated
    # continuation task for the chat models; the numbers are tags the promote gates can use
    assert storage.manifest("models/sft")["metrics"]["tool_conversations"] > 0
    ev = storage.manifest("eval")["metrics"]["models"]
    for label in ("sft", "dpo"):
        assert 0 <= ev[label]["tool_arguments"] <= 1 and 0 <= ev[label]["tool_abstain_kk"] <= 1
        assert 0 <= ev[label]["lm_eval_llmpipe_cont_acc_norm"] <= 1
    assert "tool_arguments" not in ev["pretrain"]  # a base model is not asked to call tools
    assert float(champ.tags["metric.tool_valid"]) == ev["dpo"]["tool_valid"]
    # one parent run with a nested run per stage
    runs = client.search_runs([client.get_experiment_by_name("llm-pipeline").experiment_id], max_results=200)
    parent = [r for r in runs if r.data.tags.get("llmpipe.kind") == "pipeline"]
    assert len(parent) == 1
    nested = {r.data.tags.get("llmpipe.stage") for r in runs if r.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id}
    assert nested == set(ORDER)


def test_summary_covers_every_part_of_the_run(demo_run, capsys):
    _, root, _ = demo_run
    assert main(["summary", "--root", str(root)]) == 0
    text = capsys.readouterr().out
    for needle in ("time per stage", "documents (clean)", "tokenizer fertility", "pretrain:", "train loss",
                   "evaluation", "generations", "quantized", "gguf-q4_0", "registry: llm-pipeline-demo version 1",
                   "champion is version 1", "mlflow ui --backend-store-uri sqlite:///",
                   "  clean-strict/: kept ", "-> shards-clean/", "-> clean-strict/",
                   "phases     broad steps 0-8 on shards/, strict steps 8-12 on shards-clean/"):
        assert needle in text, needle
    for stage in ORDER:
        assert f"  {stage:<10}" in text


def test_summary_of_a_copied_root_points_at_the_copy(demo_run, capsys, tmp_path):
    """A run root copied elsewhere prints the MLflow UI command of its own embedded store, not the original's."""
    import shutil

    _, root, _ = demo_run
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    capsys.readouterr()
    assert main(["summary", "--root", str(copy)]) == 0
    out = capsys.readouterr().out
    ui = next(line for line in out.splitlines() if "MLflow UI:" in line)
    assert f"sqlite:///{copy}/mlflow/mlflow.db" in ui and str(root) not in ui, ui


def test_rerun_is_up_to_date_and_lineage_reaches_the_sources(demo_run, capsys):
    _, root, jobs = demo_run
    capsys.readouterr()
    assert main(["pipeline", "--config-dir", str(jobs), "--root", str(root), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert out.count("up to date") >= len(ORDER)
    assert main(["lineage", "models:/llm-pipeline-demo@champion", "--root", str(root)]) == 0
    text = capsys.readouterr().out
    for artifact in ("models/dpo", "models/sft", "models/pretrain", "models/init", "shards", "shards-clean", "tokenizer",
                     "clean", "clean-strict", "raw"):
        assert f"    {artifact} " in text, artifact
    assert "en-fortunes (" in text


def test_the_demo_ends_by_serving_its_champion(demo_run):
    """What `make demo` runs last: scripts/demo_serve.py serves the champion, the openai client talks to it, and the
    server is gone afterwards."""
    import subprocess
    import sys

    code, root, _ = demo_run
    assert code == 0
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "LLMPIPE_TRACKING")}
    res = subprocess.run([sys.executable, str(REPO / "scripts" / "demo_serve.py"), "--root", str(root)],
                         capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "answered through the OpenAI API" in res.stdout and "llmpipe serve --root" in res.stdout
    log = (root / ".serve-cache" / "demo-serve.log").read_text()
    assert "model_version=1 status=200" in log
    served = json.loads((root / ".serve-cache" / "served.json").read_text())
    assert served["alias"] == "champion" and served["version"] == 1
