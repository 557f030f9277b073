"""sft / dpo / reward checkpoint and resume on CPU (the tiny Llama of test_posttrain.py), in process.

A run is interrupted by an exception from a Trainer callback at the start of step k (the steps after the last
checkpoint are lost, as with a killed pod); the same config run again resumes from the newest complete checkpoint and
must end where an uninterrupted run ends: same final step, same batches after the resume point, same loss history
and the same weights. A run interrupted after its last checkpoint but before the export exports that checkpoint
without training further. Then the restart budget: starts from the same checkpoint on one job id are counted and the
stage gives up past LLMPIPE_MAX_RESTARTS.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from tests.fixtures.posttrain.tiny import template_root  # noqa: F401 (a fixture)

REPO = Path(__file__).resolve().parents[2]
FIX = REPO / "tests" / "fixtures" / "posttrain"




def _cfg(stage: str, **over):
    from pipeline.stages import get_stage

    base = {"max_length": 128, "micro_batch_size": 8, "warmup_ratio": 0.0, "log_every": 1, "seed": 0,
            "checkpoint_every": 4, "keep_checkpoints": 2}
    if stage == "sft":
        # 140 training conversations / 8 = 18 batches an epoch: 24 steps cross an epoch boundary
        base.update(data=[{"path": str(FIX / "alpaca.jsonl")}, {"path": str(FIX / "chat.jsonl")}], max_steps=24, lr=3e-3)
    else:
        # 48 training pairs / 8 = 6 batches an epoch
        base.update(data=[{"path": str(FIX / "preferences.jsonl")}], model="models/pretrain", eval_fraction=0.2,
                    max_steps=16, lr=5e-4 if stage == "dpo" else 1e-3)
    base.update(over)
    return get_stage(stage).config.model_validate(base)


class Preempted(Exception):
    """What the interruption raises (a test's stand-in for a killed pod)."""


@pytest.fixture
def trainer_spy(monkeypatch):
    """Every TRL trainer the stages build gets a callback that raises Preempted at the start of step ``at`` (or at the
    end of training with ``at="end"``), and a record of the batches it trains on: (global step, a checksum of the
    input ids)."""
    from transformers import TrainerCallback

    from pipeline.training.posttrain import trainers

    spy = {"at": None, "batches": []}

    class Interrupt(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if spy["at"] == state.global_step:
                raise Preempted(f"interrupted at step {state.global_step}")

        def on_train_end(self, args, state, control, **kw):
            if spy["at"] == "end":
                raise Preempted("interrupted before the export")

    quiet = trainers.PostTrainRun.quiet

    def spied(self, trainer):
        trainer = quiet(self, trainer)
        trainer.add_callback(Interrupt())
        compute_loss = trainer.compute_loss

        def recorded(model, inputs, *a, **k):
            if model.training:
                key = "input_ids" if "input_ids" in inputs else "chosen_input_ids"
                spy["batches"].append((trainer.state.global_step, int(inputs[key].sum())))
            return compute_loss(model, inputs, *a, **k)

        trainer.compute_loss = recorded
        return trainer

    monkeypatch.setattr(trainers.PostTrainRun, "quiet", spied)
    return spy


def _run(stage: str, root: Path, cfg):
    from pipeline import runner
    from pipeline.storage import Storage

    t0 = time.time()
    outcome = runner.run_stage(stage, cfg, Storage(str(root)), progress=False)
    print(f"{stage}: {time.time() - t0:.1f}s")
    return outcome


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def _losses(folder: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (folder / "train_metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def _steps(root: Path, stage: str) -> list[str]:
    return sorted((p.name for p in (root / "checkpoints" / stage).iterdir() if p.name not in ("restarts.json", ".lock")),
                  key=lambda n: int(n.split("-")[-1]))


@pytest.mark.parametrize("stage,interrupt_at", [("sft", 10), ("dpo", 6), ("reward", 14)])
def test_interrupted_run_resumes_and_matches_an_uninterrupted_one(template_root, tmp_path, trainer_spy, capfd,
                                                                  stage, interrupt_at):
    import torch

    t0 = time.time()
    cfg = _cfg(stage)
    ref_root, root = tmp_path / "ref", tmp_path / "run"
    shutil.copytree(template_root, ref_root)
    shutil.copytree(template_root, root)
    ref = _run(stage, ref_root, cfg).manifest["metrics"]
    ref_batches, trainer_spy["batches"] = trainer_spy["batches"], []
    assert ref["steps"] == cfg.max_steps and ref["resumed_from_step"] is None
    assert _steps(ref_root, stage) == [f"step-{cfg.max_steps - 4}", f"step-{cfg.max_steps}"]  # keep 2, the last one too

    # interrupted: the steps after the last checkpoint are lost, nothing is committed
    trainer_spy["at"] = interrupt_at
    with pytest.raises(Preempted):
        _run(stage, root, cfg)
    resume_at = interrupt_at // 4 * 4  # steps 1..interrupt_at ran; a checkpoint every 4
    assert _steps(root, stage) == [f"step-{s}" for s in (resume_at - 4, resume_at) if s > 0]
    assert all((root / "checkpoints" / stage / s / "COMPLETE").is_file() for s in _steps(root, stage))
    assert not (root / "models" / stage).exists()
    assert max(s for s, _ in trainer_spy["batches"]) == interrupt_at - 1

    # the same config again: resumes from the newest complete checkpoint, ends where the uninterrupted run did
    trainer_spy["at"], trainer_spy["batches"] = None, []
    capfd.readouterr()
    got = _run(stage, root, cfg).manifest["metrics"]
    assert f"{stage}: resuming from step {resume_at} ({root / 'checkpoints' / stage / f'step-{resume_at}'})" in capfd.readouterr().err
    assert got["resumed_from_step"] == resume_at and got["steps"] == ref["steps"] == cfg.max_steps
    assert trainer_spy["batches"] == [b for b in ref_batches if b[0] >= resume_at]  # the seen batches are skipped
    out, ref_out = root / "models" / stage, ref_root / "models" / stage
    # one loss per step, those before the checkpoint from its trainer_state.json, the same as the uninterrupted run's
    assert [s for s, _ in _losses(out)] == [s for s, _ in _losses(ref_out)] == list(range(1, cfg.max_steps + 1))
    assert [v for _, v in _losses(out)] == pytest.approx([v for _, v in _losses(ref_out)], rel=1e-5)
    want, have = _weights(ref_out), _weights(out)
    assert want.keys() == have.keys()
    for name in want:
        torch.testing.assert_close(have[name], want[name], atol=1e-5, rtol=1e-5, msg=name)
    print(f"{stage} resume test: {time.time() - t0:.1f}s")


def test_sft_interrupted_before_the_export_exports_its_last_checkpoint(template_root, tmp_path, trainer_spy, capfd):
    """Killed after the checkpoint at max_steps but before the export (24 steps: mid-epoch, where the Trainer would
    run one step past max_steps): the rerun loads that checkpoint, trains nothing and exports it."""
    cfg = _cfg("sft", packing=True, micro_batch_size=2)
    ref_root, root = tmp_path / "ref", tmp_path / "run"
    shutil.copytree(template_root, ref_root)
    shutil.copytree(template_root, root)
    _run("sft", ref_root, cfg)
    trainer_spy["at"] = "end"
    with pytest.raises(Preempted):
        _run("sft", root, cfg)
    assert _steps(root, "sft") == ["step-20", "step-24"] and not (root / "models" / "sft").exists()
    trainer_spy["at"], trainer_spy["batches"] = None, []
    capfd.readouterr()
    m = _run("sft", root, cfg).manifest["metrics"]
    assert "sft: checkpoint at step 24 already reaches max_steps: exporting it" in capfd.readouterr().err
    assert m["steps"] == 24 and m["resumed_from_step"] == 24 and trainer_spy["batches"] == []
    assert m["packing"] and m["eval_loss_after"] < m["eval_loss_before"]
    want, have = _weights(ref_root / "models" / "sft"), _weights(root / "models" / "sft")
    assert all(bool((want[k] == have[k]).all()) for k in want)
    assert _losses(root / "models" / "sft") == _losses(ref_root / "models" / "sft")


def test_resume_false_and_no_checkpoints(template_root, tmp_path, trainer_spy):
    """``resume: false`` starts over beside the old checkpoints; ``checkpoint_every: 0`` writes none."""
    root = tmp_path / "run"
    shutil.copytree(template_root, root)
    trainer_spy["at"] = 6
    with pytest.raises(Preempted):
        _run("reward", root, _cfg("reward"))
    assert _steps(root, "reward") == ["step-4"]
    trainer_spy["at"], trainer_spy["batches"] = None, []
    m = _run("reward", root, _cfg("reward", resume=False)).manifest["metrics"]
    assert m["resumed_from_step"] is None and trainer_spy["batches"][0][0] == 0 and m["steps"] == 16
    assert _steps(root, "reward") == ["step-12", "step-16"]
    shutil.rmtree(root / "checkpoints")
    m = _run("reward", root, _cfg("reward", checkpoint_every=0, max_steps=4)).manifest["metrics"]
    assert m["steps"] == 4 and _steps(root, "reward") == []  # (the Trainer makes its output_dir, and leaves it empty)


def test_restart_budget_counts_starts_without_progress(template_root, tmp_path, trainer_spy, monkeypatch):
    """With LLMPIPE_JOB_ID set (as on a cluster), starts from the same checkpoint are counted in restarts.json; a
    start from a newer one resets the count; past LLMPIPE_MAX_RESTARTS the stage fails (exit 1) before any weights
    load."""
    import transformers

    from pipeline.training.restarts import RestartBudgetExceeded

    monkeypatch.setenv("LLMPIPE_JOB_ID", "sft-test-1")
    monkeypatch.setenv("LLMPIPE_MAX_RESTARTS", "1")
    root = tmp_path / "run"
    shutil.copytree(template_root, root)
    cfg = _cfg("sft", max_steps=12)
    record = root / "checkpoints" / "sft" / "restarts.json"
    for at, want in ((6, {"step": 0, "starts": 1}), (6, {"step": 4, "starts": 1}), (6, {"step": 4, "starts": 2})):
        trainer_spy["at"] = at
        with pytest.raises(Preempted):
            _run("sft", root, cfg)
        assert json.loads(record.read_text()) == {"job": "sft-test-1", **want}

    def no_weights(*a, **k):
        raise AssertionError("weights were loaded before the restart budget was checked")

    with monkeypatch.context() as m:
        m.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_weights)
        with pytest.raises(RestartBudgetExceeded, match=r"^sft: started 3 times from step 4 without reaching a new "
                                                        r"checkpoint \(LLMPIPE_MAX_RESTARTS=1\): giving up") as err:
            _run("sft", root, cfg)
    assert err.value.exit_code == 1
    # a new deploy (another job id) starts a fresh count and finishes from the checkpoint
    monkeypatch.setenv("LLMPIPE_JOB_ID", "sft-test-2")
    trainer_spy["at"] = None
    assert _run("sft", root, cfg).manifest["metrics"]["resumed_from_step"] == 4
    assert json.loads(record.read_text()) == {"job": "sft-test-2", "step": 4, "starts": 1}


# ------------------------------------------------------------------------------------ launcher


def _env() -> dict[str, str]:
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK") and not k.startswith("PET_")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    return env


def _launch_cmd(stage: str, cfg_path: Path, root: Path) -> list[str]:
    import sys

    return [sys.executable, "-m", "pipeline.training.launcher", stage, "-c", str(cfg_path), "--root", str(root),
            "--nproc-per-node", "2", "--no-progress"]


@pytest.mark.slow
def test_sft_killed_rank_under_zero2_resumes_exactly(template_root, tmp_path):
    """sft on 2 ranks with ZeRO-2 through the launcher: rank 1 is SIGKILLed once the step-4 checkpoint is complete;
    the launch fails, the rerun resumes from the newest complete checkpoint (DeepSpeed's shards from both ranks) and
    ends like an uninterrupted run: the same steps, the same loss history, the same weights within tolerance."""
    import os
    import signal
    import subprocess

    import psutil
    import torch
    import yaml

    steps = 30
    cfg = {"data": [{"path": str(FIX / "alpaca.jsonl")}, {"path": str(FIX / "chat.jsonl")}], "max_length": 128,
           "micro_batch_size": 4, "max_steps": steps, "lr": 3e-3, "warmup_ratio": 0.0, "log_every": 1,
           "zero_stage": 2, "checkpoint_every": 2, "keep_checkpoints": 2,
           "generation": {"prompts": ["Repeat the word.\napple"], "max_new_tokens": 4}}
    path = tmp_path / "sft.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    ref_root, root = tmp_path / "ref", tmp_path / "killed"
    shutil.copytree(template_root, ref_root)
    shutil.copytree(template_root, root)
    t0 = time.time()
    ref = subprocess.run(_launch_cmd("sft", path, ref_root), cwd=REPO, env=_env(), capture_output=True, text=True,
                         timeout=600)
    assert ref.returncode == 0, ref.stderr[-4000:]

    log = open(tmp_path / "killed.log", "w")
    proc = subprocess.Popen(_launch_cmd("sft", path, root), cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT)
    marker = root / "checkpoints" / "sft" / "step-4" / "COMPLETE"
    deadline = time.time() + 400
    while not marker.exists():
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline, "the run never reached the step-4 checkpoint"
        time.sleep(0.05)
    workers = [p for p in psutil.Process(proc.pid).children(recursive=True)
               if "LOCAL_RANK" in (p.environ() if p.is_running() else {})]
    os.kill(next(p for p in workers if p.environ().get("RANK") == "1").pid, signal.SIGKILL)
    assert proc.wait(timeout=300) != 0
    log.close()
    assert not (root / "models" / "sft").exists()
    from pipeline.training.checkpoint import latest_checkpoint

    resume_step = latest_checkpoint(root / "checkpoints" / "sft")[0]
    assert 4 <= resume_step < steps, resume_step

    again = subprocess.run(_launch_cmd("sft", path, root), cwd=REPO, env=_env(), capture_output=True, text=True,
                           timeout=600)
    print(f"sft kill + resume test: {time.time() - t0:.1f}s (resumed from step {resume_step})")
    assert again.returncode == 0, again.stderr[-4000:]
    assert f"sft: resuming from step {resume_step}" in again.stderr
    m = json.loads((root / "models" / "sft" / "manifest.json").read_text())["metrics"]
    assert m["resumed_from_step"] == resume_step and m["steps"] == steps and m["world_size"] == 2
    got_losses, ref_losses = _losses(root / "models" / "sft"), _losses(ref_root / "models" / "sft")
    assert [s for s, _ in got_losses] == [s for s, _ in ref_losses] == list(range(1, steps + 1))
    assert [v for _, v in got_losses] == pytest.approx([v for _, v in ref_losses], rel=1e-4, abs=1e-5)
    want, have = _weights(ref_root / "models" / "sft"), _weights(root / "models" / "sft")
    for name in want:
        torch.testing.assert_close(have[name], want[name], atol=1e-4, rtol=1e-4, msg=name)
