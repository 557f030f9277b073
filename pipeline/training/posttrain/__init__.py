"""Post-training: the sft, dpo and reward stages' library (TRL trainers + our data, checks and export).

* :mod:`.data`: records from .jsonl/.json/.parquet files (maybe compressed), folders of them or Hugging Face
  datasets, each with where it came from (``file:line``), normalised -- Alpaca and chat records to a list of
  messages, preference records to conversational ``prompt`` / ``chosen`` / ``rejected``; the data files'
  fingerprints (stage inputs). Files are found and opened as the collect stage's readers do
  (:mod:`pipeline.data.readers`);
* :mod:`.templates`: the model folder before any weights load -- tokenizer and chat template (ChatML gets
  ``{% generation %}`` markers so that TRL's ``assistant_only_loss`` masks everything but the assistant turns),
  max length against the model's positions, the tokens that end an assistant turn;
* :mod:`.measures`: measurements that do not depend on a trainer -- held-out token loss, completion log-probs of
  preference pairs, reward-model scores, greedy generations that stop at ``<|im_end|>``/EOS;
* :mod:`.trainers`: :func:`~.trainers.train_sft`, :func:`~.trainers.train_dpo`, :func:`~.trainers.train_reward`, one
  stage on one rank (rank 0 gets the output folder, the others ``None``), set up and exported through
  :mod:`pipeline.training.common` like pretrain. They checkpoint and resume as pretrain does
  (:mod:`pipeline.training.checkpoint`: ``<checkpoint root>/step-N/`` every ``checkpoint_every`` steps, the newest
  complete one resumed with ``trainer.train(resume_from_checkpoint=...)``).

This package imports nothing itself: :mod:`.data` is light (the up-to-date check reads data fingerprints), the
others import torch and transformers.
"""
