"""Model definitions and surgery used by the ``init`` stage.

:mod:`pipeline.models.families` names the supported decoder families (``model_type`` llama, qwen2, qwen3) and
their transformers classes; the surgery in :mod:`pipeline.models.llama` works on all of them (same state-dict
layout).

:mod:`pipeline.models.llama` holds the size presets, the config builder, parameter counting,
vocabulary transfer between tokenizers and layer down/up-scaling (SOLAR depth up-scaling).
Imported lazily by the stages: it pulls in torch and transformers.
"""
