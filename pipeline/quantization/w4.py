"""4-bit weights with calibration: GPTQ and AWQ through llm-compressor, saved as compressed-tensors.

Both methods quantize the weights of every ``nn.Linear`` of the decoder (attention and MLP
projections; the output head stays in float by default) to 4-bit integers with one float scale
per ``group_size`` input weights, activations staying in float ("W4A16"). They differ in how they
use the calibration tokens:

* GPTQ quantizes each layer's weight matrix column by column and corrects the columns not yet
  quantized for the error made so far, weighted by the layer's input Hessian ``X^T X`` from the
  calibration activations.
* AWQ first searches per-channel scales that protect the input channels with the largest
  activations (folding them into the preceding norm or projection, so the float function is
  unchanged) and then rounds to nearest.

Calibration sequences come from our own packed shards (``calibration.split``, ``val`` by
default, blocks other than the ones perplexity is measured on where the split has enough), never
from a downloaded data set.

The folder written is a Hugging Face checkpoint whose ``config.json`` carries a compressed-tensors
``quantization_config`` (``quant_method: compressed-tensors``, ``format: pack-quantized``: eight
4-bit values per int32, with the scales), plus llm-compressor's ``recipe.yaml`` and the
tokenizer. transformers loads it with ``AutoModelForCausalLM.from_pretrained`` (its
compressed-tensors quantizer; on a CPU it decompresses the weights back into float
``nn.Linear`` layers, which is how :func:`load_w4` measures it), and vLLM serves it as is
(``vllm serve quantized/gptq``: its compressed-tensors W4A16 kernels).

llm-compressor and compressed-tensors are the ``quantize`` extra (``pip install '.[quantize]'``;
``make install`` installs them from the lock); they are imported here only when a 4-bit variant is
made, so the other variants work without them.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Iterator

import numpy as np

from pipeline.errors import InputError, PipelineError

METHODS = ("gptq", "awq")
VLLM_GROUP_SIZES = (-1, 32, 64, 128)  # what vLLM's Marlin / Machete W4A16 kernels take
WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json")


def library_versions() -> dict[str, str] | None:
    """{llmcompressor, compressed_tensors: version} when both import, else None."""
    os.environ.setdefault("LLM_COMPRESSOR_LOG_LEVEL", "ERROR")  # INFO names every module, WARNING repeats "no accelerator"
    try:
        import compressed_tensors
        import llmcompressor
        # the modifiers and oneshot too: their imports take seconds, which belong here, not in a variant's time
        import llmcompressor.entrypoints  # noqa: F401
        import llmcompressor.modifiers.gptq  # noqa: F401
        import llmcompressor.modifiers.quantization  # noqa: F401
        import llmcompressor.modifiers.transform.awq  # noqa: F401
    except Exception:  # noqa: BLE001 - absent or broken: the caller says how to install it
        return None
    return {"llmcompressor": getattr(llmcompressor, "__version__", "unknown"),
            "compressed_tensors": getattr(compressed_tensors, "__version__", "unknown")}


def require_library(wanted: list[str]) -> dict[str, str]:
    versions = library_versions()
    if versions is None:
        raise PipelineError(f"variants {', '.join(wanted)} need llm-compressor (the `quantize` extra): "
                            "pip install -e '.[quantize]' (make install does), or drop them from `variants`")
    return versions


# ------------------------------------------------------------------------------- checks before compute


def input_sizes(config: Any) -> dict[str, int]:
    """The input widths of the decoder's linear layers, which the group size must divide."""
    hidden = int(config.hidden_size)
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    return {"hidden_size (q/k/v/gate/up_proj inputs)": hidden,
            "num_attention_heads x head_dim (o_proj input)": heads * head_dim,
            "intermediate_size (down_proj input)": int(config.intermediate_size)}


def check_group_size(config: Any, group_size: int, section: str, where: str) -> None:
    """A clear error when ``group_size`` does not divide every quantized layer's input width."""
    if group_size == -1:
        return
    sizes = input_sizes(config)
    bad = {k: v for k, v in sizes.items() if v % group_size}
    if not bad:
        return
    fits = [g for g in (128, 64, 32, 16, 8) if g < group_size and all(v % g == 0 for v in sizes.values())]
    hint = (f"set `{section}.group_size: {fits[0]}` (the largest of 128/64/32/16/8 that divides them all)"
            if fits else f"no group size of 8 or more divides them all: set `{section}.group_size: -1`")
    raise InputError(f"{where}: {section}.group_size {group_size} does not divide "
                     + ", ".join(f"{k} = {v}" for k, v in bad.items())
                     + f"; {hint}, or -1 for one scale per output channel. vLLM's 4-bit kernels take "
                     + ", ".join(str(g) for g in VLLM_GROUP_SIZES))


def calibration_samples(url: str, split: str, samples: int, seq_len: int | None, *,
                        avoid: Callable[[int], np.ndarray] | None = None,
                        storage_options: dict | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """``samples`` token sequences of ``seq_len`` (None: the shards' block length) cut from blocks of ``split``,
    evenly spread over it and skipping the block indices ``avoid(len(split))`` (the perplexity blocks) while
    enough others remain. Returns (int64 array (n, seq_len), facts for the metrics)."""
    from pipeline.data.packed import PackedDataset

    ds = PackedDataset(url, split, storage_options=storage_options, verify=True)
    n, block_len = len(ds), int(ds.block(0).shape[0]) if len(ds) else 0
    if n == 0:
        raise InputError(f"{url} has an empty {split!r} split: no calibration data for GPTQ / AWQ "
                         "(set calibration.split to a split with blocks, e.g. train)")
    length = seq_len or block_len
    if length > block_len:
        raise InputError(f"calibration.seq_len {length} is longer than the shards' blocks ({block_len} tokens): "
                         f"set it to {block_len} or less (or null for the block length)")
    per_block = block_len // length
    need = -(-samples // per_block)
    avoid_set = set(int(i) for i in avoid(n)) if avoid is not None else set()
    free = np.array([i for i in range(n) if i not in avoid_set], dtype=np.int64)
    if len(free) >= need:
        idx = free[np.unique(np.linspace(0, len(free) - 1, need).round().astype(np.int64))]
    else:  # too few blocks outside the perplexity ones: all of those, then some of the others
        rest = np.array(sorted(avoid_set & set(range(n))), dtype=np.int64)
        extra = rest[np.unique(np.linspace(0, len(rest) - 1, min(need - len(free), len(rest))).round().astype(np.int64))] \
            if len(rest) and need > len(free) else np.array([], dtype=np.int64)
        idx = np.sort(np.concatenate([free, extra]))
    pieces = [ds.block(int(i)).astype(np.int64)[: per_block * length].reshape(per_block, length) for i in idx]
    out = np.concatenate(pieces)[:samples]
    overlap = int(sum(1 for i in idx if int(i) in avoid_set))
    facts = {"split": split, "samples": int(len(out)), "seq_len": int(length), "tokens": int(out.size),
             "blocks": int(len(idx)), "blocks_shared_with_eval": overlap}
    return out, facts


# ------------------------------------------------------------------------------- quantize, save, load


def _scheme(settings: Any) -> dict[str, Any]:
    gs = int(settings.group_size)
    weights = {"num_bits": 4, "type": "int", "symmetric": bool(settings.symmetric),
               "strategy": "channel" if gs == -1 else "group", "group_size": None if gs == -1 else gs}
    return {"group_0": {"targets": ["Linear"], "weights": weights}}


def recipe(method: str, settings: Any) -> list[Any]:
    """llm-compressor modifiers for ``method`` with our settings (4-bit integer weights, float activations)."""
    if method == "gptq":
        from llmcompressor.modifiers.gptq import GPTQModifier

        return [GPTQModifier(config_groups=_scheme(settings), ignore=list(settings.ignore),
                             dampening_frac=settings.dampening_frac, actorder=settings.actorder)]
    if method == "awq":
        from llmcompressor.modifiers.quantization import QuantizationModifier
        from llmcompressor.modifiers.transform.awq import AWQModifier

        return [AWQModifier(n_grid=settings.n_grid, duo_scaling=settings.duo_scaling),
                QuantizationModifier(config_groups=_scheme(settings), ignore=list(settings.ignore))]
    raise ValueError(f"unknown method {method!r}; one of {', '.join(METHODS)}")


@contextlib.contextmanager
def _cpu_only_pinning() -> Iterator[None]:
    """llm-compressor 0.14's AWQ pins its cached activations (``Tensor.pin_memory``) for faster copies to the GPU;
    on a machine without an accelerator torch refuses to pin. Pinning changes no value, so without an accelerator
    the cache's ``pin_memory`` is a no-op for the duration of one run (restored after)."""
    import torch

    if torch.accelerator.is_available():
        yield
        return
    from llmcompressor.pipelines.cache import IntermediatesCache

    original = IntermediatesCache.pin_memory
    IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None
    try:
        yield
    finally:
        IntermediatesCache.pin_memory = original


def quantize_w4(model: Any, method: str, settings: Any, samples: np.ndarray, tokenizer: Any, folder: str,
                *, log: Callable[[str], None] | None = None) -> int:
    """Calibrate and quantize ``model`` in place with ``method``, save it compressed with ``tokenizer`` into
    ``folder``; returns the bytes of the weight files."""
    from datasets import Dataset
    from llmcompressor import oneshot

    ids = samples.astype(np.int64)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": np.ones_like(ids).tolist()})
    if log:
        log(f"{method}: calibrating on {len(ids)} x {ids.shape[1]} tokens (llm-compressor, group size "
            f"{settings.group_size}, {'symmetric' if settings.symmetric else 'asymmetric'}, ignore {settings.ignore})")
    with _cpu_only_pinning():
        oneshot(model=model, dataset=data, recipe=recipe(method, settings), processor=tokenizer,
                max_seq_length=int(ids.shape[1]), num_calibration_samples=len(ids), shuffle_calibration_samples=False)
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder, save_compressed=True)  # llm-compressor's save: compressed-tensors pack-quantized
    tokenizer.save_pretrained(folder)
    return weights_size(folder)


def weights_size(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder) if n.endswith(WEIGHT_SUFFIXES))


def load_w4(folder: str) -> Any:
    """The saved 4-bit checkpoint through transformers (its compressed-tensors quantizer), in float32 for measuring."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.eval()
    return model


def quantization_config(folder: str) -> dict[str, Any]:
    """``config.json``'s ``quantization_config`` of a saved folder (what vLLM and transformers read)."""
    import json

    with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
        return json.load(f).get("quantization_config") or {}
