"""The pretraining loop: HF Trainer + DeepSpeed ZeRO over packed token shards, resumable to the sample.

Pieces, top to bottom:

* pure helpers (unit-tested): precision choice, gradient accumulation from a token budget, the
  cosine and warmup-stable-decay schedules, PaLM MFU, phase boundaries, checkpoint discovery;
* :class:`TrainStream`: this rank's samples from a given step on, phase after phase, drawn by
  :class:`~pipeline.data.shards.ResumableDistributedSampler` -- the data position is the pair
  (phase, samples consumed in it), stored in every checkpoint;
* :class:`PretrainTrainer`: a Trainer whose checkpoints are written to a temporary folder and
  renamed to ``step-N/`` with a ``COMPLETE`` marker (keep last K), that logs each step's sample
  ids, and whose schedule is ours;
* callbacks for metrics (``metrics.jsonl``: loss, lr, grad norm, tokens/s, MFU, peak memory,
  validation loss/perplexity, per-step sample ids) and generations (``generations.jsonl``);
* :func:`train`: the whole stage on one rank.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch.utils.data import IterableDataset

from pipeline.errors import ConfigError, InputError, PipelineError

COMPLETE = "COMPLETE"
DATA_STATE = "data_state.json"
STEP_RE = re.compile(r"^step-(\d+)$")
METRICS_FILE = "metrics.jsonl"
GENERATIONS_FILE = "generations.jsonl"


# ------------------------------------------------------------------------------ pure helpers


def resolve_precision(requested: str, *, cuda: bool | None = None, bf16_ok: bool | None = None) -> str:
    """``auto`` -> bf16 on a CUDA device that supports it, fp16 on an older GPU, fp32 on CPU."""
    if cuda is None:
        cuda = torch.cuda.is_available()
    if bf16_ok is None:
        bf16_ok = bool(cuda and torch.cuda.is_bf16_supported())
    if requested == "auto":
        return "bf16" if cuda and bf16_ok else ("fp16" if cuda else "fp32")
    if requested in ("bf16", "fp16") and not cuda:
        raise ConfigError(f"precision {requested} needs a CUDA device; this machine has none (use precision: fp32 or auto)")
    if requested == "bf16" and not bf16_ok:
        raise ConfigError("precision bf16 is not supported by this GPU (use fp16 or auto)")
    return requested


def check_kernels(cfg: Any, precision: str, *, cuda: bool | None = None) -> None:
    """attention / liger_kernels / compile against this machine, before any weights are loaded."""
    import importlib.util

    if cuda is None:
        cuda = torch.cuda.is_available()
    if cfg.attention == "flash_attention_2":
        if not cuda:
            raise ConfigError("attention flash_attention_2 needs a CUDA device; this machine has none (use attention: sdpa)")
        if precision not in ("bf16", "fp16"):
            raise ConfigError(f"attention flash_attention_2 runs in bf16 or fp16, but precision is {precision}")
        if importlib.util.find_spec("flash_attn") is None:
            raise ConfigError("attention flash_attention_2 needs the flash-attn package (pip install flash-attn); "
                              "attention: sdpa uses PyTorch's own flash kernel without it")
    if cfg.liger_kernels:
        if not cuda:
            raise ConfigError("liger_kernels needs a CUDA device (Triton kernels); this machine has none")
        if importlib.util.find_spec("liger_kernel") is None:
            raise ConfigError("liger_kernels needs the liger-kernel package (pip install liger-kernel)")
    if cfg.compile and not cuda:
        import shutil as _sh

        if not (_sh.which(os.environ.get("CXX", "g++")) or _sh.which("c++") or _sh.which("clang++")):
            raise ConfigError("compile on CPU needs a C++ compiler for inductor (g++ or clang++); none is on PATH")


def quiet_trainer_logs(trainer: Any) -> None:
    """Drop the Trainer's raw ``{'loss': ...}`` dicts (PrinterCallback, and ProgressCallback's copy above its bar)."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    if any(isinstance(cb, ProgressCallback) for cb in trainer.callback_handler.callbacks):

        class BarOnly(ProgressCallback):
            def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
                pass

        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(BarOnly())


def innermost_optimizer(opt: Any) -> str | None:
    """The class doing the update under the wrappers (accelerate's, DeepSpeed's ZeRO): e.g. AdamW, DeepSpeedCPUAdam."""
    name = None
    for _ in range(5):
        if opt is None:
            break
        name = type(opt).__name__
        opt = getattr(opt, "optimizer", None)
    return name


def grad_accum_steps(global_batch_tokens: int, seq_len: int, micro_batch: int, world_size: int) -> int:
    """global_batch_tokens / (seq_len * micro_batch * world_size), which must be a whole number >= 1."""
    per_pass = seq_len * micro_batch * world_size
    if global_batch_tokens % per_pass or global_batch_tokens < per_pass:
        lo = max(1, global_batch_tokens // per_pass) * per_pass
        hi = lo + per_pass if global_batch_tokens > lo else lo
        raise ConfigError(
            f"global_batch_tokens {global_batch_tokens:,} is not a whole multiple of seq_len {seq_len} x micro_batch_size "
            f"{micro_batch} x world size {world_size} = {per_pass:,} tokens per forward pass; "
            f"use e.g. {lo:,} or {hi:,} (or change micro_batch_size)"
        )
    return global_batch_tokens // per_pass


def cosine_lr(step: int, *, total: int, warmup: int, min_ratio: float) -> float:
    """Multiplier of the peak lr: linear warmup, then cosine down to ``min_ratio`` at ``total``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def wsd_lr(step: int, *, total: int, warmup: int, min_ratio: float, decay_fraction: float, shape: str = "sqrt") -> float:
    """Warmup-stable-decay: linear warmup, constant peak, then a decay over the last ``decay_fraction``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    decay_steps = max(1, round(total * decay_fraction))
    decay_start = max(warmup, total - decay_steps)
    if step < decay_start:
        return 1.0
    progress = min(1.0, (step - decay_start) / max(1, total - decay_start))
    if shape == "linear":
        frac = 1 - progress
    elif shape == "cosine":
        frac = 0.5 * (1 + math.cos(math.pi * progress))
    else:  # 1 - sqrt (Hägele et al. 2024)
        frac = 1 - math.sqrt(progress)
    return min_ratio + (1 - min_ratio) * frac


def lr_multiplier(cfg: Any, total: int) -> Callable[[int], float]:
    if cfg.schedule == "wsd":
        return lambda s: wsd_lr(s, total=total, warmup=cfg.warmup_steps, min_ratio=cfg.min_lr_ratio,
                                decay_fraction=cfg.decay_fraction, shape=cfg.decay_shape)
    return lambda s: cosine_lr(s, total=total, warmup=cfg.warmup_steps, min_ratio=cfg.min_lr_ratio)


def flops_per_token(n_params: int, layers: int, heads: int, head_dim: int, seq_len: int) -> float:
    """PaLM (Chowdhery et al. 2022, app. B): 6N + 12·L·H·Dh·T training FLOPs per token."""
    return 6.0 * n_params + 12.0 * layers * heads * head_dim * seq_len


def mfu(tokens_per_s_per_device: float, fpt: float, peak_flops: float | None) -> float | None:
    if not peak_flops:
        return None
    return tokens_per_s_per_device * fpt / peak_flops


@dataclass(frozen=True)
class Phase:
    name: str
    shards: str
    start: int  # first global step of the phase
    end: int  # first step after it


def plan_phases(phases: list[Any], total: int) -> list[Phase]:
    out, start = [], 0
    for p in phases:
        end = p.until_step if p.until_step is not None else total
        out.append(Phase(p.name, p.shards, start, end))
        start = end
    return out


def phase_at(plan: list[Phase], step: int) -> int:
    for i, p in enumerate(plan):
        if step < p.end:
            return i
    return len(plan) - 1


def list_checkpoints(root: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """Complete checkpoints (``step-N/`` with a COMPLETE marker) under ``root``, oldest first."""
    found = []
    base = Path(root)
    if not base.is_dir():
        return []
    for entry in base.iterdir():
        m = STEP_RE.match(entry.name)
        if m and entry.is_dir() and (entry / COMPLETE).is_file():
            found.append((int(m.group(1)), entry))
    return sorted(found)


def latest_checkpoint(root: str | os.PathLike[str]) -> tuple[int, Path] | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


# ------------------------------------------------------------------------------------ data


class TrainStream(IterableDataset):
    """This rank's training samples from ``start_step`` on, switching datasets at phase boundaries.

    Each optimizer step takes ``micro * accum`` samples per rank, i.e. the next
    ``global_batch`` positions of the phase's global stream. ``start_index`` is the number of
    samples of the current phase already consumed (from the checkpoint)."""

    def __init__(self, datasets: list[Any], plan: list[Phase], *, rank: int, world: int, micro: int, accum: int,
                 seed: int, shuffle: bool, start_step: int, start_index: int):
        self.datasets, self.plan = datasets, plan
        self.rank, self.world, self.micro, self.accum = rank, world, micro, accum
        self.seed, self.shuffle = seed, shuffle
        self.start_step, self.start_index = start_step, start_index

    @property
    def global_batch(self) -> int:
        return self.micro * self.accum * self.world

    def sampler(self, phase: int, start_index: int) -> Any:
        from pipeline.data.shards import ResumableDistributedSampler

        return ResumableDistributedSampler(len(self.datasets[phase]), rank=self.rank, world_size=self.world,
                                           seed=self.seed + phase, start_index=start_index, shuffle=self.shuffle)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        step, index = self.start_step, self.start_index
        per_step = self.micro * self.accum
        while True:
            p = phase_at(self.plan, step)
            ds = self.datasets[p]
            sampler = self.sampler(p, index)
            last = p == len(self.plan) - 1
            steps = None if last else self.plan[p].end - step
            local = _forever(sampler)
            n = 0
            while steps is None or n < steps * per_step:
                i = next(local)
                item = ds[i]
                item["phase"] = p
                yield item
                n += 1
            step, index = self.plan[p].end, 0


def _forever(sampler: Any) -> Iterator[int]:
    while True:  # the sampler moves on to the next epoch after each pass
        yield from iter(sampler)


def collate(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    ids = torch.stack([it["input_ids"] for it in items])
    return {
        "input_ids": ids,
        "labels": ids.clone(),
        "sample_id": torch.tensor([int(it["sample_id"]) for it in items], dtype=torch.long),
        "phase": torch.tensor([int(it.get("phase", 0)) for it in items], dtype=torch.long),
    }


# ------------------------------------------------------------------------------ distributed


def _dist() -> Any:
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def barrier() -> None:
    d = _dist()
    if d is not None:
        d.barrier()


def gather_objects(obj: Any) -> list[Any]:
    d = _dist()
    if d is None:
        return [obj]
    out: list[Any] = [None] * d.get_world_size()
    d.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any) -> Any:
    d = _dist()
    if d is None:
        return obj
    box = [obj]
    d.broadcast_object_list(box, src=0)
    return box[0]


# --------------------------------------------------------------------------------- logging


class JsonlLog:
    """Appends records to a local JSONL file (rank 0 only), flushed per line."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
            fh.flush()
        if self.path.name == METRICS_FILE:  # and to the stage's MLflow run, when one is active
            from pipeline import tracking

            tracking.log_step(record)


def peak_memory_gb(cuda: bool) -> tuple[float, str]:
    if cuda:
        return torch.cuda.max_memory_allocated() / 2**30, "cuda_allocated"
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "cpu_rss"


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


# ------------------------------------------------------------------------------- the trainer


def _build_trainer_class() -> type:
    from transformers import Trainer

    class PretrainTrainer(Trainer):
        """Trainer with our data stream, schedule, atomic step-N checkpoints and per-step sample ids."""

        def setup_pretrain(self, *, stream: TrainStream, ckpt_root: Path, keep: int, schedule: Callable[[int], float],
                           data_state: Callable[[int], dict[str, Any]], workers: int) -> None:
            self._stream, self._ckpt_root, self._keep = stream, ckpt_root, keep
            self._schedule, self._data_state, self._workers = schedule, data_state, workers
            self._step_ids: list[int] = []
            self._step_phase: int = 0

        def get_train_dataloader(self) -> torch.utils.data.DataLoader:
            # not prepared by accelerate: the sampler inside the stream already shards by rank
            return torch.utils.data.DataLoader(
                self._stream, batch_size=self.args.per_device_train_batch_size, collate_fn=collate,
                num_workers=self._workers, pin_memory=torch.cuda.is_available(),
            )

        def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None) -> Any:
            if self.lr_scheduler is None:
                self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer if optimizer is None else optimizer,
                                                                      self._schedule)
                self._created_lr_scheduler = True
            return self.lr_scheduler

        def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            ids = inputs.pop("sample_id", None)
            phase = inputs.pop("phase", None)
            if ids is not None and model.training:
                self._step_ids.extend(int(i) for i in ids.tolist())
                if phase is not None and len(phase):
                    self._step_phase = int(phase[0])
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

        def take_step_ids(self) -> tuple[int, list[int]]:
            """This step's sample ids on all ranks in global-stream order (collective)."""
            mine, self._step_ids = self._step_ids, []
            parts = gather_objects(mine)
            n = max((len(p) for p in parts), default=0)
            ordered = [p[j] for j in range(n) for p in parts if j < len(p)]
            return self._step_phase, ordered

        def _save_checkpoint(self, model: Any, trial: Any) -> None:
            step = self.state.global_step
            root = self._ckpt_root
            staging = root / f".tmp-step-{step}"
            final = root / f"step-{step}"
            main = self.args.process_index == 0
            if main:
                shutil.rmtree(staging, ignore_errors=True)
                staging.mkdir(parents=True)
            barrier()
            saved_dir = self.args.output_dir
            self.args.output_dir = str(staging)
            try:
                super()._save_checkpoint(model, trial)
            finally:
                self.args.output_dir = saved_dir
            barrier()
            if main:
                src = staging / f"checkpoint-{step}"
                (src / DATA_STATE).write_text(json.dumps(self._data_state(step), indent=2) + "\n")
                marker = src / COMPLETE
                with open(marker, "w") as fh:
                    fh.write(json.dumps({"step": step, "time": time.time()}) + "\n")
                    fh.flush()
                    os.fsync(fh.fileno())
                if final.exists():  # a rerun reached the same step again: replace it
                    aside = root / f".old-step-{step}-{time.time_ns()}"
                    os.rename(final, aside)
                    shutil.rmtree(aside, ignore_errors=True)
                os.rename(src, final)
                shutil.rmtree(staging, ignore_errors=True)
                for _, old in list_checkpoints(root)[: -self._keep]:
                    shutil.rmtree(old, ignore_errors=True)
            barrier()

    return PretrainTrainer


def _callbacks() -> tuple[type, type]:
    from transformers import TrainerCallback

    class MetricsCallback(TrainerCallback):
        def __init__(self, trainer: Any, log: JsonlLog, *, tokens_per_step: int, world: int, fpt: float,
                     peak: float | None, cuda: bool, ctx: Any):
            self.trainer, self.log, self.tokens_per_step, self.world = trainer, log, tokens_per_step, world
            self.fpt, self.peak, self.cuda, self.ctx = fpt, peak, cuda, ctx
            self._t0 = 0.0
            self._busy = 0.0
            self._steps = 0
            self.total_busy = 0.0
            self.total_steps = 0
            self.last: dict[str, Any] = {}

        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self._t0 = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if self.cuda:
                torch.cuda.synchronize()
            dt = time.perf_counter() - self._t0
            self._busy += dt
            self._steps += 1
            self.total_busy += dt
            self.total_steps += 1
            phase, ids = self.trainer.take_step_ids()
            self.log.write({"kind": "samples", "step": state.global_step, "phase": phase, "sample_ids": ids})

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any) -> None:
            logs = dict(logs or {})
            step = state.global_step
            if "eval_loss" in logs:
                loss = float(logs["eval_loss"])
                rec = {"kind": "eval", "step": step, "val_loss": loss, "val_perplexity": math.exp(min(loss, 50.0))}
                self.last.update(val_loss=rec["val_loss"], val_perplexity=rec["val_perplexity"])
                self.log.write(rec)
                if self.log.enabled:
                    self.ctx.log(f"step {step}: val loss {loss:.4f}  ppl {rec['val_perplexity']:.2f}")
                return
            if "loss" not in logs:
                if "train_runtime" in logs:
                    self.log.write({"kind": "summary", "step": step, **logs})
                return
            tps = self.tokens_per_step * self._steps / self._busy if self._busy > 0 else None
            per_dev = tps / self.world if tps else None
            mem, mem_kind = peak_memory_gb(self.cuda)
            rec = {
                "kind": "train", "step": step, "loss": float(logs["loss"]), "lr": logs.get("learning_rate"),
                "grad_norm": logs.get("grad_norm"), "tokens_per_s": tps, "tokens_per_s_per_device": per_dev,
                "mfu": mfu(per_dev, self.fpt, self.peak) if per_dev else None,
                "peak_mem_gb": round(mem, 3), "peak_mem_kind": mem_kind, "tokens": step * self.tokens_per_step,
            }
            self.last.update(train_loss=rec["loss"])
            self.log.write(rec)
            self._busy, self._steps = 0.0, 0
            gn = f"{rec['grad_norm']:.3f}" if isinstance(rec["grad_norm"], (int, float)) else "-"
            if self.log.enabled:
                self.ctx.log(f"step {step}: loss {rec['loss']:.4f}  lr {rec['lr']:.3g}  grad norm {gn}  "
                         f"tok/s {tps or 0:,.0f}" + (f"  MFU {rec['mfu']:.1%}" if rec["mfu"] is not None else ""))

    class GenerationCallback(TrainerCallback):
        def __init__(self, gen_cfg: Any, tokenizer: Any, log: JsonlLog, synced: bool):
            self.cfg, self.tok, self.log, self.synced = gen_cfg, tokenizer, log, synced
            self.last: tuple[int, list[dict[str, Any]]] = (-1, [])

        def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
            if self.cfg.every and state.global_step % self.cfg.every == 0:
                self.generate(model, state.global_step)

        def generate(self, model: Any, step: int) -> list[dict[str, Any]]:
            if self.last[0] == step:  # already decoded at this step
                return self.last[1]
            records: list[dict[str, Any]] = []
            was_training = model.training
            model.eval()
            device = next(model.parameters()).device
            try:
                for prompt in self.cfg.prompts:
                    full = self.tok(prompt, return_tensors="pt")
                    enc = {k: full[k].to(device) for k in ("input_ids", "attention_mask") if k in full}
                    common = dict(max_new_tokens=self.cfg.max_new_tokens, synced_gpus=self.synced,
                                  pad_token_id=self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id)
                    with torch.no_grad():
                        greedy = model.generate(**enc, do_sample=False, **common)
                        with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
                            torch.manual_seed(self.cfg.seed + step)  # same on every rank: ZeRO-3 ranks stay in step
                            sampled = model.generate(**enc, do_sample=True, temperature=self.cfg.temperature,
                                                     top_p=self.cfg.top_p, **common)
                    n = enc["input_ids"].shape[1]
                    rec = {"step": step, "prompt": prompt,
                           "greedy": self.tok.decode(greedy[0, n:], skip_special_tokens=True),
                           "sampled": self.tok.decode(sampled[0, n:], skip_special_tokens=True)}
                    records.append(rec)
                    self.log.write(rec)
            finally:
                model.train(was_training)
            self.last = (step, records)
            return records

    return MetricsCallback, GenerationCallback


# ---------------------------------------------------------------------------------- the stage


def local_copy(art: Any, tmp: str) -> str:
    """An artifact as a local folder under ``tmp`` (itself when the run root is local)."""
    return art.download(os.path.join(tmp, art.name.replace("/", "_")))


def has_tokenizer(folder: str) -> bool:
    return any(os.path.exists(os.path.join(folder, f)) for f in ("tokenizer.json", "tokenizer_config.json"))


def deepspeed_dict(cfg: Any) -> dict[str, Any] | None:
    if cfg.zero_stage == 0:
        return None
    from pipeline.training import deepspeed_config_path

    path = Path(cfg.deepspeed_config) if cfg.deepspeed_config else deepspeed_config_path(cfg.zero_stage, cfg.offload)
    try:
        ds = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"deepspeed_config {path} does not exist") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"deepspeed_config {path} is not valid JSON: {exc}") from None
    stage = ds.get("zero_optimization", {}).get("stage")
    if cfg.deepspeed_config and stage is not None and stage != cfg.zero_stage:
        raise ConfigError(f"deepspeed_config {path} has ZeRO stage {stage} but zero_stage is {cfg.zero_stage}")
    return ds


def checkpoint_root(cfg: Any, storage: Any) -> Path:
    if cfg.checkpoint_dir:
        return Path(cfg.checkpoint_dir).absolute()
    if not storage.is_local:
        raise ConfigError(
            f"run root {storage.uri} is not a filesystem: DeepSpeed checkpoints need one shared by all ranks (a PVC); "
            "set checkpoint_dir to a mounted folder"
        )
    return Path(storage.path("checkpoints", "pretrain"))


def train(cfg: Any, ctx: Any, out: Any) -> dict[str, Any]:
    """Pretrain on this rank. ``out`` is the output folder on rank 0 and ``None`` elsewhere."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

    from pipeline.config import config_hash
    from pipeline.data.shards import PackedDataset

    transformers.logging.set_verbosity_warning()
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed.*")
    rank, world = ctx.rank, ctx.world
    main = rank == 0
    cuda = torch.cuda.is_available()
    precision = resolve_precision(cfg.precision)
    check_kernels(cfg, precision, cuda=cuda)
    total = cfg.total_steps
    plan = plan_phases(cfg.phases, total)
    ckpt_root = checkpoint_root(cfg, ctx.storage)
    tmp = tempfile.mkdtemp(prefix=f"llmpipe-pretrain-r{rank}-")
    try:
        # -- data
        datasets, vals = [], []
        for ph in plan:
            art = ctx.inputs[ph.shards]
            url = art.url()
            opts = ctx.storage.storage_options if not ctx.storage.is_local else None
            datasets.append(PackedDataset(url, "train", storage_options=opts, verify=cfg.verify_shards and main))
            if "val" in datasets[-1].index["splits"] and datasets[-1].index["splits"]["val"]["blocks"]:
                vals.append(PackedDataset(url, "val", storage_options=opts, verify=False))
        seq_lens = {d.seq_len for d in datasets}
        if len(seq_lens) != 1:
            raise InputError(f"the phases' shards have different block lengths {sorted(seq_lens)}; repack them alike")
        seq_len = seq_lens.pop()
        accum = grad_accum_steps(cfg.global_batch_tokens, seq_len, cfg.micro_batch_size, world)
        for ph, d in zip(plan, datasets):
            if len(d) == 0:
                raise InputError(f"phase {ph.name}: {ph.shards}/ has no training blocks (an empty corpus, or every "
                                 "document went to validation): nothing to train on")
            if len(d) < world:
                raise InputError(f"phase {ph.name}: {ph.shards}/ has {len(d)} training blocks, fewer than {world} ranks")

        # -- model and tokenizer folders (local copies when the root is remote)
        model_dir = local_copy(ctx.inputs[cfg.model], tmp)
        tok_dir = model_dir if has_tokenizer(model_dir) else local_copy(ctx.inputs[cfg.tokenizer], tmp)

        # -- resume point
        start_step, start_index, resume_from = 0, 0, None
        chash = config_hash(cfg)
        if cfg.resume:
            found = latest_checkpoint(ckpt_root)
            if main:
                for stale in ckpt_root.glob(".tmp-step-*") if ckpt_root.is_dir() else []:
                    shutil.rmtree(stale, ignore_errors=True)
            if found:
                step, path = found
                state = json.loads((path / DATA_STATE).read_text())
                if state.get("config_hash") != chash:
                    raise PipelineError(
                        f"checkpoint {path} was written by a different pretrain config; delete {ckpt_root} "
                        "(or point checkpoint_dir elsewhere, or set resume: false) to start over"
                    )
                start_step, resume_from = step, str(path)
                if step < total:
                    start_index = int(state["phase_start_index"]) if state["phase"] == phase_at(plan, step) else 0
        barrier()
        if start_step >= total:
            if not any((Path(resume_from) / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json")):
                raise PipelineError(f"checkpoint {resume_from} reaches max_steps {total} but holds no HF weights to export; "
                                    "delete it to redo the last steps")
            if main:
                ctx.log(f"checkpoint at step {start_step} already reaches max_steps {total}: exporting its weights")
            model_dir = str(resume_from)

        # -- the checkpoint against the data, before any weights load
        from pipeline.models.checkpoint import causal_lm_config

        mc = causal_lm_config(model_dir, f"{cfg.model}/")
        vocab = max(d.vocab_size for d in datasets)
        if vocab > mc.vocab_size:
            raise InputError(f"the shards were tokenized with a {vocab}-token vocabulary but {cfg.model}/ has vocab_size "
                             f"{mc.vocab_size}: the model was made for another tokenizer; rerun init with this one")
        if seq_len > getattr(mc, "max_position_embeddings", seq_len):
            raise InputError(f"the shards hold {seq_len}-token blocks, longer than {cfg.model}/'s max_position_embeddings "
                             f"{mc.max_position_embeddings}: repack with a shorter seq_len or init with more positions")

        ds_cfg = deepspeed_dict(cfg)
        if ds_cfg is not None and world == 1 and not cfg.offload and main:
            ctx.log(f"note: ZeRO-{cfg.zero_stage} in one process partitions nothing; zero_stage: 0 trains the same "
                    "without DeepSpeed's gradient copies (faster: see docs/benchmarks.md)")
        if ds_cfg is not None and "LOCAL_RANK" not in os.environ and world == 1:
            # DeepSpeed in this very process (``llmpipe run pretrain``): a one-process group
            from pipeline.training.launcher import free_port

            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", LOCAL_RANK="0",
                              WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        if ds_cfg is not None and "LOCAL_RANK" in os.environ:
            import deepspeed

            # before ZeRO-3's zero.Init (inside from_pretrained) reads the world size
            deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
        eval_steps = cfg.eval_every or total
        args = TrainingArguments(
            output_dir=str(ckpt_root),
            per_device_train_batch_size=cfg.micro_batch_size,
            per_device_eval_batch_size=cfg.micro_batch_size,
            gradient_accumulation_steps=accum,
            max_steps=total,
            learning_rate=cfg.lr,
            weight_decay=cfg.weight_decay,
            adam_beta1=cfg.adam_beta1,
            adam_beta2=cfg.adam_beta2,
            adam_epsilon=cfg.adam_eps,
            max_grad_norm=cfg.max_grad_norm,
            lr_scheduler_type="constant",
            logging_steps=cfg.log_every,
            logging_first_step=True,
            save_strategy="steps" if cfg.checkpoint_every else "no",
            save_steps=cfg.checkpoint_every or total,
            eval_strategy="steps" if vals else "no",
            eval_steps=eval_steps,
            bf16=precision == "bf16",
            fp16=precision == "fp16",
            gradient_checkpointing=cfg.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False} if cfg.gradient_checkpointing else None,
            deepspeed=ds_cfg,
            seed=cfg.seed,
            report_to="none",
            disable_tqdm=not ctx.progress,
            ignore_data_skip=True,
            dataloader_num_workers=cfg.dataloader_workers,
            prediction_loss_only=True,
            remove_unused_columns=False,
            save_safetensors=True,
            ddp_backend="gloo" if (not cuda and "LOCAL_RANK" in os.environ) else None,
            use_cpu=not cuda,
            include_num_input_tokens_seen=False,
            torch_compile=cfg.compile,
            use_liger_kernel=cfg.liger_kernels,
        )
        # after TrainingArguments, so that ZeRO-3 partitions the weights as they load
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=cfg.attention)
        model.config.use_cache = False
        tokenizer = AutoTokenizer.from_pretrained(tok_dir)
        if tokenizer.pad_token is None and tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        mc = model.config
        n_all = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
        emb = model.get_input_embeddings().weight
        n_params = n_all - getattr(emb, "ds_numel", emb.numel())
        heads = mc.num_attention_heads
        head_dim = getattr(mc, "head_dim", None) or mc.hidden_size // heads
        fpt = flops_per_token(n_params, mc.num_hidden_layers, heads, head_dim, seq_len)
        peak = cfg.peak_flops if cuda else cfg.cpu_peak_flops

        stream = TrainStream(datasets, plan, rank=rank, world=world, micro=cfg.micro_batch_size, accum=accum,
                             seed=cfg.seed, shuffle=cfg.shuffle, start_step=start_step, start_index=start_index)
        global_batch = stream.global_batch

        def data_state(step: int) -> dict[str, Any]:
            p = phase_at(plan, step)
            # samples of phase p consumed by `step`; right after a resume the phase's own counter carries on
            if p == phase_at(plan, start_step) and step >= start_step:
                consumed = start_index + (step - start_step) * global_batch
            else:
                consumed = (step - plan[p].start) * global_batch
            return {"step": step, "phase": p, "phase_name": plan[p].name, "phase_start_index": consumed,
                    "global_batch_samples": global_batch, "world_size": world, "config_hash": chash,
                    "sampler": stream.sampler(p, consumed).state_dict()}

        eval_ds = None
        if vals:
            v = vals[-1]  # the validation split of the latest phase's data
            n = len(v) if cfg.eval_max_blocks is None else min(len(v), cfg.eval_max_blocks)
            eval_ds = torch.utils.data.Subset(v, range(n))

        metrics_log = JsonlLog(ckpt_root / METRICS_FILE, main)
        gen_log = JsonlLog(ckpt_root / GENERATIONS_FILE, main)
        Trainer = _build_trainer_class()
        trainer = Trainer(model=model, args=args, train_dataset=stream, eval_dataset=eval_ds, data_collator=collate,
                          processing_class=tokenizer)
        trainer.setup_pretrain(stream=stream, ckpt_root=ckpt_root, keep=cfg.keep_checkpoints,
                               schedule=lr_multiplier(cfg, total), data_state=data_state, workers=cfg.dataloader_workers)
        MetricsCallback, GenerationCallback = _callbacks()
        mcb = MetricsCallback(trainer, metrics_log, tokens_per_step=cfg.global_batch_tokens, world=world, fpt=fpt,
                              peak=peak, cuda=cuda, ctx=ctx)
        synced = cfg.zero_stage == 3 and world > 1
        gcb = GenerationCallback(cfg.generation, tokenizer, gen_log, synced)
        quiet_trainer_logs(trainer)  # our own log lines replace the raw dicts
        trainer.add_callback(mcb)
        trainer.add_callback(gcb)

        metrics_log.write({"kind": "start", "step": start_step, "resumed_from": resume_from, "world_size": world,
                           "grad_accum": accum, "micro_batch_size": cfg.micro_batch_size, "seq_len": seq_len,
                           "global_batch_tokens": cfg.global_batch_tokens, "precision": precision,
                           "zero_stage": cfg.zero_stage, "params": n_all, "flops_per_token": fpt,
                           "phases": [p.__dict__ for p in plan]})
        if main:
            ctx.log(f"pretrain: {n_all:,} params, world {world} x micro {cfg.micro_batch_size} x accum {accum} x "
                    f"{seq_len} tokens = {cfg.global_batch_tokens:,} tokens/step, {total} steps, ZeRO {cfg.zero_stage}, "
                    f"{precision}" + (f", resuming from step {start_step}" if resume_from else ""))
        if start_step < total:
            trainer.train(resume_from_checkpoint=resume_from)
        else:  # the last checkpoint is the end of training (killed before the export): export its weights
            trainer.state.global_step = start_step

        # -- final evaluation and generations
        final_eval: dict[str, Any] = {}
        if eval_ds is not None and "val_loss" in mcb.last and trainer.state.global_step % (cfg.eval_every or total) == 0:
            final_eval = {"val_loss": mcb.last["val_loss"], "val_perplexity": mcb.last["val_perplexity"]}
        elif eval_ds is not None:
            ev = trainer.evaluate()
            final_eval = {"val_loss": ev["eval_loss"], "val_perplexity": math.exp(min(ev["eval_loss"], 50.0))}
        gens = gcb.generate(trainer.model, trainer.state.global_step) if cfg.generation.prompts else []

        # -- export: the HF model (gathered from ZeRO-3 partitions) and the tokenizer
        export = out.path() if (out is not None and out.storage.is_local) else os.path.join(tmp, "export")
        trainer.save_model(export)  # collective under ZeRO-3; only rank 0 writes
        barrier()
        result = {
            "steps": trainer.state.global_step,
            "tokens": trainer.state.global_step * cfg.global_batch_tokens,
            "seq_len": seq_len,
            "world_size": world,
            "grad_accum": accum,
            "micro_batch_size": cfg.micro_batch_size,
            "zero_stage": cfg.zero_stage,
            "offload": cfg.offload,
            "precision": precision,
            "optimizer": innermost_optimizer(trainer.optimizer),
            "attention": cfg.attention,
            "compile": cfg.compile,
            "liger_kernels": cfg.liger_kernels,
            "params": n_all,
            "resumed_from_step": start_step if resume_from else None,
            "train_loss": mcb.last.get("train_loss"),
            **final_eval,
            "tokens_per_s": (cfg.global_batch_tokens * mcb.total_steps / mcb.total_busy) if mcb.total_busy else None,
            "phases": {p.name: {"shards": p.shards, "steps": [p.start, p.end],
                                "fingerprint": ctx.inputs[p.shards].fingerprint} for p in plan},
        }
        result["mfu"] = mfu(result["tokens_per_s"] / world, fpt, peak) if result["tokens_per_s"] else None
        if main and out is not None:
            for name in ("training_args.bin",):
                try:
                    os.remove(os.path.join(export, name))
                except OSError:
                    pass
            tokenizer.save_pretrained(export)
            with open(os.path.join(export, "generations.json"), "w", encoding="utf-8") as fh:
                json.dump(gens, fh, indent=2, ensure_ascii=False)
            if metrics_log.path.exists():
                shutil.copyfile(metrics_log.path, os.path.join(export, "train_metrics.jsonl"))
            if not any(f.endswith((".safetensors", ".bin")) for f in os.listdir(export)):
                raise PipelineError(f"no model weights were exported to {export}")
            if not out.storage.is_local:
                out.put_local(export)
        barrier()
        return result
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
