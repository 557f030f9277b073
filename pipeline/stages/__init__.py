"""One module per stage; imported lazily so `llmpipe --help` stays fast."""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Callable

# what `llmpipe pipeline` runs, in order
ORDER = ["collect", "clean", "tokenizer", "pack", "init", "pretrain", "sft", "dpo", "reward", "evaluate", "quantize", "register"]
# distributed training stages: one in-process rank, or torchrun through pipeline.training.launcher
# (`llmpipe run STAGE --nproc-per-node N`, or a PyTorchJob's $PET_* environment)
TRAINING = ["pretrain", "sft", "dpo", "reward"]


def _loader(name: str) -> Callable[[], ModuleType]:
    return lambda: importlib.import_module(f"pipeline.stages.{name}")


STAGES: dict[str, Callable[[], ModuleType]] = {name: _loader(name) for name in ORDER}

# artifact folder under the run root -> the stage that writes it
PRODUCER = {
    "raw": "collect",
    "clean": "clean",
    "tokenizer": "tokenizer",
    "shards": "pack",
    "models/init": "init",
    "models/pretrain": "pretrain",
    "models/sft": "sft",
    "models/dpo": "dpo",
    "models/reward": "reward",
    "eval": "evaluate",
    "quantized": "quantize",
    "registry": "register",
}
