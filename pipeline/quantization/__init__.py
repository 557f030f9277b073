"""Quantization library behind the ``quantize`` stage.

* :mod:`.int8` -- int8 weight-only (optimum-quanto): quantize, save, load back.
* :mod:`.gguf_export` -- HF Llama -> GGUF (F16 / Q8_0 / Q4_0) with tokenizer metadata, and back.
* :mod:`.quality` -- evaluation blocks from the shards, perplexity (transformers and llama.cpp),
  greedy decoding comparisons.
* :mod:`.workflow` -- the stage's steps and ``report.md``.
"""
