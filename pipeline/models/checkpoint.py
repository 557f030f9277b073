"""Checks on a Hugging Face checkpoint folder made from its config alone, before any weights load.

Shared by the training stages (pretrain, sft, dpo, reward) and by evaluate.
"""

from __future__ import annotations

import os
from typing import Any

from transformers import AutoConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from pipeline.errors import InputError


def causal_lm_config(folder: str, where: str) -> Any:
    """The folder's transformers config; InputError unless it is a causal LM transformers can load.

    ``where`` names the folder in messages (``models/init/``, or the artifact's URL).
    """
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise InputError(f"{where} holds no HF model (config.json is missing)")
    try:
        mc = AutoConfig.from_pretrained(folder)
    except (ValueError, KeyError, OSError) as exc:
        raise InputError(f"{where.rstrip('/')}/config.json cannot be read by transformers: {str(exc).splitlines()[0]}") from None
    if mc.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise InputError(f"{where} is a {mc.model_type!r} model, which has no causal-LM head in transformers; "
                         "the model stages work on decoders such as llama (make one with the init stage)")
    archs = list(getattr(mc, "architectures", None) or [])
    if archs and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        raise InputError(f"{where} was saved as {', '.join(archs)}, not as a causal LM (a reward or classifier "
                         "checkpoint?): its language-model head would start from random weights; point the config "
                         "at a causal LM such as models/init, models/pretrain or models/sft")
    return mc
