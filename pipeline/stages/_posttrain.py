"""What sft, dpo and reward share as stages: they start from a model artifact (and maybe a tokenizer
artifact) and read data files from outside the run root. Their configs share a base too
(:class:`pipeline.training.config.PostTrainConfig`)."""

from __future__ import annotations

from typing import Any

from pipeline.stage import Stage
from pipeline.training.config import PostTrainConfig
from pipeline.training.posttrain.data import data_fingerprints


class PostTrainStage(Stage):
    distributed = True

    def inputs(self, cfg: PostTrainConfig) -> list[str]:
        """The starting model, and the tokenizer artifact where the config names one apart from it."""
        return [cfg.model] + ([cfg.tokenizer] if cfg.tokenizer and cfg.tokenizer != cfg.model else [])

    def external_inputs(self, cfg: PostTrainConfig) -> dict[str, str]:
        """The local data files' sha256 (a hub dataset: its name and split), so edited data makes the stage stale."""
        out: dict[str, Any] = {}
        for src in [*cfg.data, *cfg.eval_data]:
            found = data_fingerprints([src])
            if list(found.values()) == [None]:  # not a local path: a hub dataset, identified by name / split
                out[src.path] = f"hub:{src.path}:{src.split}"
            else:
                out.update({path: digest for path, digest in found.items() if digest})
        return out
