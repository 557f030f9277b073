"""sft / dpo / reward on CPU: a 2-layer Llama (hidden 64) with a BPE tokenizer trained on the fixtures
(ChatML template, <|im_start|>/<|im_end|>), committed as ``models/pretrain`` of a run root.

In-process runs go through ``runner.run_stage``; the launcher runs (torchrun, 2 processes, gloo)
through ``python -m pipeline.training.launcher``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fixtures.posttrain.tiny import template_root  # noqa: F401 (a fixture)

REPO = Path(__file__).resolve().parents[2]
FIX = REPO / "tests" / "fixtures" / "posttrain"



def _cfg(stage: str, **over):
    from pipeline.stages import get_stage

    base = {"max_length": 128, "micro_batch_size": 8, "warmup_ratio": 0.0, "log_every": 5, "seed": 0}
    if stage == "sft":
        base.update(data=[{"path": str(FIX / "alpaca.jsonl")}, {"path": str(FIX / "chat.jsonl")}], max_steps=40, lr=3e-3)
    else:
        base.update(data=[{"path": str(FIX / "preferences.jsonl")}], model="models/pretrain", eval_fraction=0.2,
                    max_steps=30, lr=5e-4 if stage == "dpo" else 1e-3)
    base.update(over)
    return get_stage(stage).config.model_validate(base)


def _run(stage: str, root: Path, cfg):
    from pipeline import runner
    from pipeline.storage import Storage

    t0 = time.time()
    outcome = runner.run_stage(stage, cfg, Storage(str(root)), progress=False)
    print(f"{stage}: {time.time() - t0:.1f}s")
    return outcome


# ---------------------------------------------------------------------------------------- sft


def test_sft_learns_follows_template_and_stops(run_root):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = _cfg("sft")
    m = _run("sft", run_root, cfg).manifest["metrics"]
    assert m["steps"] == 40 and m["mode"] == "full"
    assert m["eval_examples"] > 0
    assert m["eval_loss_after"] < 0.75 * m["eval_loss_before"], m
    out = run_root / "models" / "sft"
    gens = json.loads((out / "generations.json").read_text(encoding="utf-8"))
    assert len(gens) == 3
    for g in gens:
        assert g["rendered"].endswith("<|im_end|>\n<|im_start|>assistant\n")
        assert g["stopped"], g
    # the exported folder: chat template saved, generation stops at <|im_end|> / EOS by its own config
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert im_end in model.generation_config.eos_token_id and tok.eos_token_id in model.generation_config.eos_token_id
    text = tok.apply_chat_template([{"role": "user", "content": "Repeat the word.\napple"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    ids = tok(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        new = model.generate(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"], max_new_tokens=20, do_sample=False)[0, ids["input_ids"].shape[1]:].tolist()
    assert new[-1] in (im_end, tok.eos_token_id) and len(new) < 20
    assert (out / "train_metrics.jsonl").is_file() and (out / "manifest.json").is_file()
    assert _run("sft", run_root, cfg).status == "up to date"


def test_sft_on_tool_use_then_function_calling_evaluation(run_root):
    """SFT on the kk/ru/en tool-use fixture (tools in the system turn, calls and results), then evaluate's function
    calling on the held-out set: real shares per language with intervals in the manifest and the report."""
    from pipeline import runner
    from pipeline.stages import get_stage
    from pipeline.storage import Storage
    from tests.fixtures.posttrain.tiny import commit_model

    storage = Storage(str(run_root))
    commit_model(storage, "models/pretrain-long", max_pos=1024)
    cfg = _cfg("sft", model="models/pretrain-long", data=[{"path": str(FIX / "tools.jsonl")}], max_length=1024,
               max_steps=30, lr=3e-3, micro_batch_size=4)
    m = _run("sft", run_root, cfg).manifest["metrics"]
    assert m["tool_conversations"] == m["train_examples"] > 0 and m["misaligned_conversations"] == 0
    assert m["data_skipped"] == {} and m["eval_loss_after"] < m["eval_loss_before"], m
    ev = get_stage("evaluate").config.model_validate({
        "models": [{"path": "models/sft", "label": "sft", "chat": True}], "perplexity": None, "heldout": None,
        "generation": None, "lm_eval": None, "plots": False,
        "tool_use": {"files": [str(FIX / "tools_eval.jsonl")], "max_new_tokens": 48}})
    res = runner.run_stage("evaluate", ev, storage, progress=False).manifest["metrics"]["models"]["sft"]
    for key in ("tool_valid", "tool_name", "tool_arguments", "tool_abstain", "tool_valid_kk", "tool_arguments_ru",
                "tool_abstain_en"):
        assert 0.0 <= res[key] <= 1.0, (key, res)
    print({k: v for k, v in res.items() if k.startswith("tool_")})
    details = json.loads((run_root / "eval" / "sft" / "tool_use.json").read_text(encoding="utf-8"))
    assert len(details["items"]) == 54 and details["scores"]["overall"]["arguments"]["n"] == 45
    report = (run_root / "eval" / "report.md").read_text(encoding="utf-8")
    assert "## Function calling" in report and "| sft | kk |" in report and " [" in report


def test_sft_lora_merges_into_a_plain_model(run_root):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = _cfg("sft", lora={"r": 8, "alpha": 16, "dropout": 0.0}, max_steps=15, lr=5e-3)
    m = _run("sft", run_root, cfg).manifest["metrics"]
    assert m["mode"] == "lora" and m["eval_loss_after"] < m["eval_loss_before"]
    out = run_root / "models" / "sft"
    assert (out / "adapter" / "adapter_config.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    base = AutoModelForCausalLM.from_pretrained(run_root / "models" / "pretrain")
    unmerged = PeftModel.from_pretrained(base, out / "adapter")
    ids = torch.tensor([[5, 17, 42, 99, 300, 7, 12]])
    with torch.no_grad():
        a, b = merged(ids).logits, unmerged(ids).logits
        plain = AutoModelForCausalLM.from_pretrained(run_root / "models" / "pretrain")(ids).logits
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(a, plain, atol=1e-4)  # the adapter did change the model


def test_sft_packing_trains(run_root):
    m = _run("sft", run_root, _cfg("sft", packing=True, max_steps=10, micro_batch_size=2)).manifest["metrics"]
    assert m["packing"] and m["steps"] == 10 and m["eval_loss_after"] < m["eval_loss_before"]


# ---------------------------------------------------------------------------------------- dpo


@pytest.mark.parametrize("lora", [False, pytest.param(True, marks=pytest.mark.slow)],
                         ids=["frozen-copy-ref", "lora-implicit-ref"])
def test_dpo_raises_reward_margin_and_accuracy(run_root, lora):
    extra = {"lora": {"r": 8, "alpha": 16, "dropout": 0.0}, "lr": 5e-3} if lora else {}
    m = _run("dpo", run_root, _cfg("dpo", **extra)).manifest["metrics"]
    assert m["reference"] == ("adapters disabled" if lora else "frozen copy")
    for split in ("train", "eval"):
        assert m[f"{split}_reward_accuracy_before"] == 0.0 and m[f"{split}_reward_margin_before"] == 0.0
        assert m[f"{split}_reward_margin_after"] > 0.1, m
        assert m[f"{split}_reward_accuracy_after"] >= 0.75, m
        assert m[f"{split}_logp_margin_after"] > m[f"{split}_logp_margin_before"]
    out = run_root / "models" / "dpo"
    assert (out / "model.safetensors").is_file() and (out / "generations.json").is_file()
    assert (out / "adapter").is_dir() == lora


# ------------------------------------------------------------------------------------- reward


def test_reward_model_ranks_pairs(run_root):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    m = _run("reward", run_root, _cfg("reward")).manifest["metrics"]
    assert m["train_accuracy_after"] > 0.75, m
    assert m["eval_accuracy_after"] > 0.5, m
    out = run_root / "models" / "reward"
    model = AutoModelForSequenceClassification.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.num_labels == 1
    ids = tok("<|im_start|>user\nRepeat the word.\napple<|im_end|>\n", return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        assert torch.isfinite(model(**ids).logits).all()


# ---------------------------------------------------------------------------------- bad input


def _no_output(root: Path, stage: str) -> bool:
    return not (root / "models" / stage).exists()


def test_bad_inputs_fail_before_compute(run_root, tmp_path, monkeypatch):
    import transformers

    from pipeline.errors import InputError
    from pipeline.storage import Storage
    from tests.fixtures.posttrain.tiny import commit_model

    def _no_weights(*a, **k):
        raise AssertionError("weights were loaded before the input checks")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", _no_weights)
    cases = []
    (tmp_path / "empty.jsonl").write_text("", encoding="utf-8")
    cases.append((_cfg("sft", data=[{"path": str(tmp_path / "empty.jsonl")}]), "holds no records"))
    (tmp_path / "bad.jsonl").write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n', encoding="utf-8")
    cases.append((_cfg("sft", data=[{"path": str(tmp_path / "bad.jsonl")}]), r"bad\.jsonl:2: record has no 'output'"))
    cases.append((_cfg("sft", max_length=1024), "beyond the model's max_position_embeddings 256"))
    cases.append((_cfg("sft", model="models/missing"), "needs 'models/missing/'.*no committed output"))
    storage = Storage(str(run_root))
    commit_model(storage, "models/notok", tokenizer=False)
    cases.append((_cfg("sft", model="models/notok"), "has no tokenizer"))
    commit_model(storage, "models/nochat", chat=False)
    cases.append((_cfg("sft", model="models/nochat"), "no chat template and no <\\|im_start\\|>"))
    for cfg, match in cases:
        with pytest.raises(InputError, match=match):
            _run("sft", run_root, cfg)
    assert _no_output(run_root, "sft")
    (tmp_path / "p.jsonl").write_text('{"prompt": "x", "chosen": "y"}\n', encoding="utf-8")
    for stage in ("dpo", "reward"):
        with pytest.raises(InputError, match=r"p\.jsonl:1: preference record has no 'rejected'"):
            _run(stage, run_root, _cfg(stage, data=[{"path": str(tmp_path / "p.jsonl")}]))
        with pytest.raises(InputError, match="needs 'models/sft/'"):
            _run(stage, run_root, _cfg(stage, model="models/sft"))


# ------------------------------------------------------------------------------------ launcher


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK") and not k.startswith("PET_")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    return env


@pytest.mark.slow
def test_sft_two_processes_zero2_through_launcher(run_root, tmp_path):
    import yaml
    from transformers import AutoModelForCausalLM

    cfg = {
        "data": [{"path": str(FIX / "alpaca.jsonl")}, {"path": str(FIX / "chat.jsonl")}],
        "max_length": 128, "micro_batch_size": 4, "max_steps": 12, "lr": 3e-3, "warmup_ratio": 0.0, "log_every": 4,
        "zero_stage": 2, "generation": {"prompts": ["Repeat the word.\napple"], "max_new_tokens": 8},
    }
    path = tmp_path / "sft.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "pipeline.training.launcher", "sft", "-c", str(path), "--root",
                           str(run_root), "--nproc-per-node", "2", "--no-progress"],
                          cwd=REPO, env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    print(f"launcher sft 2 x ZeRO-2: {time.time() - t0:.1f}s")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    manifest = json.loads((run_root / "models" / "sft" / "manifest.json").read_text())
    m = manifest["metrics"]
    assert manifest["world_size"] == 2 and m["world_size"] == 2 and m["zero_stage"] == 2 and m["steps"] == 12
    assert m["eval_loss_after"] < m["eval_loss_before"]
    model = AutoModelForCausalLM.from_pretrained(run_root / "models" / "sft")
    assert model.num_parameters() > 0
    assert "== sft: done" in proc.stderr  # the launcher relays the workers' output to stderr


@pytest.mark.slow
@pytest.mark.parametrize("stage,zero", [("dpo", 2), ("dpo", 3), ("reward", 2)], ids=["dpo-zero2", "dpo-zero3", "reward-zero2"])
def test_preference_stages_two_processes_through_launcher(run_root, tmp_path, stage, zero):
    """dpo (frozen reference, ZeRO-2 and ZeRO-3: TRL puts the reference under DeepSpeed too) and reward on 2 ranks."""
    import yaml

    cfg = {"data": [{"path": str(FIX / "preferences.jsonl")}], "model": "models/pretrain", "eval_fraction": 0.2,
           "max_length": 128, "micro_batch_size": 4, "max_steps": 10, "lr": 5e-4 if stage == "dpo" else 1e-3,
           "warmup_ratio": 0.0, "log_every": 5, "zero_stage": zero}
    if stage == "dpo":
        cfg["generation"] = {"prompts": ["Repeat the word.\napple"], "max_new_tokens": 8}
    path = tmp_path / f"{stage}.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "pipeline.training.launcher", stage, "-c", str(path), "--root",
                           str(run_root), "--nproc-per-node", "2", "--no-progress"],
                          cwd=REPO, env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    print(f"launcher {stage} 2 x ZeRO-{zero}: {time.time() - t0:.1f}s")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    out = run_root / "models" / stage
    manifest = json.loads((out / "manifest.json").read_text())
    m = manifest["metrics"]
    assert manifest["world_size"] == 2 and m["world_size"] == 2 and m["zero_stage"] == zero and m["steps"] == 10
    log = [json.loads(line) for line in (out / "train_metrics.jsonl").read_text().splitlines()]
    assert any("loss" in r for r in log)
    if stage == "dpo":
        from transformers import AutoModelForCausalLM

        assert m["reference"] == "frozen copy"
        if zero == 2:  # measured on every rank before and after (ZeRO-3 skips it: the weights are partitioned)
            assert m["train_logp_margin_after"] > m["train_logp_margin_before"], m
        model = AutoModelForCausalLM.from_pretrained(out)
    else:
        from transformers import AutoModelForSequenceClassification

        assert m["train_accuracy_after"] > 0.5, m
        model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.num_parameters() > 0
    assert f"== {stage}: done" in proc.stderr
