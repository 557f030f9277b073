"""FLOPs per token against hand-computed values for every preset, tied and untied; the peak table by real
device names; the step clock counting data-loading time with a deliberately slow dataset."""

from __future__ import annotations

import time

import pytest

from pipeline.models.llama import PRESETS, llama_config
from pipeline.training.flops import matmul_flops_per_token, mfu, peak_flops_for, resolve_peak

V = 32000


def cfg_of(preset: str, tied: bool):
    from dataclasses import replace

    return llama_config(replace(PRESETS[preset], tie_word_embeddings=tied), V, bos_id=None, eos_id=None, pad_id=None)


# N by hand: per layer q + k + v + o + SwiGLU (3·h·ffn) + 2 RMSNorm gains; then the final norm and the head V·h,
# counted once tied or not; the input embedding (a lookup) left out. Attention: 12·L·H·Q·T.
HAND = {
    # tiny: h 64, L 2, H 4, kv 2, Q 16, ffn 192, T 1024
    #   layer = 64·64 + 2·64·32 + 64·64 + 3·64·192 + 2·64 = 4096 + 4096 + 4096 + 36864 + 128 = 49,280
    #   N = 2·49,280 + 64 + 32000·64 = 98,624 + 2,048,000 = 2,146,624
    #   attn = 12·2·4·16·1024 = 1,572,864;  6N = 12,879,744;  total 14,452,608
    "tiny": (1024, 2 * (64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 192 + 2 * 64) + 64 + V * 64, 2_146_624,
             12 * 2 * 4 * 16 * 1024, 14_452_608),
    # 125m: h 768, L 12, H 12, kv 12, Q 64, ffn 2048, T 2048
    #   layer = 4·768² + 3·768·2048 + 2·768 = 2,359,296 + 4,718,592 + 1,536 = 7,079,424
    #   N = 12·7,079,424 + 768 + 32000·768 = 84,953,856 + 24,576,000 = 109,529,856
    #   attn = 12·12·12·64·2048 = 226,492,416;  6N = 657,179,136;  total 883,671,552
    "125m": (2048, 12 * (4 * 768 * 768 + 3 * 768 * 2048 + 2 * 768) + 768 + V * 768, 109_529_856,
             12 * 12 * 12 * 64 * 2048, 883_671_552),
    # 350m: h 1024, L 24, H 16, kv 16, Q 64, ffn 2816, T 2048
    #   layer = 4·1024² + 3·1024·2816 + 2·1024 = 4,194,304 + 8,650,752 + 2,048 = 12,847,104
    #   N = 24·12,847,104 + 1024 + 32000·1024 = 308,331,520 + 32,768,000 = 341,099,520
    #   attn = 12·24·16·64·2048 = 603,979,776;  6N = 2,046,597,120;  total 2,650,576,896
    "350m": (2048, 24 * (4 * 1024 * 1024 + 3 * 1024 * 2816 + 2 * 1024) + 1024 + V * 1024, 341_099_520,
             12 * 24 * 16 * 64 * 2048, 2_650_576_896),
    # 1b: h 2048, L 16, H 32, kv 8 (GQA), Q 64, ffn 8192, T 2048
    #   layer = 2048·2048 (q) + 2·2048·512 (k, v) + 2048·2048 (o) + 3·2048·8192 + 2·2048
    #         = 4,194,304 + 2,097,152 + 4,194,304 + 50,331,648 + 4,096 = 60,821,504
    #   N = 16·60,821,504 + 2048 + 32000·2048 = 973,146,112 + 65,536,000 = 1,038,682,112
    #   attn = 12·16·32·64·2048 = 805,306,368;  6N = 6,232,092,672;  total 7,037,399,040
    "1b": (2048, 16 * (2048 * 2048 + 2 * 2048 * 512 + 2048 * 2048 + 3 * 2048 * 8192 + 2 * 2048) + 2048 + V * 2048,
           1_038_682_112, 12 * 16 * 32 * 64 * 2048, 7_037_399_040),
}


@pytest.mark.parametrize("preset", list(HAND))
@pytest.mark.parametrize("tied", [False, True])
def test_flops_per_token_by_hand(preset, tied):
    seq, n_expr, n, attn, total = HAND[preset]
    assert n_expr == n
    assert 6 * n + attn == total
    assert matmul_flops_per_token(cfg_of(preset, tied), seq) == total


@pytest.mark.parametrize("preset", list(HAND))
def test_head_counted_once_tied_or_not(preset):
    """N against a model built on the meta device: untied, the total less the embedding; tied, the whole count
    (the shared tensor is the head's matmul). Tied used to lose the head: 125m gave 6·84.95M."""
    import torch
    from transformers import LlamaForCausalLM

    seq, _, n, attn, total = HAND[preset]
    for tied in (False, True):
        with torch.device("meta"):
            model = LlamaForCausalLM(cfg_of(preset, tied))
        all_params = sum(p.numel() for p in model.parameters())
        emb = model.get_input_embeddings().weight.numel()
        assert (all_params if tied else all_params - emb) == n
    assert matmul_flops_per_token({**cfg_of(preset, True).to_dict()}, seq) == total  # a dict of fields works too


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989e12),
    ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989e12),
    ("NVIDIA H200 NVL", 835e12),
    ("NVIDIA GH200 480GB", 989e12),
    ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA A100-SXM4-40GB", 312e12),
    ("NVIDIA A100-PCIE-40GB", 312e12),
    ("NVIDIA A100 80GB PCIe", 312e12),
    ("NVIDIA B200", 2250e12),
    ("NVIDIA L40S", 362.05e12),
    ("NVIDIA L40", 181.05e12),
    ("NVIDIA L4", 121e12),
    ("NVIDIA A10", 125e12),
    ("NVIDIA GeForce RTX 4090", 165.2e12),
])
def test_peak_table(name, peak):
    assert peak_flops_for(name, "bf16") == peak
    assert peak_flops_for(name, "fp16") == peak


@pytest.mark.parametrize("name", ["NVIDIA A10G", "Tesla V100-SXM2-16GB", "NVIDIA GeForce RTX 3090", "", None])
def test_peak_unknown(name):
    assert peak_flops_for(name, "bf16") is None


def test_peak_override_and_unknown():
    assert peak_flops_for("NVIDIA H100 80GB HBM3", "fp32") is None  # no fp32 entries
    assert resolve_peak(None, "NVIDIA H100 80GB HBM3", "bf16") == (989e12, "table: NVIDIA H100 80GB HBM3 bf16")
    assert resolve_peak(500e12, "NVIDIA H100 80GB HBM3", "bf16") == (500e12, "config peak_flops")
    assert resolve_peak(70e12, "NVIDIA A10G", "bf16") == (70e12, "config peak_flops")
    peak, why = resolve_peak(None, "NVIDIA A10G", "bf16")
    assert peak is None and "no MFU" in why and "A10G" in why and "peak_flops" in why
    assert mfu(1000.0, 1e9, None) is None
    assert mfu(1000.0, 1e9, 1e13) == pytest.approx(0.1)


def test_config_peak_flops_default_is_table():
    from pipeline.training.config import PretrainConfig

    assert PretrainConfig.model_fields["peak_flops"].default is None


class SlowData:
    """A map-style dataset whose every item takes ``delay`` seconds to load."""

    def __init__(self, n: int, delay: float):
        self.n, self.delay = n, delay

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        import torch

        time.sleep(self.delay)
        return {"x": torch.ones(4), "labels": torch.zeros(1)}


def test_step_clock_counts_data_wait(tmp_path):
    """A real HF Trainer with pretrain's TimedBatches mixin and StepClockRestart, a dataset that sleeps 50 ms
    per item, batch 2, accumulation 2: each optimizer step waits >= 4 x 50 ms for data, and the step's wall time
    (what tokens/s and MFU divide by) contains that wait, while a 1 s step-end callback does not count."""
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from pipeline.training.pretrain import StepClock, StepClockRestart, TimedBatches, throughput

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 1)

        def forward(self, x, labels):
            return {"loss": ((self.lin(x) - labels) ** 2).mean()}

    class T(TimedBatches, Trainer):
        pass

    clock = StepClock(cuda=False)

    class End(TrainerCallback):  # what MetricsCallback.on_step_end does first
        def on_step_end(self, args, state, control, **kw):
            clock.end_step()

    class SlowStepEnd(TrainerCallback):  # like sample generation: after the step, not training
        def on_step_end(self, args, state, control, **kw):
            time.sleep(1.0)

    steps, delay = 3, 0.05
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                             max_steps=steps, report_to=[], save_strategy="no", logging_steps=1000,
                             dataloader_num_workers=0, use_cpu=True, disable_tqdm=True)
    trainer = T(model=Model(), args=args, train_dataset=SlowData(64, delay))
    trainer.step_clock = clock
    for cb in (End(), SlowStepEnd(), StepClockRestart(clock)):
        trainer.add_callback(cb)
    trainer.train()
    tot = clock.total
    assert tot["steps"] == steps
    assert tot["wait"] >= steps * 4 * delay * 0.95  # 2 micro batches x 2 items, each 50 ms
    assert tot["wall"] >= tot["wait"]
    assert tot["wall"] < steps * 1.0  # the 1 s step-end callback is outside every interval
    tp = throughput(tokens_per_step=4, world=1, fpt=1e6, peak=1e9, acc=tot)
    assert tp["tokens_per_s"] == pytest.approx(4 * steps / tot["wall"])
    assert tp["mfu"] == pytest.approx(tp["tokens_per_s"] * 1e6 / 1e9)
    assert tp["data_wait_s"] == tot["wait"] and 0.5 < tp["data_wait_fraction"] <= 1.0
