"""The pretraining loop: HF Trainer + DeepSpeed ZeRO over packed token shards, resumable to the sample.

:func:`train` is the stage on one rank, a handful of calls:

1. checks before any weights load: precision and kernels (:func:`check_kernels`), the phases' shards
   (:func:`open_data`), the model folder against them (:func:`check_model`);
2. the start point (:func:`start_point`): step 0, or the newest complete checkpoint and its data position.
   Checkpoints -- where they are written, how they are committed, pruned and read back -- are
   :mod:`pipeline.training.checkpoint`'s (:class:`~pipeline.training.checkpoint.CheckpointManager`); on a
   cluster, rank 0 then counts the start against the restart budget (:mod:`pipeline.training.restarts`);
3. the Trainer (:func:`build_trainer`): TrainingArguments (:func:`trainer_arguments`, on
   :func:`pipeline.training.common.training_arguments`), :class:`TrainStream` (this rank's samples from the
   start point on, phase after phase, drawn by :class:`~pipeline.data.packed.ResumableDistributedSampler`, or
   :class:`~pipeline.data.packed.MixtureSampler` for a phase with a language / source ``mix`` -- the
   data position is the pair (phase, samples consumed in it), stored in every checkpoint), and
   :class:`PretrainTrainer` with our schedule, per-step sample ids and checkpoint saves; the callbacks for metrics
   (``metrics.jsonl``: loss, lr, grad norm, tokens/s, MFU, peak memory, validation loss/perplexity, per-step sample
   ids) and generations (``generations.jsonl``);
4. training, the final evaluation and generations (:func:`final_evaluation`), the export
   (:class:`~pipeline.training.common.Export`) and the stage's metrics (:func:`result`; with
   :func:`phase_data`, the tokens and epochs each phase drew per stream, language and source).

Pure helpers (unit-tested) come first: gradient accumulation from a token budget, the cosine and
warmup-stable-decay schedules, PaLM MFU, phase boundaries and mixes, kernel checks.
"""

from __future__ import annotations

import importlib.util
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
import transformers
from torch.utils.data import IterableDataset
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

from pipeline import tracking
from pipeline.data.packed import (
    MixtureSampler,
    PackedDataset,
    ResumableDistributedSampler,
    Stream,
    document_positions,
    flatten_rows,
    mixture_counts,
    stream_counts,
)
from pipeline.errors import ConfigError, CorruptShardError, InputError, PipelineError
from pipeline.models.checkpoint import causal_lm_config
from pipeline.training.checkpoint import CheckpointedTrainer, CheckpointManager, ResumePoint
from pipeline.training.common import (
    DecayGroups,
    Export,
    barrier,
    gather_objects,
    has_tokenizer,
    load_deepspeed_config,
    local_copy,
    quiet_libraries,
    quiet_trainer_logs,
    resolve_precision,
    start_deepspeed,
    training_arguments,
)
from pipeline.training.flops import matmul_flops_per_token, mfu, resolve_peak
from pipeline.training.restarts import count_start

METRICS_FILE = "metrics.jsonl"
GENERATIONS_FILE = "generations.jsonl"


# ------------------------------------------------------------------------------ pure helpers


def check_kernels(cfg: Any, precision: str, *, cuda: bool | None = None) -> None:
    """attention / liger_kernels / compile against this machine, before any weights are loaded."""
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
        if not (shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++") or shutil.which("clang++")):
            raise ConfigError("compile on CPU needs a C++ compiler for inductor (g++ or clang++); none is on PATH")


def dataloader_workers(cfg: Any) -> int:
    """The configured ``dataloader_workers``, or by default 1 on CUDA (loading overlaps the step) and 0 on CPU."""
    if cfg.dataloader_workers is not None:
        return int(cfg.dataloader_workers)
    return 1 if torch.cuda.is_available() else 0


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
    """PaLM (Chowdhery et al. 2022, app. B): 6N + 12·L·H·Dh·T training FLOPs per token for a given N. The stage
    counts N from the model config with :func:`pipeline.training.flops.matmul_flops_per_token` (head counted once,
    tied or not); this is the bare formula."""
    return 6.0 * n_params + 12.0 * layers * heads * head_dim * seq_len


class StepClock:
    """Wall time per optimizer step, data loading included, and the part of it spent waiting for batches.

    A step's interval runs from the end of the previous step's bookkeeping (``restart``: after the step-end
    callbacks, logging, evaluation and checkpoint saving, or the start of training) to the end of its optimizer
    step (``end_step``, after a CUDA sync): the Trainer's batch fetch (``get_batch_samples``, which pulls all of a
    step's micro batches before ``on_step_begin``), forward, backward and optimizer. ``add_wait`` adds the time
    spent in that fetch. Evaluation, checkpoints and sample generations are left out: they are not training."""

    def __init__(self, cuda: bool = False):
        self.cuda = cuda
        self._start: float | None = None
        self.window = {"steps": 0, "wall": 0.0, "wait": 0.0}  # since the last log line
        self.total = {"steps": 0, "wall": 0.0, "wait": 0.0}

    def restart(self) -> None:
        self._start = time.perf_counter()

    def add_wait(self, seconds: float) -> None:
        for acc in (self.window, self.total):
            acc["wait"] += seconds

    def end_step(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        if self._start is not None:
            for acc in (self.window, self.total):
                acc["wall"] += now - self._start
                acc["steps"] += 1
        self._start = None

    def take_window(self) -> dict[str, float]:
        w, self.window = self.window, {"steps": 0, "wall": 0.0, "wait": 0.0}
        return w


class StepClockRestart(TrainerCallback):
    """Added after every other callback: restarts the clock once a step's step-end callbacks, log, evaluation
    or save are done, so the next interval is the next step's data fetch and compute only."""

    def __init__(self, clock: StepClock):
        self.clock = clock

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.clock.restart()

    on_step_end = on_log = on_evaluate = on_save = on_train_begin


class TimedBatches:
    """Trainer mixin: the time spent fetching each optimizer step's batches goes to ``self.step_clock``."""

    step_clock: StepClock | None = None

    def get_batch_samples(self, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return super().get_batch_samples(*args, **kwargs)  # type: ignore[misc]
        finally:
            if self.step_clock is not None:
                self.step_clock.add_wait(time.perf_counter() - t0)


def throughput(tokens_per_step: int, world: int, fpt: float, peak: float | None,
               acc: dict[str, float]) -> dict[str, Any]:
    """tokens/s (all ranks), per device, MFU, and the data wait (seconds and share of the wall time) of a window."""
    wall, steps = acc["wall"], acc["steps"]
    tps = tokens_per_step * steps / wall if wall > 0 and steps else None
    per_dev = tps / world if tps else None
    return {"tokens_per_s": tps, "tokens_per_s_per_device": per_dev, "mfu": mfu(per_dev, fpt, peak),
            "step_time_s": wall / steps if steps else None, "data_wait_s": acc["wait"],
            "data_wait_fraction": acc["wait"] / wall if wall > 0 else None}


@dataclass(frozen=True)
class Phase:
    name: str
    shards: str
    start: int  # first global step of the phase
    end: int  # first step after it
    mix: dict[str, float] | None = None  # the config's weights (None: the shards' blocks uniformly)
    mix_by: str = "lang"


def plan_phases(phases: list[Any], total: int) -> list[Phase]:
    out, start = [], 0
    for p in phases:
        end = p.until_step if p.until_step is not None else total
        out.append(Phase(p.name, p.shards, start, end, dict(p.mix) if getattr(p, "mix", None) else None,
                         getattr(p, "mix_by", "lang")))
        start = end
    return out


_MIX_KEY = {"lang": ("lang", "language"), "source": ("source", "source"), "stream": ("name", "stream")}


def resolve_mix(streams: list[Stream], mix: dict[str, float] | None, mix_by: str, where: str) -> list[float] | None:
    """Each stream's weight under a phase's ``mix`` (in the order of ``streams``), or None without a mix. A key names
    a language, a source or a stream (``mix_by``); ``*`` every stream no other key names; streams no key names get
    1.0. ConfigError (one line, naming what the shards have) for a key that names nothing or shards without
    streams. ``where`` starts the messages: ``phases[0] (web, shards/)``."""
    if mix is None:
        return None
    attr, word = _MIX_KEY[mix_by]
    if not streams:
        raise ConfigError(f"{where}: mix needs shards packed per language / source (pack's stream_by), and these "
                          "were packed with every document in one stream: repack them (stream_by: [lang, source])")
    values = [getattr(st, attr) for st in streams]
    if any(v is None for v in values):
        by = [d for d in ("lang", "source") if getattr(streams[0], d) is not None]
        raise ConfigError(f"{where}: mix_by {mix_by}, but the shards' streams carry no {word} (packed with stream_by "
                          f"{by}): key the mix by {' or '.join(by) or 'stream'}, or repack")
    known = sorted(set(values))
    unknown = sorted(k for k in mix if k != "*" and k not in known)
    if unknown:
        raise ConfigError(f"{where}: mix key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} "
                          f"name{'' if len(unknown) > 1 else 's'} no {word} of the shards ({word}s: {', '.join(known)})")
    rest = float(mix.get("*", 1.0))
    return [float(mix.get(v, rest)) for v in values]


def _mixture(streams: list[Stream], weights: list[float], where: str, **kw: Any) -> MixtureSampler:
    try:
        return MixtureSampler(streams, weights, **kw)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def mix_plan(plan: list[Phase], datasets: list[Any], weights: list[list[float] | None],
             global_batch: int) -> dict[str, Any]:
    """What each mixed phase will draw, before training: per stream its weight, blocks, share of the samples and
    the epochs that the phase's steps make of it (the start record of metrics.jsonl, and one log line per phase)."""
    out: dict[str, Any] = {}
    for ph, ds, w in zip(plan, datasets, weights):
        if w is None:
            continue
        counts = mixture_counts([st.blocks for st in ds.streams], w)
        samples = (ph.end - ph.start) * global_batch
        total = int(counts.sum())
        out[ph.name] = {st.name: {"weight": wt, "blocks": st.blocks, "share": c / total,
                                  "epochs": samples * c / total / st.blocks if st.blocks else 0.0}
                        for st, wt, c in zip(ds.streams, w, counts.tolist())}
    return out


def _ratio(a: int, b: int) -> float:
    return a / b if b else 0.0


def phase_data(sampler: Any, streams: list[Stream], samples: int, seq_len: int, blocks: int) -> dict[str, Any]:
    """What a phase drew in its first ``samples`` global samples: tokens and epochs overall and, with streams, per
    stream, language and source (each: tokens, samples, blocks it has, epochs = samples / blocks, fractional)."""
    out: dict[str, Any] = {"samples": samples, "tokens": samples * seq_len, "epochs": _ratio(samples, blocks)}
    if not streams:
        return out
    counts = stream_counts(sampler, streams, 0, samples).tolist()
    out["streams"] = {st.name: {"lang": st.lang, "source": st.source, "blocks": st.blocks, "samples": c,
                                "tokens": c * seq_len, "epochs": _ratio(c, st.blocks)}
                      for st, c in zip(streams, counts)}
    for key, attr in (("languages", "lang"), ("sources", "source")):
        groups: dict[str, list[int]] = {}
        for st, c in zip(streams, counts):
            value = getattr(st, attr)
            if value is not None:
                acc = groups.setdefault(value, [0, 0])
                acc[0] += c
                acc[1] += st.blocks
        if groups:
            out[key] = {v: {"tokens": c * seq_len, "samples": c, "blocks": b, "epochs": _ratio(c, b)}
                        for v, (c, b) in sorted(groups.items())}
    return out


def phase_at(plan: list[Phase], step: int) -> int:
    for i, p in enumerate(plan):
        if step < p.end:
            return i
    return len(plan) - 1


# ------------------------------------------------------------------------------------ data


class TrainStream(IterableDataset):
    """This rank's training samples from ``start_step`` on, switching datasets at phase boundaries.

    Each optimizer step takes ``micro * accum`` samples per rank, i.e. the next
    ``global_batch`` positions of the phase's global stream. ``start_index`` is the number of
    samples of the current phase already consumed (from the checkpoint)."""

    def __init__(self, datasets: list[Any], plan: list[Phase], *, rank: int, world: int, micro: int, accum: int,
                 seed: int, shuffle: bool, start_step: int, start_index: int,
                 weights: list[list[float] | None] | None = None):
        self.datasets, self.plan = datasets, plan
        self.rank, self.world, self.micro, self.accum = rank, world, micro, accum
        self.seed, self.shuffle = seed, shuffle
        self.start_step, self.start_index = start_step, start_index
        self.weights = weights or [None] * len(plan)  # per phase: its streams' mix weights, or None (uniform)

    @property
    def global_batch(self) -> int:
        return self.micro * self.accum * self.world

    def sampler(self, phase: int, start_index: int) -> ResumableDistributedSampler:
        """Phase ``phase``'s sampler from ``start_index``: seeded by (seed + phase), a :class:`MixtureSampler` over
        the shards' streams when the phase has a mix, else uniform over its blocks."""
        kw = dict(rank=self.rank, world_size=self.world, seed=self.seed + phase, start_index=start_index,
                  shuffle=self.shuffle)
        if self.weights[phase] is not None:
            return MixtureSampler(self.datasets[phase].streams, self.weights[phase], **kw)
        return ResumableDistributedSampler(len(self.datasets[phase]), **kw)

    def position(self, step: int) -> dict[str, Any]:
        """The data position after ``step`` optimizer steps (what a checkpoint's data state holds): the phase, the
        samples of it consumed, and the sampler's state there."""
        p = phase_at(self.plan, step)
        # samples of phase p consumed by `step`; right after a resume the phase's own counter carries on
        if p == phase_at(self.plan, self.start_step) and step >= self.start_step:
            consumed = self.start_index + (step - self.start_step) * self.global_batch
        else:
            consumed = (step - self.plan[p].start) * self.global_batch
        return {"step": step, "phase": p, "phase_name": self.plan[p].name, "phase_start_index": consumed,
                "global_batch_samples": self.global_batch, "world_size": self.world,
                "sampler": self.sampler(p, consumed).state_dict()}

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


@dataclass(frozen=True)
class Collate:
    """Blocks -> a batch: ``input_ids``, ``labels`` (the same ids: the model shifts them), the blocks' sample ids and
    phase. With ``document_masking``, ``position_ids`` that restart at every document
    (:func:`~pipeline.data.packed.document_positions`), which keeps attention inside documents; with ``flatten``
    too (flash_attention_2's varlen kernel), the rows become one (:func:`~pipeline.data.packed.flatten_rows`)."""

    bos_id: int | None = None
    eos_id: int | None = None
    document_masking: bool = False
    flatten: bool = False
    vocab_size: int | None = None  # the model's rows: a larger id is a damaged shard, named here, not an IndexError

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids = torch.stack([it["input_ids"] for it in items])
        if self.vocab_size is not None and ids.numel() and int(ids.max()) >= self.vocab_size:
            bad = [int(it["sample_id"]) for it in items if int(it["input_ids"].max()) >= self.vocab_size]
            raise CorruptShardError(f"token id {int(ids.max())} in block(s) {bad[:5]} is outside the model's "
                                    f"{self.vocab_size} embedding rows: the shards are damaged or were packed with "
                                    "another tokenizer (llmpipe run pack --force rebuilds them)")
        batch = {"input_ids": ids, "labels": ids.clone()}
        if self.document_masking:
            batch["position_ids"] = document_positions(ids, bos_id=self.bos_id, eos_id=self.eos_id)
            if self.flatten:
                batch = flatten_rows(batch)
        batch["sample_id"] = torch.tensor([int(it["sample_id"]) for it in items], dtype=torch.long)
        batch["phase"] = torch.tensor([int(it.get("phase", 0)) for it in items], dtype=torch.long)
        return batch


collate = Collate()  # no document masking


# --------------------------------------------------------------------------------- logging


class JsonlLog:
    """Appends records to a local JSONL file (rank 0 only), flushed per line."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)

    def truncate_after(self, step: int) -> int:
        """Drop the records of steps after ``step`` (a resumed run redoes them: without this, a killed run's later
        steps would stay in the file and be logged again, twice and out of order); returns how many were dropped."""
        if not self.enabled or not self.path.is_file():
            return 0
        keep, dropped = [], 0
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                dropped += 1  # a line cut by the kill
                continue
            if isinstance(rec, dict) and int(rec.get("step") or 0) > step:
                dropped += 1
                continue
            keep.append(line)
        if dropped:
            tmp = self.path.with_suffix(self.path.suffix + ".tmp")
            tmp.write_text("".join(line + "\n" for line in keep), encoding="utf-8")
            os.replace(tmp, self.path)
        return dropped

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
            fh.flush()
        if self.path.name == METRICS_FILE:  # and to the stage's MLflow run, when one is active
            tracking.log_step(record)


def peak_memory_gb(cuda: bool) -> tuple[float, str]:
    if cuda:
        return torch.cuda.max_memory_allocated() / 2**30, "cuda_allocated"
    import resource  # POSIX only: imported where it is used, on CPU

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "cpu_rss"


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


# ------------------------------------------------------------------------------- the trainer


class PretrainTrainer(DecayGroups, TimedBatches, CheckpointedTrainer, Trainer):
    """Trainer with our data stream and schedule, per-step sample ids, and checkpoints saved through
    :class:`~pipeline.training.checkpoint.CheckpointManager` (:class:`~pipeline.training.checkpoint.CheckpointedTrainer`)
    with the stream's data position."""

    def __init__(self, *args: Any, stream: TrainStream, checkpoints: CheckpointManager,
                 schedule: Callable[[int], float], workers: int, **kwargs: Any):
        self.stream, self.schedule, self.workers = stream, schedule, workers  # batches: the data_collator
        self._step_ids: list[int] = []
        self._step_phase: int = 0
        # set by build_trainer
        self.metrics_callback: MetricsCallback | None = None
        self.generation_callback: GenerationCallback | None = None
        self.n_params = 0
        super().__init__(*args, checkpoints=checkpoints, **kwargs)

    def get_train_dataloader(self) -> torch.utils.data.DataLoader:
        # not prepared by accelerate: the sampler inside the stream already shards by rank
        return torch.utils.data.DataLoader(
            self.stream, batch_size=self.args.per_device_train_batch_size, collate_fn=self.data_collator,
            num_workers=self.workers, pin_memory=torch.cuda.is_available(),
        )

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None) -> Any:
        if self.lr_scheduler is None:
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer if optimizer is None else optimizer,
                                                                  self.schedule)
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

    def checkpoint_data_state(self, step: int) -> dict[str, Any]:
        return self.stream.position(step)


class MetricsCallback(TrainerCallback):
    """Per step: the step's sample ids and timing; per log: loss, lr, grad norm, tokens/s, MFU, peak memory and
    validation loss, to ``metrics.jsonl`` and one log line each (rank 0)."""

    def __init__(self, trainer: PretrainTrainer, log: JsonlLog, *, tokens_per_step: int, world: int, fpt: float,
                 peak: float | None, cuda: bool, ctx: Any, clock: StepClock | None = None,
                 tokens_per_byte: dict[str, float] | None = None):
        self.trainer, self.log, self.tokens_per_step, self.world = trainer, log, tokens_per_step, world
        self.tokens_per_byte = tokens_per_byte
        self.fpt, self.peak, self.cuda, self.ctx = fpt, peak, cuda, ctx
        self.clock = clock or StepClock(cuda)
        self.last: dict[str, Any] = {}

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.clock.end_step()
        phase, ids = self.trainer.take_step_ids()
        self.log.write({"kind": "samples", "step": state.global_step, "phase": phase, "sample_ids": ids})

    def totals(self) -> dict[str, Any]:
        """Throughput, MFU and data wait over every step of this run."""
        return throughput(self.tokens_per_step, self.world, self.fpt, self.peak, self.clock.total)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any) -> None:
        logs = dict(logs or {})
        step = state.global_step
        found = eval_metrics(logs, self.tokens_per_byte)
        if found:
            rec = {"kind": "eval", "step": step, **found}
            self.last.update(found)
            self.log.write(rec)
            if self.log.enabled:
                if "val_loss" in found:
                    self.ctx.log(f"step {step}: val loss {found['val_loss']:.4f}  ppl {found['val_perplexity']:.2f}"
                                 + (f"  {found['val_bpb']:.3f} bits/byte" if found.get("val_bpb") else ""))
                else:
                    lang = next(k for k in found if k.startswith("val_loss_"))[len("val_loss_"):]
                    bpb = found.get(f"val_bpb_{lang}")
                    self.ctx.log(f"step {step}: val {lang} loss {found[f'val_loss_{lang}']:.4f}"
                                 + (f"  {bpb:.3f} bits/byte" if bpb else ""))
            return
        if "loss" not in logs:
            if "train_runtime" in logs:
                self.log.write({"kind": "summary", "step": step, **logs})
            return
        tp = throughput(self.tokens_per_step, self.world, self.fpt, self.peak, self.clock.take_window())
        tps = tp["tokens_per_s"]
        mem, mem_kind = peak_memory_gb(self.cuda)
        rec = {
            "kind": "train", "step": step, "loss": float(logs["loss"]), "lr": logs.get("learning_rate"),
            "grad_norm": logs.get("grad_norm"), **tp,
            "peak_mem_gb": round(mem, 3), "peak_mem_kind": mem_kind, "tokens": step * self.tokens_per_step,
        }
        self.last.update(train_loss=rec["loss"])
        self.log.write(rec)
        gn = f"{rec['grad_norm']:.3f}" if isinstance(rec["grad_norm"], (int, float)) else "-"
        wait = f"  data wait {tp['data_wait_fraction']:.1%}" if tp["data_wait_fraction"] is not None else ""
        if self.log.enabled:
            self.ctx.log(f"step {step}: loss {rec['loss']:.4f}  lr {rec['lr']:.3g}  grad norm {gn}  "
                         f"tok/s {tps or 0:,.0f}" + (f"  MFU {rec['mfu']:.1%}" if rec["mfu"] is not None else "")
                         + wait)


_EVAL_LOSS = re.compile(r"^eval_(?:(.+)_)?loss$")


def eval_metrics(logs: dict[str, Any], tokens_per_byte: dict[str, float] | None = None) -> dict[str, float]:
    """Validation numbers from a Trainer evaluation's logs: ``eval_loss`` / ``eval_val_loss`` -> ``val_loss``,
    ``val_perplexity`` and ``val_bpb``; ``eval_<lang>_loss`` (the per-language splits) -> ``val_loss_<lang>``,
    ``val_bpb_<lang>``. Bits per byte = loss / ln 2 x the split's packed tokens per UTF-8 byte of its documents (BOS
    and EOS included in the tokens; a block's dropped tail makes it approximate by well under 1%)."""
    per_byte = tokens_per_byte or {}
    out: dict[str, float] = {}
    for key, value in logs.items():
        m = _EVAL_LOSS.match(key)
        if not m or not isinstance(value, (int, float)):
            continue
        name, loss = m.group(1) or "val", float(value)
        bpb = loss / math.log(2) * per_byte[name] if name in per_byte else None
        if name == "val":
            out.update(val_loss=loss, val_perplexity=math.exp(min(loss, 50.0)))
            if bpb is not None:
                out["val_bpb"] = bpb
        else:
            out[f"val_loss_{name}"] = loss
            if bpb is not None:
                out[f"val_bpb_{name}"] = bpb
    return out


class GenerationCallback(TrainerCallback):
    """Greedy and sampled continuations of the configured prompts every ``generation.every`` steps, to
    ``generations.jsonl``; :meth:`generate` also gives the final ones."""

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


# ---------------------------------------------------------------------------------- the stage


@dataclass
class PretrainData:
    """The phases' training sets and the validation blocks, checked against each other and the batch budget."""

    plan: list[Phase]
    train: list[PackedDataset]
    val: torch.utils.data.Subset | None  # the latest phase's validation split, capped at eval_max_blocks
    seq_len: int
    accum: int  # gradient accumulation steps
    boundaries: tuple[int | None, int | None] = (None, None)  # (document start id, document end id)
    val_langs: dict[str, torch.utils.data.Subset] | None = None  # language -> its validation blocks (val_<lang>)
    tokens_per_byte: dict[str, float] | None = None  # "val" and each language: packed tokens per UTF-8 byte
    weights: list[list[float] | None] | None = None  # per phase: its streams' mix weights (None: uniform)

    @property
    def vocab_size(self) -> int:
        return max(d.vocab_size for d in self.train)

    def eval_sets(self) -> Any:
        """What the Trainer evaluates: the validation blocks, or with per-language splits a dict ``{"val": ...,
        "<lang>": ...}`` (metrics ``eval_<name>_loss``)."""
        if self.val is None or not self.val_langs:
            return self.val
        return {"val": self.val, **self.val_langs}


def open_data(cfg: Any, ctx: Any) -> PretrainData:
    """Every phase's shards (sha256-checked on rank 0 with verify_shards); InputError when they cannot train."""
    plan = plan_phases(cfg.phases, cfg.total_steps)
    opts = ctx.storage.storage_options if not ctx.storage.is_local else None
    datasets, vals = [], []
    for ph in plan:
        url = ctx.inputs[ph.shards].url()
        datasets.append(PackedDataset(url, "train", storage_options=opts, verify=cfg.verify_shards and ctx.rank == 0))
        if "val" in datasets[-1].index["splits"] and datasets[-1].index["splits"]["val"]["blocks"]:
            # the validation blocks are checked like the training ones: a damaged val split gives a wrong val loss
            vals.append(PackedDataset(url, "val", storage_options=opts, verify=cfg.verify_shards and ctx.rank == 0))
    seq_lens = {d.seq_len for d in datasets}
    if len(seq_lens) != 1:
        raise InputError(f"the phases' shards have different block lengths {sorted(seq_lens)}; repack them alike")
    seq_len = seq_lens.pop()
    accum = grad_accum_steps(cfg.global_batch_tokens, seq_len, cfg.micro_batch_size, ctx.world)
    weights: list[list[float] | None] = []
    for i, (ph, d) in enumerate(zip(plan, datasets)):
        if len(d) == 0:
            raise InputError(f"phase {ph.name}: {ph.shards}/ has no training blocks (an empty corpus, or every "
                             "document went to validation): nothing to train on")
        if len(d) < ctx.world:
            raise InputError(f"phase {ph.name}: {ph.shards}/ has {len(d)} training blocks, fewer than {ctx.world} ranks")
        where = f"phases[{i}] ({ph.name}, {ph.shards}/)"
        weights.append(resolve_mix(d.streams, ph.mix, ph.mix_by, where))
        if weights[-1] is not None:  # the mix draws enough for every rank (no permutation is drawn here)
            _mixture(d.streams, weights[-1], where, world_size=ctx.world)
    val, val_langs, per_byte = None, {}, {}
    if vals:
        v = vals[-1]  # the validation split of the latest phase's data

        def capped(ds: PackedDataset) -> torch.utils.data.Subset:
            return torch.utils.data.Subset(ds, range(len(ds) if cfg.eval_max_blocks is None else
                                                     min(len(ds), cfg.eval_max_blocks)))

        val = capped(v)
        url = ctx.inputs[plan[-1].shards].url()
        for name, split in sorted(v.index["splits"].items()):
            if split.get("stream_tokens") and split.get("document_bytes"):
                per_byte["val" if name == "val" else name[4:]] = split["stream_tokens"] / split["document_bytes"]
            if name.startswith("val_") and split.get("blocks"):
                val_langs[name[4:]] = capped(PackedDataset(url, name, storage_options=opts,
                                                           verify=cfg.verify_shards and ctx.rank == 0))
    boundaries = {d.document_boundaries() for d in datasets}
    if cfg.document_masking:
        if len(boundaries) != 1:
            raise InputError("document_masking: the phases' shards frame documents with different tokens "
                             f"({sorted(map(str, boundaries))}); repack them with one tokenizer and add_bos/add_eos")
        if boundaries == {(None, None)}:
            raise InputError("document_masking needs documents framed by bos or eos tokens, but these shards were packed "
                             "with add_bos and add_eos false: repack with either, or set document_masking: false")
    return PretrainData(plan, datasets, val, seq_len, accum, boundaries.pop(), val_langs or None, per_byte or None,
                        weights)


def model_folders(cfg: Any, ctx: Any, tmp: str) -> tuple[str, str]:
    """(model, tokenizer) folders, local copies under ``tmp`` when the run root is remote."""
    model_dir = local_copy(ctx.inputs[cfg.model], tmp)
    return model_dir, model_dir if has_tokenizer(model_dir) else local_copy(ctx.inputs[cfg.tokenizer], tmp)


@dataclass(frozen=True)
class Start:
    """Where training starts: a step, the samples of its phase already consumed, and the checkpoint it resumes."""

    step: int = 0
    index: int = 0
    checkpoint: str | None = None


def start_point(cfg: Any, ctx: Any, checkpoints: CheckpointManager, plan: list[Phase]) -> Start:
    """Step 0, or (``resume``) the newest complete checkpoint with its data position. A checkpoint that already
    reaches max_steps (a run killed before its export) must hold HF weights: they are exported as they are."""
    found: ResumePoint | None = checkpoints.resume() if cfg.resume else None
    barrier()
    if found is None:
        return Start()
    total = cfg.total_steps
    if found.step < total:
        state = found.data_state
        index = int(state["phase_start_index"]) if state["phase"] == phase_at(plan, found.step) else 0
        return Start(found.step, index, str(found.path))
    if not found.has_hf_weights:
        raise PipelineError(f"checkpoint {found.path} reaches max_steps {total} but holds no HF weights to export; "
                            "delete it to redo the last steps")
    if ctx.rank == 0:
        ctx.log(f"checkpoint at step {found.step} already reaches max_steps {total}: exporting its weights")
    return Start(found.step, 0, str(found.path))


def check_model(cfg: Any, model_dir: str, data: PretrainData) -> None:
    """The checkpoint's config against the data, before any weights load: vocabulary and positions."""
    mc = causal_lm_config(model_dir, f"{cfg.model}/")
    if data.vocab_size > mc.vocab_size:
        raise InputError(f"the shards were tokenized with a {data.vocab_size}-token vocabulary but {cfg.model}/ has "
                         f"vocab_size {mc.vocab_size}: the model was made for another tokenizer; rerun init with this one")
    if data.seq_len > getattr(mc, "max_position_embeddings", data.seq_len):
        raise InputError(f"the shards hold {data.seq_len}-token blocks, longer than {cfg.model}/'s "
                         f"max_position_embeddings {mc.max_position_embeddings}: repack with a shorter seq_len or init "
                         "with more positions")


def trainer_arguments(cfg: Any, ctx: Any, precision: str, data: PretrainData,
                      checkpoints: CheckpointManager) -> TrainingArguments:
    """DeepSpeed started (when zero_stage > 0) and the TrainingArguments; before the model loads, so that ZeRO-3
    partitions the weights as they load."""
    ds_cfg = load_deepspeed_config(cfg)
    if ds_cfg is not None and ctx.world == 1 and not cfg.offload and ctx.rank == 0:
        ctx.log(f"note: ZeRO-{cfg.zero_stage} in one process partitions nothing; zero_stage: 0 trains the same "
                "without DeepSpeed's gradient copies (faster: see docs/benchmarks.md)")
    start_deepspeed(ds_cfg, ctx.world)
    total = cfg.total_steps
    return TrainingArguments(**training_arguments(
        cfg, ctx, precision=precision, ds_cfg=ds_cfg, checkpoints=checkpoints.trainer_arguments(),
        gradient_accumulation_steps=data.accum,
        max_steps=total,
        adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2,
        adam_epsilon=cfg.adam_eps,
        lr_scheduler_type="constant",  # ours, in PretrainTrainer.create_scheduler
        eval_strategy="steps" if data.val is not None else "no",
        eval_steps=cfg.eval_every or total,
        ignore_data_skip=True,  # TrainStream starts at the data position itself
        dataloader_num_workers=dataloader_workers(cfg),
        prediction_loss_only=True,
        remove_unused_columns=False,
        include_num_input_tokens_seen=False,
        torch_compile=cfg.compile,
        use_liger_kernel=cfg.liger_kernels,
    ))


def load_model(cfg: Any, model_dir: str, tok_dir: str) -> tuple[Any, Any]:
    """The model in fp32 (mixed precision is the Trainer's) with the configured attention, and its tokenizer."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=cfg.attention)
    model.config.use_cache = False
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def model_size(model: Any, seq_len: int) -> tuple[int, float]:
    """(all parameters, counting ZeRO-3's partitioned parameters whole; training FLOPs per token from the config,
    :func:`pipeline.training.flops.matmul_flops_per_token`)."""
    n_all = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    return n_all, matmul_flops_per_token(model.config, seq_len)


def mfu_peak(cfg: Any, cuda: bool, precision: str) -> tuple[float | None, str]:
    """(peak FLOP/s per device for MFU, where it came from): on CUDA the configured ``peak_flops``, else the table's
    entry for ``torch.cuda.get_device_name()``; on CPU ``cpu_peak_flops``."""
    if not cuda:
        return resolve_peak(cfg.cpu_peak_flops, None, precision)
    return resolve_peak(cfg.peak_flops, torch.cuda.get_device_name(), precision)


def build_trainer(cfg: Any, ctx: Any, args: TrainingArguments, model: Any, tokenizer: Any, data: PretrainData,
                  start: Start, checkpoints: CheckpointManager, precision: str) -> PretrainTrainer:
    """The Trainer over this rank's stream from ``start``, with the metrics and generations callbacks
    (``trainer.metrics_callback``, ``trainer.generation_callback``); writes the run's ``start`` record to metrics.jsonl."""
    main, world, total, cuda = ctx.rank == 0, ctx.world, cfg.total_steps, torch.cuda.is_available()
    stream = TrainStream(data.train, data.plan, rank=ctx.rank, world=world, micro=cfg.micro_batch_size,
                         accum=data.accum, seed=cfg.seed, shuffle=cfg.shuffle, start_step=start.step,
                         start_index=start.index, weights=data.weights)
    batches = Collate(*data.boundaries, document_masking=cfg.document_masking,
                      flatten=cfg.document_masking and cfg.attention == "flash_attention_2",
                      vocab_size=int(model.config.vocab_size))
    trainer = PretrainTrainer(model=model, args=args, train_dataset=stream, eval_dataset=data.eval_sets(),
                              data_collator=batches,
                              processing_class=tokenizer, stream=stream, checkpoints=checkpoints,
                              schedule=lr_multiplier(cfg, total), workers=dataloader_workers(cfg))
    n_all, fpt = model_size(model, data.seq_len)
    plan = mix_plan(data.plan, data.train, data.weights or [None] * len(data.plan), stream.global_batch)
    metrics_log = JsonlLog(checkpoints.root / METRICS_FILE, main)
    generations_log = JsonlLog(checkpoints.root / GENERATIONS_FILE, main)
    for log in (metrics_log, generations_log):  # a resumed run continues from the checkpoint's step
        log.truncate_after(start.step)
    trainer.n_params = n_all
    peak, peak_source = mfu_peak(cfg, cuda, precision)
    if main and peak is None and cuda:  # one line: this run reports no MFU, and why
        ctx.log(f"pretrain: {peak_source}")
    trainer.step_clock = StepClock(cuda)
    trainer.metrics_callback = MetricsCallback(trainer, metrics_log, tokens_per_step=cfg.global_batch_tokens,
                                               world=world, fpt=fpt, peak=peak, cuda=cuda, ctx=ctx,
                                               clock=trainer.step_clock, tokens_per_byte=data.tokens_per_byte)
    trainer.generation_callback = GenerationCallback(cfg.generation, tokenizer, generations_log,
                                                     synced=cfg.zero_stage == 3 and world > 1)
    quiet_trainer_logs(trainer)  # our own log lines replace the raw dicts
    trainer.add_callback(trainer.metrics_callback)
    trainer.add_callback(trainer.generation_callback)
    trainer.add_callback(StepClockRestart(trainer.step_clock))  # last: after the step-end callbacks
    metrics_log.write({"kind": "start", "step": start.step, "resumed_from": start.checkpoint, "world_size": world,
                       "grad_accum": data.accum, "micro_batch_size": cfg.micro_batch_size, "seq_len": data.seq_len,
                       "global_batch_tokens": cfg.global_batch_tokens, "precision": precision,
                       "zero_stage": cfg.zero_stage, "document_masking": cfg.document_masking,
                       "params": n_all, "flops_per_token": fpt,
                       "peak_flops": peak, "peak_flops_source": peak_source,
                       "phases": [p.__dict__ for p in data.plan], "mix": plan})
    if main:
        ctx.log(f"pretrain: {n_all:,} params, world {world} x micro {cfg.micro_batch_size} x accum {data.accum} x "
                f"{data.seq_len} tokens = {cfg.global_batch_tokens:,} tokens/step, {total} steps, ZeRO {cfg.zero_stage}, "
                f"{precision}" + (f", resuming from step {start.step}" if start.checkpoint else ""))
        for name, streams in plan.items():
            ctx.log(f"pretrain: phase {name} mix: " + ", ".join(
                f"{s} x{v['weight']:g} ({v['share']:.1%} of samples, {v['epochs']:.2f} epochs of {v['blocks']:,} blocks)"
                for s, v in streams.items()))
    return trainer


def final_evaluation(cfg: Any, trainer: PretrainTrainer) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(val_loss and val_perplexity at the last step, the last step's generations): the last periodic evaluation
    when it ran at that step, else one now."""
    step, mcb, final_eval = trainer.state.global_step, trainer.metrics_callback, {}
    if trainer.eval_dataset is not None and "val_loss" in mcb.last and step % (cfg.eval_every or cfg.total_steps) == 0:
        final_eval = {k: v for k, v in mcb.last.items() if k.startswith("val_")}
    elif trainer.eval_dataset is not None:
        final_eval = eval_metrics(trainer.evaluate(), mcb.tokens_per_byte)
    gens = trainer.generation_callback.generate(trainer.model, step) if cfg.generation.prompts else []
    return final_eval, gens


def result(cfg: Any, ctx: Any, trainer: PretrainTrainer, data: PretrainData, start: Start, precision: str,
           final_eval: dict[str, Any]) -> dict[str, Any]:
    """The stage's metrics (the manifest's ``metrics``)."""
    steps, mcb, world = trainer.state.global_step, trainer.metrics_callback, ctx.world
    out = {
        "steps": steps,
        "tokens": steps * cfg.global_batch_tokens,
        "seq_len": data.seq_len,
        "world_size": world,
        "grad_accum": data.accum,
        "micro_batch_size": cfg.micro_batch_size,
        "zero_stage": cfg.zero_stage,
        "offload": cfg.offload,
        "precision": precision,
        "optimizer": innermost_optimizer(trainer.optimizer),
        "attention": cfg.attention,
        "document_masking": cfg.document_masking,
        "dataloader_workers": dataloader_workers(cfg),
        "compile": cfg.compile,
        "liger_kernels": cfg.liger_kernels,
        "params": trainer.n_params,
        "resumed_from_step": start.step if start.checkpoint else None,
        "train_loss": mcb.last.get("train_loss"),
        **final_eval,
        **mcb.totals(),  # tokens_per_s(_per_device), mfu, step_time_s, data_wait_s, data_wait_fraction
        "flops_per_token": mcb.fpt,
        "peak_flops": mcb.peak,
        "phases": {p.name: {"shards": p.shards, "steps": [p.start, p.end],
                            "fingerprint": ctx.inputs[p.shards].fingerprint,
                            **({"mix": p.mix, "mix_by": p.mix_by} if p.mix else {}),
                            **phase_data(trainer.stream.sampler(i, 0), ds.streams,
                                         max(0, min(p.end, steps) - p.start) * trainer.stream.global_batch,
                                         data.seq_len, len(ds))}
                   for i, (p, ds) in enumerate(zip(data.plan, data.train))},
    }
    # the whole run per language and source, over its phases (each phase's own numbers are under phases)
    for key, name in (("languages", "tokens_by_language"), ("sources", "tokens_by_source")):
        total: dict[str, int] = {}
        for ph in out["phases"].values():
            for value, v in (ph.get(key) or {}).items():
                total[value] = total.get(value, 0) + v["tokens"]
        if total:
            out[name] = dict(sorted(total.items()))
    return out


def train(cfg: Any, ctx: Any, out: Any) -> dict[str, Any]:
    """Pretrain on this rank. ``out`` is the output folder on rank 0 and ``None`` elsewhere."""
    quiet_libraries(transformers.logging.WARNING)
    precision = resolve_precision(cfg.precision)
    check_kernels(cfg, precision)
    checkpoints = CheckpointManager.for_stage("pretrain", cfg, ctx.storage, main=ctx.rank == 0)
    with tempfile.TemporaryDirectory(prefix=f"llmpipe-pretrain-r{ctx.rank}-", ignore_cleanup_errors=True) as tmp:
        data = open_data(cfg, ctx)
        model_dir, tok_dir = model_folders(cfg, ctx, tmp)
        start = start_point(cfg, ctx, checkpoints, data.plan)
        count_start("pretrain", checkpoints.root, start.step, main=ctx.rank == 0, log=ctx.log)
        if start.step >= cfg.total_steps:  # the last checkpoint is the end of training: its weights are the model
            model_dir = start.checkpoint
        check_model(cfg, model_dir, data)
        args = trainer_arguments(cfg, ctx, precision, data, checkpoints)
        model, tokenizer = load_model(cfg, model_dir, tok_dir)
        trainer = build_trainer(cfg, ctx, args, model, tokenizer, data, start, checkpoints, precision)
        if start.step < cfg.total_steps:
            trainer.train(resume_from_checkpoint=start.checkpoint)
        else:
            trainer.state.global_step = start.step
        final_eval, generations = final_evaluation(cfg, trainer)
        export = Export(out, tmp, main=ctx.rank == 0)
        export.save_weights(trainer)  # the HF model, gathered from ZeRO-3 partitions
        export.finish(tokenizer, {"generations.json": generations},
                      copies={"train_metrics.jsonl": trainer.metrics_callback.log.path})
        return result(cfg, ctx, trainer, data, start, precision, final_eval)
