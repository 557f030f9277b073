"""The decoder families the model stages take, keyed by ``config.json``'s ``model_type``.

=============  ===========================  ==========================================  ============
model_type     transformers class            what differs from Llama                     GGUF export
=============  ===========================  ==========================================  ============
``llama``      ``LlamaForCausalLM``          (the reference)                             ``llama``
``qwen2``      ``Qwen2ForCausalLM``          q/k/v projections have biases               ``qwen2``
               (Qwen2 and Qwen2.5)
``qwen3``      ``Qwen3ForCausalLM``          RMSNorm on each head's q and k (``q_norm``,  ``qwen3``
                                             ``k_norm``); ``head_dim`` set on its own
=============  ===========================  ==========================================  ============

All three are the same decoder otherwise (RMSNorm, SwiGLU MLP, RoPE, grouped-query attention, an output head
tied to the embedding or not), with the same state-dict key layout (``model.embed_tokens``,
``model.layers.N.self_attn.{q,k,v,o}_proj``, ``model.layers.N.mlp.{gate,up,down}_proj``, ``model.norm``,
``lm_head``), so the init stage's surgery (vocabulary transfer, layer maps) is written once on plain state
dicts, and the training, evaluation and registry stages load every family through transformers'
``AutoModelForCausalLM`` / ``AutoModelForSequenceClassification`` without knowing which it is.

Gemma 3 (``gemma3_text``) is left out on purpose, see docs/ARCHITECTURE.md ("Model families"): its
RoPE settings are per layer type (local sliding-window layers and global layers with different bases), which
``rope_theta`` / ``max_position_embeddings`` overrides and the GGUF writer would each need to special-case, and
its GGUF needs the norm weights shifted by one and the sliding-window pattern written out.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from pipeline.errors import InputError


@dataclass(frozen=True)
class Family:
    model_type: str
    label: str  # what users call it
    causal_lm: str  # transformers class name
    config: str  # transformers config class name
    gguf_arch: str  # llama.cpp architecture name the GGUF export writes


FAMILIES: dict[str, Family] = {
    "llama": Family("llama", "Llama", "LlamaForCausalLM", "LlamaConfig", "llama"),
    "qwen2": Family("qwen2", "Qwen2 / Qwen2.5", "Qwen2ForCausalLM", "Qwen2Config", "qwen2"),
    "qwen3": Family("qwen3", "Qwen3", "Qwen3ForCausalLM", "Qwen3Config", "qwen3"),
}
MODEL_TYPES = tuple(FAMILIES)


def supported_text() -> str:
    """``llama (Llama), qwen2 (Qwen2 / Qwen2.5), qwen3 (Qwen3)``: for messages."""
    return ", ".join(f"{f.model_type} ({f.label})" for f in FAMILIES.values())


def family_of(config: Any, where: str = "the model") -> Family:
    """The family of a transformers config (or a config.json dict); one-line :class:`InputError` otherwise."""
    if isinstance(config, dict):
        model_type, archs = config.get("model_type"), list(config.get("architectures") or [])
    else:
        model_type, archs = getattr(config, "model_type", None), list(getattr(config, "architectures", None) or [])
    fam = FAMILIES.get(model_type or "")
    if fam is None:
        listed = ", ".join(archs) or "no architectures listed"
        raise InputError(f"{where} holds a {model_type!r} model ({listed}); supported model families (model_type): "
                         f"{supported_text()}")
    if archs and fam.causal_lm not in archs:
        raise InputError(f"{where} was saved as {', '.join(archs)}, not as {fam.causal_lm}: point it at the "
                         "causal-LM checkpoint")
    return fam


def causal_lm_class(fam: Family) -> Any:
    import transformers

    return getattr(transformers, fam.causal_lm)


# Texts whose splits differ between the pre-tokenizer regexes the tokenizer stage offers (digit runs, contractions,
# punctuation runs, whitespace, Cyrillic): a tokenizer that loads differently encodes some of them differently.
_PROBES = ("Қазақстан Республикасы 1991 жылы 16 желтоқсанда тәуелсіздік алды.", "Москва — столица России (12 506 468 чел.)",
           "We've got 3.14159 and 2024-12-01; it's   fine!!!\n\n\tdone...", "<|im_start|>user\nHi<|im_end|>")


def _splits(tokenizer: Any) -> tuple[list[str], Any]:
    import json

    raw = json.loads(tokenizer.backend_tokenizer.to_str())

    def walk(node: Any) -> list[str]:
        if isinstance(node, dict):
            if node.get("type") == "Split" and isinstance(node.get("pattern"), dict):
                return [str(node["pattern"].get("Regex", node["pattern"].get("String")))]
            return [p for child in node.get("pretokenizers") or [] for p in walk(child)]
        return []

    return walk(raw.get("pre_tokenizer")), raw.get("normalizer")


def tokenizer_reload_problem(tokenizer: Any, config: dict[str, Any]) -> str | None:
    """How ``AutoTokenizer`` would load ``tokenizer`` back from a model folder whose config.json is ``config``,
    when that differs from ``tokenizer`` (None when it comes back the same).

    transformers 5 decides the tokenizer class of some model types itself, whatever tokenizer_config.json says:
    a ``qwen2`` folder always loads as ``Qwen2Tokenizer``, which rebuilds the tokenizer with Qwen2's pre-tokenizer
    regex and NFC, and adds ``<|endoftext|>`` when the vocabulary lacks it. Every later stage would then read
    another tokenizer than the one the shards were packed with, so init checks it before any weights load.
    """
    import json
    import tempfile

    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as fh:
            json.dump({k: config[k] for k in ("model_type", "architectures") if k in config}, fh)
        again = AutoTokenizer.from_pretrained(tmp, local_files_only=True)
    if type(again) is type(tokenizer):
        return None
    found = []
    if len(again) != len(tokenizer):
        extra = sorted(set(again.get_vocab()) - set(tokenizer.get_vocab()))
        found.append(f"{len(tokenizer)} -> {len(again)} tokens (adds {', '.join(extra[:3])})")
    (ours_split, ours_norm), (their_split, their_norm) = _splits(tokenizer), _splits(again)
    if ours_split != their_split:
        found.append("another pre-tokenizer regex")
    if ours_norm != their_norm:
        found.append("another normalizer")
    if not found and any(tokenizer(t)["input_ids"] != again(t)["input_ids"] for t in _PROBES):
        found.append("other token ids for the same text")
    if not found:
        return None
    return (f"transformers loads the tokenizer of a {config.get('model_type')!r} model folder as "
            f"{type(again).__name__}, which would change ours: {'; '.join(found)}")
