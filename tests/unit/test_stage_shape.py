"""Every stage has the one declared shape of pipeline/stage.py; configs mark their execution-only fields
themselves; imports point down (core <- library <- stages <- runner / CLI)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from pipeline.config import StrictModel, config_hash, execution_only
from pipeline.stage import ShardedStage, Stage
from pipeline.stages import ORDER, get_stage, producer

PKG = Path(__file__).resolve().parents[2] / "pipeline"


@pytest.mark.parametrize("name", ORDER)
def test_every_stage_has_the_declared_shape(name):
    stage = get_stage(name)
    assert isinstance(stage, Stage) and stage.name == name
    assert issubclass(stage.config, StrictModel)
    assert stage.OUTPUT and stage.output(None) == stage.OUTPUT
    kind = type(stage)
    if stage.sharded:
        assert isinstance(stage, ShardedStage)
        assert kind.merge is not ShardedStage.merge
        if kind.STEPS:  # a stage in steps: a step_<name> method per step, no run_part
            assert all(callable(getattr(stage, f"step_{step.name}", None)) for step in kind.STEPS)
            assert len({step.name for step in kind.STEPS}) == len(kind.STEPS)
        else:
            assert kind.run_part is not ShardedStage.run_part
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
CKPT = {"checkpoint_dir", "checkpoint_every", "keep_checkpoints", "resume"}  # every training stage's
EXECUTION_ONLY = {
    "collect": set(), "clean": {"workers"}, "tokenizer": set(), "pack": {"workers", "batch_size"}, "init": set(),
    "pretrain": {"checkpoint_dir", "checkpoint_every", "keep_checkpoints", "resume", "eval_every", "eval_max_blocks",
                 "log_every", "generation", "peak_flops", "cpu_peak_flops", "dataloader_workers", "verify_shards",
                 "attention", "compile", "liger_kernels"},
    "sft": {*CKPT, "log_every", "eval_every", "generation"}, "dpo": {*CKPT, "log_every", "eval_every", "generation"},
    "reward": {*CKPT, "log_every", "eval_every"}, "evaluate": set(), "quantize": {"threads", "batch_size"},
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


# ---------------------------------------------------------------------------------------- layers

CORE = {"pipeline", "pipeline.errors", "pipeline.config", "pipeline.storage", "pipeline.stage"}
# entry points: they may import anything (they run stages); nothing below imports them
ENTRY = {"pipeline.runner", "pipeline.cli", "pipeline.summary", "pipeline.k8s.cli", "pipeline.training.launcher",
         "pipeline.fabric"}  # llmpipe fabric-check: launches torchrun like a training stage, runs no stage


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every pipeline module imported anywhere in the file (function bodies too), except under TYPE_CHECKING."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("pipeline"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pipeline"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return found


def _layer(module: str) -> str:
    if module in CORE:
        return "core"
    if module in ENTRY:
        return "entry"
    if module == "pipeline.stages" or module.startswith("pipeline.stages."):
        return "stages"
    return "library"


def test_imports_point_down():
    known = {_module_name(p) for p in PKG.rglob("*.py")}
    allowed = {"core": {"core"}, "library": {"core", "library"}, "stages": {"core", "library", "stages"},
               "entry": {"core", "library", "stages", "entry"}}
    wrong = []
    for path in sorted(PKG.rglob("*.py")):
        me = _module_name(path)
        for target in _imports(path):
            if target not in known:  # `from pipeline.x import name`: the name, not a module
                continue
            if _layer(target) not in allowed[_layer(me)]:
                wrong.append(f"{me} ({_layer(me)}) imports {target} ({_layer(target)})")
    assert wrong == []
