"""Pretrain tokens/s and MFU on one GPU for the 125m / 350m / 1b shapes: our pretrain path against a
plain PyTorch loop measured in the same run, same checkpoint, same shards, same order.

MFU follows PaLM (Chowdhery et al. 2022, app. B): training FLOPs per token
``6 * N + 12 * L * H * Dh * T`` with ``N`` the parameters without the input embedding, the output head
counted once (``pipeline.training.flops.matmul_flops_per_token``, as the pretrain stage counts them),
divided into ``--peak`` (default: the GPU's dense bf16 peak from ``pipeline.training.flops``'s datasheet
table by ``torch.cuda.get_device_name()``; a GPU not in it needs ``--peak``).

Sides, each in its own process, alternating within each round (``--rounds``), best and median:

* ``ours``: the pretrain stage's ``run`` through ``runner.execute`` exactly as
  ``benchmarks/bench_train.py`` drives it (same timing: a stamp after every optimizer step,
  after the metrics callback's ``cuda.synchronize``; the window starts after ``--warmup``
  steps) on one GPU: ``precision: bf16`` (Trainer autocast over fp32 master weights),
  ``zero_stage: 0``, ``attention: sdpa``, fused AdamW (the Trainer's default
  ``adamw_torch_fused``), no gradient checkpointing.
* ``ours+compile`` (``compile: true``, the Trainer's ``torch_compile``) and, when
  ``liger_kernel`` is installed, ``ours+liger`` (``liger_kernels: true``).
* ``ours+docmask`` (``document_masking: true``, sdpa with a block-diagonal mask) and, with flash-attn installed,
  ``ours+docmask+flash`` (``attention: flash_attention_2``, the varlen kernel): the cost of attending within
  documents, each compared with ``ours``; MFU there still counts whole-block attention FLOPs.
* ``plain``, ``plain+compile``, ``plain+liger``: the same loop as bench_train's plain side on
  CUDA (autocast bf16, fused AdamW, SDPA), with ``torch.compile`` / Liger's kernels patched in.
  Each ours side is compared with its plain twin; the MFU goal is read on the best ours side.

The shapes are defined here (``pipeline/models/llama.py`` did not exist when this was written):
125m: 12 layers, hidden 768, 12 heads, ffn 2048; 350m: 24 layers, hidden 1024, 16 heads, ffn
2816; 1b: 16 layers, hidden 2048, 32 heads, 8 kv heads, ffn 8192; vocab 32000, untied head.

Without CUDA it exits 2 with one line. ``--dry-run`` prints the shapes, parameter counts (built
on the meta device) and FLOPs per token without a GPU.

    .venv/bin/python benchmarks/bench_train_gpu.py [--presets 125m,350m,1b] [--json out.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

H100_SXM_BF16 = 989e12
VOCAB = 32000


@dataclass(frozen=True)
class Preset:
    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    micro: int  # default micro batch at seq 2048 on an 80 GB GPU without gradient checkpointing
    vocab: int = VOCAB

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


PRESETS: dict[str, Preset] = {
    "125m": Preset("125m", 12, 768, 12, 12, 2048, micro=16),
    "350m": Preset("350m", 24, 1024, 16, 16, 2816, micro=8),
    "1b": Preset("1b", 16, 2048, 32, 8, 8192, micro=4),
}


def llama_config(p: Preset, seq_len: int) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=p.vocab, hidden_size=p.hidden, intermediate_size=p.intermediate,
                       num_hidden_layers=p.layers, num_attention_heads=p.heads, num_key_value_heads=p.kv_heads,
                       max_position_embeddings=seq_len, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                       tie_word_embeddings=False, attn_implementation="sdpa")


def param_counts(p: Preset, seq_len: int = 2048) -> dict[str, int]:
    """All parameters and those without the input embedding, from a model built on the meta device."""
    import torch
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(llama_config(p, seq_len))
    total = sum(t.numel() for t in model.parameters())
    emb = model.get_input_embeddings().weight.numel()
    return {"total": total, "non_embedding": total - emb}


def flops_per_token(n_params: int, layers: int, heads: int, head_dim: int, seq_len: int) -> float:
    """PaLM: 6N + 12·L·H·Dh·T training FLOPs per token for a given N (``describe`` counts N with
    ``pipeline.training.flops.matmul_flops_per_token``)."""
    return 6.0 * n_params + 12.0 * layers * heads * head_dim * seq_len


def mfu(tokens_per_s: float, fpt: float, peak: float = H100_SXM_BF16) -> float:
    return tokens_per_s * fpt / peak


def liger_available() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def apply_liger(model: Any) -> None:
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(model=model)


# ------------------------------------------------------------------------------- measurement


def shape_for(p: Preset, seq_len: int, micro: int, accum: int, steps: int) -> Any:
    import bench_train as B

    blocks = max(256, steps * micro * accum + 64)
    return B.Shape(vocab=p.vocab, hidden=p.hidden, layers=p.layers, heads=p.heads, kv_heads=p.kv_heads,
                   intermediate=p.intermediate, seq_len=seq_len, micro=micro, accum=accum, train_blocks=blocks)


def worker(args: argparse.Namespace) -> None:
    import bench_train as B

    t0 = time.perf_counter()
    shape, hyper = B.Shape(**json.loads(args.shape)), B.Hyper(**json.loads(args.hyper))
    root = Path(args.root)
    side = args.worker
    if side.startswith("ours"):
        res = B.run_ours(root, shape, hyper, args.steps, args.warmup, zero=0, t_start=t0, precision="bf16", side=side,
                         **OURS_KERNELS[side])
    else:
        res = B.run_plain(root, shape, hyper, args.steps, args.warmup, t_start=t0, precision="bf16",
                          compile=side == "plain+compile", model_hook=apply_liger if side == "plain+liger" else None,
                          side=side)
    import torch

    res.extra["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
    Path(args.result).write_text(json.dumps(asdict(res)))


def spawn(side: str, root: Path, shape: Any, hyper: Any, steps: int, warmup: int, scratch: Path) -> Any:
    import bench_train as B

    return B.spawn_worker(Path(__file__), side, root, shape, hyper, steps, warmup, scratch, extra_args=[],
                          drop_env=("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"), extra_env={})


# ------------------------------------------------------------------------------------- main


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", default="125m,350m,1b", help="comma list of " + ", ".join(PRESETS))
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--micro", type=int, default=None, help="micro batch (default: per preset)")
    ap.add_argument("--accum", type=int, default=1)
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps per measurement (warm-up included)")
    ap.add_argument("--warmup", type=int, default=10, help="steps before the timed window (compile warm-up too)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                    help="measure ours+compile and plain+compile sides (auto: yes)")
    ap.add_argument("--liger", choices=("auto", "on", "off"), default="auto",
                    help="measure ours+liger and plain+liger sides (auto: when liger_kernel is installed)")
    ap.add_argument("--docmask", choices=("auto", "on", "off"), default="auto",
                    help="measure document masking: ours+docmask (sdpa, block mask) and, with flash-attn installed, "
                         "ours+docmask+flash (varlen), each against ours (auto: yes)")
    ap.add_argument("--peak", type=float, default=None,
                    help="dense peak FLOP/s per GPU for MFU (default: from the GPU's name, pipeline/training/flops.py)")
    ap.add_argument("--dry-run", action="store_true", help="shapes, parameter counts and FLOPs/token only; no GPU")
    ap.add_argument("--json", help="write every measurement here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--root", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--shape", help=argparse.SUPPRESS)
    ap.add_argument("--hyper", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    names = [n for n in args.presets.split(",") if n]
    bad = [n for n in names if n not in PRESETS]
    if bad:
        ap.error(f"unknown preset(s) {', '.join(bad)}; choose from {', '.join(PRESETS)}")
    if not 1 <= args.warmup < args.steps:
        ap.error("need 1 <= --warmup < --steps")
    args.preset_list = [PRESETS[n] for n in names]
    return args


def describe(p: Preset, seq_len: int) -> dict[str, Any]:
    n = param_counts(p, seq_len)
    from pipeline.training.flops import matmul_flops_per_token

    fpt = matmul_flops_per_token(llama_config(p, seq_len), seq_len)
    return {"preset": p.name, **asdict(p), "params": n["total"], "params_non_embedding": n["non_embedding"],
            "flops_per_token": fpt}


# our pretrain stage's kernel options per side (PretrainConfig fields); each ours side has a plain twin
OURS_KERNELS: dict[str, dict[str, Any]] = {
    "ours": {},
    "ours+compile": {"compile": True},
    "ours+liger": {"liger_kernels": True},
    # document masking (bench_train's shards: documents of ~128 tokens): sdpa with the block-diagonal mask, and
    # flash-attention's varlen kernel on the flattened batch; compared with "ours", not with a plain twin
    "ours+docmask": {"document_masking": True},
    "ours+docmask+flash": {"document_masking": True, "attention": "flash_attention_2"},
}


def sides_for(args: argparse.Namespace) -> list[str]:
    sides = ["ours", "plain"]
    if args.compile in ("auto", "on"):
        sides += ["ours+compile", "plain+compile"]
    if args.liger == "on" or (args.liger == "auto" and liger_available()):
        sides += ["ours+liger", "plain+liger"]
    if args.docmask in ("auto", "on"):
        sides += ["ours+docmask"] + (["ours+docmask+flash"] if importlib.util.find_spec("flash_attn") else [])
    return sides


def twin(side: str) -> str:
    """The loop a side is compared with: ours+compile against plain+compile, and so on; a document-masking side
    against ours (the same stage attending whole blocks)."""
    return "ours" if "docmask" in side else side.replace("ours", "plain", 1)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.worker:
        worker(args)
        return 0
    if args.dry_run:
        for p in args.preset_list:
            d = describe(p, args.seq_len)
            print(f"{p.name}: {d['params']:,} params ({d['params_non_embedding']:,} without the input embedding), "
                  f"{d['flops_per_token'] / 1e9:.3f} GFLOP/token at seq {args.seq_len}")
        return 0
    import torch

    if not torch.cuda.is_available():
        print("bench_train_gpu: CUDA is not available on this machine; this benchmark needs an NVIDIA GPU "
              "(try --dry-run for the shapes and FLOPs)", file=sys.stderr)
        return 2
    import bench_train as B

    if args.liger == "on" and not liger_available():
        print("bench_train_gpu: --liger on but liger_kernel is not installed", file=sys.stderr)
        return 2
    sides = sides_for(args)
    gpu = torch.cuda.get_device_name(0)
    if args.peak is None:
        from pipeline.training.flops import peak_flops_for

        args.peak = peak_flops_for(gpu, "bf16")
        if args.peak is None:
            print(f"bench_train_gpu: no dense bf16 peak for {gpu!r} in pipeline/training/flops.py's table; "
                  "give --peak FLOP/s for MFU", file=sys.stderr)
            return 2
    print(f"GPU: {gpu}; torch {torch.__version__}; peak {args.peak:.3g} FLOP/s; seq {args.seq_len}; sides {sides}",
          flush=True)
    hyper = B.Hyper(warmup_steps=2, log_every=10)
    report: dict[str, Any] = {"gpu": gpu, "peak": args.peak, "sides": sides, "presets": {}}
    rows = []
    for p in args.preset_list:
        info = describe(p, args.seq_len)
        micro = args.micro or p.micro
        shape = shape_for(p, args.seq_len, micro, args.accum, args.steps)
        scratch = Path(tempfile.mkdtemp(prefix=f"bench-train-gpu-{p.name}-"))
        try:
            B.build_root(scratch / "root", shape)
            runs: dict[str, list[Any]] = {s: [] for s in sides}
            for rnd in range(args.rounds):
                for side in (sides if rnd % 2 == 0 else sides[::-1]):
                    try:
                        r = spawn(side, scratch / "root", shape, hyper, args.steps, args.warmup, scratch)
                    except RuntimeError as exc:
                        print(f"  {p.name} {side}: failed: {str(exc).splitlines()[-1]}", flush=True)
                        continue
                    runs[side].append(r)
                    print(f"  {p.name} round {rnd + 1} {side:14s} {r.tokens_per_s:10,.0f} tok/s  "
                          f"MFU {mfu(r.tokens_per_s, info['flops_per_token'], args.peak):.1%}  "
                          f"peak mem {r.extra.get('peak_mem_gb', 0):.1f} GiB", flush=True)
            entry = {**info, "micro": micro, "accum": args.accum, "tokens_per_step": shape.tokens_per_step,
                     "same_sample_ids": len({json.dumps(r.sample_ids) for rs in runs.values() for r in rs}) == 1,
                     "runs": {s: [r.summary() for r in rs] for s, rs in runs.items()}, "table": {}}
            for s, rs in runs.items():
                if not rs:
                    continue
                best = max(r.tokens_per_s for r in rs)
                med = statistics.median(r.tokens_per_s for r in rs)
                entry["table"][s] = {"best_tokens_per_s": best, "median_tokens_per_s": med,
                                     "best_steps_per_s": best / shape.tokens_per_step,
                                     "mfu_best": mfu(best, info["flops_per_token"], args.peak),
                                     "mfu_median": mfu(med, info["flops_per_token"], args.peak)}
            for s, t in entry["table"].items():
                plain = entry["table"].get(twin(s)) if s.startswith("ours") and twin(s) != s else None
                t["ratio_vs_plain"] = t["best_tokens_per_s"] / plain["best_tokens_per_s"] if plain else None
                rows.append((p.name, s, t))
            # the MFU goal is read on whole-block attention: masked attention does fewer FLOPs than the count
            ours = {s: t for s, t in entry["table"].items() if s.startswith("ours") and "docmask" not in s}
            if ours:
                best = max(ours, key=lambda s: ours[s]["best_tokens_per_s"])
                entry["best_ours"] = {"side": best, "mfu": ours[best]["mfu_best"]}
            report["presets"][p.name] = entry
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    print("\n| preset | side | tokens/s best | median | MFU best | ours / its plain twin (best; docmask: / ours) |")
    print("|---|---|---:|---:|---:|---:|")
    for name, s, t in rows:
        ratio = f"{t['ratio_vs_plain']:.3f}x" if t["ratio_vs_plain"] else ""
        print(f"| {name} | {s} | {t['best_tokens_per_s']:,.0f} | {t['median_tokens_per_s']:,.0f} | "
              f"{t['mfu_best']:.1%} | {ratio} |")
    for name, entry in report["presets"].items():
        if "best_ours" in entry:
            b = entry["best_ours"]
            print(f"{name}: best of our pretrain stage {b['side']}, MFU {b['mfu']:.1%}"
                  + (f" (goal for 1b on an H100: >= 50%: {'met' if b['mfu'] >= 0.5 else 'NOT met'})" if name == "1b" else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
