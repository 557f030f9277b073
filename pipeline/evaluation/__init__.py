"""Model evaluation for the ``evaluate`` stage.

* :mod:`.loading` loads a model folder (HF layout) onto a device and checks its tokenizer
  against the token shards it is measured on;
* :mod:`.perplexity` token loss / perplexity on validation shards, and perplexity plus bits per
  byte on raw held-out text per language (comparable across tokenizers);
* :mod:`.generation` greedy and seeded sampled answers to a prompt set;
* :mod:`.harness` lm-evaluation-harness (``lm_eval``) on a loaded model: the tasks shipped in
  ``tasks/`` (kk / ru / en multiple choice, offline) or any standard task name;
* :mod:`.report` the side-by-side Markdown and self-contained HTML report with plots.
"""
