"""The GGUF writer (pipeline.quantization.gguf_export), read back with gguf.GGUFReader.

Tiny random Llamas (tied and untied head) with the BPE tokenizer of the post-training fixtures:
tensor names / shapes / types, header and tokenizer metadata, dequantised weights against the
originals (F16 within fp16 rounding, Q8_0 close, Q4_0 coarser), the model's logits with the
F16 weights, and the RoPE row permutation checked against both rotation conventions.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
gguf = pytest.importorskip("gguf")

from pipeline.errors import InputError  # noqa: E402
from pipeline.quantization import gguf_export as ge  # noqa: E402

LAYER_PARTS = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    from tests.fixtures.posttrain.tiny import save_tokenizer

    folder = tmp_path_factory.mktemp("tok")
    save_tokenizer(folder)
    return folder


def _model(tok_dir, tied: bool, vocab_pad: int = 0, seed: int = 0):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tok_dir)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok) + vocab_pad, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rope_theta=10000.0,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=tied, initializer_range=0.1)
    return LlamaForCausalLM(cfg).eval(), cfg, tok


@pytest.fixture(scope="module")
def written(tok_dir, tmp_path_factory):
    """{(tied, target): (path, model, cfg, result)} for both heads and the three types."""
    out = tmp_path_factory.mktemp("gguf")
    found = {}
    for tied in (False, True):
        model, cfg, tok = _model(tok_dir, tied, vocab_pad=0 if tied else 8)
        meta = ge.tokenizer_meta(str(tok_dir), cfg.vocab_size, cfg)
        for target in ge.SUPPORTED:
            path = str(out / f"{'tied' if tied else 'untied'}-{target}.gguf")
            res = ge.write_gguf(path, model.state_dict(), cfg, str(tok_dir), target, name="tiny", meta=meta)
            found[(tied, target)] = (path, model, cfg, res)
    return found


def _field(reader, key):
    f = reader.get_field(key)
    assert f is not None, key
    return f.contents()


def test_tensor_names_shapes_and_types(written):
    for (tied, target), (path, model, cfg, res) in written.items():
        reader = gguf.GGUFReader(path)
        tensors = {t.name: t for t in reader.tensors}
        expected = {"token_embd.weight", "output_norm.weight"} | ({"output.weight"} if not tied else set())
        expected |= {f"blk.{i}.{p}.weight" for i in range(2) for p in LAYER_PARTS}
        assert set(tensors) == expected, (tied, target)
        h, ffn = cfg.hidden_size, cfg.intermediate_size
        kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
        shapes = {"token_embd.weight": [h, cfg.vocab_size], "output.weight": [h, cfg.vocab_size], "output_norm.weight": [h],
                  "blk.1.attn_q.weight": [h, h], "blk.1.attn_k.weight": [h, kv], "blk.1.attn_v.weight": [h, kv],
                  "blk.1.attn_output.weight": [h, h], "blk.1.ffn_gate.weight": [h, ffn], "blk.1.ffn_up.weight": [h, ffn],
                  "blk.1.ffn_down.weight": [ffn, h], "blk.1.ffn_norm.weight": [h]}
        for name, shape in shapes.items():
            if name in tensors:  # GGUF lists ne0 (the row length) first
                assert [int(x) for x in tensors[name].shape] == shape, (name, tied, target)
        head = "token_embd.weight" if tied else "output.weight"
        for name, t in tensors.items():
            kind = t.tensor_type.name
            if name.endswith("norm.weight"):
                assert kind == "F32"
            elif target == "Q4_0" and name == head:
                assert kind == "Q8_0"  # the head keeps 8 bits in the 4-bit file
            else:
                assert kind == target, (name, kind, target)
        assert res.tensor_types == {n: t.tensor_type.name for n, t in tensors.items()}
        assert res.fallbacks == []


def test_header_and_tokenizer_metadata(written, tok_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    path, model, cfg, res = written[(False, "Q8_0")]
    r = gguf.GGUFReader(path)
    assert _field(r, "general.architecture") == "llama"
    assert _field(r, "general.name") == "tiny"
    assert _field(r, "general.file_type") == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    assert _field(r, "general.quantization_version") == gguf.GGML_QUANT_VERSION
    expect = {"llama.block_count": 2, "llama.embedding_length": 64, "llama.feed_forward_length": 96,
              "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2, "llama.context_length": 128,
              "llama.rope.dimension_count": 16, "llama.vocab_size": cfg.vocab_size}
    for key, value in expect.items():
        assert _field(r, key) == value, key
    assert _field(r, "llama.rope.freq_base") == pytest.approx(10000.0)
    assert _field(r, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(cfg.rms_norm_eps)

    assert _field(r, "tokenizer.ggml.model") == "gpt2"
    assert _field(r, "tokenizer.ggml.pre") == "llama-bpe"  # our Cyrillic-aware regex has no llama.cpp twin
    tokens, types = _field(r, "tokenizer.ggml.tokens"), _field(r, "tokenizer.ggml.token_type")
    assert len(tokens) == len(types) == cfg.vocab_size == len(tok) + 8
    vocab = tok.get_vocab()
    assert all(tokens[i] == t for t, i in vocab.items())
    assert tokens[-8:] == [f"[PAD{i}]" for i in range(len(tok), len(tok) + 8)]
    assert set(types[-8:]) == {int(gguf.TokenType.UNUSED)}
    for special in ("<|begin_of_text|>", "<|end_of_text|>", "<|pad|>", "<|im_start|>", "<|im_end|>"):
        assert types[vocab[special]] == int(gguf.TokenType.CONTROL), special
    assert types[vocab["a"]] == int(gguf.TokenType.NORMAL)
    merges = _field(r, "tokenizer.ggml.merges")
    raw = json.loads((tok_dir / "tokenizer.json").read_text(encoding="utf-8"))["model"]["merges"]
    assert merges[:5] == [m if isinstance(m, str) else " ".join(m) for m in raw[:5]] and len(merges) == len(raw)
    assert _field(r, "tokenizer.ggml.bos_token_id") == tok.bos_token_id
    assert _field(r, "tokenizer.ggml.eos_token_id") == tok.eos_token_id
    assert _field(r, "tokenizer.ggml.padding_token_id") == tok.pad_token_id
    assert _field(r, "tokenizer.ggml.eot_token_id") == vocab["<|im_end|>"]
    assert _field(r, "tokenizer.ggml.add_bos_token") is bool(tok("a")["input_ids"][0] == tok.bos_token_id)
    template = _field(r, "tokenizer.chat_template")
    assert "<|im_start|>" in template and "{% generation" not in template
    # the GGUF template renders what the HF one renders
    import jinja2

    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    hf = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False)
    assert jinja2.Template(template).render(messages=msgs, add_generation_prompt=False, bos_token=tok.bos_token) == hf
    assert res.tokenizer["padded_rows"] == 8


def test_dequantized_weights_match_the_original(written):
    for tied in (False, True):
        sd = {k: v.float() for k, v in written[(tied, "F16")][1].state_dict().items()}
        errors = {}
        for target in ge.SUPPORTED:
            path = written[(tied, target)][0]
            back, types = ge.read_gguf_state_dict(path)
            expected = set(sd) - ({"lm_head.weight"} if tied else set())
            assert set(back) == expected
            worst = 0.0
            for key, t in back.items():
                assert t.shape == sd[key].shape, key
                rel = float((t - sd[key]).abs().max() / sd[key].abs().max())
                if key.endswith("norm.weight"):
                    assert rel == 0.0  # F32 in every file
                worst = max(worst, rel)
            errors[target] = worst
            if target == "F16":
                for key, t in back.items():
                    torch.testing.assert_close(t, sd[key].half().float(), rtol=0, atol=0)  # exactly the fp16 rounding
        assert errors["F16"] < 1e-3, errors
        assert errors["Q8_0"] < 1.5e-2, errors  # 8-bit blocks: at most half a step of max|block|/127
        assert errors["F16"] < errors["Q8_0"] < errors["Q4_0"] < 0.2, errors


def test_f16_weights_give_the_same_logits(written):
    for tied in (False, True):
        path, model, cfg, _ = written[(tied, "F16")]
        back, _ = ge.read_gguf_state_dict(path)
        import copy

        other = copy.deepcopy(model)
        missing, unexpected = other.load_state_dict(back, strict=False)
        assert not unexpected and set(missing) == ({"lm_head.weight"} if tied else set())
        ids = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            a, b = model(ids).logits, other(ids).logits
        assert (a - b).abs().max() < 2e-2 * a.abs().max()
        assert torch.equal(a.argmax(-1), b.argmax(-1)) or (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.95


def _rope_hf(x, pos, theta):
    """transformers' convention: rotate the two halves of the head (rotate_half)."""
    d = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, d, 2) / d)
    ang = np.concatenate([pos * inv, pos * inv])
    rot = np.concatenate([-x[d // 2:], x[: d // 2]])
    return x * np.cos(ang) + rot * np.sin(ang)


def _rope_pairs(x, pos, theta):
    """llama.cpp's llama convention: rotate adjacent pairs (2i, 2i+1)."""
    d = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, d, 2) / d)
    c, s = np.cos(pos * inv), np.sin(pos * inv)
    out = x.copy()
    out[0::2] = x[0::2] * c - x[1::2] * s
    out[1::2] = x[0::2] * s + x[1::2] * c
    return out


def test_qk_permutation_turns_half_rotation_into_pair_rotation():
    rng = np.random.default_rng(0)
    heads, d, hidden = 3, 8, 12
    wq, wk = rng.normal(size=(heads * d, hidden)), rng.normal(size=(heads * d, hidden))
    x1, x2 = rng.normal(size=hidden), rng.normal(size=hidden)
    pq, pk = ge.permute_qk(wq, heads), ge.permute_qk(wk, heads)
    np.testing.assert_array_equal(ge.unpermute_qk(pq, heads), wq)
    for p1, p2 in ((3, 1), (7, 7), (0, 5)):
        for h in range(heads):
            sl = slice(h * d, (h + 1) * d)
            hf = _rope_hf((wq @ x1)[sl], p1, 10000.0) @ _rope_hf((wk @ x2)[sl], p2, 10000.0)
            cpp = _rope_pairs((pq @ x1)[sl], p1, 10000.0) @ _rope_pairs((pk @ x2)[sl], p2, 10000.0)
            assert hf == pytest.approx(cpp, rel=1e-9, abs=1e-9)
    # without the permutation the scores differ: the test would catch a missing or wrong one
    q, k = (wq @ x1)[:d], (wk @ x2)[:d]
    assert _rope_hf(q, 3, 1e4) @ _rope_hf(k, 1, 1e4) != pytest.approx(_rope_pairs(q, 3, 1e4) @ _rope_pairs(k, 1, 1e4))


def test_type_choice_and_fallback():
    assert ge.choose_type("blk.0.attn_norm.weight", (64,), "Q4_0") == "F32"
    assert ge.choose_type("blk.0.attn_q.weight", (64, 64), "Q4_0") == "Q4_0"
    assert ge.choose_type("blk.0.attn_q.weight", (64, 48), "Q8_0") == "F16"  # 48 values a row: not whole 32-blocks
    assert ge.choose_type("output.weight", (600, 64), "Q4_0") == "Q8_0"
    assert ge.choose_type("output.weight", (600, 64), "Q4_0", q4_keep_head_q8=False) == "Q4_0"
    assert ge.choose_type("token_embd.weight", (600, 64), "Q4_0") == "Q4_0"
    assert ge.choose_type("token_embd.weight", (600, 64), "Q4_0", tied=True) == "Q8_0"


def test_pre_tokenizer_names_and_template_markers():
    from pipeline.data.tokenization import GPT2_PATTERN, LLAMA3_PATTERN, PATTERNS, QWEN2_PATTERN, pretokenizer_pattern

    def raw(pattern):
        return {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False}]}}

    assert ge._pre_name(raw(GPT2_PATTERN))[0] == "gpt-2"
    assert ge._pre_name(raw(LLAMA3_PATTERN))[0] == "llama-bpe"
    assert ge._pre_name(raw(QWEN2_PATTERN))[0] == "qwen2"
    assert {ge._pre_name(raw(p))[0] for p in PATTERNS.values()} == {"llama-bpe", "qwen2", "gpt-4o", "gpt-2"}
    name, why = ge._pre_name(raw(pretokenizer_pattern("cyrillic-aware")))
    assert name is None and "llama.cpp has no preset" in why
    t = "{% for m in messages %}{% generation %}{{ m['content'] }}{%- endgeneration -%}{% endfor %}"
    assert ge.strip_hf_generation_markers(t) == "{% for m in messages %}{{ m['content'] }}{% endfor %}"


def test_rope_base_and_linear_scaling_from_the_config():
    """transformers 5 keeps rope_theta and the scaling in config.rope_parameters (rope_theta= / rope_scaling= still
    build one)."""
    from transformers import LlamaConfig

    dims = ge.check_llama_config(LlamaConfig(rope_theta=500_000.0))
    assert dims.rope_theta == 500_000.0 and dims.rope_scaling is None
    dims = ge.check_llama_config(LlamaConfig(rope_theta=250_000.0, rope_scaling={"rope_type": "linear", "factor": 2.0}))
    assert dims.rope_theta == 250_000.0 and dims.rope_scaling["rope_type"] == "linear" and dims.rope_scaling["factor"] == 2.0


def test_clear_errors(tok_dir, tmp_path):
    from transformers import GPT2Config, LlamaConfig

    with pytest.raises(InputError, match="holds a .gpt2. model .*supported model families .*qwen3"):
        ge.check_llama_config(GPT2Config(n_layer=1, n_embd=32, n_head=2), "models/x/")
    with pytest.raises(InputError, match="rope_scaling type 'yarn'"):
        ge.check_llama_config(LlamaConfig(rope_scaling={"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64}))
    model, cfg, _ = _model(tok_dir, tied=False)
    sd = model.state_dict()
    with pytest.raises(InputError, match="unknown GGUF type 'Q5_0'"):
        ge.write_gguf(str(tmp_path / "x.gguf"), sd, cfg, str(tok_dir), "Q5_0")
    with pytest.raises(InputError, match="no place in a GGUF llama model"):
        ge.write_gguf(str(tmp_path / "x.gguf"), {**sd, "model.extra.weight": torch.zeros(2)}, cfg, str(tok_dir), "F16")
    sd.pop("model.layers.1.mlp.up_proj.weight")
    with pytest.raises(InputError, match="lacks 1 llama weights"):
        ge.write_gguf(str(tmp_path / "x.gguf"), sd, cfg, str(tok_dir), "F16")
    with pytest.raises(InputError, match="no tokenizer.json"):
        ge.tokenizer_meta(str(tmp_path), 600)
    with pytest.raises(InputError, match="only 10 rows"):
        ge.tokenizer_meta(str(tok_dir), 10)


@pytest.mark.parametrize("family,tied", [("qwen2", True), ("qwen2", False), ("qwen3", True), ("qwen3", False)])
def test_qwen_families_round_trip(tok_dir, tmp_path, family, tied):
    """Qwen2 (q/k/v biases) and Qwen3 (q/k RMSNorm, head_dim 32 != hidden / heads) write as llama.cpp's qwen2 / qwen3
    architectures: the extra tensors as F32 under llama.cpp's names, q/k rows unpermuted (NEOX RoPE), the header
    under the architecture's prefix; the file reads back into the same model (F16: same logits; Q8_0: close)."""
    import transformers
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    common = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, rope_theta=1e6, tie_word_embeddings=tied,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                  initializer_range=0.1)
    torch.manual_seed(0)
    if family == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common)).eval()
        extra = {f"blk.{i}.attn_{x}.bias": model.model.layers[i].self_attn.get_submodule(f"{x}_proj").bias
                 for i in range(2) for x in "qkv"}
    else:
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**common, head_dim=32)).eval()
        extra = {f"blk.{i}.attn_{x}_norm.weight": model.model.layers[i].self_attn.get_submodule(f"{x}_norm").weight
                 for i in range(2) for x in "qk"}
    with torch.no_grad():
        for p in extra.values():
            p.uniform_(0.5, 1.5)  # biases start at 0, norms at 1: values that would show a dropped or swapped tensor
    ids = torch.tensor([tok("Қазақстан Республикасы. The quick brown fox.")["input_ids"]])
    with torch.no_grad():
        ref = model(ids).logits
    for target, tol in (("F16", 2e-2), ("Q8_0", 0.15)):
        path = str(tmp_path / f"{family}-{target}.gguf")
        res = ge.write_gguf(path, model.state_dict(), model.config, str(tok_dir), target)
        r = gguf.GGUFReader(path)
        assert _field(r, "general.architecture") == family
        assert _field(r, f"{family}.block_count") == 2 and _field(r, f"{family}.attention.head_count_kv") == 2
        assert _field(r, f"{family}.rope.freq_base") == 1e6
        if family == "qwen3":
            assert _field(r, "qwen3.attention.key_length") == 32 and _field(r, "qwen3.rope.dimension_count") == 32
        tensors = {t.name: t for t in r.tensors}
        assert set(extra) <= set(tensors) and ("output.weight" in tensors) is (not tied)
        assert len(tensors) == 2 + 9 * 2 + len(extra) + (not tied)
        assert all(res.tensor_types[n] == "F32" for n in extra)
        q0 = tensors["blk.0.attn_q.weight"]
        back, _ = ge.read_gguf_state_dict(path)
        if target == "F16":  # stored in HF row order: no RoPE permutation for these architectures
            raw = gguf.quants.dequantize(q0.data, q0.tensor_type).reshape(model.model.layers[0].self_attn.q_proj.weight.shape)
            assert np.allclose(raw, model.model.layers[0].self_attn.q_proj.weight.detach().numpy(), atol=1e-3)
        for name, p in extra.items():
            assert torch.equal(back[ge.gguf_to_hf_names(2, family)[name][0]], p.detach().float())
        copy_ = type(model)(model.config).eval()
        missing, unexpected = copy_.load_state_dict(back, strict=False)
        assert not unexpected and set(missing) <= ({"lm_head.weight"} if tied else set())
        copy_.tie_weights()
        with torch.no_grad():
            assert (copy_(ids).logits - ref).abs().max() < tol, (family, tied, target)


def test_gguf_problem_names_what_cannot_be_written():
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    assert ge.gguf_problem(Qwen2Config()) is None and ge.gguf_problem(Qwen3Config()) is None
    assert "sliding-window" in ge.gguf_problem(Qwen2Config(use_sliding_window=True), "models/x/")
    assert "Qwen3 with attention biases" in ge.gguf_problem(Qwen3Config(attention_bias=True))
    assert "attention/MLP biases" in ge.gguf_problem(LlamaConfig(attention_bias=True))
    yarn = Qwen2Config(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768})
    assert "rope_scaling type 'yarn'" in ge.gguf_problem(yarn)
    with pytest.raises(InputError, match="rope_scaling type 'yarn'"):
        ge.check_llama_config(yarn)
    assert ge.model_dims(yarn).arch == "qwen2"  # the dims still come (the quantize stage's int8 needs them)
