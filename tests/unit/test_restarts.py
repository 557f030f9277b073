"""The restart budget (pipeline/training/restarts.py) on a tmp folder with the environment passed in: what a start
counts, when progress resets the count, when it gives up, and the limit's parsing."""

from __future__ import annotations

import json

import pytest

from pipeline.errors import ConfigError, PipelineError
from pipeline.training.restarts import RESTARTS_FILE, RestartBudgetExceeded, count_start, restart_limit


def record(root):
    return json.loads((root / RESTARTS_FILE).read_text())


def test_local_runs_count_nothing(tmp_path):
    for env in ({}, {"LLMPIPE_JOB_ID": ""}, {"LLMPIPE_JOB_ID": "  ", "LLMPIPE_MAX_RESTARTS": "junk"}):
        assert count_start("pretrain", tmp_path / "ck", 0, env=env) is None
    assert count_start("pretrain", tmp_path / "ck", 0, main=False, env={"LLMPIPE_JOB_ID": "j"}) is None
    assert not (tmp_path / "ck").exists()


def test_starts_from_one_step_are_counted_until_the_limit(tmp_path):
    lines: list[str] = []
    env = {"LLMPIPE_JOB_ID": "run-1", "LLMPIPE_MAX_RESTARTS": "3"}
    root = tmp_path / "checkpoints" / "pretrain"  # not there yet: created
    assert count_start("pretrain", root, 1200, env=env, log=lines.append) == 1
    assert record(root) == {"job": "run-1", "step": 1200, "starts": 1} and lines == []
    for n in (2, 3, 4):
        assert count_start("pretrain", root, 1200, env=env, log=lines.append) == n
    assert lines == [f"pretrain: restart {k}/3 from step 1200 (job run-1)" for k in (1, 2, 3)]
    with pytest.raises(RestartBudgetExceeded) as err:
        count_start("pretrain", root, 1200, env=env, log=lines.append)
    assert str(err.value) == ("pretrain: started 5 times from step 1200 without reaching a new checkpoint "
                              "(LLMPIPE_MAX_RESTARTS=3): giving up; the earlier pods' logs say why")
    assert isinstance(err.value, PipelineError) and err.value.exit_code == 1
    assert record(root)["starts"] == 5
    assert sorted(p.name for p in root.iterdir()) == [RESTARTS_FILE]  # written atomically: no temporary left


def test_progress_or_another_job_starts_the_count_again(tmp_path):
    env = {"LLMPIPE_JOB_ID": "a", "LLMPIPE_MAX_RESTARTS": "1"}
    assert count_start("sft", tmp_path, 0, env=env) == 1
    assert count_start("sft", tmp_path, 0, env=env) == 2  # restart 1/1
    assert count_start("sft", tmp_path, 200, env=env) == 1  # a new checkpoint was reached
    assert count_start("sft", tmp_path, 200, env=env) == 2
    with pytest.raises(RestartBudgetExceeded, match="sft: started 3 times from step 200 "):
        count_start("sft", tmp_path, 200, env=env)
    assert count_start("sft", tmp_path, 200, env={**env, "LLMPIPE_JOB_ID": "b"}) == 1  # a new deploy
    assert record(tmp_path) == {"job": "b", "step": 200, "starts": 1}


def test_no_restarts_allowed_and_a_default_limit(tmp_path):
    env = {"LLMPIPE_JOB_ID": "j", "LLMPIPE_MAX_RESTARTS": "0"}
    count_start("dpo", tmp_path / "a", 0, env=env)
    with pytest.raises(RestartBudgetExceeded, match=r"started 2 times from step 0 .*LLMPIPE_MAX_RESTARTS=0"):
        count_start("dpo", tmp_path / "a", 0, env=env)
    env = {"LLMPIPE_JOB_ID": "j"}  # default 3
    assert [count_start("reward", tmp_path / "b", 7, env=env) for _ in range(4)] == [1, 2, 3, 4]
    with pytest.raises(RestartBudgetExceeded, match="LLMPIPE_MAX_RESTARTS=3"):
        count_start("reward", tmp_path / "b", 7, env=env)


def test_an_unreadable_record_is_a_first_start(tmp_path):
    (tmp_path / RESTARTS_FILE).write_text("{not json")
    assert count_start("sft", tmp_path, 4, env={"LLMPIPE_JOB_ID": "j"}) == 1
    (tmp_path / RESTARTS_FILE).write_text('["a list"]')
    assert count_start("sft", tmp_path, 4, env={"LLMPIPE_JOB_ID": "j"}) == 1


@pytest.mark.parametrize("raw", ["three", "-1", "1.5"])
def test_a_bad_limit_is_a_config_error_naming_the_variable(tmp_path, raw):
    with pytest.raises(ConfigError, match=f"LLMPIPE_MAX_RESTARTS='{raw}' is not a whole number"):
        count_start("pretrain", tmp_path, 0, env={"LLMPIPE_JOB_ID": "j", "LLMPIPE_MAX_RESTARTS": raw})
    assert not (tmp_path / RESTARTS_FILE).exists()
    assert restart_limit({}) == 3 and restart_limit({"LLMPIPE_MAX_RESTARTS": " 5 "}) == 5
