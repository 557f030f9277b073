"""Every stage has the one declared shape of pipeline/stage.py; configs mark their execution-only fields
themselves."""

from __future__ import annotations

import pytest

from pipeline.config import StrictModel, config_hash, execution_only
from pipeline.stage import ShardedStage, Stage
from pipeline.stages import ORDER, get_stage, producer


@pytest.mark.parametrize("name", ORDER)
def test_every_stage_has_the_declared_shape(name):
    stage = get_stage(name)
    assert isinstance(stage, Stage) and stage.name == name
    assert issubclass(stage.config, StrictModel)
    assert stage.OUTPUT and stage.output(None) == stage.OUTPUT
    kind = type(stage)
    if stage.sharded:
        assert isinstance(stage, ShardedStage)
        assert kind.run_part is not ShardedStage.run_part and kind.merge is not ShardedStage.merge
    else:
        assert kind.run is not Stage.run


def test_what_was_restated_is_derived():
    # round 1 kept these as tables beside the stages; they now come from the stages themselves
    assert {get_stage(s).OUTPUT: s for s in ORDER} == {
        "raw": "collect", "clean": "clean", "tokenizer": "tokenizer", "shards": "pack", "models/init": "init",
        "models/pretrain": "pretrain", "models/sft": "sft", "models/dpo": "dpo", "models/reward": "reward",
        "eval": "evaluate", "quantized": "quantize", "registry": "register"}
    assert producer("shards") == "pack" and producer("shards-clean") is None
    assert [s for s in ORDER if get_stage(s).distributed] == ["pretrain", "sft", "dpo", "reward"]
    assert [s for s in ORDER if get_stage(s).sharded] == ["clean", "pack"]
    assert [s for s in ORDER if get_stage(s).renamable()] == ["clean", "pack"]


# the execution-only fields of round 1's EXEC_FIELDS sets, now marked on the fields themselves
EXECUTION_ONLY = {
    "collect": set(), "clean": {"workers"}, "tokenizer": set(), "pack": {"workers", "batch_size"}, "init": set(),
    "pretrain": {"checkpoint_dir", "checkpoint_every", "keep_checkpoints", "resume", "eval_every", "eval_max_blocks",
                 "log_every", "generation", "peak_flops", "cpu_peak_flops", "dataloader_workers", "verify_shards",
                 "attention", "compile", "liger_kernels"},
    "sft": {"log_every", "eval_every", "generation"}, "dpo": {"log_every", "eval_every", "generation"},
    "reward": {"log_every", "eval_every"}, "evaluate": set(), "quantize": {"threads", "batch_size"},
    "register": {"promote", "auto_promote"},
}


@pytest.mark.parametrize("name", ORDER)
def test_execution_only_markers_name_real_fields_and_leave_the_hash_alone(name):
    model = get_stage(name).config
    marked = execution_only(model)
    assert marked == EXECUTION_ONLY[name]
    assert marked <= set(model.model_fields)  # every marker is on a real field of the stage's config
    assert not hasattr(model, "EXEC_FIELDS")  # no second, far-away list to drift from the fields


def test_an_execution_only_field_does_not_change_the_hash_but_another_does():
    from pipeline.stages import load_config

    base = load_config("pack")
    assert config_hash(load_config("pack", None, ["workers=7", "batch_size=3"])) == config_hash(base)
    assert config_hash(load_config("pack", None, ["seq_len=64"])) != config_hash(base)
