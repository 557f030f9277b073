"""The checkpoint component on a tmp folder, in one process: where checkpoints go, the latest complete one, save /
commit with the COMPLETE marker and atomic rename, pruning to ``keep``, and resume with the data state."""

from __future__ import annotations

import json

import pytest

from pipeline.errors import ConfigError, PipelineError
from pipeline.training.checkpoint import (
    COMPLETE,
    DATA_STATE,
    CheckpointManager,
    checkpoint_root,
    latest_checkpoint,
    list_checkpoints,
)


def manager(root, keep=2, every=4, chash="h1"):
    return CheckpointManager(root, every=every, keep=keep, config_hash=chash, main=True)


def save(m: CheckpointManager, step: int, payload: str = "w") -> None:
    """What the Trainer does inside ``saving``: writes checkpoint-N/ into the staging folder."""
    with m.saving(step, lambda: {"step": step, "phase": 0, "phase_start_index": step * 8}, written=f"checkpoint-{step}") as staging:
        assert staging == m.root / f".tmp-step-{step}" and staging.is_dir()
        (staging / f"checkpoint-{step}").mkdir()
        (staging / f"checkpoint-{step}" / "model.safetensors").write_text(payload)


def test_where_checkpoints_go(tmp_path):
    m = manager(tmp_path / "ck")
    assert m.step_dir(12) == tmp_path / "ck" / "step-12"
    assert m.staging_dir(12) == tmp_path / "ck" / ".tmp-step-12"
    assert m.trainer_arguments() == {"output_dir": str(tmp_path / "ck"), "save_strategy": "steps", "save_steps": 4}
    assert manager(tmp_path, every=0).trainer_arguments() == {"output_dir": str(tmp_path), "save_strategy": "no"}

    class Cfg:
        checkpoint_dir = None

    class Local:
        is_local, uri = True, "/run"

        def path(self, *parts):
            return "/run/" + "/".join(parts)

    class Remote:
        is_local, uri = False, "s3://bucket/run"

    assert checkpoint_root(Cfg(), Local()) == tmp_path.__class__("/run/checkpoints/pretrain")
    assert checkpoint_root(Cfg(), Local(), "sft") == tmp_path.__class__("/run/checkpoints/sft")
    with pytest.raises(ConfigError, match="set checkpoint_dir to a mounted folder"):
        checkpoint_root(Cfg(), Remote())
    with pytest.raises(ConfigError, match="set checkpoint_dir to a mounted folder"):
        checkpoint_root(Cfg(), Remote(), "dpo")
    Cfg.checkpoint_dir = str(tmp_path / "mine")
    assert checkpoint_root(Cfg(), Remote()) == tmp_path / "mine"


def test_save_commits_atomically_and_prunes(tmp_path):
    m = manager(tmp_path / "ck", keep=2)
    assert m.latest() is None and m.complete() == []
    for step in (4, 8, 12):
        save(m, step)
    assert [s for s, _ in m.complete()] == [8, 12]  # step-4 pruned: keep 2
    assert sorted(p.name for p in m.root.iterdir()) == ["step-12", "step-8"]  # no staging left behind
    step, path = m.latest()
    assert step == 12 and (path / COMPLETE).is_file() and (path / "model.safetensors").read_text() == "w"
    assert json.loads((path / COMPLETE).read_text())["step"] == 12
    state = json.loads((path / DATA_STATE).read_text())
    assert state == {"step": 12, "phase": 0, "phase_start_index": 96, "config_hash": "h1"}
    # a rerun that reaches the same step replaces the checkpoint
    save(m, 12, payload="again")
    assert (m.step_dir(12) / "model.safetensors").read_text() == "again"
    assert [s for s, _ in m.complete()] == [8, 12]


def test_a_failed_write_commits_nothing(tmp_path):
    m = manager(tmp_path / "ck")
    with pytest.raises(RuntimeError):
        with m.saving(4, lambda: {}, written="checkpoint-4") as staging:
            (staging / "checkpoint-4").mkdir()
            raise RuntimeError("disk full")
    assert m.latest() is None and m.staging_dir(4).is_dir()


def test_resume_reads_the_latest_complete_one_and_clears_staging(tmp_path):
    m = manager(tmp_path / "ck", keep=3)
    assert m.resume() is None  # no folder yet
    for step in (4, 8):
        save(m, step)
    (m.root / "step-12").mkdir()  # killed before COMPLETE
    m.staging_dir(16).mkdir()  # killed while writing
    point = m.resume()
    assert point.step == 8 and point.path == m.step_dir(8) and point.data_state["phase_start_index"] == 64
    assert point.has_hf_weights
    assert not m.staging_dir(16).exists()
    (point.path / "model.safetensors").unlink()
    assert not m.resume().has_hf_weights
    with pytest.raises(PipelineError, match="written by a different pretrain config; delete"):
        manager(tmp_path / "ck", chash="h2").resume()


def test_module_level_discovery(tmp_path):
    for name, complete in [("step-4", True), ("step-8", True), ("step-12", False), (".tmp-step-16", True), ("other", True)]:
        (tmp_path / name).mkdir()
        if complete:
            (tmp_path / name / "COMPLETE").write_text("{}")
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4, 8]
    assert latest_checkpoint(tmp_path)[0] == 8
    assert latest_checkpoint(tmp_path / "missing") is None


def test_data_position_carries_on_across_a_resume():
    """The data state a checkpoint stores lets a resumed stream report the same positions as an uninterrupted one,
    across a phase boundary."""
    from pipeline.training.config import DataPhase
    from pipeline.training.pretrain import TrainStream, phase_at, plan_phases

    plan = plan_phases([DataPhase(name="a", shards="s1", until_step=5), DataPhase(name="b", shards="s2")], 12)
    data = [list(range(40)), list(range(30))]
    kw = dict(rank=0, world=2, micro=2, accum=2, seed=3, shuffle=True)
    full = TrainStream(data, plan, start_step=0, start_index=0, **kw)
    for resume_at in (3, 5, 7):
        state = full.position(resume_at)
        index = state["phase_start_index"] if state["phase"] == phase_at(plan, resume_at) else 0
        resumed = TrainStream(data, plan, start_step=resume_at, start_index=index, **kw)
        for step in range(resume_at, 13):
            assert resumed.position(step) == full.position(step), (resume_at, step)
    assert full.position(5)["phase_name"] == "b" and full.position(5)["phase_start_index"] == 0
    assert full.position(7)["phase_start_index"] == 2 * 8


@pytest.mark.parametrize("stage", ["pretrain", "sft", "dpo", "reward"])
def test_every_training_stage_has_the_same_checkpoint_keys(tmp_path, stage):
    """pretrain's and post-training's configs share checkpoint_dir / checkpoint_every / keep_checkpoints / resume
    (execution-only: not in the config hash); for_stage puts a stage's checkpoints under checkpoints/<stage>/ and
    refuses a checkpoint another config of the same stage wrote."""
    from pipeline.config import config_hash, execution_only
    from pipeline.stages import get_stage
    from pipeline.storage import Storage

    cls = get_stage(stage).config
    base = {"max_steps": 10, "global_batch_tokens": 64} if stage == "pretrain" else {"data": [{"path": "x.jsonl"}]}
    cfg = cls.model_validate(base)
    assert {"checkpoint_dir", "checkpoint_every", "keep_checkpoints", "resume"} <= execution_only(cls)
    assert cfg.checkpoint_dir is None and cfg.resume is True
    assert (cfg.checkpoint_every, cfg.keep_checkpoints) == ((500, 3) if stage == "pretrain" else (200, 2))
    assert config_hash(cfg) == config_hash(cls.model_validate({**base, "checkpoint_every": 7, "resume": False}))
    m = CheckpointManager.for_stage(stage, cfg, Storage(str(tmp_path)), main=True)
    assert m.root == tmp_path / "checkpoints" / stage and m.every == cfg.checkpoint_every and m.keep == cfg.keep_checkpoints
    save(m, 4)
    other = cls.model_validate({**base, "seed": 1})
    with pytest.raises(PipelineError, match=f"written by a different {stage} config; delete"):
        CheckpointManager.for_stage(stage, other, Storage(str(tmp_path)), main=True).resume()
    mine = CheckpointManager.for_stage(stage, cfg.model_copy(update={"checkpoint_dir": str(tmp_path / "ck")}),
                                       Storage(str(tmp_path)), main=True)
    assert mine.root == tmp_path / "ck" and mine.resume() is None
