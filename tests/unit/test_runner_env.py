"""A stage leaves no ACCELERATE_* variables behind for the next stage of the same process."""

import os

from pipeline import runner


def test_accelerate_variables_set_by_a_stage_are_removed_and_earlier_ones_restored(monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    with runner._accelerate_env():
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"  # what TrainingArguments(deepspeed=...) does
        os.environ["ACCELERATE_MIXED_PRECISION"] = "bf16"
    assert "ACCELERATE_USE_DEEPSPEED" not in os.environ
    assert os.environ["ACCELERATE_MIXED_PRECISION"] == "no"
