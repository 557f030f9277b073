"""The arithmetic in jobs/cluster/pretrain-350m.yaml's comments, recomputed from the configs it describes (a changed
config with a stale comment fails here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.stages import load_config
from pipeline.training.flops import matmul_flops_per_token

CLUSTER = Path(__file__).resolve().parents[2] / "jobs" / "cluster"
# the comment's assumed train tokens per language (billions) in shards/ and shards-clean/
ASSUMED = {"web": {"kk": 3.5, "ru": 14.0, "en": 8.5}, "clean": {"kk": 2.1, "ru": 8.4, "en": 5.1}}
H100_PEAK = 989e12


def test_350m_recipe_arithmetic():
    from pipeline.models.llama import preset_param_counts

    init = load_config("init", CLUSTER / "init-350m.yaml")
    pre = load_config("pretrain", CLUSTER / "pretrain-350m.yaml")
    seq = load_config("pack", CLUSTER / "pack.yaml").seq_len
    vocab = load_config("tokenizer", CLUSTER / "tokenizer.yaml").vocab_size
    shape = init.shape()
    counts = preset_param_counts(shape, vocab_size=vocab)
    assert (counts["total"], counts["non_embedding"]) == (439_403_520, 373_867_520)  # "439.4M", "N = 373.9M"
    assert init.max_position_embeddings == seq == 4096

    tokens = pre.total_steps * pre.global_batch_tokens
    assert tokens / 1e9 == pytest.approx(24.12, abs=0.005)
    assert tokens / (20 * counts["non_embedding"]) == pytest.approx(3.2, abs=0.05)  # x Chinchilla
    assert pre.global_batch_tokens == 128 * seq == pre.micro_batch_size * seq * 8 * 4
    web, clean = pre.phases
    phase_tokens = {"web": web.until_step * pre.global_batch_tokens,
                    "clean": (pre.total_steps - web.until_step) * pre.global_batch_tokens}
    assert phase_tokens["web"] / 1e9 == pytest.approx(21.71, abs=0.005)
    assert phase_tokens["clean"] / 1e9 == pytest.approx(2.41, abs=0.005)
    # the decay of wsd is the clean phase
    assert round(pre.total_steps * pre.decay_fraction) == pre.total_steps - web.until_step
    # under the assumed sizes one pass of each mix fills its phase, so the weights are the epochs
    for ph in (web, clean):
        assert ph.mix_by == "lang" and set(ph.mix) == set(ASSUMED[ph.name])
        per_lang = {g: ph.mix[g] * ASSUMED[ph.name][g] for g in ph.mix}
        assert sum(per_lang.values()) * 1e9 == pytest.approx(phase_tokens[ph.name], rel=0.005)
    total = {g: web.mix[g] * ASSUMED["web"][g] + clean.mix[g] * ASSUMED["clean"][g] for g in web.mix}
    assert {g: round(t, 2) for g, t in total.items()} == {"kk": 9.70, "ru": 7.34, "en": 7.09}
    assert total["kk"] / sum(total.values()) == pytest.approx(0.40, abs=0.005)
    assert total["kk"] / ASSUMED["web"]["kk"] == pytest.approx(2.8, abs=0.05)  # epochs of the kk corpus, under ~4
    assert web.mix["kk"] + clean.mix["kk"] == pytest.approx(2.95)  # of its cleanest documents: ~3
    assert [round(total[g] / ASSUMED["web"][g], 1) for g in ("ru", "en")] == [0.5, 0.8]  # subsampled

    fpt = matmul_flops_per_token({"hidden_size": shape.hidden_size, "num_layers": shape.num_layers,
                                  "num_heads": shape.num_heads, "num_kv_heads": shape.num_kv_heads,
                                  "intermediate_size": shape.intermediate_size, "vocab_size": vocab}, seq)
    assert fpt / 1e9 == pytest.approx(3.451, abs=0.0005)
    flops = fpt * tokens
    assert flops == pytest.approx(8.32e19, rel=0.001)
    gpu_hours = {mfu: flops / (H100_PEAK * mfu) / 3600 for mfu in (0.3, 0.4, 0.5)}
    assert [round(gpu_hours[m]) for m in (0.3, 0.4, 0.5)] == [78, 58, 47]
    assert gpu_hours[0.4] / 8 == pytest.approx(7.3, abs=0.05)
    assert pre.global_batch_tokens / (8 * H100_PEAK * 0.4 / fpt) == pytest.approx(0.57, abs=0.005)  # s per step
