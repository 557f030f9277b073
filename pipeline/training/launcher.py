"""Distributed launcher: PyTorchJob environment (or flags) -> torchrun -> the stage on every rank.

One entry, two roles::

    python -m pipeline.training.launcher pretrain -c jobs/demo/pretrain.yaml --root runs/demo \\
        [--nnodes N --node-rank R --nproc-per-node P --master-addr A --master-port PORT]

* **Not under torchrun** (no ``LOCAL_RANK``): work out the node topology -- CLI flags first, then
  the Kubeflow PyTorchJob variables ``PET_NNODES``, ``PET_NODE_RANK``, ``PET_NPROC_PER_NODE``,
  ``PET_MASTER_ADDR``, ``PET_MASTER_PORT``, then defaults (one node, one process, localhost) --
  and run ``python -m torch.distributed.run ... -m pipeline.training.launcher <same args>``.
  The pod-level ``RANK`` / ``WORLD_SIZE`` that the operator also sets count *pods*, not
  processes; they are used only as a fallback for the node rank / node count when no
  ``PET_*`` variable is there (older operators), never as process ranks.
  ``--simulate-nodes`` (implied by ``--nnodes N > 1`` with no ``--node-rank``, outside a pod)
  starts all N node agents on this machine with the same static rendezvous, which is how a
  multi-node launch is tested on a laptop.
* **Under torchrun** (``LOCAL_RANK`` set): run the stage on this rank. Rank 0 goes through the
  runner's manifest/commit path; the other ranks run the same stage function with ``out=None``.

A rank that fails makes torchrun stop the others; the launcher exits non-zero and its last
stderr line names the failing rank and its error. That rank is torchelastic's root cause, read
from the JSON error file each torchrun agent writes (``TORCHELASTIC_ERROR_FILE``, see
:class:`RankErrorHandler`), not from torchrun's printed summary.

**Exit codes** are chosen for the training operator's ``restartPolicy: ExitCode``, which recreates a
pod whose container exited with 128 or more and fails the job on anything else
(pkg/util/train/train_util.go IsRetryableExitCode, pkg/controller.v1/common/pod.go ReconcilePods, v1.8.1):

* 128+N when the launcher itself got signal N (SIGTERM: preemption, eviction, node drain; torchrun
  would exit 1 there) or the failing rank was killed by signal N (the OOM killer's SIGKILL: 137);
* 143 when the failing rank lost a peer (a collective failed because another pod went away:
  ``torch.distributed.DistError``, gloo's "Connection closed by peer", NCCL's remote errors): the
  other pod's restart needs this one to start over too; also when torchrun's agent itself failed in
  the rendezvous with no rank to blame (a recreated pod that met the old Master's store going away);
* the rank's own code otherwise: 2 for a bad config, 1 for bad data or any other error, which
  fails the job at once with its one-line explanation.

**Rendezvous**: static on the Master (``PET_MASTER_ADDR``/``PET_NODE_RANK``), or torchrun's c10d
rendezvous when the operator sets ``PET_RDZV_BACKEND`` (an ``elasticPolicy``: pkg/controller.v1/pytorch/
elastic.go), with ``PET_RDZV_ENDPOINT``, ``PET_NNODES`` ("N:N") and ``PET_MAX_RESTARTS`` passed to torchrun
as flags, so nothing the operator set is overridden by a default of ours.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

# torch at the top is fine: pipeline.cli imports this module only when a training stage runs
# (never for `llmpipe --help`), and every role of this module starts torchrun or runs under it.
from torch.distributed.elastic.multiprocessing.errors import ErrorHandler, record

from pipeline import default_root, runner
from pipeline.errors import ConfigError, PipelineError
from pipeline.stages import load_config
from pipeline.storage import Storage
from pipeline.training import free_port

DEFAULT_MASTER_ADDR = "127.0.0.1"
DEFAULT_MASTER_PORT = 29500
ERROR_PREFIX = "llmpipe-rank-error:"  # a worker's one-line error, picked out of its output
ERROR_FILE_ENV = "TORCHELASTIC_ERROR_FILE"  # torchelastic's JSON error file (agent and worker)
PEER_LOST_EXIT = 143  # a rank lost a peer pod: retryable under restartPolicy ExitCode (>= 128), like SIGTERM
# a collective that failed because another process or pod went away (gloo and NCCL word it differently)
_PEER_LOST_RE = re.compile(r"Connection (closed|reset) by peer|Broken pipe|remote worker crash|ncclRemoteError|"
                           r"NCCL communicator was aborted|Socket Timeout|Connection refused|"
                           r"failed to recv|failed to send", re.IGNORECASE)
# a torchrun agent that failed itself, before or between its workers: the rendezvous or its store (e.g. a recreated
# pod that met the old Master's store as it went away)
_RDZV_RE = re.compile(r"Rendezvous\w*Error|DistStoreError|DistNetworkError|RendezvousClosed")
# torchrun's printed summary of a failure: only the fallback for a rank with no error file (see _run_agents)
_SUMMARY_RE = re.compile(r"^\s*(rank|exitcode|traceback)\s*:\s*(.*)$")


@dataclass(frozen=True)
class Topology:
    """Where this launcher sits in the job: nodes, this node's rank, processes per node, master."""

    nnodes: int
    node_rank: int
    nproc_per_node: str  # an int, or torchrun's "auto" / "gpu" / "cpu"
    master_addr: str
    master_port: int
    source: str = "defaults"  # "flags", "PyTorchJob env", "pod env", "defaults" (for messages)
    rdzv_backend: str = "static"  # or "c10d" (the operator's elasticPolicy)
    rdzv_endpoint: str = ""  # host:port of the c10d rendezvous
    rdzv_id: str = ""
    rdzv_conf: str = ""
    max_restarts: int = 0  # torchrun --max-restarts (elasticPolicy.maxRestarts -> PET_MAX_RESTARTS)

    def world_size(self) -> int | None:
        return self.nnodes * int(self.nproc_per_node) if self.nproc_per_node.isdigit() else None


# ------------------------------------------------------------------------- env / flags -> topology


def _int(value: Any, name: str) -> int:
    try:
        return int(str(value).strip())
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be an integer, got {value!r}") from None


def _nnodes(value: Any, name: str) -> int:
    """``N`` or torchrun's elastic ``MIN:MAX`` (only a fixed size ``N:N`` is supported)."""
    text = str(value).strip()
    if ":" in text:
        lo, hi = text.split(":", 1)
        if lo != hi:
            raise ConfigError(f"{name}={text!r}: elastic node ranges are not supported, use a fixed count")
        text = lo
    return _int(text, name)


def _nproc(value: Any, name: str) -> str:
    text = str(value).strip()
    if text in ("auto", "gpu", "cpu"):
        return text
    n = _int(text, name)
    if n < 1:
        raise ConfigError(f"{name} must be >= 1, got {n}")
    return str(n)


def topology_from(env: Mapping[str, str], flags: Mapping[str, Any] | None = None) -> Topology:
    """The node topology from CLI flags (``None`` = not given), else the PyTorchJob env, else defaults.

    Pure: reads only its arguments. ``RANK``/``WORLD_SIZE`` are pod counts in a PyTorchJob and
    are only a fallback for node rank/count when no ``PET_NODE_RANK``/``PET_NNODES`` is set."""
    flags = dict(flags or {})
    sources: set[str] = set()

    def pick(flag: str, pet: str, pod: str | None, default: Any) -> Any:
        if flags.get(flag) is not None:
            sources.add("flags")
            return flags[flag], f"--{flag.replace('_', '-')}"
        if env.get(pet, "").strip():
            sources.add("PyTorchJob env")
            return env[pet], pet
        if pod and env.get(pod, "").strip():
            sources.add("pod env")
            return env[pod], pod
        return default, flag

    # Legacy pod variables only count when they describe pods (both present, no PET_ at all).
    legacy = not any(k.startswith("PET_") for k in env) and "RANK" in env and "WORLD_SIZE" in env
    raw_nnodes, n_name = pick("nnodes", "PET_NNODES", "WORLD_SIZE" if legacy else None, 1)
    raw_rank, r_name = pick("node_rank", "PET_NODE_RANK", "RANK" if legacy else None, 0)
    raw_nproc, p_name = pick("nproc_per_node", "PET_NPROC_PER_NODE", None, 1)
    raw_addr, _ = pick("master_addr", "PET_MASTER_ADDR", "MASTER_ADDR" if legacy else None, DEFAULT_MASTER_ADDR)
    raw_port, port_name = pick("master_port", "PET_MASTER_PORT", "MASTER_PORT" if legacy else None, DEFAULT_MASTER_PORT)

    nnodes = _nnodes(raw_nnodes, n_name)
    node_rank = _int(raw_rank, r_name)
    if nnodes < 1:
        raise ConfigError(f"{n_name} must be >= 1, got {nnodes}")
    if not 0 <= node_rank < nnodes:
        raise ConfigError(f"{r_name}={node_rank} is outside 0..{nnodes - 1} for {nnodes} node(s)")
    port = _int(raw_port, port_name)
    if not 0 < port < 65536:
        raise ConfigError(f"{port_name}={port} is not a TCP port")
    source = ", ".join(sorted(sources)) or "defaults"
    max_restarts = _int(env.get("PET_MAX_RESTARTS") or 0, "PET_MAX_RESTARTS")
    if max_restarts < 0:
        raise ConfigError(f"PET_MAX_RESTARTS must be >= 0, got {max_restarts}")
    backend = env.get("PET_RDZV_BACKEND", "").strip()
    if backend and flags.get("master_addr") is None:
        # elasticPolicy (elastic.go): c10d at PET_RDZV_ENDPOINT; no Master, so no node rank or master address
        if backend != "c10d":
            raise ConfigError(f"PET_RDZV_BACKEND={backend!r}: only the c10d rendezvous is supported (elasticPolicy.rdzvBackend)")
        endpoint = env.get("PET_RDZV_ENDPOINT", "").strip()
        if not endpoint:
            raise ConfigError("PET_RDZV_BACKEND is set but PET_RDZV_ENDPOINT is not: the operator sets both for an elasticPolicy")
        return Topology(nnodes, 0, _nproc(raw_nproc, p_name), "", 0, "PyTorchJob env, elastic", "c10d", endpoint,
                        env.get("PET_RDZV_ID", "").strip(), env.get("PET_RDZV_CONF", "").strip(), max_restarts)
    return Topology(nnodes, node_rank, _nproc(raw_nproc, p_name), str(raw_addr).strip(), port, source,
                    max_restarts=max_restarts)


def torchrun_command(
    topo: Topology,
    worker_args: Sequence[str],
    *,
    python: str = sys.executable,
    node_rank: int | None = None,
    module: str = "pipeline.training.launcher",
) -> list[str]:
    """The torchrun command line for one node agent, running ``module`` on every rank: the static rendezvous at
    master addr:port, or c10d at the operator's endpoint (ranks then come from the rendezvous). Every value is a
    flag, so torchrun's own reading of ``PET_*`` never mixes with ours."""
    if topo.rdzv_backend == "c10d":
        where = ["--nnodes", f"{topo.nnodes}:{topo.nnodes}", "--rdzv-backend", "c10d",
                 "--rdzv-endpoint", topo.rdzv_endpoint, "--rdzv-id", topo.rdzv_id or "llmpipe"]
        if topo.rdzv_conf:
            where += ["--rdzv-conf", topo.rdzv_conf]
    else:
        rank = topo.node_rank if node_rank is None else node_rank
        where = ["--nnodes", str(topo.nnodes), "--node-rank", str(rank),
                 "--master-addr", topo.master_addr, "--master-port", str(topo.master_port)]
    return [
        python, "-m", "torch.distributed.run",
        *where,
        "--nproc-per-node", topo.nproc_per_node,
        "--max-restarts", str(topo.max_restarts),
        "-m", module,
        *worker_args,
    ]


def under_torchrun(env: Mapping[str, str]) -> bool:
    """True inside a worker started by torchrun (LOCAL_RANK is set per process; RANK alone is not enough,
    the PyTorchJob sets a pod-level RANK on the agent too)."""
    return "LOCAL_RANK" in env


def worker_rank(env: Mapping[str, str]) -> tuple[int, int, int]:
    """(global rank, world size, local rank) of a torchrun worker."""
    return _int(env.get("RANK", 0), "RANK"), _int(env.get("WORLD_SIZE", 1), "WORLD_SIZE"), _int(env.get("LOCAL_RANK", 0), "LOCAL_RANK")


# ---------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pipeline.training.launcher",
        description="Run a distributed training stage through torchrun (PyTorchJob env or flags -> torchrun -> stage).",
    )
    p.add_argument("stage", help="stage to run on every rank, e.g. pretrain")
    p.add_argument("--config", "-c", metavar="FILE")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--root", metavar="URI")
    p.add_argument("--force", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    d = p.add_argument_group("topology (default: $PET_* from the PyTorchJob, else one local node)")
    d.add_argument("--nnodes", help="number of nodes (pods)")
    d.add_argument("--node-rank", type=int, help="this node's rank")
    d.add_argument("--nproc-per-node", help="processes per node: N, or auto/gpu/cpu")
    d.add_argument("--master-addr", help="address of node 0")
    d.add_argument("--master-port", type=int, help="rendezvous port on node 0")
    d.add_argument("--simulate-nodes", action="store_true",
                   help="start every node's agent on this machine (local test of a multi-node launch)")
    return p


def worker_argv(args: argparse.Namespace) -> list[str]:
    """The arguments the workers get (topology flags are torchrun's business, not theirs)."""
    out = [args.stage]
    if args.config:
        out += ["--config", args.config]
    for o in args.overrides:
        out += ["--set", o]
    if args.root:
        out += ["--root", args.root]
    if args.force:
        out.append("--force")
    if args.no_progress:
        out.append("--no-progress")
    return out


def _flags(args: argparse.Namespace) -> dict[str, Any]:
    return {k: getattr(args, k) for k in ("nnodes", "node_rank", "nproc_per_node", "master_addr", "master_port")}


def launch(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> int:
    """Start the node agent(s) and wait; non-zero if any rank failed."""
    env = dict(os.environ if env is None else env)
    flags = _flags(args)
    in_pod = any(k.startswith("PET_") for k in env) or "RANK" in env
    simulate = args.simulate_nodes or (
        flags["nnodes"] is not None and _nnodes(flags["nnodes"], "--nnodes") > 1 and args.node_rank is None and not in_pod
    )
    if flags["master_port"] is None and not in_pod and (simulate or flags["nnodes"] is None or str(flags["nnodes"]) == "1"):
        flags["master_port"] = free_port()  # local: never collide with another run on the default port
    topo = topology_from(env, flags)
    if simulate and flags["master_addr"] is None and topo.rdzv_backend == "static":
        topo = dataclasses.replace(topo, node_rank=0, master_addr=DEFAULT_MASTER_ADDR)
    wargs = worker_argv(args)
    # the workers must not mistake the pod-level RANK/WORLD_SIZE for their own before torchrun sets them
    child_env = {k: v for k, v in env.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    ranks = list(range(topo.nnodes)) if simulate else [topo.node_rank]
    cmds = [torchrun_command(topo, wargs, node_rank=r) for r in ranks]
    for cmd in cmds:
        print(f"launcher: {shlex.join(cmd)}  [{topo.source}]", file=sys.stderr, flush=True)
    return _run_agents(cmds, child_env)


def _run_agents(cmds: list[list[str]], env: dict[str, str]) -> int:
    """Run node agents, relay their output, stop all when one fails; return the exit status."""
    procs: list[subprocess.Popen[bytes]] = []
    errors: list[str] = []
    lock = threading.Lock()

    printed_causes: list[tuple[str, str]] = []  # fallback: torchrun's printed root cause (see relay)
    rendezvous: list[str] = []  # lines saying an agent's rendezvous failed

    def relay(proc: subprocess.Popen[bytes], tag: str) -> None:
        assert proc.stdout is not None
        cause: dict[str, str] = {}
        for raw in iter(proc.stdout.readline, b""):
            line = raw.decode("utf-8", "replace")
            if ERROR_PREFIX in line:
                with lock:
                    errors.append(line.split(ERROR_PREFIX, 1)[1].strip())
            # Fallback only (used when no error file names the root cause): a worker killed by a signal
            # writes no error file, so the agent has none to copy (torch/distributed/elastic/multiprocessing/
            # errors/__init__.py: record() skips dump_error_file when the failure's error_file is "<N/A>"), and
            # its rank and "Signal N (SIG...) received by PID p" (ProcessFailure.__post_init__) exist only in
            # the "Root Cause" block torchrun prints (ChildFailedError.format_msg).
            if _RDZV_RE.search(line):
                with lock:
                    rendezvous.append(line.strip())
            if "Root Cause" in line:
                cause = {"root": "1"}
            m = _SUMMARY_RE.match(line)
            if m and "root" in cause:  # torchrun's summary of the first failed worker: rank / exitcode / traceback
                cause[m.group(1)] = m.group(2).strip()
                if m.group(1) == "traceback" and "rank" in cause:
                    tb = cause["traceback"]
                    detail = tb if tb.startswith("Signal") else f"exitcode {cause.get('exitcode', '?').split()[0]}"
                    with lock:
                        printed_causes.append((cause["rank"].split()[0], detail))
                    cause = {}
            sys.stderr.write(f"{tag}{line}" if tag else line)
            sys.stderr.flush()

    received: list[int] = []  # signals this launcher got (the kubelet's SIGTERM on preemption or eviction)

    def forward(signum: int, _frame: Any) -> None:
        received.append(signum)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    # Each agent gets its own error file: when a worker fails, torchrun's @record copies the first
    # failed worker's error file there (ErrorHandler.dump_error_file); the workers get per-rank files
    # from the agent (DefaultLogsSpecs.reify in torch/distributed/elastic/multiprocessing/api.py).
    tmp = tempfile.mkdtemp(prefix="llmpipe-launch-")
    error_files = [os.path.join(tmp, f"node-{i}.json") for i in range(len(cmds))]
    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    threads = []
    try:
        for i, cmd in enumerate(cmds):
            proc = subprocess.Popen(cmd, env={**env, ERROR_FILE_ENV: error_files[i]},
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            procs.append(proc)
            t = threading.Thread(target=relay, args=(proc, f"[node {i}] " if len(cmds) > 1 else ""), daemon=True)
            t.start()
            threads.append(t)
        status = 0
        while any(p.poll() is None for p in procs):
            failed = [p for p in procs if p.poll() not in (None, 0)]
            if failed:
                status = failed[0].returncode
                time.sleep(5)  # let the others notice through the rendezvous, then stop them
                for p in procs:
                    if p.poll() is None:
                        p.terminate()
                deadline = time.time() + 30
                while any(p.poll() is None for p in procs) and time.time() < deadline:
                    time.sleep(0.2)
                for p in procs:
                    if p.poll() is None:
                        p.kill()
                break
            time.sleep(0.2)
        for t in threads:
            t.join(timeout=10)
        codes = [p.wait() for p in procs]
        status = status or next((c for c in codes if c != 0), 0)
        causes = (_root_causes(error_files) or printed_causes) if status != 0 else []
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        shutil.rmtree(tmp, ignore_errors=True)
    if status != 0 or received:
        code, why = exit_code(status, received, causes, rendezvous_failed=bool(rendezvous))
        detail = _failure_detail(errors, causes)
        print(f"error: distributed launch failed (exit {code}{why}): {detail}", file=sys.stderr, flush=True)
        return code
    return 0


def exit_code(status: int, received: Sequence[int], causes: Sequence[tuple[str, ...]],
              rendezvous_failed: bool = False) -> tuple[int, str]:
    """The launcher's exit code after a failed launch, and why (for its last line): see the module docstring.

    ``status``: the first failed agent's exit code; ``received``: signals the launcher got; ``causes``: the root
    causes, first failure first, as ``(rank, detail[, error line[, retryable]])``; ``rendezvous_failed``: an agent
    reported a rendezvous or store error (with no worker to blame, that is the failure: retryable)."""
    restart = ", the operator restarts the pod (restartPolicy ExitCode)"
    if received:
        sig = received[0]
        return 128 + sig, f": stopped by {signal.Signals(sig).name}{restart}"
    if causes:
        rank, detail, *rest = causes[0]
        m = re.match(r"Signal (\d+)", detail)
        if m:
            return 128 + int(m.group(1)), f": rank {rank} was killed by signal {m.group(1)}{restart}"
        if len(rest) > 1 and rest[1] == "true":
            return PEER_LOST_EXIT, f": rank {rank} lost a peer{restart}"
    elif rendezvous_failed and status != 0:
        return PEER_LOST_EXIT, f": the rendezvous failed{restart}"
    return (status if 0 < status < 128 else 1), ""


def peer_lost(exc: BaseException) -> bool:
    """Whether a rank's error means another process or pod went away (so restarting the job can fix it)."""
    import torch.distributed as dist

    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    return isinstance(exc, (RuntimeError, ConnectionError, TimeoutError)) and bool(_PEER_LOST_RE.search(str(exc)))


def _read_root_cause(path: str) -> tuple[int, tuple[str, str, str, str]] | None:
    """``(timestamp, (rank, detail, error line, "true" if it lost a peer else "false"))`` of the failed worker in a torchrun agent's error file.

    None when there is no file (no failure, or the root cause left none) or it is not a worker's
    file written by :class:`RankErrorHandler` (e.g. the agent's own error when it was stopped)."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    message = data.get("message")
    info = message.get("extraInfo") if isinstance(message, dict) else data
    if not isinstance(info, dict) or "llmpipe_rank" not in info:
        return None
    # errorCode: the worker's exit code, set by the agent (ErrorHandler.dump_error_file)
    code = message.get("errorCode") if isinstance(message, dict) else None
    detail = f"exitcode {code}" if code is not None else "failed"
    try:
        stamp = int(info.get("timestamp") or 0)
    except (TypeError, ValueError):
        stamp = 0
    return stamp, (str(info["llmpipe_rank"]), detail, str(info.get("llmpipe_error") or ""),
                   "true" if info.get("llmpipe_peer_lost") else "false")


def _root_causes(error_files: Sequence[str]) -> list[tuple[str, str, str, str]]:
    """The failed workers named by the agents' error files, first failure first (torchelastic's rule:
    the smallest timestamp, ChildFailedError.get_first_failure); agents in order on a tie."""
    found = [c for c in (_read_root_cause(f) for f in error_files) if c is not None]
    return [cause for _, cause in sorted(found, key=lambda c: c[0])]


def _failure_detail(errors: list[str], root_causes: Sequence[tuple[str, ...]]) -> str:
    """One line on the rank that failed first (torchrun's root cause), with its own error line if it wrote one.

    A root cause is ``(rank, detail)`` or ``(rank, detail, error line)``; without the error line it is
    looked up in ``errors``. Other ranks' errors (e.g. 'connection closed by peer' after the first one
    died) are only counted."""
    if root_causes:
        rank, detail, *own_line = root_causes[0]
        own = [e for e in own_line[:1] if e] or [e for e in errors if e.startswith(f"rank {rank}/")]
        line = own[0] if own else f"rank {rank}: {detail}"
    elif errors:
        line = errors[0]
    else:
        return "see the output above"
    others = len([e for e in errors if e != line])
    return line + (f" ({others} other rank error(s) above)" if others else "")


# ------------------------------------------------------------------------------------- worker


def error_line(exc: BaseException, rank: int, world: int) -> str:
    """A worker's one-line error: ``rank R/W: Type: first line of the message``."""
    text = str(exc).strip()
    msg = text.splitlines()[0].strip() if text else type(exc).__name__
    return f"rank {rank}/{world}: {type(exc).__name__}: {msg}"


class RankErrorHandler(ErrorHandler):
    """torchelastic's error file for a worker, plus which rank failed and its one-line error.

    torchrun sets ``TORCHELASTIC_ERROR_FILE`` for every worker; :func:`record` writes an uncaught
    exception there (``ErrorHandler.record_exception``), and the agent copies the first failed
    worker's file into its own error file (``ChildFailedError`` -> ``ErrorHandler.dump_error_file``,
    torch/distributed/elastic/multiprocessing/errors/__init__.py). torch's JSON does not say which
    rank it came from: this handler adds ``llmpipe_rank`` and ``llmpipe_error`` to its
    ``extraInfo``, which is what the launcher reads (:func:`_read_root_cause`)."""

    def __init__(self, env: Mapping[str, str] | None = None):
        super().__init__()
        self._env = env

    def _environ(self) -> Mapping[str, str]:
        return os.environ if self._env is None else self._env

    def _get_error_file_path(self) -> str | None:
        return self._environ().get(ERROR_FILE_ENV) or None

    def record_exception(self, e: BaseException) -> None:
        super().record_exception(e)  # type: ignore[arg-type]
        env, path = self._environ(), self._get_error_file_path()
        if not path or not under_torchrun(env):
            return
        try:
            rank, world, _ = worker_rank(env)
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
            message = data.get("message")
            info = message.setdefault("extraInfo", {}) if isinstance(message, dict) else data
            info.update(llmpipe_rank=str(rank), llmpipe_error=error_line(e, rank, world),
                        llmpipe_peer_lost=not isinstance(e, PipelineError) and peer_lost(e))
            with open(path, "w", encoding="utf-8") as fh:
                json.dump(data, fh)
        except (OSError, ValueError, AttributeError, PipelineError):
            pass  # torch's own file stays; the launcher falls back to torchrun's summary


def run_worker(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> int:
    """Inside torchrun: run the stage on this rank. Rank 0 commits the output and its manifest."""
    env = dict(os.environ if env is None else env)
    rank, world, _ = worker_rank(env)
    try:
        cfg = load_config(args.stage, args.config, args.overrides)
        storage = Storage(default_root(args.root))
        outcome = runner.run_rank(args.stage, cfg, storage, rank, world, force=args.force, progress=not args.no_progress)
        if rank == 0:
            print(f"== {args.stage}: up to date" if outcome.status == "up to date" else runner.format_summary(outcome),
                  flush=True)
        return 0
    except BaseException as exc:  # noqa: BLE001 - one line that the launcher relays, then the traceback
        if isinstance(exc, KeyboardInterrupt):
            raise
        print(f"{ERROR_PREFIX} {error_line(exc, rank, world)}", file=sys.stderr, flush=True)
        if isinstance(exc, PipelineError):
            RankErrorHandler(env).record_exception(exc)  # returned, not raised: @record never sees it
            return exc.exit_code
        if not isinstance(exc, Exception):
            RankErrorHandler(env).record_exception(exc)  # @record writes only an Exception (SystemExit passes)
        raise


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if under_torchrun(os.environ):
            return run_worker(args)
        return launch(args)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(record(main, error_handler=RankErrorHandler())())
