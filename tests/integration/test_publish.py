"""`llmpipe publish`: a registered version -> the folder pushed to the Hugging Face Hub (model, tokenizer with its
chat template, GGUF files, a model card) -> the push, with `HfApi` replaced by a recorder (nothing reaches the Hub).

The registered model is real and cheap: collect -> clean -> tokenizer -> pack -> init run on the committed fixtures
with MLflow tracking on; pretrain / sft / dpo are stand-ins (init's weights, manifests shaped by the stages'
own config classes, each logged to its MLflow run like a stage's); quantize and register run for real. So the card
is built from real data-stage manifests, from the run root and from MLflow alone.
"""

from __future__ import annotations

import filecmp
import json
import os
import shutil
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.storage import Storage
from tests.conftest import write_configs

NAME = "tiny-publish"
URI = f"models:/{NAME}@champion"
REPO_ID = "kk-lab/tiny-kk-ru-en"
EVAL = {"val_loss": 6.61, "val_perplexity": 742.5, "perplexity_kk": 901.0, "bits_per_byte_kk": 2.51,
        "tokens_kk": 1234.0, "lm_eval_llmpipe_mc_kk_acc": 0.3, "lm_eval_llmpipe_mc_kk_acc_norm": 0.28,
        "tool_valid": 0.5}


def _stand_in(storage: Storage, name: str, stage: str, config: dict, metrics: dict, inputs: list[str]) -> None:
    """A model artifact as a training stage commits it (init's weights), with its own MLflow run and manifest."""
    from pipeline import tracking

    tracker = tracking.Tracker(tracking.resolve_uri(storage)).start(stage, tags={"llmpipe.stage": stage})
    out = storage.begin(name)
    init = Path(storage.path("models/init"))
    for f in init.iterdir():
        if f.name != "manifest.json":
            out.put_local(str(f))
    manifest = out.commit({
        "stage": stage, "config": config, "config_hash": f"{stage}-test", "metrics": metrics,
        "inputs": {i: {"fingerprint": storage.manifest(i)["fingerprint"], "uri": storage.url(i)} for i in inputs},
        "mlflow_run_id": tracker.run_id, "code_version": "test", "ended_at": "2026-01-01T00:00:00+00:00",
    })
    tracking.finish_stage(tracker, [], storage, name, manifest)


def _training_stand_ins(storage: Storage) -> None:
    from pipeline.training.config import DPOConfig, PretrainConfig, SFTConfig

    pre = PretrainConfig(max_steps=4, global_batch_tokens=512, micro_batch_size=4, lr=3e-3, schedule="wsd",
                         warmup_steps=1, phases=[{"name": "broad", "shards": "shards", "mix": {"kk": 2.0, "ru": 1.0,
                                                                                            "en": 0.5}}])
    langs = {"kk": {"tokens": 1024, "samples": 16, "blocks": 225, "epochs": 0.07},
             "ru": {"tokens": 640, "samples": 10, "blocks": 140, "epochs": 0.07},
             "en": {"tokens": 384, "samples": 6, "blocks": 154, "epochs": 0.04}}
    _stand_in(storage, "models/pretrain", "pretrain", pre.model_dump(mode="json"), {
        "steps": 4, "tokens": 2048, "seq_len": 64, "world_size": 1, "grad_accum": 2, "micro_batch_size": 4,
        "zero_stage": 2, "precision": "fp32", "train_loss": 6.7, "val_loss": 6.66, "val_perplexity": 780.0,
        "phases": {"broad": {"shards": "shards", "steps": [0, 4], "mix": {"kk": 2.0, "ru": 1.0, "en": 0.5},
                             "mix_by": "lang", "samples": 32, "tokens": 2048, "epochs": 0.06, "languages": langs}},
        "tokens_by_language": {k: v["tokens"] for k, v in langs.items()}}, ["models/init", "shards", "tokenizer"])
    sft = SFTConfig(data=[{"path": "tests/fixtures/posttrain/alpaca.jsonl"}, {"path": "kk-lab/kk-instructions"}],
                    max_steps=2, lr=3e-4, max_length=64)
    _stand_in(storage, "models/sft", "sft", sft.model_dump(mode="json"), {
        "steps": 2, "train_examples": 14, "eval_examples": 2, "mode": "full", "world_size": 1,
        "eval_loss_before": 6.69, "eval_loss_after": 6.67, "train_loss": 6.72}, ["models/pretrain"])
    dpo = DPOConfig(data=[{"path": "tests/fixtures/posttrain/preferences.jsonl"}], max_steps=2, beta=0.1)
    _stand_in(storage, "models/dpo", "dpo", dpo.model_dump(mode="json"), {
        "steps": 2, "train_examples": 14, "eval_examples": 2, "mode": "full", "reference": "frozen copy",
        "world_size": 1, "eval_reward_accuracy_before": 0.0, "eval_reward_accuracy_after": 0.5,
        "eval_logp_margin_before": 43.2, "eval_logp_margin_after": 43.3}, ["models/sft"])


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """A run root whose models/dpo is registered as tiny-publish version 1 (champion), quantized to GGUF. The MLflow
    store (SQLite, artefacts beside it) lives outside the run root, as a tracking server's would."""
    from pipeline.tracking import sqlite_uri

    base = tmp_path_factory.mktemp("publish")
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", sqlite_uri(str(base / "mlflow" / "mlflow.db")))
    mp.setenv("MLFLOW_EXPERIMENT_NAME", "test-publish")
    mp.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    mp.delenv("LLMPIPE_TRACKING", raising=False)
    mp.delenv("HF_TOKEN", raising=False)
    cfg = write_configs(base / "jobs")
    (cfg / "init.yaml").write_text("source: random\npreset: tiny\nmax_position_embeddings: 128\n", encoding="utf-8")
    root = base / "root"
    assert main(["pipeline", "--config-dir", str(cfg), "--root", str(root), "--until", "init", "--no-progress"]) == 0
    storage = Storage(str(root))
    _training_stand_ins(storage)
    assert main(["run", "quantize", "--root", str(root), "--no-progress", "--set", "variants=[gguf-q8_0, gguf-q4_0]",
                 "--set", "max_blocks=4", "--set", "llamacpp=off"]) == 0
    out = storage.begin("eval")
    out.write_json("results.json", {"models": {"dpo": EVAL}})
    out.commit({"stage": "evaluate", "config_hash": "test", "inputs": {}, "metrics": {"models": {"dpo": EVAL}}})
    (cfg / "register.yaml").write_text(f"model: models/dpo\neval: eval\neval_label: dpo\nname: {NAME}\n"
                                       "description: tiny kk/ru/en test model\nauto_promote: true\n", encoding="utf-8")
    assert main(["run", "register", "-c", str(cfg / "register.yaml"), "--root", str(root), "--no-progress"]) == 0
    yield root
    mp.undo()


def _card(folder: Path):
    from huggingface_hub import ModelCard

    return ModelCard.load(str(folder / "README.md"))  # a path: read from disk, never the Hub


def test_dry_run_writes_a_folder_that_loads_with_its_card(published, tmp_path, capsys):
    from huggingface_hub import ModelCard
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, out = published, tmp_path / "hub"
    assert main(["publish", URI, "--repo-id", REPO_ID, "--root", str(root), "--gguf", "--dry-run", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"models:/{NAME}/1 (alias champion) -> {REPO_ID} (private)" in printed
    assert "nothing was uploaded" in printed and f"'{NAME} version 1 (models:/{NAME}/1" in printed

    # exactly the HF folder + GGUF files + card: none of MLflow's own files (MLmodel, requirements.txt, ...)
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(["README.md", "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                            "tokenizer_config.json", "chat_template.jinja", "tiny-kk-ru-en-Q8_0.gguf",
                            "tiny-kk-ru-en-Q4_0.gguf"]), files
    assert all(f in printed for f in files)
    quantized = Storage(str(root)).manifest("quantized")["metrics"]
    for variant in ("gguf-q8_0", "gguf-q4_0"):
        src = root / "quantized" / quantized["variants"][variant]["path"]
        assert filecmp.cmp(src, out / f"tiny-kk-ru-en-{variant[5:].upper()}.gguf", shallow=False)

    # it loads as a Hub repo would, and the chat template renders
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert "local_files_only" not in tok_cfg and "is_local" not in tok_cfg
    tok = AutoTokenizer.from_pretrained(str(out))
    model = AutoModelForCausalLM.from_pretrained(str(out))
    text = tok.apply_chat_template([{"role": "user", "content": "Сәлем!"}], tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>user\nСәлем!<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")
    ids = tok.apply_chat_template([{"role": "user", "content": "Сәлем!"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    assert model.generate(**ids, max_new_tokens=2, do_sample=False).shape[1] == ids["input_ids"].shape[1] + 2

    # the card's metadata, as the Hub reads it
    card = _card(out)
    data = card.data
    assert data.language == ["kk", "ru", "en"] and data.license == "apache-2.0"
    assert data.library_name == "transformers" and data.pipeline_tag == "text-generation"
    assert {"llmpipe", "gguf", "conversational", "dpo"} <= set(data.tags)
    assert data.datasets == ["kk-lab/kk-instructions"]  # a hub id from sft's data; local files are not datasets
    assert data.base_model is None  # init started from random weights
    results = {r.metric_name: r for r in data.eval_results}
    assert results["val_perplexity"].metric_value == pytest.approx(EVAL["val_perplexity"])
    assert results["lm_eval_llmpipe_mc_kk_acc"].metric_type == "accuracy"
    assert results["lm_eval_llmpipe_mc_kk_acc"].dataset_type == "llmpipe_mc_kk"
    assert "tokens_kk" not in results  # a count, not a result
    assert "model-index" in data.to_dict() and data.to_dict()["model-index"][0]["name"] == "tiny-kk-ru-en"
    assert ModelCard(str(card)).data.to_dict() == data.to_dict()  # the text round-trips

    body = card.text
    clean = Storage(str(root)).manifest("clean")["metrics"]
    for section in ("## How to use", "## Model", "## Training data", "### Cleaning: `clean/`",
                    "## Tokenizer and token counts", "## Training recipe", "## Evaluation", "## Quantized variants",
                    "## License", "## Limitations", "## Provenance"):
        assert section in body, section
    assert f"{clean['documents_in']:,} documents in, {clean['kept']:,} kept" in body
    assert "| en-fortunes | en | `…/en/*.txt` |" in body and "/work/" not in body  # no machine paths
    assert "- **pretrain**: 4 steps x 512 tokens = 2,048 tokens" in body
    assert "| broad | `shards/` | 0-4 | 2,048 | by lang: kk x2.0, ru x1.0, en x0.5 |" in body
    assert "- **dpo**:" in body and "beta 0.1" in body
    q8 = quantized["variants"]["gguf-q8_0"]
    assert f"{q8['perplexity_delta_pct']:+.2f}% | `tiny-kk-ru-en-Q8_0.gguf` |" in body
    assert "demonstration size" in body and "No safety evaluation" in body
    assert "released under `apache-2.0`" in body


def test_the_card_from_the_registry_alone_matches_the_run_roots(published, tmp_path, capsys):
    """Without the run root (moved away) the manifests come from the stages' MLflow runs: the same card."""
    root = published
    with_root, alone = tmp_path / "with-root", tmp_path / "alone"
    assert main(["publish", URI, "--repo-id", REPO_ID, "--root", str(root), "--dry-run", str(with_root),
                 "--license", "cc-by-4.0"]) == 0
    moved = root.with_name("root-moved")
    os.rename(root, moved)
    try:
        capsys.readouterr()
        assert main(["publish", URI, "--repo-id", REPO_ID, "--dry-run", str(alone), "--license", "cc-by-4.0"]) == 0
        printed = capsys.readouterr().out
        assert "is not reachable here: facts from the registry and MLflow runs" in printed
        assert "card facts: 8 of 8 lineage manifests (0 from the run root, 8 from MLflow runs); quantized variants: " \
               "MLflow run " in printed
        assert (alone / "README.md").read_text(encoding="utf-8") == (with_root / "README.md").read_text(encoding="utf-8")
        assert _card(alone).data.license == "cc-by-4.0"
        # GGUF files live only under the run root: one line saying so
        assert main(["publish", URI, "--repo-id", REPO_ID, "--gguf", "--dry-run", str(tmp_path / "g")]) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "--gguf" in err and "no run root is reachable" in err
    finally:
        os.rename(moved, root)


class _Hub:
    """Records what `llmpipe publish` asks of huggingface_hub.HfApi; answers like the Hub would, offline."""

    calls: list[tuple[str, tuple, dict]] = []

    def __init__(self, token=None, **kwargs):
        self.calls.append(("HfApi", (), {"token": token, **kwargs}))

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", (repo_id,), kwargs))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kwargs):
        folder = Path(kwargs["folder_path"])
        kwargs["files"] = sorted(p.name for p in folder.iterdir())  # the folder is gone after the command
        kwargs["card"] = (folder / "README.md").read_text(encoding="utf-8")
        self.calls.append(("upload_folder", (), kwargs))

        class Info:
            commit_url = f"https://huggingface.co/{kwargs['repo_id']}/commit/abc123"

        return Info()


@pytest.fixture
def hub(monkeypatch):
    import huggingface_hub

    _Hub.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", _Hub)
    return _Hub


def test_push_creates_a_private_repo_and_uploads_the_folder(published, hub, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    assert main(["publish", URI, "--repo-id", REPO_ID, "--root", str(published)]) == 0
    assert f"pushed models:/{NAME}/1 to {REPO_ID}: https://huggingface.co/{REPO_ID}/commit/abc123" in capsys.readouterr().out
    (api, _, init), (create, create_args, create_kw), (upload, _, up) = hub.calls
    assert (api, init) == ("HfApi", {"token": "hf_test_token"})
    assert (create, create_args) == ("create_repo", (REPO_ID,))
    assert create_kw == {"private": True, "exist_ok": True, "repo_type": "model"}
    assert upload == "upload_folder" and up["repo_id"] == REPO_ID and up["repo_type"] == "model"
    assert up["commit_message"] == f"{NAME} version 1 (models:/{NAME}/1, alias champion) from llmpipe"
    assert "model.safetensors" in up["files"] and "README.md" in up["files"] and "chat_template.jinja" in up["files"]
    assert not any(f.endswith(".gguf") for f in up["files"])  # only with --gguf
    assert "# tiny-kk-ru-en" in up["card"]
    assert not Path(up["folder_path"]).exists()  # built in a temporary folder, removed after the push

    hub.calls.clear()
    assert main(["publish", f"models:/{NAME}/1", "--repo-id", REPO_ID, "--root", str(published), "--public"]) == 0
    assert hub.calls[1][2]["private"] is False


def test_push_without_a_token_or_with_a_bad_repo_id_is_one_line(published, hub, monkeypatch, capsys):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    assert main(["publish", URI, "--repo-id", REPO_ID, "--root", str(published)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == ["error: $HF_TOKEN is not set: export a Hugging Face write token to push (or --dry-run "
                                "DIR to write the folder without pushing)"]
    assert hub.calls == []  # nothing built, nothing called
    assert main(["publish", URI, "--repo-id", "no-namespace", "--root", str(published), "--dry-run", "x"]) == 1
    assert "is not a Hub repo id: use ORG/NAME" in capsys.readouterr().err


def test_dry_run_refuses_a_folder_with_other_files(published, tmp_path, capsys):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine", encoding="utf-8")
    assert main(["publish", URI, "--repo-id", REPO_ID, "--root", str(published), "--dry-run", str(busy)]) == 1
    assert "is not empty and is not an earlier publish folder" in capsys.readouterr().err
    assert sorted(p.name for p in busy.iterdir()) == ["notes.txt"]
    # an earlier dry run's folder is replaced
    again = tmp_path / "again"
    for _ in range(2):
        assert main(["publish", URI, "--repo-id", REPO_ID, "--root", str(published), "--dry-run", str(again)]) == 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folders left
    shutil.rmtree(again)


def test_gguf_files_given_by_path(published, tmp_path, capsys):
    q4 = Storage(str(published)).manifest("quantized")["metrics"]["variants"]["gguf-q4_0"]["path"]
    mine = tmp_path / "mine-q4.gguf"
    shutil.copyfile(published / "quantized" / q4, mine)
    out = tmp_path / "hub"
    assert main(["publish", URI, "--repo-id", REPO_ID, "--root", str(published), "--gguf-file", str(mine),
                 "--dry-run", str(out)]) == 0
    assert filecmp.cmp(mine, out / "mine-q4.gguf", shallow=False)
    card = _card(out)
    assert "gguf" in card.data.tags and "Also included as given (not measured here): `mine-q4.gguf`." in card.text
    capsys.readouterr()
    not_gguf = tmp_path / "notes.gguf"
    not_gguf.write_text("not a model", encoding="utf-8")
    assert main(["publish", URI, "--repo-id", REPO_ID, "--root", str(published), "--gguf-file", str(not_gguf),
                 "--dry-run", str(tmp_path / "other")]) == 1
    assert capsys.readouterr().err.strip() == f"error: --gguf-file {not_gguf} is not a GGUF file (no GGUF magic)"
    assert not (tmp_path / "other").exists()  # refused before anything was downloaded or written
