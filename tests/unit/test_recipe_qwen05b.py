"""The arithmetic in the comments of the expanded-Qwen2.5-0.5B recipe (jobs/cluster/tokenizer-qwen05b.yaml,
init-qwen05b.yaml, pretrain-qwen05b.yaml), recomputed from the configs and Qwen2.5-0.5B's shape (a changed config
with a stale comment fails here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.stages import load_config
from pipeline.training.flops import matmul_flops_per_token

CLUSTER = Path(__file__).resolve().parents[2] / "jobs" / "cluster"
# Qwen/Qwen2.5-0.5B's config.json
QWEN = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
            num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=32768, rope_theta=1e6)
QWEN_ROWS, QWEN3_TOKENIZER, QWEN25_TOKENIZER = 151_936, 151_669, 151_665
ASSUMED = {"web": {"kk": 3.5, "ru": 14.0, "en": 8.5}, "clean": {"kk": 2.1, "ru": 8.4, "en": 5.1}}
H100_PEAK = 989e12


def qwen_params(vocab: int) -> tuple[int, int]:
    """(total, input embedding) parameters of Qwen2.5-0.5B's shape with ``vocab`` rows (built on the meta device)."""
    torch = pytest.importorskip("torch")
    from transformers import Qwen2Config, Qwen2ForCausalLM

    with torch.device("meta"):
        model = Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab, **QWEN))
    return sum(p.numel() for p in model.parameters()), model.model.embed_tokens.weight.numel()


def test_expanded_qwen_recipe_arithmetic():
    from pipeline.models.llama import padded_vocab

    tok = load_config("tokenizer", CLUSTER / "tokenizer-qwen05b.yaml")
    init = load_config("init", CLUSTER / "init-qwen05b.yaml")
    pre = load_config("pretrain", CLUSTER / "pretrain-qwen05b.yaml")
    seq = load_config("pack", CLUSTER / "pack.yaml").seq_len

    # tokenizer: 168,000 = Qwen 3's 151,669 + 2 special tokens it lacks + 16,329 merges, a multiple of 64
    specials = tok.special_tokens
    assert (specials.bos, specials.eos, specials.pad) == ("<|begin_of_text|>", "<|endoftext|>", "<|pad|>")
    assert tok.extend.target_size == 168_000 and tok.extend.to_add(QWEN3_TOKENIZER, 2) == 16_329
    assert padded_vocab(tok.extend.target_size, init.pad_vocab_multiple) == 168_000
    assert set(tok.mix) == {"kk", "ru"} and tok.model_max_length == seq
    # against Qwen2.5's tokenizer: Qwen 3's 4 extra added tokens + our 2 special tokens start at the global mean
    assert tok.extend.target_size - QWEN25_TOKENIZER - 16_329 == 6
    assert init.source == "pretrained" and init.allow_hub and init.new_token_init == "auto"

    # the model: 494.0M -> 508.4M (+16,064 rows x 896 = +14.4M, +2.9%)
    total0, _ = qwen_params(QWEN_ROWS)
    total, embed = qwen_params(168_000)
    assert (round(total0 / 1e6, 1), round(total / 1e6, 1)) == (494.0, 508.4)
    assert total - total0 == (168_000 - QWEN_ROWS) * 896 == 14_393_344
    assert round((total - total0) / total0, 3) == 0.029 and round(embed / 1e6, 1) == 150.5

    # budget and phases
    tokens = pre.total_steps * pre.global_batch_tokens
    assert tokens / 1e9 == pytest.approx(10.49, abs=0.005)
    assert round(tokens / total) == 21  # tokens per parameter
    assert pre.global_batch_tokens == 128 * seq == pre.micro_batch_size * seq * 8 * 4
    web, clean = pre.phases
    phase_tokens = {"web": web.until_step * pre.global_batch_tokens,
                    "clean": (pre.total_steps - web.until_step) * pre.global_batch_tokens}
    assert phase_tokens["web"] / 1e9 == pytest.approx(9.44, abs=0.005)
    assert phase_tokens["clean"] / 1e9 == pytest.approx(1.05, abs=0.005)
    assert round(pre.total_steps * pre.decay_fraction) == pre.total_steps - web.until_step  # the decay is the clean phase
    passes = {}
    for ph in (web, clean):
        assert ph.mix_by == "lang" and set(ph.mix) == set(ASSUMED[ph.name])
        passes[ph.name] = {g: ph.mix[g] * ASSUMED[ph.name][g] for g in ph.mix}
        # one pass of the mixture is the phase, within 1%
        assert sum(passes[ph.name].values()) * 1e9 == pytest.approx(phase_tokens[ph.name], rel=0.01)
    assert round(sum(passes["web"].values()), 2) == 9.49 and round(sum(passes["clean"].values()), 2) == 1.04
    total_by_lang = {g: passes["web"][g] + passes["clean"][g] for g in web.mix}
    assert {g: round(t, 2) for g, t in total_by_lang.items()} == {"kk": 5.25, "ru": 2.64, "en": 2.64}
    drawn = sum(total_by_lang.values())
    assert round(drawn, 2) == 10.53
    assert {g: round(t / drawn, 2) for g, t in total_by_lang.items()} == {"kk": 0.50, "ru": 0.25, "en": 0.25}
    assert round(total_by_lang["kk"] / ASSUMED["web"]["kk"], 1) == 1.5  # x the kk corpus, under ~4 epochs
    assert [round(total_by_lang[g] / ASSUMED["web"][g], 2) for g in ("ru", "en")] == [0.19, 0.31]
    assert pre.warmup_steps * pre.global_batch_tokens / 1e9 == pytest.approx(0.52, abs=0.005)

    # compute
    fpt = matmul_flops_per_token({**QWEN, "vocab_size": 168_000}, seq)
    assert 6 * total / 1e9 == pytest.approx(3.051, abs=0.0005)  # the head is tied: N counts it once
    assert fpt / 1e9 == pytest.approx(4.107, abs=0.0005)
    flops = fpt * tokens
    assert flops == pytest.approx(4.31e19, rel=0.002)
    assert H100_PEAK * 0.4 / fpt / 1e3 == pytest.approx(96.3, abs=0.05)  # tokens/s per GPU at 40% MFU
    assert pre.global_batch_tokens / (8 * H100_PEAK * 0.4 / fpt) == pytest.approx(0.68, abs=0.005)  # s per step
    gpu_hours = {mfu: flops / (H100_PEAK * mfu) / 3600 for mfu in (0.3, 0.4, 0.5)}
    assert {m: round(h) for m, h in gpu_hours.items()} == {0.3: 40, 0.4: 30, 0.5: 24}
    assert {m: round(h / 8, 1) for m, h in gpu_hours.items()} == {0.3: 5.0, 0.4: 3.8, 0.5: 3.0}
    assert pre.zero_stage == 0 and 16 * total / 1e9 == pytest.approx(8.1, abs=0.05)  # bytes of weights+grads+Adam
