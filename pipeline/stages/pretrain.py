"""pretrain: ``shards/`` (one artifact per data phase) + ``models/init/`` -> ``models/pretrain/``.

Distributed: run it through :mod:`pipeline.training.launcher` (torchrun; a Kubeflow PyTorchJob on a
cluster). Every rank calls :func:`run`; rank 0 gets the output folder, the others ``out=None``.
Checkpoints go to ``checkpoints/pretrain/step-N/`` every ``checkpoint_every`` steps and a restart
resumes from the newest complete one (model, optimizer, scheduler, RNG and data position). The
work is done by :func:`pipeline.training.pretrain.train`.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from pipeline.config import StrictModel
from pipeline.runner import StageContext
from pipeline.storage import OutputDir

NAME = "pretrain"
INPUTS = ["shards", "models/init", "tokenizer"]  # the default; `inputs(cfg)` adds every phase's shards
OUTPUT = "models/pretrain"


class DataPhase(StrictModel):
    """One stretch of training on one shards artifact, e.g. phase 1 on 'shards', phase 2 on 'shards-clean'."""

    name: str = Field("main", description="label used in logs and metrics")
    shards: str = Field("shards", description="artifact folder under the run root holding index.json + shards")
    until_step: int | None = Field(
        None, ge=1, description="this phase ends before this global step (exclusive); None: until the end (last phase only)"
    )


class GenerationConfig(StrictModel):
    every: int = Field(0, ge=0, description="decode the prompts every N steps (0: only at the end)")
    prompts: list[str] = Field(default_factory=lambda: ["Once upon a time", "Қазақстан", "Москва"])
    max_new_tokens: int = Field(32, ge=1, le=4096)
    temperature: float = Field(0.8, gt=0)
    top_p: float = Field(0.95, gt=0, le=1)
    seed: int = 1234


class PretrainConfig(StrictModel):
    # -- inputs
    model: str = Field("models/init", description="artifact holding the initial HF checkpoint")
    tokenizer: str = Field("tokenizer", description="tokenizer artifact (used when the model folder has none)")
    phases: list[DataPhase] = Field(default_factory=lambda: [DataPhase()], min_length=1)
    # -- batch and length
    micro_batch_size: int = Field(4, ge=1, description="sequences per device per forward pass")
    global_batch_tokens: int = Field(
        524288, ge=1, description="tokens per optimizer step over all devices; must equal seq_len*micro*world*accum"
    )
    max_steps: int | None = Field(None, ge=1, description="optimizer steps (give this or train_tokens)")
    train_tokens: int | None = Field(None, ge=1, description="tokens to train on; max_steps = train_tokens / global_batch_tokens")
    # -- optimizer and schedule
    lr: float = Field(3e-4, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="final lr as a share of lr")
    weight_decay: float = Field(0.1, ge=0)
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.95, ge=0, lt=1)
    adam_eps: float = Field(1e-8, gt=0)
    max_grad_norm: float = Field(1.0, ge=0, description="0 disables clipping")
    schedule: Literal["cosine", "wsd"] = Field("cosine", description="cosine decay, or warmup-stable-decay")
    warmup_steps: int = Field(100, ge=0)
    decay_fraction: float = Field(0.2, gt=0, le=1, description="wsd: share of max_steps spent in the final decay")
    decay_shape: Literal["linear", "cosine", "sqrt"] = Field("sqrt", description="wsd decay curve (sqrt = 1 - sqrt)")
    # -- parallelism and numerics
    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="DeepSpeed ZeRO stage; 0 = no DeepSpeed (plain DDP)")
    offload: bool = Field(False, description="use the CPU-offload variant of the shipped ZeRO config")
    deepspeed_config: str | None = Field(None, description="a DeepSpeed JSON to use instead of the shipped one")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field("auto", description="auto: bf16 on CUDA with bf16, else fp32")
    gradient_checkpointing: bool = False
    seed: int = 0
    shuffle: bool = True
    # -- checkpoints, evaluation, logging (change how it runs, not what it learns)
    checkpoint_dir: str | None = Field(None, description="local/PVC folder for checkpoints; default <root>/checkpoints/pretrain")
    checkpoint_every: int = Field(500, ge=0, description="0: no intermediate checkpoints")
    keep_checkpoints: int = Field(3, ge=1)
    resume: bool = Field(True, description="resume from the newest complete checkpoint when there is one")
    eval_every: int = Field(500, ge=0, description="validation loss + perplexity every N steps (0: only at the end)")
    eval_max_blocks: int | None = Field(256, ge=1, description="validation blocks used (None: the whole val split)")
    log_every: int = Field(10, ge=1)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    peak_flops: float = Field(989e12, gt=0, description="per-device peak FLOP/s for MFU on CUDA (H100 bf16 dense)")
    cpu_peak_flops: float | None = Field(None, gt=0, description="per-process peak FLOP/s for MFU on CPU (None: no MFU)")
    dataloader_workers: int = Field(0, ge=0, le=1)
    verify_shards: bool = Field(True, description="check every shard's sha256 when opening")
    EXEC_FIELDS: ClassVar[set[str]] = {
        "checkpoint_dir", "checkpoint_every", "keep_checkpoints", "resume", "eval_every", "eval_max_blocks",
        "log_every", "generation", "peak_flops", "cpu_peak_flops", "dataloader_workers", "verify_shards",
    }

    @model_validator(mode="after")
    def _check(self) -> "PretrainConfig":
        if (self.max_steps is None) == (self.train_tokens is None):
            raise ValueError("give exactly one of max_steps and train_tokens")
        if self.train_tokens is not None and self.train_tokens % self.global_batch_tokens:
            raise ValueError(
                f"train_tokens {self.train_tokens} is not a multiple of global_batch_tokens {self.global_batch_tokens}"
            )
        steps = self.total_steps
        last = 0
        for i, ph in enumerate(self.phases):
            end = ph.until_step
            if end is None:
                if i != len(self.phases) - 1:
                    raise ValueError(f"phases[{i}] ({ph.name}): only the last phase may leave until_step empty")
                continue
            if end <= last:
                raise ValueError(f"phases[{i}] ({ph.name}): until_step {end} must be greater than the previous boundary {last}")
            if i == len(self.phases) - 1 and end != steps:
                raise ValueError(f"the last phase ({ph.name}) must end at max_steps {steps} (or leave until_step empty)")
            if end > steps:
                raise ValueError(f"phases[{i}] ({ph.name}): until_step {end} is past max_steps {steps}")
            last = end
        names = [p.name for p in self.phases]
        if len(set(names)) != len(names):
            raise ValueError(f"phase names must be unique, got {names}")
        if self.offload and self.zero_stage == 0:
            raise ValueError("offload needs DeepSpeed: set zero_stage to 1, 2 or 3")
        if self.deepspeed_config and self.zero_stage == 0:
            raise ValueError("deepspeed_config is given but zero_stage is 0 (no DeepSpeed)")
        return self

    @property
    def total_steps(self) -> int:
        return self.max_steps if self.max_steps is not None else self.train_tokens // self.global_batch_tokens  # type: ignore[operator]


def inputs(cfg: PretrainConfig) -> list[str]:
    """Artifacts this config reads: every phase's shards, the initial model and the tokenizer."""
    names: list[str] = []
    for name in [*(p.shards for p in cfg.phases), cfg.model, cfg.tokenizer]:
        if name not in names:
            names.append(name)
    return names


def run(cfg: PretrainConfig, ctx: StageContext, out: OutputDir | None) -> dict[str, Any]:
    from pipeline.training.pretrain import train

    return train(cfg, ctx, out)


def summary(m: dict[str, Any]) -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = [
        ("steps", m.get("steps")),
        ("tokens", m.get("tokens")),
        ("world size", f"{m.get('world_size')} (grad accum {m.get('grad_accum')}, micro batch {m.get('micro_batch_size')})"),
        ("zero / precision", f"{m.get('zero_stage')} / {m.get('precision')}"),
        ("final train loss", m.get("train_loss")),
        ("val loss", m.get("val_loss")),
        ("val perplexity", m.get("val_perplexity")),
        ("tokens/s", m.get("tokens_per_s")),
    ]
    if m.get("mfu") is not None:
        rows.append(("MFU", m["mfu"]))
    if m.get("resumed_from_step"):
        rows.append(("resumed from step", m["resumed_from_step"]))
    return [(k, v) for k, v in rows if v is not None]
