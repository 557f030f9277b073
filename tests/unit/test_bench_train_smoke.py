"""Smoke test of benchmarks/bench_train.py and the CPU-safe parts of benchmarks/bench_train_gpu.py.

A microscopic Llama for a few steps on each side: both measure a positive throughput and both
saw the same sample ids (hence the same tokens) step by step. Nothing here looks at how fast
anything is.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _load(name: str):
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    yield _load("bench_train")


@pytest.fixture(scope="module")
def gpu(bench):
    yield _load("bench_train_gpu")


def test_both_sides_same_samples_positive_throughput(bench, tmp_path):
    shape = bench.Shape(vocab=64, hidden=32, layers=1, heads=2, kv_heads=2, intermediate=64, seq_len=16, micro=2,
                        accum=2, train_blocks=48)
    hyper = bench.Hyper(log_every=1)
    root = bench.build_root(tmp_path / "root", shape)
    steps, warmup = 4, 1
    ours = bench.run_ours(root, shape, hyper, steps, warmup, zero=0)
    plain = bench.run_plain(root, shape, hyper, steps, warmup)
    for r in (ours, plain):
        assert len(r.stamps) == steps and r.timed_steps == steps - warmup
        assert r.steps_per_s > 0 and r.tokens_per_s == pytest.approx(r.steps_per_s * shape.tokens_per_step)
        assert [len(s) for s in r.sample_ids] == [shape.micro * shape.accum] * steps
    assert ours.sample_ids == plain.sample_ids
    data = bench.check_same_data([ours, plain])
    assert data["same_sample_ids"] and data["tokens"]["ours-z0"] == data["tokens"]["plain"] == steps * shape.tokens_per_step
    # same weights, same first batches, same loss: the model's own mean over the T - 1 shifted tokens of a block, and
    # the Trainer's sum over the label tokens it counts, which transformers 5 takes over labels[..., 1:] for a causal LM
    # (Trainer._get_num_items_in_batch, `_loss_shifts_labels`)
    assert ours.losses[1] == pytest.approx(plain.losses[1], abs=2e-4)
    assert "fused=True" in ours.optimizer and "fused=True" in plain.optimizer
    # the document-masking side trains on the same samples; its shards frame documents for it
    masked = bench.run_ours(root, shape, hyper, steps, warmup, zero=0, side="ours-z0-docmask", document_masking=True)
    assert masked.side == "ours-z0-docmask" and masked.sample_ids == ours.sample_ids and masked.steps_per_s > 0


def test_flop_formula_by_hand(gpu):
    from pipeline.training.pretrain import flops_per_token

    # N = 1e6, L = 2, H = 4, Dh = 8, T = 16: 6e6 + 12*2*4*8*16 = 6,000,000 + 12,288
    assert gpu.flops_per_token(1_000_000, 2, 4, 8, 16) == 6_012_288.0
    assert gpu.flops_per_token(1_000_000, 2, 4, 8, 16) == flops_per_token(1_000_000, 2, 4, 8, 16)
    assert gpu.mfu(1000.0, 6_012_288.0, peak=6_012_288.0 * 1000) == pytest.approx(1.0)


def test_125m_on_meta_device(gpu):
    p = gpu.PRESETS["125m"]
    n = gpu.param_counts(p)
    # embed 32000*768 + head 768*32000 + 12 * (4*768^2 attn + 3*768*2048 mlp + 2*768 norms) + final norm 768
    per_layer = 4 * 768 * 768 + 3 * 768 * 2048 + 2 * 768
    assert n["total"] == 2 * 32000 * 768 + 12 * per_layer + 768
    assert n["non_embedding"] == n["total"] - 32000 * 768
    fpt = gpu.describe(p, 2048)["flops_per_token"]
    assert fpt == 6 * n["non_embedding"] + 12 * 12 * 12 * 64 * 2048
    kv = gpu.param_counts(gpu.PRESETS["1b"])  # 8 kv heads of 64: k/v projections are 2048 x 512
    assert kv["total"] == 2 * 32000 * 2048 + 16 * (2 * 2048 * 2048 + 2 * 2048 * 512 + 3 * 2048 * 8192 + 2 * 2048) + 2048


def test_gpu_args_and_no_cuda_exit(gpu, monkeypatch, capsys):
    import torch

    args = gpu.parse(["--presets", "125m,1b", "--compile", "off", "--liger", "off", "--docmask", "off"])
    assert [p.name for p in args.preset_list] == ["125m", "1b"] and gpu.sides_for(args) == ["ours", "plain"]
    both = gpu.parse(["--compile", "on", "--liger", "on", "--docmask", "on"])
    assert gpu.sides_for(both)[:7] == ["ours", "plain", "ours+compile", "plain+compile", "ours+liger", "plain+liger",
                                       "ours+docmask"]
    assert [gpu.twin(s) for s in ("ours", "ours+compile", "ours+liger", "ours+docmask", "ours+docmask+flash")] == [
        "plain", "plain+compile", "plain+liger", "ours", "ours"]
    from pipeline.training.config import PretrainConfig

    for side, fields in gpu.OURS_KERNELS.items():  # every ours side is a valid stage config
        PretrainConfig(max_steps=1, **fields)
    with pytest.raises(SystemExit):
        gpu.parse(["--presets", "7b"])
    capsys.readouterr()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu.main(["--presets", "125m"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "CUDA is not available" in err[0]


def test_paired_ratio_is_per_round_geometric_mean(bench):
    def res(side, sps):  # a Result whose timed window gives `sps` steps/s
        return bench.Result(side, 3, 1, 8, [0.0, 0.0, 1.0 / sps], [[0]] * 3, {}, startup_s=0.0)

    runs = {"ours-z0": [res("ours-z0", 1.0), res("ours-z0", 1.2)], "plain": [res("plain", 1.25), res("plain", 1.0)]}
    paired = bench.paired_ratios(runs)
    assert paired["ours-z0"] == pytest.approx([0.8, 1.2])
    assert bench.geomean(paired["ours-z0"]) == pytest.approx((0.8 * 1.2) ** 0.5)
    assert bench.paired_ratios({"ours-z0": runs["ours-z0"]}) == {}
