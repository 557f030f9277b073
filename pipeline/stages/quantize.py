"""quantize: a model artifact (default ``models/dpo/``) + ``shards/`` -> ``quantized/``.

Variants, each measured against the original on the same validation blocks (size on disk and
perplexity):

* ``int8`` -- weight-only int8 (optimum-quanto), ``quantized/int8/``; loads back with
  ``optimum.quanto.QuantizedModelForCausalLM.from_pretrained("quantized/int8")``.
* ``gguf-f16`` / ``gguf-q8_0`` / ``gguf-q4_0`` -- llama.cpp files ``quantized/gguf/<model>-<type>.gguf``
  written with the ``gguf`` library (the llama, qwen2 or qwen3 architecture by the model's family, byte-level BPE tokenizer metadata, the
  chat template); quality measured by dequantising the file back into the HF model, and with
  llama.cpp itself when llama-cpp-python is installed (``make test-llamacpp`` installs it),
  which also checks that greedy decoding matches the HF model token for token.
* ``gptq`` / ``awq`` -- 4-bit weights (W4A16, ``group_size`` weights per scale) calibrated on
  ``calibration.samples`` sequences of our own shards (llm-compressor, the ``quantize`` extra),
  ``quantized/gptq/`` and ``quantized/awq/``: Hugging Face folders in compressed-tensors format that
  ``AutoModelForCausalLM.from_pretrained`` loads and ``vllm serve`` serves (see
  :mod:`pipeline.quantization.w4`). Not in the default ``variants``: list them.

``report.md`` in the output has the table and how to load each variant; the manifest's metrics
hold ``{"model", "original": {size_bytes, perplexity}, "variants": {name: {size_bytes, perplexity,
perplexity_delta_pct, path, ...}}, ...}``. The work is done by :mod:`pipeline.quantization`.
"""

from __future__ import annotations

import difflib
from typing import Any, Literal

from pydantic import Field, field_validator

from pipeline.config import ExecField, StrictModel
from pipeline.stage import Stage, StageContext
from pipeline.storage import OutputDir

DEFAULT_VARIANTS = ("int8", "gguf-f16", "gguf-q8_0", "gguf-q4_0")
VARIANTS = (*DEFAULT_VARIANTS, "gptq", "awq")  # gptq / awq: the `quantize` extra (llm-compressor), calibration data


class Int8Settings(StrictModel):
    """optimum-quanto int8 weight-only quantisation."""

    exclude: list[str] = Field(default_factory=list, description="module names (fnmatch patterns) kept in float, "
                                                                 "e.g. ['lm_head']")


class GGUFSettings(StrictModel):
    """How the GGUF files are written."""

    q4_keep_head_q8: bool = Field(True, description="in the 4-bit file, store the output head (the embedding when tied) "
                                                    "as Q8_0, as llama-quantize keeps it at higher precision")
    pre_tokenizer: str | None = Field(None, description="tokenizer.ggml.pre (llama.cpp's built-in pre-tokenizer); "
                                                        "None: gpt-2 / llama-bpe by the tokenizer's regex, else llama-bpe")


class _W4Settings(StrictModel):
    """4-bit integer weights with float scales, float activations (W4A16), saved in compressed-tensors format."""

    group_size: int = Field(128, description="input weights per scale; must divide hidden_size, intermediate_size and "
                                             "heads x head_dim (checked before any compute); -1: one scale per output "
                                             "channel. vLLM's 4-bit kernels take -1, 32, 64 or 128")
    symmetric: bool = Field(True, description="scales only (True) or scales and zero points (False, 'W4A16_ASYM')")
    ignore: list[str] = Field(default_factory=lambda: ["lm_head"],
                              description="layers kept in float: names or 're:<regex>' (llm-compressor's syntax)")

    @field_validator("group_size")
    @classmethod
    def _group(cls, value: int) -> int:
        if value != -1 and value < 1:
            raise ValueError(f"group_size {value}: write a positive number of weights per scale (e.g. 128) "
                             "or -1 for one scale per output channel")
        return value


class GPTQSettings(_W4Settings):
    """GPTQ (llm-compressor's GPTQModifier): error-compensating rounding from the calibration Hessian."""

    dampening_frac: float = Field(0.01, gt=0, lt=1, description="added to the Hessian diagonal, as a fraction of its "
                                                                "mean (raise it if GPTQ reports a non-invertible Hessian)")
    actorder: Literal["static", "group", "weight"] | None = Field(
        "static", description="activation ordering: quantize columns by decreasing Hessian diagonal (None: in order)")


class AWQSettings(_W4Settings):
    """AWQ (llm-compressor's AWQModifier + QuantizationModifier): activation-aware channel scales, then rounding."""

    n_grid: int = Field(20, ge=1, le=100, description="scale ratios tried per layer group (time grows with it)")
    duo_scaling: bool = Field(True, description="scales from activations and weights (True) or activations only")


class CalibrationSettings(StrictModel):
    """The token sequences GPTQ and AWQ calibrate on: cut from our own packed shards."""

    split: str = Field("val", description="shard split; blocks that perplexity is measured on are skipped while the "
                                          "split has enough others")
    samples: int = Field(128, ge=1, description="calibration sequences")
    seq_len: int | None = Field(None, ge=16, description="tokens per sequence (None: the shards' block length); "
                                                         "a block gives block_len // seq_len sequences")


class QuantizeConfig(StrictModel):
    # -- inputs
    model: str = Field("models/dpo", description="artifact holding the HF checkpoint (and tokenizer): Llama, Qwen2 / Qwen2.5 or Qwen3")
    tokenizer: str | None = Field(None, description="tokenizer artifact, used only when the model folder has none")
    shards: str = Field("shards", description="packed token shards whose split measures perplexity")
    # -- what to make
    variants: list[str] = Field(default_factory=lambda: list(DEFAULT_VARIANTS),
                                description=f"any of {', '.join(VARIANTS)}")
    int8: Int8Settings = Field(default_factory=Int8Settings)
    gguf: GGUFSettings = Field(default_factory=GGUFSettings)
    gptq: GPTQSettings = Field(default_factory=GPTQSettings)
    awq: AWQSettings = Field(default_factory=AWQSettings)
    calibration: CalibrationSettings = Field(default_factory=CalibrationSettings)
    # -- how quality is measured
    split: str = Field("val", description="shard split the perplexity is measured on")
    max_blocks: int | None = Field(64, ge=1, description="blocks of that split used (evenly spread); None: all")
    batch_size: int = ExecField(4, ge=1, description="blocks per forward pass of the HF models")
    llamacpp: Literal["auto", "off", "require"] = Field(
        "auto", description="also measure the GGUF files with llama.cpp (llama-cpp-python): auto = when importable")
    prompt: str = Field("Қазақстанның астанасы", description="greedy-decoding check prompt (tokenised by the HF tokenizer)")
    greedy_tokens: int = Field(16, ge=1, le=512, description="tokens generated for the greedy check")
    # -- how it runs
    threads: int | None = ExecField(None, ge=1, description="llama.cpp threads (None: all cores)")

    @field_validator("llamacpp", mode="before")
    @classmethod
    def _yaml_booleans(cls, value: Any) -> Any:
        # YAML 1.1 reads a bare `off` / `no` as false and `on` / `yes` as true
        return {False: "off", True: "require"}.get(value, value) if isinstance(value, bool) else value

    @field_validator("variants")
    @classmethod
    def _known_variants(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError(f"no variants: list at least one of {', '.join(VARIANTS)}")
        for v in value:
            if v not in VARIANTS:
                near = difflib.get_close_matches(v, VARIANTS, n=1)
                hint = f" (did you mean {near[0]!r}?)" if near else ""
                raise ValueError(f"unknown variant {v!r}{hint}; choose from {', '.join(VARIANTS)}")
        if len(set(value)) != len(value):
            raise ValueError("a variant is listed twice")
        return value


def _size(n: int | None) -> str:
    return "?" if n is None else f"{n / 1e6:.2f} MB"


class QuantizeStage(Stage):
    name = "quantize"
    config = QuantizeConfig
    OUTPUT = "quantized"
    INPUTS = ("models/dpo", "shards")  # the default; `inputs(cfg)` follows cfg.model / cfg.shards / cfg.tokenizer
    ARTIFACTS = ("report.md",)  # report files tracking logs to MLflow

    def inputs(self, cfg: QuantizeConfig) -> list[str]:
        extra = [cfg.tokenizer] if cfg.tokenizer and cfg.tokenizer not in (cfg.model, cfg.shards) else []
        return [cfg.model, cfg.shards, *extra]

    def run(self, cfg: QuantizeConfig, ctx: StageContext, out: OutputDir) -> dict[str, Any]:
        from pipeline.quantization.workflow import quantize

        return quantize(cfg, ctx, out)

    def summary(self, m: dict[str, Any]) -> list[tuple[str, Any]]:
        orig = m.get("original") or {}
        rows: list[tuple[str, Any]] = [
            ("model", m.get("model")),
            ("eval blocks x tokens", f"{m.get('eval_blocks')} x {m.get('seq_len')}"),
            ("original", f"{_size(orig.get('size_bytes'))}, perplexity {orig.get('perplexity', float('nan')):.3f}"),
        ]
        for name, v in (m.get("variants") or {}).items():
            text = (f"{_size(v.get('size_bytes'))} ({v.get('size_ratio', 0):.2f}x), perplexity {v.get('perplexity', float('nan')):.3f} "
                    f"({v.get('perplexity_delta_pct', 0):+.2f}%)")
            if v.get("llamacpp_perplexity") is not None:
                text += f", llama.cpp {v['llamacpp_perplexity']:.3f}"
            if v.get("llamacpp_greedy_match") is not None:
                text += f", greedy {'matches' if v['llamacpp_greedy_match'] else 'DIFFERS'}"
            rows.append((name, text))
        rows.append(("llama.cpp", m.get("llamacpp") or "not installed (make test-llamacpp)"))
        return rows


STAGE = QuantizeStage()
