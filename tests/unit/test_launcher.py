"""The launcher's pure parts (env/flags -> topology -> torchrun command) and the training helpers."""

from __future__ import annotations

import json
import math

import pytest

from pipeline.errors import ConfigError
from pipeline.training import deepspeed_config_path
from pipeline.training.common import resolve_precision
from pipeline.training.launcher import (
    PEER_LOST_EXIT,
    build_parser,
    exit_code,
    peer_lost,
    topology_from,
    torchrun_command,
    under_torchrun,
    worker_argv,
    worker_rank,
)
from pipeline.training.pretrain import (
    check_kernels,
    cosine_lr,
    flops_per_token,
    grad_accum_steps,
    mfu,
    phase_at,
    plan_phases,
    wsd_lr,
)

PYTORCHJOB = {
    "PET_NNODES": "4",
    "PET_NODE_RANK": "2",
    "PET_NPROC_PER_NODE": "8",
    "PET_MASTER_ADDR": "llm-pretrain-master-0",
    "PET_MASTER_PORT": "23456",
    # pod-level: 4 pods, this is pod 2 -- not process ranks
    "RANK": "2",
    "WORLD_SIZE": "4",
    "MASTER_ADDR": "llm-pretrain-master-0",
    "MASTER_PORT": "23456",
}


def test_pytorchjob_env_gives_node_topology_not_pod_ranks():
    t = topology_from(PYTORCHJOB)
    assert (t.nnodes, t.node_rank, t.nproc_per_node, t.master_addr, t.master_port) == (4, 2, "8", "llm-pretrain-master-0", 23456)
    assert t.world_size() == 32  # 4 nodes x 8 processes, not WORLD_SIZE=4
    assert t.source == "PyTorchJob env"


def test_flags_override_env_and_defaults_are_one_local_node():
    t = topology_from(PYTORCHJOB, {"nproc_per_node": "2", "master_port": 29999, "nnodes": None})
    assert (t.nnodes, t.node_rank, t.nproc_per_node, t.master_port) == (4, 2, "2", 29999)
    d = topology_from({})
    assert (d.nnodes, d.node_rank, d.nproc_per_node, d.master_addr, d.master_port) == (1, 0, "1", "127.0.0.1", 29500)


def test_legacy_pod_env_only_without_pet_vars():
    legacy = {"RANK": "1", "WORLD_SIZE": "3", "MASTER_ADDR": "m0", "MASTER_PORT": "1234"}
    t = topology_from(legacy)
    assert (t.nnodes, t.node_rank, t.master_addr, t.master_port, t.nproc_per_node) == (3, 1, "m0", 1234, "1")
    # with any PET_ variable the pod-level ones are ignored
    t = topology_from({**legacy, "PET_NPROC_PER_NODE": "4"})
    assert (t.nnodes, t.node_rank, t.nproc_per_node) == (1, 0, "4")


@pytest.mark.parametrize(
    "env, message",
    [
        ({"PET_NNODES": "2", "PET_NODE_RANK": "2"}, "PET_NODE_RANK=2 is outside 0..1"),
        ({"PET_NNODES": "1:4"}, "elastic"),
        ({"PET_NPROC_PER_NODE": "zero"}, "PET_NPROC_PER_NODE must be an integer"),
        ({"PET_MASTER_PORT": "70000"}, "not a TCP port"),
    ],
)
def test_bad_topology_is_a_clear_error(env, message):
    with pytest.raises(ConfigError, match=message):
        topology_from(env)


def test_nproc_keywords_and_fixed_elastic_range():
    t = topology_from({"PET_NNODES": "2:2", "PET_NPROC_PER_NODE": "auto"})
    assert t.nnodes == 2 and t.nproc_per_node == "auto" and t.world_size() is None


def test_torchrun_command_and_worker_args():
    args = build_parser().parse_args(
        ["pretrain", "-c", "jobs/cluster/pretrain.yaml", "--root", "/data/run", "--set", "lr=1e-4", "--nproc-per-node", "8"]
    )
    wargs = worker_argv(args)
    assert wargs == ["pretrain", "--config", "jobs/cluster/pretrain.yaml", "--set", "lr=1e-4", "--root", "/data/run"]
    cmd = torchrun_command(topology_from(PYTORCHJOB), wargs, python="python")
    assert cmd[:3] == ["python", "-m", "torch.distributed.run"]
    opts = dict(zip(cmd[3:17:2], cmd[4:17:2]))
    assert opts == {"--nnodes": "4", "--node-rank": "2", "--nproc-per-node": "8", "--master-addr": "llm-pretrain-master-0",
                    "--master-port": "23456", "--max-restarts": "0", "-m": "pipeline.training.launcher"}
    assert cmd[-len(wargs):] == wargs
    assert torchrun_command(topology_from(PYTORCHJOB), wargs, node_rank=0)[6] == "0"


# what the operator puts in a Worker pod of a job with an elasticPolicy and no Master (v1.8.1
# pkg/controller.v1/pytorch/elastic.go ElasticEnvVarGenerator.Generate; envvar.go setPodEnv adds no node rank
# or master address without a Master); tests/k8s/test_operator_model.py checks the model that produces it
ELASTIC = {"PET_RDZV_ENDPOINT": "llmpipe-pretrain-worker-0:23456", "PET_RDZV_BACKEND": "c10d", "PET_NNODES": "4:4",
           "PET_MAX_RESTARTS": "3", "PET_NPROC_PER_NODE": "8", "PYTHONUNBUFFERED": "1"}


def test_elastic_env_gives_a_c10d_rendezvous_with_the_operators_max_restarts():
    t = topology_from(ELASTIC)
    assert (t.rdzv_backend, t.rdzv_endpoint, t.nnodes, t.max_restarts) == ("c10d", "llmpipe-pretrain-worker-0:23456", 4, 3)
    cmd = torchrun_command(t, ["pretrain"], python="python")
    opts = dict(zip(cmd[3:-3:2], cmd[4:-3:2]))
    assert opts == {"--nnodes": "4:4", "--rdzv-backend": "c10d", "--rdzv-endpoint": "llmpipe-pretrain-worker-0:23456",
                    "--rdzv-id": "llmpipe", "--nproc-per-node": "8", "--max-restarts": "3"}
    assert "--node-rank" not in cmd and "--master-addr" not in cmd  # the rendezvous assigns ranks
    # the static rendezvous honours PET_MAX_RESTARTS too; a range or another backend is refused
    assert topology_from({**PYTORCHJOB, "PET_MAX_RESTARTS": "2"}).max_restarts == 2
    with pytest.raises(ConfigError, match="elastic node ranges"):
        topology_from({**ELASTIC, "PET_NNODES": "2:4"})
    with pytest.raises(ConfigError, match="only the c10d"):
        topology_from({**ELASTIC, "PET_RDZV_BACKEND": "etcd"})
    with pytest.raises(ConfigError, match="PET_RDZV_ENDPOINT"):
        topology_from({k: v for k, v in ELASTIC.items() if k != "PET_RDZV_ENDPOINT"})


def test_exit_codes_tell_the_operator_what_to_restart():
    """>= 128 is retryable under restartPolicy ExitCode (training-operator v1.8.1 pkg/util/train/train_util.go
    IsRetryableExitCode); torchrun itself exits 1 for all of these."""
    import signal

    assert exit_code(1, [signal.SIGTERM], [])[0] == 143  # preempted / evicted: the kubelet's SIGTERM
    killed = ("3", "Signal 9 (SIGKILL) received by PID 123")
    assert exit_code(1, [], [killed])[0] == 137  # the OOM killer took a rank
    assert exit_code(1, [], [("0", "exitcode 1", "rank 0/16: RuntimeError: Connection closed by peer", "true")])[0] \
        == PEER_LOST_EXIT >= 128
    assert exit_code(2, [], [("0", "exitcode 2", "rank 0/16: ConfigError: bad", "false")]) == (2, "")
    assert exit_code(1, [], [("5", "exitcode 1", "rank 5/16: InputError: corrupt shard", "false")]) == (1, "")
    assert exit_code(1, [], []) == (1, "")
    assert exit_code(-9, [], []) == (1, "")  # an agent killed without a root cause: not ours to call retryable
    assert exit_code(1, [], [], rendezvous_failed=True)[0] == PEER_LOST_EXIT  # the agent's rendezvous failed
    assert exit_code(2, [], [("0", "exitcode 2", "rank 0/2: ConfigError: bad", "false")], rendezvous_failed=True)[0] == 2


def test_peer_lost_is_what_a_surviving_rank_sees():
    import torch.distributed as dist

    # gloo's words when the other node's process died (seen here with two torchrun agents and a SIGKILL)
    gloo = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
                        "[10.0.0.7]:12696. This is typically caused by a remote worker crashing.")
    assert peer_lost(gloo)
    assert peer_lost(dist.DistBackendError("NCCL error: remote process exited or there was a network error, "
                                           "NCCL version 2.21.5 ncclRemoteError"))
    assert not peer_lost(ValueError("bad shard"))
    assert not peer_lost(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert not peer_lost(ConfigError("Connection closed by peer"))  # never retried: our own errors are permanent


def test_under_torchrun_needs_local_rank():
    assert not under_torchrun(PYTORCHJOB)  # the pod itself: launch torchrun
    assert under_torchrun({**PYTORCHJOB, "LOCAL_RANK": "3", "RANK": "19", "WORLD_SIZE": "32"})
    assert worker_rank({"LOCAL_RANK": "3", "RANK": "19", "WORLD_SIZE": "32"}) == (19, 32, 3)


def test_shipped_deepspeed_configs_parse():
    for stage in (1, 2, 3):
        for offload in (False, True):
            cfg = json.loads(deepspeed_config_path(stage, offload).read_text())
            zero = cfg["zero_optimization"]
            assert zero["stage"] == stage
            assert ("offload_optimizer" in zero) == offload
            assert cfg["train_micro_batch_size_per_gpu"] == "auto" and cfg["gradient_accumulation_steps"] == "auto"
            assert cfg["bf16"]["enabled"] == "auto"
    assert json.loads(deepspeed_config_path(3).read_text())["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"]
    with pytest.raises(ValueError):
        deepspeed_config_path(4)


# ------------------------------------------------------------------------------- training helpers


def test_grad_accum_from_token_budget():
    assert grad_accum_steps(524288, 2048, 4, 8) == 8
    assert grad_accum_steps(4096 * 8 * 64, 4096, 1, 64) == 8
    with pytest.raises(ConfigError, match="not a whole multiple.*use e.g. 491,520 or 540,672"):
        grad_accum_steps(524288, 2048, 4, 6)
    with pytest.raises(ConfigError):
        grad_accum_steps(1024, 2048, 1, 1)


def test_precision_auto():
    assert resolve_precision("auto", cuda=False, bf16_ok=False) == "fp32"
    assert resolve_precision("auto", cuda=True, bf16_ok=True) == "bf16"
    assert resolve_precision("auto", cuda=True, bf16_ok=False) == "fp16"
    assert resolve_precision("fp32", cuda=True, bf16_ok=True) == "fp32"
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        resolve_precision("bf16", cuda=False, bf16_ok=False)


def test_gpu_only_kernels_are_refused_on_cpu(monkeypatch):
    import importlib.util

    from pipeline.training.config import PretrainConfig

    def cfg(**kw):
        return PretrainConfig(max_steps=1, **kw)

    check_kernels(cfg(), "fp32", cuda=False)  # the defaults run anywhere
    with pytest.raises(ConfigError, match="flash_attention_2 needs a CUDA device.*use attention: sdpa"):
        check_kernels(cfg(attention="flash_attention_2"), "fp32", cuda=False)
    with pytest.raises(ConfigError, match="runs in bf16 or fp16, but precision is fp32"):
        check_kernels(cfg(attention="flash_attention_2"), "fp32", cuda=True)
    with pytest.raises(ConfigError, match="liger_kernels needs a CUDA device"):
        check_kernels(cfg(liger_kernels=True), "fp32", cuda=False)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("flash_attn", "liger_kernel") else real(name, *a))
    with pytest.raises(ConfigError, match="needs the flash-attn package"):
        check_kernels(cfg(attention="flash_attention_2"), "bf16", cuda=True)
    with pytest.raises(ConfigError, match="needs the liger-kernel package"):
        check_kernels(cfg(liger_kernels=True), "bf16", cuda=True)
    check_kernels(cfg(compile=True, attention="eager"), "fp32", cuda=False)  # g++ is on PATH here
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(ConfigError, match="compile on CPU needs a C\\+\\+ compiler"):
        check_kernels(cfg(compile=True), "fp32", cuda=False)
    # how it runs, not what it learns: switching kernels keeps the config hash (a run resumes across it)
    from pipeline.config import config_hash

    assert config_hash(cfg(compile=True, attention="eager")) == config_hash(cfg())


def test_schedules():
    kw = dict(total=100, warmup=10, min_ratio=0.1)
    assert cosine_lr(0, **kw) == pytest.approx(0.1) and cosine_lr(9, **kw) == pytest.approx(1.0)
    assert cosine_lr(10, **kw) == pytest.approx(1.0)
    assert cosine_lr(55, **kw) == pytest.approx(0.55)
    assert cosine_lr(100, **kw) == pytest.approx(0.1)
    w = dict(kw, decay_fraction=0.2)
    assert wsd_lr(50, **w) == 1.0 and wsd_lr(79, **w) == 1.0
    assert wsd_lr(80, **w) == pytest.approx(1.0)
    assert wsd_lr(100, **w) == pytest.approx(0.1)
    assert wsd_lr(90, **w, shape="linear") == pytest.approx(0.55)
    assert wsd_lr(90, **w, shape="sqrt") == pytest.approx(0.1 + 0.9 * (1 - math.sqrt(0.5)))
    assert all(wsd_lr(s, **w) >= wsd_lr(s + 1, **w) for s in range(10, 100))


def test_mfu_palm_formula():
    fpt = flops_per_token(7_000_000_000, 32, 32, 128, 4096)
    assert fpt == pytest.approx(6 * 7e9 + 12 * 32 * 32 * 128 * 4096)
    assert mfu(3000.0, fpt, 989e12) == pytest.approx(3000 * fpt / 989e12)
    assert mfu(3000.0, fpt, None) is None


def test_phase_plan():
    from pipeline.training.config import DataPhase

    plan = plan_phases([DataPhase(name="a", shards="shards", until_step=30), DataPhase(name="b", shards="shards-clean")], 100)
    assert [(p.start, p.end) for p in plan] == [(0, 30), (30, 100)]
    assert [phase_at(plan, s) for s in (0, 29, 30, 99, 100)] == [0, 0, 1, 1, 1]


def test_pretrain_config_validation():
    from pydantic import ValidationError

    from pipeline.stages.pretrain import STAGE
    from pipeline.training.config import PretrainConfig

    inputs = STAGE.inputs

    cfg = PretrainConfig(max_steps=10, phases=[{"shards": "shards", "until_step": 4, "name": "p1"},
                                               {"shards": "shards-clean", "name": "p2"}])
    assert inputs(cfg) == ["shards", "shards-clean", "models/init", "tokenizer"]
    assert PretrainConfig(train_tokens=8 * 524288).total_steps == 8
    for bad, msg in [
        ({}, "exactly one of max_steps and train_tokens"),
        ({"max_steps": 10, "phases": [{"until_step": 12}]}, "must end at max_steps"),
        ({"max_steps": 10, "phases": [{"name": "a"}, {"name": "b"}]}, "only the last phase"),
        ({"max_steps": 10, "zero_stage": 0, "offload": True}, "offload needs DeepSpeed"),
        ({"train_tokens": 1000}, "not a multiple of global_batch_tokens"),
    ]:
        with pytest.raises(ValidationError, match=msg):
            PretrainConfig(**bad)


def test_failure_line_names_the_first_failed_rank():
    from pipeline.training.launcher import _failure_detail

    errors = ["rank 0/2: RuntimeError: Connection closed by peer", "rank 1/2: ValueError: bad shard"]
    assert _failure_detail(errors, [("1", "exitcode 1")]) == "rank 1/2: ValueError: bad shard (1 other rank error(s) above)"
    assert _failure_detail(errors[:1], [("1", "Signal 9 (SIGKILL) received by PID 7")]) == (
        "rank 1: Signal 9 (SIGKILL) received by PID 7 (1 other rank error(s) above)")
    assert _failure_detail(errors[1:], []) == "rank 1/2: ValueError: bad shard"
    assert _failure_detail([], []) == "see the output above"


def test_trainer_raw_log_dicts_are_dropped_but_the_bar_stays(tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from pipeline.training.common import quiet_trainer_logs

    model = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    args = TrainingArguments(output_dir=str(tmp_path), disable_tqdm=False, report_to="none", use_cpu=True)
    trainer = Trainer(model=model, args=args)
    quiet_trainer_logs(trainer)
    cbs = trainer.callback_handler.callbacks
    bars = [cb for cb in cbs if isinstance(cb, ProgressCallback)]
    assert len(bars) == 1 and not any(isinstance(cb, PrinterCallback) for cb in cbs)
    trainer.state.max_steps = 3
    for cb in (bars[0], ProgressCallback()):  # ours, then the stock one for contrast
        cb.on_train_begin(args, trainer.state, trainer.control)
        capsys.readouterr()
        cb.on_log(args, trainer.state, trainer.control, logs={"loss": 1.25})
        seen = capsys.readouterr()
        cb.on_train_end(args, trainer.state, trainer.control)
        assert ("'loss': '1.25'" in seen.out + seen.err) == (cb is not bars[0])


def test_root_cause_comes_from_torchelastic_error_files(tmp_path, monkeypatch):
    """A worker's error file carries its rank and one-line error; the agent's copy (torch's
    dump_error_file) is what the launcher reads. Files without a rank (the agent's own error) are skipped."""
    from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

    from pipeline.errors import ConfigError
    from pipeline.training.launcher import RankErrorHandler, _failure_detail, _read_root_cause, _root_causes

    child, agent = tmp_path / "child.json", tmp_path / "agent.json"
    worker_env = {"LOCAL_RANK": "1", "RANK": "1", "WORLD_SIZE": "2", "TORCHELASTIC_ERROR_FILE": str(child)}
    try:
        raise ConfigError("global_batch_tokens 384 is not a whole multiple\nsecond line")
    except ConfigError as exc:
        RankErrorHandler(worker_env).record_exception(exc)
    data = json.loads(child.read_text())
    assert data["message"]["message"].startswith("ConfigError: global_batch_tokens 384")  # torch's own fields stay
    assert "Traceback" in data["message"]["extraInfo"]["py_callstack"]
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(agent))
    ErrorHandler().dump_error_file(str(child), error_code=2)  # what torchrun's @record does for the root cause
    stamp, cause = _read_root_cause(str(agent))
    assert cause == ("1", "exitcode 2", "rank 1/2: ConfigError: global_batch_tokens 384 is not a whole multiple", "false")
    errors = ["rank 0/2: RuntimeError: Connection closed by peer", cause[2]]
    assert _failure_detail(errors, [cause]) == cause[2] + " (1 other rank error(s) above)"

    stopped = tmp_path / "stopped.json"  # an agent stopped by the launcher records its own SignalException
    try:
        raise RuntimeError("Process 7 got signal: 15")
    except RuntimeError as exc:
        RankErrorHandler({"TORCHELASTIC_ERROR_FILE": str(stopped)}).record_exception(exc)
    assert stopped.exists() and _read_root_cause(str(stopped)) is None
    assert _read_root_cause(str(tmp_path / "missing.json")) is None
    assert _root_causes([str(stopped), str(tmp_path / "missing.json"), str(agent)]) == [cause]
