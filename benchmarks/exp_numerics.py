"""The small experiment behind two pretraining defaults: document masking and depth-scaled init.

On the demo corpus (kk/ru/en, packed into 256-token blocks by ``jobs/demo``), the demo's tiny Llama is
initialised and pretrained once per variant, at equal tokens and on the same samples in the same order:

* ``init_std``: ``normal`` (every weight N(0, 0.02)) or ``depth_scaled`` (the residual output projections
  at 0.02 / sqrt(2 x layers));
* ``document_masking``: false (blocks attended whole) or true (attention within each document).

Each variant trains ``--steps`` optimizer steps of the demo config (8192 tokens a step, WSD schedule, lr 3e-3, one
phase on ``shards``) for each ``--seeds`` seed (the seed of the init and of the data order). The held-out
measure is the loss on every block of ``shards``' validation split (documents never trained on), computed two
ways for every model: with document masking (each document seen from its own first token, as a user's prompt is
at inference) and without (the block as one sequence). The first is the one that decides: it is how the model is
used. Nothing is asserted; the table goes to docs/benchmarks.md.

    .venv/bin/python benchmarks/exp_numerics.py [--root runs/numerics] [--steps 160] [--seeds 0 1] [--json out.json]

``make bench-numerics`` runs it with the defaults (~30 min on 2 cores: the demo data stages once, then 8 runs).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

VARIANTS = [("normal", False), ("normal", True), ("depth_scaled", False), ("depth_scaled", True)]


def ensure_data(root: Path, cache: Path) -> None:
    """The demo's data stages up to ``shards`` in ``root`` (skipped when they are up to date)."""
    env = {**os.environ, "LLMPIPE_CACHE": str(cache.resolve())}
    cmd = [str(Path(sys.executable).parent / "llmpipe"), "pipeline", "--config-dir", "jobs/demo", "--root", str(root),
           "--until", "pack", "--no-progress"]
    print("data:", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=REPO, env=env, check=True)


def val_losses(model_dir: Path, shards: Path) -> dict[str, float]:
    """Mean next-token loss over every validation block, with and without document masking."""
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.data.packed import PackedDataset, document_positions

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.config.use_cache = False
    val = PackedDataset(str(shards), "val")
    bos, eos = val.document_boundaries()
    sums = {"masked": 0.0, "whole": 0.0}
    n = 0
    with torch.no_grad():
        for start in range(0, len(val), 16):
            ids = torch.stack([val[i]["input_ids"] for i in range(start, min(len(val), start + 16))])
            targets = ids.shape[0] * (ids.shape[1] - 1)
            pos = document_positions(ids, bos_id=bos, eos_id=eos)
            sums["masked"] += float(model(input_ids=ids, labels=ids, position_ids=pos).loss) * targets
            sums["whole"] += float(model(input_ids=ids, labels=ids).loss) * targets
            n += targets
    return {f"val_loss_{k}": v / n for k, v in sums.items()} | {"val_blocks": len(val), "val_targets": n}


def run_variant(root: Path, init_std: str, masking: bool, seed: int, steps: int) -> dict[str, Any]:
    from pipeline import runner
    from pipeline.stages import load_config
    from pipeline.storage import Storage

    storage = Storage(str(root))
    init_cfg = load_config("init", REPO / "jobs/demo/init.yaml", overrides=[f"seed={seed}", f"init_std={init_std}"])
    runner.run_stage("init", init_cfg, storage, force=True, progress=False)
    label = f"{init_std}-{'mask' if masking else 'whole'}-s{seed}"
    ckpt = root / "checkpoints" / f"numerics-{label}"
    over = [f"max_steps={steps}", "phases=[{name: main, shards: shards}]", "checkpoint_every=0", "eval_every=0",
            "resume=false", f"checkpoint_dir={ckpt}", f"seed={seed}", f"document_masking={str(masking).lower()}",
            "generation={every: 0, prompts: []}", "log_every=20"]
    cfg = load_config("pretrain", REPO / "jobs/demo/pretrain.yaml", overrides=over)
    t0 = time.perf_counter()
    m = runner.run_stage("pretrain", cfg, storage, force=True, progress=False).manifest["metrics"]
    seconds = time.perf_counter() - t0
    out = {"label": label, "init_std": init_std, "document_masking": masking, "seed": seed, "steps": m["steps"],
           "tokens": m["tokens"], "train_loss": m["train_loss"], "seconds": round(seconds, 1),
           "tokens_per_s": m["tokens_per_s"], **val_losses(root / "models" / "pretrain", root / "shards")}
    print(json.dumps(out), flush=True)
    return out


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| init_std | document_masking | val loss, per document (masked eval) | val loss, whole blocks | "
             "train loss (last log) | tokens/s |", "|---|---|---|---|---|---|"]
    for std, masking in VARIANTS:
        got = [r for r in rows if r["init_std"] == std and r["document_masking"] == masking]
        if not got:
            continue

        def cell(key: str, digits: int = 4, got: list = got) -> str:
            vals = [r[key] for r in got]
            mean = statistics.fmean(vals)
            spread = f" ± {statistics.stdev(vals):.{digits}f}" if len(vals) > 1 else ""
            return f"{mean:.{digits}f}{spread}"

        lines.append(f"| {std} | {str(masking).lower()} | {cell('val_loss_masked')} | {cell('val_loss_whole')} | "
                     f"{cell('train_loss')} | {cell('tokens_per_s', 0)} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="runs/numerics", help="run root for the demo data and the runs")
    ap.add_argument("--cache", default=".cache", help="the corpus cache (make corpus)")
    ap.add_argument("--steps", type=int, default=160, help="optimizer steps per run (8192 tokens each)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--only", choices=["init", "masking"], help="vary only one of the two (the other at its default)")
    ap.add_argument("--json", help="write every run's numbers here")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    root = Path(args.root)
    ensure_data(root, Path(args.cache))
    variants = VARIANTS
    if args.only == "init":
        variants = [v for v in VARIANTS if v[1] is False]
    elif args.only == "masking":
        variants = [v for v in VARIANTS if v[0] == "normal"]
    rows = [run_variant(root, std, masking, seed, args.steps) for seed in args.seeds for std, masking in variants]
    print()
    print(f"{args.steps} steps x 8192 tokens, seeds {args.seeds}; mean ± std over seeds; loss in nats per token")
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
