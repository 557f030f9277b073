"""Loading a model folder for evaluation, and the checks that fail before any compute."""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.errors import InputError
from pipeline.models.checkpoint import causal_lm_config

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def pick_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"device {device!r} was asked for but no CUDA device is visible; use device: auto or cpu")
    return device


def pick_dtype(dtype: str, device: str) -> Any:
    if dtype == "auto":
        if device.startswith("cuda") and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def check_model_folder(folder: str, where: str) -> dict[str, Any]:
    """The folder's config as a dict; a clear error when it is not a causal LM with a tokenizer."""
    config = causal_lm_config(folder, where).to_dict()
    missing = [f for f in TOKENIZER_FILES if not os.path.exists(os.path.join(folder, f))]
    if missing:
        raise InputError(f"{where} has no tokenizer ({', '.join(missing)} missing); the evaluate stage reads the "
                         "tokenizer saved beside the model (the training stages save it there)")
    return config


@dataclass
class Loaded:
    label: str
    folder: str
    model: Any
    tokenizer: Any
    device: str
    max_positions: int


def load(label: str, folder: str, device: str, dtype: Any) -> Loaded:
    tok = AutoTokenizer.from_pretrained(folder)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device)
    model.eval()
    positions = int(getattr(model.config, "max_position_embeddings", 0) or 2048)
    return Loaded(label, folder, model, tok, device, positions)


def check_against_shards(tok: Any, model_config: dict[str, Any], index: dict[str, Any], where: str,
                         sample: Any = None) -> None:
    """Fail when the model's tokenizer is not the one the shards were packed with.

    Checks the vocabulary size (the tokenizer's == the shards'; the embedding may be padded
    beyond it), BOS/EOS ids, and when ``sample`` (a block of token ids) is given, that
    decoding and re-encoding it with the model's tokenizer gives mostly the same ids.
    """
    n_tok = len(tok)
    n_shards = int(index["vocab_size"])
    n_model = int(model_config.get("vocab_size") or 0)
    hint = "(was the model trained on another tokenizer/ than the one these shards were packed with?)"
    if n_tok != n_shards:
        raise InputError(f"model/tokenizer mismatch: {where} has a tokenizer of {n_tok:,} tokens but the shards were "
                         f"packed with {n_shards:,} {hint}")
    if n_model and n_model < n_shards:
        raise InputError(f"model/tokenizer mismatch: {where} has {n_model:,} embedding rows but the shards hold ids "
                         f"up to {n_shards - 1:,} {hint}")
    for key, ours in (("bos_id", tok.bos_token_id), ("eos_id", tok.eos_token_id)):
        theirs = index.get(key)
        if theirs is not None and ours is not None and int(theirs) != int(ours):
            raise InputError(f"model/tokenizer mismatch: {where} has {key[:3]} id {ours} but the shards use {theirs} {hint}")
    if sample is not None:
        ids = [int(i) for i in sample if int(i) not in set(tok.all_special_ids)]
        if len(ids) >= 16:
            again = tok(tok.decode(ids), add_special_tokens=False)["input_ids"]
            same = difflib.SequenceMatcher(None, ids, again, autojunk=False).ratio()
            if same < 0.5:
                raise InputError(f"model/tokenizer mismatch: {where}'s tokenizer re-encodes a validation block to "
                                 f"different ids ({same:.0%} agree) {hint}")
