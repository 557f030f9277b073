"""int8 weight-only quantisation with optimum-quanto, saved so that it loads back.

Every ``nn.Linear`` of the model (attention and MLP projections, and the output head unless
excluded) gets int8 weights with a per-output-channel float scale; activations stay in the
model's float type, so this is the "W8A16" kind: about a quarter of the fp32 weight bytes for
the linear layers, and no calibration data needed. The embedding stays as it is.

The folder written by :func:`save_int8` is quanto's ``QuantizedModelForCausalLM`` layout
(``model.safetensors`` with the int8 weights and scales, ``quanto_qmap.json`` naming each
quantised module's type, the HF ``config.json``) plus the tokenizer. Load it back with::

    from optimum.quanto import QuantizedModelForCausalLM
    model = QuantizedModelForCausalLM.from_pretrained("quantized/int8")   # a torch module
    tokenizer = transformers.AutoTokenizer.from_pretrained("quantized/int8")

(:func:`load_int8` does exactly that). A tied output head is quantised as its own int8 matrix
while the embedding stays in float, so the tie is not kept in the saved model.
"""

from __future__ import annotations

import os
from typing import Any

import transformers
from optimum.quanto import QuantizedModelForCausalLM, qint8
from optimum.quanto.nn import QModuleMixin

WEIGHT_FILES = ("model.safetensors", "quanto_qmap.json")


def quantize_int8(model: Any, exclude: list[str] | None = None) -> Any:
    """A ``QuantizedModelForCausalLM`` with int8 weights (the given model is changed in place)."""
    return QuantizedModelForCausalLM.quantize(model, weights=qint8, exclude=list(exclude) if exclude else None)


def save_int8(qmodel: Any, folder: str, tokenizer: Any | None = None) -> int:
    """Save a quantised model (and its tokenizer) into ``folder``; returns the bytes of the weight files."""
    os.makedirs(folder, exist_ok=True)
    qmodel.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return weights_size(folder)


def weights_size(folder: str) -> int:
    names = [n for n in os.listdir(folder) if n.endswith(".safetensors") or n.endswith(".safetensors.index.json")
             or n == "quanto_qmap.json"]
    return sum(os.path.getsize(os.path.join(folder, n)) for n in names)


def load_int8(folder: str) -> Any:
    """The int8 model saved by :func:`save_int8`, ready for ``model(input_ids)`` / ``generate``."""
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # quanto passes the deprecated torch_dtype= to transformers
    try:
        model = QuantizedModelForCausalLM.from_pretrained(folder)
    finally:
        transformers.logging.set_verbosity(level)
    model.eval()
    return model


def quantized_modules(qmodel: Any) -> int:
    """How many modules quanto replaced (QLinear etc.)."""
    inner = getattr(qmodel, "_wrapped", qmodel)
    return sum(1 for m in inner.modules() if isinstance(m, QModuleMixin))
