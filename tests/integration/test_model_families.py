"""Llama, Qwen2 and Qwen3 checkpoints through the model stages (pipeline/models/families.py).

Each case is a tiny random checkpoint built here with transformers' own classes (``LlamaForCausalLM``,
``Qwen2ForCausalLM`` with its q/k/v biases, ``Qwen3ForCausalLM`` with q/k norms and a head size that is not
hidden / heads), tied or untied as noted, saved with a real tokenizer: Qwen 3's (151,669 tokens; Qwen2 and
Qwen2.5 share its byte-level BPE) or Llama 3's (128,256), from ``.cache/refs`` (``make corpus`` fetches them).

* ``init`` (source: pretrained) with the checkpoint's own tokenizer as the pipeline's, so the vocabulary is
  identical: the model comes out with the same logits; then the GGUF export of that model (the family's
  llama.cpp architecture, its extra tensors, the real tokenizer's metadata) read back with the ``gguf`` package
  into the same logits. 20-40 s a case on a busy 2-core box (the 128k / 151k-token vocabularies: building, and
  ``gguf.GGUFReader`` parsing the token list), so Qwen3 and Llama (untied) run in the default suite, the rest slow.
* default suite: the quantize stage on a Qwen2 model moved onto our tokenizer, and its refusal to write GGUF for
  a config llama.cpp's graph cannot run (one line; int8 still made). tests/unit/test_gguf_export.py round-trips
  every family's GGUF with a small tokenizer.
* slow: the whole chain per family with our own (small, ChatML) tokenizer: init (vocabulary transfer) ->
  pretrain -> sft -> dpo -> reward -> evaluate -> quantize -> register (MLflow, SQLite).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

torch = pytest.importorskip("torch")

from pipeline.cli import main  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
REFS = REPO / ".cache" / "refs"
POSTTRAIN = REPO / "tests" / "fixtures" / "posttrain"
TEXT = "Қазақстан Республикасы. Москва — столица России. The quick brown fox."

# (model_type, tied output head, reference tokenizer, transformers class, GGUF architecture)
CASES = {
    "qwen2-tied": ("qwen2", True, "qwen3", "Qwen2ForCausalLM", "qwen2"),
    "qwen3-tied": ("qwen3", True, "qwen3", "Qwen3ForCausalLM", "qwen3"),
    "qwen3-untied": ("qwen3", False, "qwen3", "Qwen3ForCausalLM", "qwen3"),
    "llama-untied": ("llama", False, "llama3", "LlamaForCausalLM", "llama"),
}
CHAIN = ("qwen2-tied", "qwen3-untied", "llama-untied")
DEFAULT_SUITE = ("qwen3-untied", "llama-untied")  # one per real tokenizer; ~20 s each (qwen2: unit and quantize tests)


def _ref(name: str) -> Path:
    folder = REFS / name
    if not (folder / "tokenizer.json").is_file():
        pytest.skip(f"{folder}/tokenizer.json is missing (make corpus fetches the reference tokenizers)")
    return folder


def build_checkpoint(folder: Path, case: str, *, seed: int = 0) -> Path:
    """A tiny random checkpoint of the case's family with the reference tokenizer, as a hub download looks."""
    import transformers
    from transformers import AutoTokenizer

    from pipeline.models.llama import padded_vocab

    model_type, tied, ref, cls, _ = CASES[case]
    tok = AutoTokenizer.from_pretrained(_ref(ref))
    common = dict(vocab_size=padded_vocab(len(tok), 64), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=tied,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if model_type == "llama":
        config = transformers.LlamaConfig(**common, rope_theta=500_000.0)
    elif model_type == "qwen2":
        config = transformers.Qwen2Config(**common, rope_theta=1_000_000.0)
    else:
        config = transformers.Qwen3Config(**common, head_dim=32, rope_theta=1_000_000.0)  # 4 x 32 != 64, as Qwen3 does
    torch.manual_seed(seed)
    model = getattr(transformers, cls)(config)
    if model_type == "qwen2":  # the biases start at zero; give them values so that dropping one would show
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0.0, 0.5)
    if model_type == "qwen3":
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_norm.weight.uniform_(0.5, 1.5)
                layer.self_attn.k_norm.weight.uniform_(0.5, 1.5)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _commit_files(root: Path, name: str, source: Path, config: dict | None = None) -> None:
    """``source``'s files (not its manifest) committed as artifact ``name``; ``config`` updates its config.json."""
    from pipeline.storage import Storage

    out = Storage(str(root)).begin(name)
    for f in source.iterdir():
        if f.is_file() and f.name != "manifest.json":
            shutil.copy(f, out.path())
    if config:
        path = Path(out.path()) / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    out.commit({"stage": name.split("/")[-1], "config_hash": "test", "inputs": {}, "metrics": {}})


def _logits(model, ids: list[int]):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def _run(stage: str, root: Path, cfg: dict, tmp: Path, *extra: str) -> dict:
    path = tmp / f"{stage}.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    assert main(["run", stage, "-c", str(path), "--root", str(root), "--no-progress", *extra]) == 0, stage
    out = {"pretrain": "models/pretrain", "sft": "models/sft", "dpo": "models/dpo", "reward": "models/reward",
           "evaluate": "eval", "quantize": "quantized", "register": "registry", "init": "models/init"}[stage]
    return json.loads((root / out / "manifest.json").read_text(encoding="utf-8"))["metrics"]


# --------------------------------------------------------------------- default suite


@pytest.mark.parametrize("case", [c if c in DEFAULT_SUITE else pytest.param(c, marks=pytest.mark.slow) for c in CASES])
def test_init_keeps_a_checkpoint_with_its_own_tokenizer_and_gguf_round_trips(case, tmp_path):
    """The pipeline's tokenizer is the checkpoint's own: every token matches, the model keeps its class and its
    logits; its GGUF (F16) has the family's architecture and tensors and reads back into the same logits."""
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.quantization import gguf_export as ge

    model_type, tied, ref, cls, arch = CASES[case]
    src = build_checkpoint(tmp_path / "src", case)
    root = tmp_path / "root"
    _commit_files(root, "tokenizer", _ref(ref))
    m = _run("init", root, {"source": "pretrained", "pretrained_path": str(src)}, tmp_path)
    tok = AutoTokenizer.from_pretrained(src)
    assert m["vocab_matched"] == len(tok) and m["vocab_new"] == 0 and m["vocab_identical"], m
    assert m["tie_word_embeddings"] is tied and m["layers"] == 2

    out = root / "models" / "init"
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == model_type and config["architectures"] == [cls]
    before = AutoModelForCausalLM.from_pretrained(src).eval()
    after = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(after).__name__ == cls
    ids = tok(TEXT)["input_ids"][:24]
    assert torch.allclose(_logits(before, ids), _logits(after, ids), atol=1e-5)

    # GGUF: written for the family's llama.cpp architecture, read back with the gguf package
    path = str(tmp_path / "m.gguf")
    res = ge.write_gguf(path, after.state_dict(), after.config, str(out), "F16")
    reader = gguf.GGUFReader(path)
    assert reader.get_field("general.architecture").contents() == arch
    assert reader.get_field(f"{arch}.block_count").contents() == 2
    names = {t.name for t in reader.tensors}
    assert ("output.weight" in names) is (not tied)
    extra = {"qwen2": {f"blk.{i}.attn_{x}.bias" for i in (0, 1) for x in "qkv"},
             "qwen3": {f"blk.{i}.attn_{x}_norm.weight" for i in (0, 1) for x in "qk"}, "llama": set()}[arch]
    assert {n for n in names if n.endswith(".bias") or n.endswith(("attn_q_norm.weight", "attn_k_norm.weight"))} == extra
    assert len(names) == len(extra) + 9 * 2 + 2 + (not tied)  # 9 tensors a layer, embedding, final norm, head
    if arch == "qwen3":
        assert reader.get_field("qwen3.attention.key_length").contents() == 32
    assert res.tokenizer["pre"] == {"qwen3": "qwen2", "llama3": "llama-bpe"}[ref] and res.tokenizer["padded_rows"] == (
        config["vocab_size"] - len(tok))
    state, types = ge.read_gguf_state_dict(path, reader=reader)
    assert all(types[n] == "F32" for n in extra)
    back = AutoModelForCausalLM.from_pretrained(out).eval()
    missing, unexpected = back.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= ({"lm_head.weight"} if tied else set())
    if tied:
        back.tie_weights()
    assert torch.allclose(_logits(after, ids), _logits(back, ids), atol=2e-2)  # F16 weights
    if arch != "llama":  # NEOX RoPE in llama.cpp: q/k rows as HF has them (llama's are permuted, unit-tested)
        q = after.model.layers[0].self_attn.q_proj.weight
        assert torch.allclose(state["model.layers.0.self_attn.q_proj.weight"], q, atol=1e-2)


def test_unsupported_model_type_is_one_line_naming_the_families(tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    src = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=300, n_positions=64)).save_pretrained(src)
    root = tmp_path / "root"
    _commit_files(root, "tokenizer", _ref("qwen3"))
    cfg = tmp_path / "init.yaml"
    cfg.write_text(f"source: pretrained\npretrained_path: {src}\n", encoding="utf-8")
    capsys.readouterr()
    assert main(["run", "init", "-c", str(cfg), "--root", str(root), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'gpt2' model (GPT2LMHeadModel)" in err
    assert "llama (Llama), qwen2 (Qwen2 / Qwen2.5), qwen3 (Qwen3)" in err
    assert not (root / "models" / "init").exists()


def save_pipeline_tokenizer(folder: str | Path, *, qwen2: bool) -> None:
    """Our own small ChatML tokenizer (as tests/fixtures/posttrain/tiny.py trains it); ``qwen2``: with the qwen2
    pre-tokenizer and ``<|endoftext|>``, which is what a qwen2 model folder keeps (transformers loads its tokenizer
    as Qwen2Tokenizer, see pipeline.models.families.tokenizer_reload_problem)."""
    from pipeline.data.tokenization import TokenizerConfig, save_hf, train_bpe
    from tests.fixtures.posttrain.tiny import MAX_POS, fixture_texts

    cfg = TokenizerConfig(vocab_size=600, train_chars=20000, model_max_length=MAX_POS, min_frequency=2,
                          pretokenizer="qwen2" if qwen2 else "llama3",
                          special_tokens={"chat": ["<|im_start|>", "<|im_end|>"], "extra": ["<|endoftext|>"] if qwen2 else []})
    save_hf(train_bpe(fixture_texts(), cfg), cfg, str(folder))


def _chain_root(tmp_path: Path, case: str, *, qwen2_tokenizer: bool | None = None) -> tuple[Path, Path]:
    """A run root with our own small ChatML tokenizer (``tokenizer/``) and shards of the fixtures' text."""
    from transformers import AutoTokenizer

    from pipeline.storage import Storage
    from tests.fixtures.quantize_model import SEQ, commit_shards, token_stream

    src = build_checkpoint(tmp_path / "src", case)
    root = tmp_path / "root"
    storage = Storage(str(root))
    out = storage.begin("tokenizer")
    save_pipeline_tokenizer(out.path(), qwen2=CASES[case][0] == "qwen2" if qwen2_tokenizer is None else qwen2_tokenizer)
    out.commit({"stage": "tokenizer", "config_hash": "test", "inputs": {}, "metrics": {}})
    tok = AutoTokenizer.from_pretrained(root / "tokenizer")
    stream = token_stream(tok)
    commit_shards(storage, stream[: len(stream) // SEQ * SEQ].reshape(-1, SEQ), len(tok), bos=tok.bos_token_id,
                  eos=tok.eos_token_id)
    return root, src


def test_qwen2_refuses_a_tokenizer_transformers_would_load_as_another(tmp_path, capsys):
    """A qwen2 model folder's tokenizer loads as transformers' Qwen2Tokenizer whatever tokenizer_config.json says:
    our llama3-regex tokenizer would come back with Qwen2's regex and one token more. init says so, in one line,
    before any weights load; the same tokenizer is fine for qwen3 and llama."""
    root, src = _chain_root(tmp_path, "qwen2-tied", qwen2_tokenizer=False)
    cfg = tmp_path / "init.yaml"
    cfg.write_text(f"source: pretrained\npretrained_path: {src}\n", encoding="utf-8")
    capsys.readouterr()
    assert main(["run", "init", "-c", str(cfg), "--root", str(root), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "as Qwen2Tokenizer, which would change ours" in err, err
    assert "600 -> 601 tokens (adds <|endoftext|>)" in err and "another pre-tokenizer regex" in err
    assert "pretokenizer: qwen2" in err and not (root / "models" / "init").exists()

    from transformers import AutoTokenizer

    from pipeline.models.families import tokenizer_reload_problem

    tok = AutoTokenizer.from_pretrained(root / "tokenizer")
    assert tokenizer_reload_problem(tok, {"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"]}) is None
    assert tokenizer_reload_problem(tok, {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}) is None


def test_quantize_stage_on_a_qwen2_model_with_our_tokenizer(tmp_path):
    """init moves a Qwen2 checkpoint onto our tokenizer (rows of shared tokens copied); quantize writes its int8 and
    GGUF variants; the GGUF file is a qwen2 one that dequantizes back close to the original."""
    root, src = _chain_root(tmp_path, "qwen2-tied")
    m = _run("init", root, {"source": "pretrained", "pretrained_path": str(src)}, tmp_path)
    assert m["vocab_matched"] > 256 and m["vocab_new"] > 0 and m["vocab_size"] < 1000, m  # bytes and more matched
    from transformers import AutoTokenizer

    back = AutoTokenizer.from_pretrained(root / "models" / "init")  # as every later stage loads it
    assert type(back).__name__ == "Qwen2Tokenizer" and len(back) == m["tokenizer_size"]
    _commit_files(root, "models/dpo", root / "models" / "init")
    q = _run("quantize", root, {"variants": ["int8", "gguf-q8_0"], "max_blocks": 4, "llamacpp": "off"}, tmp_path)
    assert set(q["variants"]) == {"int8", "gguf-q8_0"}
    assert abs(q["variants"]["gguf-q8_0"]["perplexity_delta_pct"]) < 1.0, q["variants"]
    path = root / "quantized" / q["variants"]["gguf-q8_0"]["path"]
    from pipeline.quantization.gguf_export import read_metadata

    meta = read_metadata(str(path))
    assert meta["general.architecture"] == "qwen2" and meta["qwen2.block_count"] == 2


def test_quantize_skips_gguf_for_a_model_it_cannot_export_and_does_the_rest(tmp_path, capsys):
    """A Qwen2 config with sliding-window attention: no GGUF, one line saying why; int8 still made."""
    root, src = _chain_root(tmp_path, "qwen2-tied")
    _run("init", root, {"source": "pretrained", "pretrained_path": str(src)}, tmp_path)
    _commit_files(root, "models/dpo", root / "models" / "init",
                  config={"use_sliding_window": True, "sliding_window": 64, "max_window_layers": 0})
    capsys.readouterr()
    q = _run("quantize", root, {"variants": ["int8", "gguf-q8_0"], "max_blocks": 4, "llamacpp": "off"}, tmp_path)
    assert set(q["variants"]) == {"int8"}
    printed = capsys.readouterr()
    lines = [x for x in (printed.out + printed.err).splitlines() if "skipping gguf-q8_0" in x]
    assert len(lines) == 1 and "sliding-window attention" in lines[0], lines
    rc = main(["run", "quantize", "--root", str(root), "--no-progress", "--force", "--set", "variants=[gguf-f16]"])
    assert rc == 1 and "no other variant was asked for" in capsys.readouterr().err


# --------------------------------------------------------------------------- slow: the chain


@pytest.mark.slow
@pytest.mark.parametrize("case", CHAIN)
def test_family_through_every_model_stage(case, tmp_path, monkeypatch):
    from transformers import AutoConfig

    from pipeline.tracking import sqlite_uri

    _, tied, _, cls, arch = CASES[case]
    root, src = _chain_root(tmp_path, case)
    m = _run("init", root, {"source": "pretrained", "pretrained_path": str(src)}, tmp_path)
    assert m["vocab_new"] > 0 and m["tie_word_embeddings"] is tied
    train = {"micro_batch_size": 4, "zero_stage": 0, "log_every": 1, "seed": 0, "warmup_ratio": 0.0}
    p = _run("pretrain", root, {"micro_batch_size": 4, "global_batch_tokens": 64 * 8, "max_steps": 6, "lr": 3e-3,
                                "warmup_steps": 1, "zero_stage": 0, "checkpoint_every": 0, "eval_every": 6,
                                "eval_max_blocks": 8, "log_every": 1,
                                "generation": {"every": 0, "prompts": ["The"], "max_new_tokens": 4}}, tmp_path)
    assert p["steps"] == 6 and p["val_loss"] == p["val_loss"], p  # finite
    s = _run("sft", root, {**train, "data": [{"path": str(POSTTRAIN / "alpaca.jsonl")}], "max_length": 96,
                           "max_steps": 4, "lr": 1e-3, "generation": {"prompts": ["Hi"], "max_new_tokens": 4}}, tmp_path)
    assert s["steps"] == 4 and s["eval_loss_after"] < s["eval_loss_before"], s
    pref = {**train, "data": [{"path": str(POSTTRAIN / "preferences.jsonl")}], "model": "models/sft",
            "eval_fraction": 0.2, "max_length": 96, "max_steps": 2}
    d = _run("dpo", root, {**pref, "lr": 5e-4, "generation": {"prompts": ["Hi"], "max_new_tokens": 4}}, tmp_path)
    r = _run("reward", root, {**pref, "lr": 1e-3}, tmp_path)
    assert d["steps"] == 2 and r["steps"] == 2
    for name, want in (("pretrain", cls), ("sft", cls), ("dpo", cls)):
        assert AutoConfig.from_pretrained(root / "models" / name).architectures == [want], name
    assert AutoConfig.from_pretrained(root / "models" / "reward").architectures[0].endswith("ForSequenceClassification")
    e = _run("evaluate", root, {"models": [{"path": "models/pretrain"}, {"path": "models/dpo"}],
                                "perplexity": {"max_blocks": 4}, "heldout": None, "continuation": None,
                                "generation": {"prompts": ["Қазақстан"], "max_new_tokens": 4, "sampled": False},
                                "lm_eval": {"tasks": ["llmpipe_mc"], "limit": 2, "batch_size": 8},
                                "max_length": 64}, tmp_path)
    assert set(e["models"]) == {"pretrain", "dpo"} and e["models"]["dpo"]["val_perplexity"] > 1
    q = _run("quantize", root, {"variants": ["int8", "gguf-q8_0", "gguf-q4_0"], "max_blocks": 4, "llamacpp": "off"},
             tmp_path)
    assert set(q["variants"]) == {"int8", "gguf-q8_0", "gguf-q4_0"}
    assert abs(q["variants"]["gguf-q8_0"]["perplexity_delta_pct"]) < 1.0, q["variants"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", sqlite_uri(str(tmp_path / "mlflow" / "mlflow.db")))
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    monkeypatch.delenv("LLMPIPE_TRACKING", raising=False)
    g = _run("register", root, {"model": "models/dpo", "eval": "eval", "eval_label": "dpo", "name": f"fam-{arch}"},
             tmp_path)
    assert g["version"] == 1 and g["model_uri"] == f"models:/fam-{arch}/1"
