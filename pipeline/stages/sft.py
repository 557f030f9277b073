"""sft: instruction data + ``models/pretrain/`` -> ``models/sft/`` (TRL SFTTrainer).

Data: Alpaca records (``instruction`` / ``input`` / ``output``) and chat records (``messages``)
from local .jsonl/.json/.parquet files, folders of them, or Hugging Face datasets (a
``save_to_disk`` folder, or a hub name where the hub is reachable). Every record becomes a
conversation rendered by the tokenizer's ChatML template; the loss is on assistant tokens only
(each assistant turn's content and its ``<|im_end|>``). Full fine-tuning or LoRA (merged into a
full model on export; the adapter is kept under ``adapter/``). Distributed through
:mod:`pipeline.training.launcher` with the shipped DeepSpeed configs, like pretrain. The work is
done by :func:`pipeline.training.posttrain.train_sft`.

This module also holds the config pieces the three post-training stages share.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from pipeline.config import StrictModel

NAME = "sft"
INPUTS = ["models/pretrain"]  # the default; `inputs(cfg)` follows cfg.model / cfg.tokenizer
OUTPUT = "models/sft"


# ------------------------------------------------------------------------ shared config pieces


class DataSource(StrictModel):
    """One post-training data input."""

    path: str = Field(..., description="local .jsonl/.json/.parquet file, a folder of them, a datasets save_to_disk "
                                       "folder, or a Hugging Face hub dataset name")
    format: Literal["auto", "alpaca", "chat", "preference"] = Field(
        "auto", description="record layout; auto: messages -> chat, instruction+output -> alpaca, prompt+chosen+rejected -> preference")
    split: str = Field("train", description="split of a Hugging Face dataset (DatasetDict folder or hub name)")
    max_examples: int | None = Field(None, ge=1, description="use only the first N records of this source")


class LoraSettings(StrictModel):
    """LoRA (peft) instead of full fine-tuning; merged into a full model on export."""

    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"


class SampleGeneration(StrictModel):
    """Greedy answers to a few user prompts, written to ``generations.json`` of the output."""

    prompts: list[str] = Field(default_factory=lambda: [
        "Сөзді қайтала.\nалма", "Назови столицу страны.\nФранция", "Write the number as a digit.\nseven"])
    max_new_tokens: int = Field(32, ge=1, le=4096)
    system: str | None = Field(None, description="system message put before every prompt")


class PostTrainConfig(StrictModel):
    """Fields common to sft, dpo and reward."""

    # -- inputs
    model: str = Field("models/pretrain", description="artifact holding the starting HF checkpoint (and its tokenizer)")
    tokenizer: str | None = Field(None, description="tokenizer artifact, used only when the model folder has none")
    data: list[DataSource] = Field(..., min_length=1, description="training data sources, concatenated")
    eval_data: list[DataSource] = Field(default_factory=list, description="held-out data (default: eval_fraction of data)")
    eval_fraction: float = Field(0.1, ge=0, lt=1, description="share of data held out when eval_data is empty")
    chat_template: str = Field("auto", description="auto: the tokenizer's (ChatML gets loss markers); else a Jinja template")
    max_length: int = Field(1024, ge=8, description="tokens per example (truncated); must fit the model's positions")
    # -- optimisation
    micro_batch_size: int = Field(4, ge=1)
    grad_accum: int = Field(1, ge=1)
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1, description="optimizer steps; overrides epochs")
    lr: float = Field(2e-5, gt=0)
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, ge=0)
    lora: LoraSettings | None = Field(None, description="LoRA settings; None: full fine-tuning")
    # -- parallelism and numerics (as pretrain)
    zero_stage: Literal[0, 1, 2, 3] = Field(0, description="DeepSpeed ZeRO stage; 0 = no DeepSpeed (plain DDP)")
    offload: bool = False
    deepspeed_config: str | None = None
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    gradient_checkpointing: bool = False
    seed: int = 0
    # -- how it runs
    log_every: int = Field(10, ge=1)
    eval_every: int = Field(0, ge=0, description="held-out evaluation every N steps (0: before and after training only)")
    EXEC_FIELDS: ClassVar[set[str]] = {"log_every", "eval_every"}

    @model_validator(mode="after")
    def _check_common(self) -> "PostTrainConfig":
        if self.offload and self.zero_stage == 0:
            raise ValueError("offload needs DeepSpeed: set zero_stage to 1, 2 or 3")
        if self.deepspeed_config and self.zero_stage == 0:
            raise ValueError("deepspeed_config is given but zero_stage is 0 (no DeepSpeed)")
        if self.lora is not None and self.zero_stage == 3:
            raise ValueError("lora with zero_stage 3 is not supported (merging needs the whole weights): use 0, 1 or 2")
        return self


def inputs_of(cfg: PostTrainConfig) -> list[str]:
    return [cfg.model] + ([cfg.tokenizer] if cfg.tokenizer and cfg.tokenizer != cfg.model else [])


def external_inputs_of(cfg: PostTrainConfig) -> dict[str, str]:
    """The local data files' sha256 (a hub dataset: its name and split), so edited data makes the stage stale."""
    from pipeline.training.posttrain import data_fingerprints

    out = {}
    for src in [*cfg.data, *cfg.eval_data]:
        found = data_fingerprints([src])
        if list(found.values()) == [None]:  # not a local path: a hub dataset, identified by name / split
            out[src.path] = f"hub:{src.path}:{src.split}"
        else:
            out.update({path: digest for path, digest in found.items() if digest})
    return out


# ---------------------------------------------------------------------------------- sft config


class SFTConfig(PostTrainConfig):
    packing: bool = Field(False, description="pack several examples into one max_length row (TRL best-fit packing)")
    lr: float = Field(2e-5, gt=0)
    generation: SampleGeneration = Field(default_factory=SampleGeneration)
    EXEC_FIELDS: ClassVar[set[str]] = {"log_every", "eval_every", "generation"}


def inputs(cfg: SFTConfig) -> list[str]:
    return inputs_of(cfg)


def external_inputs(cfg: SFTConfig) -> dict[str, str]:
    return external_inputs_of(cfg)


def run(cfg: SFTConfig, ctx: Any, out: Any) -> dict[str, Any]:
    from pipeline.training.posttrain import train_sft

    return train_sft(cfg, ctx, out)


def summary(m: dict[str, Any]) -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = [
        ("examples (train / eval)", f"{m.get('train_examples')} / {m.get('eval_examples')}"),
        ("steps", m.get("steps")),
        ("mode", m.get("mode")),
        ("world size / zero", f"{m.get('world_size')} / {m.get('zero_stage')}"),
        ("final train loss", m.get("train_loss")),
        ("held-out loss before", m.get("eval_loss_before")),
        ("held-out loss after", m.get("eval_loss_after")),
        ("generations stopped at EOS", m.get("generations_stopped")),
    ]
    return [(k, v) for k, v in rows if v is not None]
