"""The stages, one module each (``STAGE``, a :class:`pipeline.stage.Stage`); imported when asked for,
so `llmpipe --help` stays fast."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from pipeline.errors import PipelineError

if TYPE_CHECKING:  # this package is read by `llmpipe --help`: pydantic and the stage modules load only when asked for
    from pipeline.config import StrictModel
    from pipeline.stage import Stage

# what `llmpipe pipeline` runs, in order
ORDER = ["collect", "clean", "tokenizer", "pack", "init", "pretrain", "sft", "dpo", "reward", "evaluate", "quantize", "register"]


def get_stage(name: str) -> Stage:
    """The stage called ``name``."""
    if name not in ORDER:
        raise PipelineError(f"unknown stage {name!r}; stages: {', '.join(ORDER)}")
    stage = importlib.import_module(f"pipeline.stages.{name}").STAGE
    assert stage.name == name, f"pipeline/stages/{name}.py declares stage {stage.name!r}"
    return stage


def producer(artifact: str) -> str | None:
    """The stage whose default output is ``artifact`` (None: no stage writes it unless a config renames its output)."""
    return next((name for name in ORDER if get_stage(name).OUTPUT == artifact), None)


def load_config(stage: str, path: str | None = None, overrides: list[str] | None = None) -> StrictModel:
    """A stage's config from YAML (or its defaults) with ``--set`` overrides, validated."""
    from pipeline import config

    return config.load_config(get_stage(stage).config, path, overrides)
