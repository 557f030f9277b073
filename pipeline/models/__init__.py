"""Model definitions and surgery used by the ``init`` stage (Llama family only, for now).

:mod:`pipeline.models.llama` holds the size presets, the config builder, parameter counting,
vocabulary transfer between tokenizers and layer down/up-scaling (SOLAR depth up-scaling).
Imported lazily by the stages: it pulls in torch and transformers.
"""
