"""The init stage's model library (pipeline.models.llama) and the stage itself on tiny models.

Tokenizers here are word-level with hand-picked vocabularies, so which tokens two vocabularies
share (and at which ids) is known exactly.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")

from pipeline.errors import ConfigError, InputError  # noqa: E402
from pipeline.models import llama as L  # noqa: E402

SPECIALS = ["<pad>", "<s>", "</s>"]


# ------------------------------------------------------------------------------- helpers


def wordlevel_tokenizer(words: list[str]):
    """A fast tokenizer whose ids are SPECIALS then ``words``, in order."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate([*SPECIALS, *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def commit_tokenizer(root: Path, tokenizer) -> None:
    """A committed ``tokenizer/`` artifact under ``root``, as the tokenizer stage leaves it."""
    from pipeline.storage import Storage

    out = Storage(str(root)).begin("tokenizer")
    tokenizer.save_pretrained(out.path())
    out.commit({"stage": "tokenizer", "config_hash": "x", "inputs": {}, "metrics": {}})


def save_llama(folder: Path, tokenizer, *, layers: int = 4, tied: bool = False, vocab: int | None = None, seed: int = 1) -> Path:
    """A small random Llama with its tokenizer, saved like a downloaded checkpoint."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab or len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # distinct, non-trivial values everywhere (norms start at 1.0 otherwise)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def stage():
    """Run the init stage through the runner."""
    from pipeline import runner
    from pipeline.stages.init import InitConfig
    from pipeline.storage import Storage

    def run(root: Path, **fields):
        return runner.run_stage("init", InitConfig(**fields), Storage(str(root)), progress=False)

    return run


def load_output(root: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = root / "models" / "init"
    return AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)


def logits_of(model, ids: list[int]):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits


# -------------------------------------------------------------------------------- presets


EXPECTED_TOTAL = {"tiny": 4_194_624, "125m": 134_105_856, "350m": 373_867_520, "1b": 1_104_218_112}


@pytest.mark.parametrize("name", list(L.PRESETS))
def test_preset_builds_and_counts(name):
    shape = L.PRESETS[name]
    assert shape.problems() == []
    n = L.preset_param_counts(shape, 32000)
    assert n["total"] == EXPECTED_TOTAL[name]
    assert n["embedding"] == 32000 * shape.hidden_size and n["lm_head"] == n["embedding"]
    assert n["non_embedding"] == n["total"] - n["embedding"]
    if name != "tiny":  # the names are honest: within 15% of the nominal size
        nominal = {"125m": 125e6, "350m": 350e6, "1b": 1e9}[name]
        assert 0.85 < n["total"] / nominal < 1.15


def test_tied_counts_once():
    from dataclasses import replace

    n = L.preset_param_counts(replace(L.PRESETS["125m"], tie_word_embeddings=True), 32000)
    assert n["lm_head"] == 0 and n["total"] == 109_529_856


def test_shape_problems_and_padding():
    assert L.resolve_shape("tiny", num_heads=3).problems()  # 64 % 3
    assert L.resolve_shape("tiny", num_kv_heads=3).problems()  # 4 % 3
    assert L.resolve_shape("tiny", hidden_size=96, num_heads=32).problems()  # head dim 3 is odd
    assert L.resolve_shape("1b", num_layers=None).num_layers == 16
    assert L.padded_vocab(32000, 64) == 32000 and L.padded_vocab(32001, 64) == 32064 and L.padded_vocab(5, 1) == 5


# ----------------------------------------------------------------------------- config


def test_config_validation():
    from pydantic import ValidationError

    from pipeline.stages.init import InitConfig, UpScale

    assert InitConfig(preset="tiny").shape().num_layers == 2
    cases = [
        {},  # random without preset
        {"preset": "tiny", "num_heads": 3},
        {"source": "pretrained"},
        {"source": "pretrained", "pretrained_path": "x", "preset": "tiny"},
        {"source": "pretrained", "pretrained_path": "x", "hidden_size": 128},
        {"preset": "tiny", "pretrained_path": "x"},
        {"preset": "tiny", "scale": {"mode": "up", "target_layers": 5}},
        {"preset": "tiny", "scale": {"mode": "down", "drop_layers": [1, 1]}},
        {"preset": "tiny", "scale": {"mode": "down", "drop_layers": []}},
        {"preset": "tiny", "scale": {"mode": "sideways"}},
        {"preset": "tiny", "scale": {"mode": "up", "target_layers": 4, "drop_layers": [0]}},
    ]
    for fields in cases:
        with pytest.raises(ValidationError):
            InitConfig(**fields)
    up = InitConfig(preset="tiny", scale={"mode": "up", "target_layers": 4, "copy": "solar"})
    assert isinstance(up.scale, UpScale) and up.scale.recipe == "solar"
    again = InitConfig.model_validate(up.model_dump(mode="json"))  # manifests round-trip
    assert again == up
    ok = InitConfig(source="pretrained", pretrained_path="x", rope_theta=1e6, max_position_embeddings=4096)
    assert ok.rope_theta == 1e6


# ---------------------------------------------------------------------------- surgery


def test_solar_layer_map():
    assert L.solar_layer_map(12, 16) == [*range(0, 8), *range(4, 12)]
    assert L.solar_layer_map(4, 6) == [0, 1, 2, 1, 2, 3]
    assert L.solar_layer_map(32, 48) == [*range(0, 24), *range(8, 32)]  # SOLAR 10.7B
    assert L.solar_layer_map(3, 6) == [0, 1, 2, 0, 1, 2]  # k = 0
    for n, target in ((4, 4), (4, 10), (4, 7)):
        with pytest.raises(ValueError):
            L.solar_layer_map(n, target)


def test_drop_layer_map():
    assert L.drop_layer_map(6, [1, 4]) == [0, 2, 3, 5]
    with pytest.raises(ValueError):
        L.drop_layer_map(4, [4])
    with pytest.raises(ValueError):
        L.drop_layer_map(2, [0, 1])


def test_remap_layers_clones_repeats():
    sd = {"model.embed_tokens.weight": torch.zeros(2), **{f"model.layers.{i}.w": torch.full((2,), float(i)) for i in range(3)}}
    out = L.remap_layers(sd, [0, 1, 1, 2])
    assert [out[f"model.layers.{i}.w"][0].item() for i in range(4)] == [0, 1, 1, 2]
    assert out["model.layers.1.w"].data_ptr() != out["model.layers.2.w"].data_ptr()
    assert out["model.embed_tokens.weight"] is sd["model.embed_tokens.weight"]


def test_rope_theta_set_read_and_saved():
    """transformers 5 keeps rope_theta in config.rope_parameters, 4.x as its own field."""
    from transformers import LlamaConfig

    config = LlamaConfig(rope_theta=10000.0)
    L.set_rope_theta(config, 1e6)
    assert L.rope_settings(config)["rope_theta"] == 1e6
    assert L.shape_of(LlamaConfig.from_dict(config.to_dict())).rope_theta == 1e6


def test_transfer_vocab_mean_and_random():
    old = torch.arange(12, dtype=torch.float32).reshape(4, 3)  # 3 real tokens + 1 padding row
    match = L.match_vocab(["b", "x", "a"], {"a": 0, "b": 1, "c": 2}, old_rows=4)
    assert match.new_to_old == {0: 1, 2: 0} and match.new_ids == [1] and match.old_rows == [0, 1, 2]
    new = L.transfer_vocab(old, match, rows=5, init="mean", generator=torch.Generator().manual_seed(0), std=0.02)
    mean = old[:3].mean(0)
    assert torch.equal(new[0], old[1]) and torch.equal(new[2], old[0])
    for row in (1, 3, 4):  # the new token and the two padding rows
        assert torch.allclose(new[row], mean)
    rnd = L.transfer_vocab(old, match, rows=5, init="random", generator=torch.Generator().manual_seed(0), std=0.02)
    assert torch.equal(rnd[0], old[1]) and rnd[1].abs().max() < 0.2 and not torch.allclose(rnd[1], mean)


# ---------------------------------------------------------------------------- the stage


def test_random_tiny(tmp_path, stage):
    tok = wordlevel_tokenizer([f"w{i}" for i in range(97)])  # 100 tokens -> 128 rows
    commit_tokenizer(tmp_path, tok)
    outcome = stage(tmp_path, preset="tiny", seed=3)
    m = outcome.manifest["metrics"]
    assert m["vocab_size"] == 128 and m["tokenizer_size"] == 100 and m["layers"] == 2 and m["kv_heads"] == 2
    model, loaded_tok = load_output(tmp_path)
    assert type(model).__name__ == "LlamaForCausalLM" and len(loaded_tok) == 100
    assert model.config.vocab_size == 128
    assert (model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id) == (1, 2, 0)
    gc = model.generation_config
    assert (gc.bos_token_id, gc.eos_token_id, gc.pad_token_id) == (1, 2, 0)
    n = L.param_counts(model)
    assert (m["params_total"], m["params_embedding"], m["params_lm_head"]) == (n["total"], n["embedding"], n["lm_head"])
    assert torch.isfinite(logits_of(model, [1, 5, 6, 7])).all()
    files = {f["path"] for f in outcome.manifest["files"]}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= files
    assert (tmp_path / "models" / "init" / "model.safetensors").stat().st_mode & 0o044 == 0o044  # group/other can read
    # same seed, same weights; the manifest says what made it
    assert outcome.manifest["config"]["preset"] == "tiny"


def test_random_overrides_bf16(tmp_path, stage):
    commit_tokenizer(tmp_path, wordlevel_tokenizer(["a", "b"]))
    m = stage(tmp_path, preset="tiny", num_layers=3, hidden_size=32, num_heads=2, num_kv_heads=1, intermediate_size=48,
              tie_word_embeddings=True, dtype="bfloat16", pad_vocab_multiple=8, rope_theta=10000.0).manifest["metrics"]
    assert (m["layers"], m["hidden_size"], m["heads"], m["kv_heads"], m["vocab_size"]) == (3, 32, 2, 1, 8)
    assert m["params_lm_head"] == 0 and m["tie_word_embeddings"]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "models" / "init", dtype="auto")  # the stored dtype
    assert model.dtype == torch.bfloat16 and L.rope_settings(model.config)["rope_theta"] == 10000.0
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


OLD_WORDS = ["apple", "bread", "cheese", "dog", "egg", "fish"]
NEW_WORDS = ["fish", "zebra", "apple", "yak", "dog"]  # 3 shared (at other ids), 2 new


@pytest.mark.parametrize("tied", [False, True])
def test_pretrained_vocab_transfer(tmp_path, stage, tied):
    old_tok = wordlevel_tokenizer(OLD_WORDS)
    src = save_llama(tmp_path / "src", old_tok, tied=tied, vocab=16)  # 9 tokens, 16 rows (7 padding rows)
    root = tmp_path / "root"
    new_tok = wordlevel_tokenizer(NEW_WORDS)  # 8 tokens
    commit_tokenizer(root, new_tok)
    m = stage(root, source="pretrained", pretrained_path=str(src), pad_vocab_multiple=4).manifest["metrics"]
    assert (m["vocab_matched"], m["vocab_new"], m["vocab_padding"], m["vocab_size"]) == (6, 2, 0, 8)  # 3 specials + 3 words

    from transformers import AutoModelForCausalLM

    old = AutoModelForCausalLM.from_pretrained(src)
    new, _ = load_output(root)
    old_ov, new_ov = old_tok.get_vocab(), new_tok.get_vocab()
    real_old = sorted(old_ov.values())  # the mean is over the old tokenizer's rows, not the padding rows
    for name, get in (("embed", lambda mod: mod.model.embed_tokens.weight), ("head", lambda mod: mod.lm_head.weight)):
        ow, nw = get(old).detach(), get(new).detach()
        for token, nid in new_ov.items():
            if token in old_ov:
                assert torch.equal(nw[nid], ow[old_ov[token]]), (name, token)
            else:
                assert torch.allclose(nw[nid], ow[real_old].mean(0), atol=1e-6), (name, token)
    assert (new.lm_head.weight.data_ptr() == new.model.embed_tokens.weight.data_ptr()) == tied
    # the blocks are untouched
    assert torch.equal(new.model.layers[3].mlp.up_proj.weight, old.model.layers[3].mlp.up_proj.weight)
    assert new.config.vocab_size == 8 and new.config.bos_token_id == 1
    assert torch.isfinite(logits_of(new, [1, 3, 4, 5, 6, 7])).all()


def test_pretrained_same_vocab_is_identity(tmp_path, stage):
    tok = wordlevel_tokenizer(OLD_WORDS)  # 9 tokens; the checkpoint has 64 rows = our padded size
    src = save_llama(tmp_path / "src", tok, vocab=64)
    root = tmp_path / "root"
    commit_tokenizer(root, tok)
    m = stage(root, source="pretrained", pretrained_path=str(src), max_position_embeddings=256).manifest["metrics"]
    assert m["vocab_identical"] and m["vocab_new"] == 0 and m["max_position_embeddings"] == 256
    from transformers import AutoModelForCausalLM

    old = AutoModelForCausalLM.from_pretrained(src)
    new, _ = load_output(root)
    for (k, a), (k2, b) in zip(old.state_dict().items(), new.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k


def _layer(model, i):
    return {k: v for k, v in model.model.layers[i].state_dict().items()}


def _same_layer(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_down_scaling_drops_the_named_layers(tmp_path, stage):
    tok = wordlevel_tokenizer(OLD_WORDS)
    src = save_llama(tmp_path / "src", tok, layers=5, vocab=64)
    root = tmp_path / "root"
    commit_tokenizer(root, tok)
    m = stage(root, source="pretrained", pretrained_path=str(src), scale={"mode": "down", "drop_layers": [3, 1]}).manifest["metrics"]
    assert m["scale"] == {"mode": "down", "from_layers": 5, "to_layers": 3, "layer_map": [0, 2, 4]} and m["layers"] == 3
    from transformers import AutoModelForCausalLM

    old = AutoModelForCausalLM.from_pretrained(src)
    new, _ = load_output(root)
    assert new.config.num_hidden_layers == 3
    for new_i, old_i in enumerate([0, 2, 4]):
        assert _same_layer(_layer(new, new_i), _layer(old, old_i))
    assert not _same_layer(_layer(new, 1), _layer(old, 1))
    assert torch.equal(new.model.norm.weight, old.model.norm.weight)
    assert torch.isfinite(logits_of(new, [1, 3, 4])).all()


def test_up_scaling_solar_4_to_6(tmp_path, stage):
    tok = wordlevel_tokenizer(OLD_WORDS)
    src = save_llama(tmp_path / "src", tok, layers=4, vocab=64)
    root = tmp_path / "root"
    commit_tokenizer(root, tok)
    m = stage(root, source="pretrained", pretrained_path=str(src), scale={"mode": "up", "target_layers": 6}).manifest["metrics"]
    assert m["scale"]["layer_map"] == [0, 1, 2, 1, 2, 3] and m["scale"]["k"] == 1 and m["layers"] == 6
    from transformers import AutoModelForCausalLM

    old = AutoModelForCausalLM.from_pretrained(src)
    new, _ = load_output(root)  # AutoModelForCausalLM loads the 6-layer checkpoint
    assert new.config.num_hidden_layers == 6 and len(new.model.layers) == 6
    for new_i, old_i in enumerate([0, 1, 2, 1, 2, 3]):
        assert _same_layer(_layer(new, new_i), _layer(old, old_i)), new_i
    assert [layer.self_attn.layer_idx for layer in new.model.layers] == list(range(6))  # KV-cache slots
    assert torch.isfinite(logits_of(new, [1, 3, 4, 5])).all()
    out = new.generate(torch.tensor([[1, 3]]), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 5)


def test_random_with_up_scaling(tmp_path, stage):
    commit_tokenizer(tmp_path, wordlevel_tokenizer(OLD_WORDS))
    m = stage(tmp_path, preset="tiny", scale={"mode": "up", "target_layers": 4}).manifest["metrics"]
    assert m["scale"]["layer_map"] == [0, 1, 0, 1] and m["layers"] == 4
    with pytest.raises(ConfigError, match="target_layers in 3..4"):
        stage(tmp_path, preset="tiny", scale={"mode": "up", "target_layers": 6})


# ------------------------------------------------------------------------------- errors


def test_missing_folder(tmp_path, stage):
    commit_tokenizer(tmp_path, wordlevel_tokenizer(OLD_WORDS))
    with pytest.raises(InputError, match="not a local folder"):
        stage(tmp_path, source="pretrained", pretrained_path=str(tmp_path / "nope"))
    with pytest.raises(InputError, match="hub downloads are off"):
        stage(tmp_path, source="pretrained", pretrained_path="meta-llama/Llama-3.2-1B")
    assert not (tmp_path / "models" / "init").exists()
    assert [p.name for p in (tmp_path / "models").iterdir()] == []  # the aborted temporary is gone


def test_hub_allowed_but_offline(tmp_path, stage, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    commit_tokenizer(tmp_path, wordlevel_tokenizer(OLD_WORDS))
    with pytest.raises(InputError, match="could not fetch 'no-such-org/no-such-model' from the Hugging Face hub"):
        stage(tmp_path, source="pretrained", pretrained_path="no-such-org/no-such-model", allow_hub=True)


def test_not_llama(tmp_path, stage):
    from transformers import GPT2Config, GPT2LMHeadModel

    src = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=64)).save_pretrained(src)
    root = tmp_path / "root"
    commit_tokenizer(root, wordlevel_tokenizer(OLD_WORDS))
    with pytest.raises(InputError, match=r"holds a 'gpt2' model \(GPT2LMHeadModel\); supported model families \(model_type\): llama \(Llama\), qwen2"):
        stage(root, source="pretrained", pretrained_path=str(src))


def test_folder_without_weights_or_tokenizer(tmp_path, stage):
    tok = wordlevel_tokenizer(OLD_WORDS)
    src = save_llama(tmp_path / "src", tok, vocab=64)
    root = tmp_path / "root"
    commit_tokenizer(root, tok)
    (src / "tokenizer.json").unlink()
    (src / "tokenizer_config.json").unlink()
    with pytest.raises(InputError, match="cannot load the pretrained model's tokenizer"):
        stage(root, source="pretrained", pretrained_path=str(src))
    (src / "model.safetensors").unlink()
    with pytest.raises(InputError, match="no weights"):
        stage(root, source="pretrained", pretrained_path=str(src))


def test_forbid_new_tokens_fails_before_loading_weights(tmp_path, stage, monkeypatch):
    from transformers import LlamaForCausalLM

    src = save_llama(tmp_path / "src", wordlevel_tokenizer(OLD_WORDS))
    root = tmp_path / "root"
    commit_tokenizer(root, wordlevel_tokenizer(NEW_WORDS))

    def boom(*a, **k):
        raise AssertionError("weights were loaded before the vocabulary check")

    monkeypatch.setattr(LlamaForCausalLM, "from_pretrained", boom)
    with pytest.raises(InputError, match=r"2 of our 8 tokens are not in the vocabulary .* new_token_init is 'forbid'"):
        stage(root, source="pretrained", pretrained_path=str(src), new_token_init="forbid")


def test_no_shared_tokens(tmp_path, stage):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "q": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    src = save_llama(tmp_path / "src", PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]"))
    root = tmp_path / "root"
    commit_tokenizer(root, wordlevel_tokenizer(NEW_WORDS))
    with pytest.raises(InputError, match="none of our 8 tokens"):
        stage(root, source="pretrained", pretrained_path=str(src))


def test_gpt2_config_json_is_read_not_trusted(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "mistral", "architectures": ["MistralForCausalLM"]}))
    with pytest.raises(InputError, match="'mistral' model"):
        L.check_pretrained(str(folder))
    (folder / "config.json").write_text("{not json")
    with pytest.raises(InputError, match="not readable JSON"):
        L.check_pretrained(str(folder))
