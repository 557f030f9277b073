"""Every shipped DeepSpeed config accumulates and reduces gradients in fp32 under bf16.

Two ranks (torchrun, gloo) build a real DeepSpeed engine from each shipped ZeRO JSON (its "auto" values filled as
the HF Trainer fills them, bf16 on: DeepSpeed's CPU accelerator supports it), with our optimizer param groups, run
two micro-batches of gradient accumulation and one step, and report what the engine and its ZeRO optimizer use:
``engine.get_data_types()`` (model dtype, gradient-accumulation dtype), ``engine.communication_data_type``, the
dtype of the optimizer's gradient buffers, and the dtype of every floating tensor DeepSpeed reduced across ranks
(``deepspeed.comm`` all_reduce / reduce_scatter, recorded). This file is also the worker (``__main__``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = [(stage, offload) for stage in (1, 2, 3) for offload in (False, True)]


def _fill(cfg: dict, world: int) -> dict:
    """The shipped config with its "auto" values as the HF Trainer fills them (bf16 on, fp16 off)."""
    cfg = json.loads(json.dumps(cfg))
    cfg.update(train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=2, train_batch_size=2 * 2 * world,
               gradient_clipping=1.0)
    cfg["bf16"]["enabled"] = True
    cfg["fp16"]["enabled"] = False
    if "optimizer" in cfg:
        cfg["optimizer"]["params"].update(lr=1e-3, betas=[0.9, 0.95], eps=1e-8, weight_decay=0.1)
    else:
        cfg["zero_allow_untested_optimizer"] = True  # as transformers' deepspeed_optim_sched sets it
    zero = cfg["zero_optimization"]
    for key in ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold"):
        if zero.get(key) == "auto":
            zero[key] = 0 if key == "stage3_param_persistence_threshold" else 5e5
    return cfg


def _worker() -> None:
    import torch
    from torch import nn

    import deepspeed
    import deepspeed.comm as ds_comm

    from pipeline.training import deepspeed_config_path
    from pipeline.training.common import optimizer_param_groups

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = ds_comm.get_rank(), ds_comm.get_world_size()
    reduced: list[str] = []

    def record(name):
        fn = getattr(ds_comm, name)

        def wrapped(*args, **kwargs):
            for t in list(args) + list(kwargs.values()):
                if torch.is_tensor(t) and t.is_floating_point() and t.numel() > 1:
                    reduced.append(str(t.dtype))
                elif isinstance(t, (list, tuple)):
                    reduced.extend(str(x.dtype) for x in t if torch.is_tensor(x) and x.is_floating_point())
            return fn(*args, **kwargs)
        setattr(ds_comm, name, wrapped)

    for name in ("all_reduce", "reduce", "reduce_scatter_fn", "reduce_scatter_tensor", "reduce_scatter"):
        if hasattr(ds_comm, name):
            record(name)

    out = {}
    for stage, offload in CONFIGS:
        torch.manual_seed(0)
        if os.environ.get("GRAD_DTYPE_DEBUG"):
            print(f"rank {rank}: zero{stage} offload={offload}", flush=True)
        model = nn.Sequential(nn.Embedding(64, 32), nn.Linear(32, 32), nn.LayerNorm(32), nn.Linear(32, 64))
        cfg = _fill(json.loads(deepspeed_config_path(stage, offload).read_text()), world)
        groups = optimizer_param_groups(model, 0.1)
        kwargs = {"model_parameters": groups} if "optimizer" in cfg else {"optimizer": torch.optim.AdamW(groups, lr=1e-3)}
        engine, *_ = deepspeed.initialize(model=model, config=cfg, **kwargs)
        reduced.clear()
        for micro in range(2):
            x = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(rank * 10 + micro))
            logits = engine(x)
            loss = nn.functional.cross_entropy(logits.float().view(-1, 64), x.view(-1))
            engine.backward(loss)
            engine.step()
        opt = engine.optimizer
        buffers = {}
        if hasattr(opt, "fp32_groups_gradients_flat"):  # BF16_Optimizer
            buffers["fp32_groups_gradients_flat"] = sorted({str(t.dtype) for t in opt.fp32_groups_gradients_flat})
        if getattr(opt, "grad_partitions_flat_buffer", None) is not None:  # ZeRO-3
            buffers["grad_partitions_flat_buffer"] = [str(opt.grad_partitions_flat_buffer.dtype)]
        if hasattr(opt, "ipg_buckets"):  # ZeRO-1/2/3: one reduce bucket per communication dtype
            buffers["ipg_buckets"] = sorted(str(d) for d in opt.ipg_buckets)
        model_dtype, accum_dtype = engine.get_data_types()
        out[f"zero{stage}{'-offload' if offload else ''}"] = {
            "optimizer": type(opt).__name__,
            "model_dtype": str(model_dtype), "grad_accum_dtype": str(accum_dtype),
            "optimizer_grad_accum_dtype": str(getattr(opt, "gradient_accumulation_dtype", None)
                                               or getattr(opt, "grad_acc_dtype", None)),
            "communication_data_type": str(engine.communication_data_type),
            "param_dtype": str(next(engine.module.parameters()).dtype),
            "buffers": buffers, "reduced": sorted(set(reduced)),
            "weight_decay": sorted(g["weight_decay"] for g in engine.basic_optimizer.param_groups),
        }
        engine.destroy()
        del engine, opt
    if rank == 0:
        Path(os.environ["GRAD_DTYPE_OUT"]).write_text(json.dumps(out, indent=1))
    ds_comm.barrier()


@pytest.mark.slow
def test_shipped_configs_accumulate_and_reduce_gradients_in_fp32(tmp_path):
    """Every shipped config, bf16 on, 2 ranks: gradients accumulate in fp32 and every reduction is fp32."""
    from pipeline.training import free_port

    out = tmp_path / "dtypes.json"
    env = {**os.environ, "GRAD_DTYPE_OUT": str(out), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(free_port()), str(Path(__file__))],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    print(f"6 engines x 2 ranks: {time.time() - t0:.1f}s")
    assert proc.returncode == 0, proc.stderr[-6000:]
    got = json.loads(out.read_text())
    assert sorted(got) == sorted(f"zero{s}{'-offload' if o else ''}" for s, o in CONFIGS)
    for name, d in got.items():
        assert d["model_dtype"] == d["param_dtype"] == "torch.bfloat16", (name, d)  # bf16 really is on
        assert d["grad_accum_dtype"] == "torch.float32", (name, d)          # data_types.grad_accum_dtype
        assert d["optimizer_grad_accum_dtype"] == "torch.float32", (name, d)
        assert d["communication_data_type"] == "torch.float32", (name, d)  # communication_data_type
        assert d["reduced"] and set(d["reduced"]) == {"torch.float32"}, (name, d)
        for buf, dtypes in d["buffers"].items():
            assert dtypes == ["torch.float32"], (name, buf, d)
        assert d["weight_decay"] == [0.0, 0.1], (name, d)
    # ZeRO-1 without offload, bf16 + fp32 accumulation: DeepSpeed swaps its ZeRO-1 optimizer for BF16_Optimizer
    assert got["zero1"]["optimizer"] == "BF16_Optimizer"
    assert "fp32_groups_gradients_flat" in got["zero1"]["buffers"]
    for name in ("zero1-offload", "zero2", "zero2-offload"):
        assert got[name]["optimizer"] == "DeepSpeedZeroOptimizer", name
    for name in ("zero3", "zero3-offload"):
        assert got[name]["optimizer"] == "DeepSpeedZeroOptimizer_Stage3", name
        assert "grad_partitions_flat_buffer" in got[name]["buffers"]


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    _worker()
