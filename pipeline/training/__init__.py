"""Distributed training: the launcher (PyTorchJob env -> torchrun), shipped DeepSpeed configs, and the
pretraining loop library (:mod:`pipeline.training.pretrain`)."""

from __future__ import annotations

from pathlib import Path

DEEPSPEED_DIR = Path(__file__).parent / "deepspeed"


def deepspeed_config_path(stage: int, offload: bool = False) -> Path:
    """The shipped DeepSpeed JSON for ZeRO ``stage`` (1, 2, 3), optionally its CPU-offload variant."""
    if stage not in (1, 2, 3):
        raise ValueError(f"ZeRO stage must be 1, 2 or 3, got {stage}")
    return DEEPSPEED_DIR / f"zero{stage}{'-offload' if offload else ''}.json"
