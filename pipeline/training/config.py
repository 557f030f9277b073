"""The configs of the training stages: pretrain, and sft / dpo / reward on one shared base."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from pipeline.config import ExecField, StrictModel


class DataPhase(StrictModel):
    """One stretch of training on one shards artifact, e.g. phase 1 on 'shards', phase 2 on 'shards-clean', with its
    own language / source mix."""

    name: str = Field("main", description="label used in logs and metrics")
    shards: str = Field("shards", description="artifact folder under the run root holding index.json + shards")
    until_step: int | None = Field(
        None, ge=1, description="this phase ends before this global step (exclusive); None: until the end (last phase only)"
    )
    mix: dict[str, Annotated[float, Field(ge=0)]] | None = Field(
        None, description="sampling weights of the shards' training streams (pack's stream_by), keyed by what mix_by "
        "names, e.g. {kk: 3.0, ru: 1.0, en: 0.5}. A weight is epochs per pass of the mixture: a pass draws each "
        "block of a stream of weight w w times (3.0: three times, 0.5: a random half, 0: never); the phase draws pass "
        "after pass (each reshuffled; a stream continues its own epochs, so 0.5 twice sees every block once) until "
        "its steps are done, so a stream's share of the phase is w x its blocks / the pass length, and the epochs it "
        "gets are w x the phase's samples / the pass length (reported per stream, language and source). '*' weights "
        "every stream no other key names (default 1.0). A key that names no stream of the shards is an error. "
        "None: the shards' blocks uniformly, epoch after epoch, as without streams")
    mix_by: Literal["lang", "source", "stream"] = Field(
        "lang", description="what mix's keys name: a language (every stream of that language, whatever its source), "
        "a source (every stream of that collect source), or a stream by its full name (e.g. kk/kk-web)")

    @model_validator(mode="after")
    def _check_mix(self) -> "DataPhase":
        if self.mix is not None:
            if not self.mix:
                raise ValueError(f"phase {self.name}: mix is empty (leave it out to sample the shards uniformly)")
            if "" in self.mix:
                raise ValueError(f"phase {self.name}: mix has an empty key")
            if "*" in self.mix and not any(self.mix.values()):
                raise ValueError(f"phase {self.name}: every mix weight is 0: the phase would draw nothing")
        return self


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
    document_masking: bool = Field(
        True, description="attend only within each document of a packed block (position ids restart per document: "
                          "a block-diagonal mask with sdpa/eager, the varlen kernel with flash_attention_2), as the "
                          "model is used at inference; false: blocks are attended whole, across document boundaries. "
                          "Default from the experiment in docs/benchmarks.md")
    # -- kernels (how fast it runs, not what it learns)
    attention: Literal["sdpa", "flash_attention_2", "eager"] = ExecField(
        "sdpa", description="attention kernel: sdpa (PyTorch's, flash/memory-efficient on GPU), flash_attention_2 "
                            "(CUDA + the flash-attn package, bf16/fp16), eager (reference)")
    compile: bool = ExecField(False, description="torch.compile the model (inductor): faster steps on GPU after a "
                                             "compile of a minute or more at start")
    liger_kernels: bool = ExecField(False, description="Liger Triton kernels (RMSNorm, RoPE, SwiGLU, fused linear "
                                                   "cross-entropy): CUDA + the liger-kernel package")
    # -- checkpoints, evaluation, logging (change how it runs, not what it learns)
    checkpoint_dir: str | None = ExecField(None, description="local/PVC folder for checkpoints; default <root>/checkpoints/pretrain")
    checkpoint_every: int = ExecField(500, ge=0, description="0: no intermediate checkpoints")
    keep_checkpoints: int = ExecField(3, ge=1)
    resume: bool = ExecField(True, description="resume from the newest complete checkpoint when there is one")
    eval_every: int = ExecField(500, ge=0, description="validation loss + perplexity every N steps (0: only at the end)")
    eval_max_blocks: int | None = ExecField(256, ge=1, description="validation blocks used (None: the whole val split)")
    log_every: int = ExecField(10, ge=1)
    generation: GenerationConfig = ExecField(default_factory=GenerationConfig)
    peak_flops: float | None = ExecField(
        None, gt=0, description="per-device dense peak FLOP/s for MFU on CUDA; None: from the GPU's name and the "
                                "precision (pipeline/training/flops.py's datasheet table; a GPU not in it gets no MFU)")
    cpu_peak_flops: float | None = ExecField(None, gt=0, description="per-process peak FLOP/s for MFU on CPU (None: no MFU)")
    dataloader_workers: int | None = ExecField(
        None, ge=0, le=1, description="1: batches are read and collated in a background process, overlapping the "
                                      "step; 0: in the training process. None: 1 on CUDA, 0 on CPU (where a worker "
                                      "would take a core from the step). At most 1: the stream of a rank is one "
                                      "resumable sequence, which more workers would each replay")
    verify_shards: bool = ExecField(True, description="check every shard's sha256 when opening")

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


# ----------------------------------------------------------------- post-training: sft, dpo, reward


class DataSource(StrictModel):
    """One post-training data input."""

    path: str = Field(..., description="local .jsonl/.json/.parquet file, a folder of them, a datasets save_to_disk "
                                       "folder, or a Hugging Face hub dataset name")
    format: Literal["auto", "alpaca", "chat", "preference", "xlam", "glaive", "hermes"] = Field(
        "auto", description="record layout; auto: messages -> chat (tools / tool_calls / tool messages allowed), "
                            "instruction+output -> alpaca, prompt+chosen+rejected -> preference, query+tools+answers -> "
                            "xlam, system+chat -> glaive, conversations -> hermes (tool-use formats: bad records are "
                            "counted by reason and skipped)")
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
    # -- checkpoints, evaluation, logging (change how it runs, not what it learns)
    checkpoint_dir: str | None = ExecField(None, description="local/PVC folder for checkpoints; default <root>/checkpoints/<stage>")
    checkpoint_every: int = ExecField(200, ge=0, description="0: no intermediate checkpoints")
    keep_checkpoints: int = ExecField(2, ge=1)
    resume: bool = ExecField(True, description="resume from the newest complete checkpoint when there is one")
    log_every: int = ExecField(10, ge=1)
    eval_every: int = ExecField(0, ge=0, description="held-out evaluation every N steps (0: before and after training only)")

    @model_validator(mode="after")
    def _check_common(self) -> "PostTrainConfig":
        if self.offload and self.zero_stage == 0:
            raise ValueError("offload needs DeepSpeed: set zero_stage to 1, 2 or 3")
        if self.deepspeed_config and self.zero_stage == 0:
            raise ValueError("deepspeed_config is given but zero_stage is 0 (no DeepSpeed)")
        if self.lora is not None and self.zero_stage == 3:
            raise ValueError("lora with zero_stage 3 is not supported (merging needs the whole weights): use 0, 1 or 2")
        return self


class SFTConfig(PostTrainConfig):
    packing: bool = Field(False, description="pack several examples into one max_length row (TRL best-fit packing)")
    lr: float = Field(2e-5, gt=0)
    generation: SampleGeneration = ExecField(default_factory=SampleGeneration)


class DPOConfig(PostTrainConfig):
    model: str = Field("models/sft", description="artifact holding the starting (SFT) checkpoint")
    beta: float = Field(0.1, gt=0, description="DPO temperature: strength of the pull towards the reference")
    loss_type: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"
    lr: float = Field(5e-7, gt=0)
    generation: SampleGeneration = ExecField(default_factory=SampleGeneration)


class RewardConfig(PostTrainConfig):
    model: str = Field("models/sft", description="artifact holding the causal LM the reward model starts from")
    lr: float = Field(1e-5, gt=0)
    center_rewards: float | None = Field(None, ge=0, description="coefficient pulling rewards towards 0 (None: off)")

