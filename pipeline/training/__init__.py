"""Distributed training: the launcher (PyTorchJob env -> torchrun, an entry point), the shipped DeepSpeed
configs, the stages' configs (:mod:`.config`), and the libraries the training stages run:
:mod:`.pretrain`, :mod:`.posttrain` (sft / dpo / reward on TRL), :mod:`.checkpoint` (where checkpoints
are written) and :mod:`.common` (precision, DeepSpeed, TrainingArguments, export). Light to import."""

from __future__ import annotations

from pathlib import Path

from pipeline.localserver import free_port  # noqa: F401  (re-exported: the launchers' rendezvous port)

DEEPSPEED_DIR = Path(__file__).parent / "deepspeed"


def deepspeed_config_path(stage: int, offload: bool = False) -> Path:
    """The shipped DeepSpeed JSON for ZeRO ``stage`` (1, 2, 3), optionally its CPU-offload variant."""
    if stage not in (1, 2, 3):
        raise ValueError(f"ZeRO stage must be 1, 2 or 3, got {stage}")
    return DEEPSPEED_DIR / f"zero{stage}{'-offload' if offload else ''}.json"


