"""One module per stage; imported lazily so `llmpipe --help` stays fast."""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Callable

ORDER = ["collect", "clean", "tokenizer", "pack"]


def _loader(name: str) -> Callable[[], ModuleType]:
    return lambda: importlib.import_module(f"pipeline.stages.{name}")


STAGES: dict[str, Callable[[], ModuleType]] = {name: _loader(name) for name in ORDER}

# artifact folder under the run root -> the stage that writes it
PRODUCER = {"raw": "collect", "clean": "clean", "tokenizer": "tokenizer", "shards": "pack"}
