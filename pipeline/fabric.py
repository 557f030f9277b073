"""``llmpipe fabric-check``: an all-reduce bandwidth test across the nodes, before GPU hours are spent.

Every rank all-reduces tensors of growing size (bf16 by default; NCCL on GPUs, gloo on CPUs) with
``torch.distributed``: warm-up calls, then timed calls. Rank 0 prints one row per size with the numbers
nccl-tests prints (doc/PERFORMANCE.md and src/all_reduce.cu ``AllReduceGetBw`` in NVIDIA/nccl-tests, v2.19):

* time: the mean time of one all-reduce, averaged over the ranks (nccl-tests' default ``--average 1``);
* algorithm bandwidth ``algbw = S / t`` (S: the tensor's bytes, GB = 1e9 bytes);
* bus bandwidth ``busbw = algbw * 2(n-1)/n`` for n ranks: what each rank's links carried, comparable with
  the hardware's rate whatever n is;

and the ratio of the bus bandwidth to the nominal rate of the node's links: ``--nominal-gbps`` per link, in Gb/s
as links are sold (400 for an NDR InfiniBand rail), times ``--rails``, the links per node (default: one per GPU,
a rail-optimized node). Across nodes, a ring all-reduce spreads its channels over every NIC of a node, so its bus
bandwidth approaches the node's total: NVIDIA measures 192 GB/s on a DGX A100 with 8 x 200 Gb/s HDR
(NVIDIA/nccl#1576) and 46-48 GB/s per 400 Gb/s NDR NIC (NVIDIA/nccl-tests#290). With a nominal rate, the check
fails (exit 1, one line) when the bus bandwidth at the largest size is below ``--min-fraction`` of it. On one
node nothing crosses the fabric (NVLink / PCIe only): the table is printed, no threshold applies.

Launch: the same as a training stage's (:mod:`pipeline.training.launcher`): the topology from flags, else a
PyTorchJob's ``PET_*`` variables, else one local node; ``--nnodes N`` without ``--node-rank`` outside a pod
starts N simulated nodes on this machine. On the cluster, ``make deploy-nccl-check`` runs it as a PyTorchJob
with the pod shape of pretrain (docs/kubernetes.md, "Fabric check").
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shlex
import sys
import time
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from pipeline.errors import ConfigError, PipelineError

TOPOLOGY = ("nnodes", "node_rank", "nproc_per_node", "master_addr", "master_port")
# the settings a config file (--config) may hold; flags override them
SETTINGS = {"min_bytes": "1M", "max_bytes": "1G", "factor": 4, "warmup": 5, "iters": 20, "dtype": "bf16",
            "backend": "auto", "nominal_gbps": None, "rails": None, "min_fraction": 0.7, "nccl_algo": None}
CPU_SIZES = ("64K", "4M")  # gloo's default sweep: a CPU moves a GB slowly and measures no fabric anyway
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


class FabricCheckFailed(PipelineError):
    """The bus bandwidth at the largest size is below the threshold (exit 1)."""


# --------------------------------------------------------------------------------- arithmetic


def parse_size(text: Any) -> int:
    """``4096``, ``64K``, ``1M``, ``1G`` (binary units, like nccl-tests' -b/-e) -> bytes."""
    m = re.fullmatch(r"\s*(\d+)\s*([KMG]?)i?B?\s*", str(text), re.I)
    if not m or int(m.group(1)) <= 0:
        raise ConfigError(f"size {text!r}: a positive number of bytes, optionally with K, M or G (e.g. 1M)")
    return int(m.group(1)) * _UNITS[m.group(2).upper()]


def sizes(min_bytes: int, max_bytes: int, factor: int, elem: int) -> list[int]:
    """min, min*factor, ... up to max (max itself always last), each a whole number of elements."""
    if factor < 2:
        raise ConfigError(f"factor {factor}: the sizes grow by a factor of at least 2")
    if min_bytes > max_bytes:
        raise ConfigError(f"min size {min_bytes} B is above max size {max_bytes} B")
    out, s = [], min_bytes
    while s < max_bytes:
        out.append(s)
        s *= factor
    out.append(max_bytes)
    return sorted({max(elem, b // elem * elem) for b in out})


def alg_bandwidth(nbytes: int, seconds: float) -> float:
    """GB/s (1e9 bytes) of one all-reduce of ``nbytes`` taking ``seconds``: S / t."""
    return nbytes / 1e9 / seconds


def bus_bandwidth(algbw: float, ranks: int) -> float:
    """nccl-tests' all-reduce bus bandwidth: algbw * 2(n-1)/n (0 for one rank: nothing crossed a link)."""
    return algbw * 2 * (ranks - 1) / ranks


def fraction_of_nominal(busbw_gbs: float, nominal_gbps: float, rails: int = 1) -> float:
    """Bus bandwidth (GB/s) over ``rails`` links of ``nominal_gbps`` Gb/s each (400 Gb/s NDR = 50 GB/s)."""
    return busbw_gbs * 8 / (nominal_gbps * rails)


@dataclass(frozen=True)
class Row:
    nbytes: int
    count: int
    time_us: float  # mean of one all-reduce, averaged over the ranks
    algbw: float  # GB/s
    busbw: float  # GB/s
    wrong: int  # elements of the check all-reduce that were not n


def _human(nbytes: int) -> str:
    for unit, k in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if nbytes >= k and nbytes % k == 0:
            return f"{nbytes // k}{unit}"
    return str(nbytes)


def format_table(rows: Sequence[Row], nominal_gbps: float | None, rails: int = 1) -> str:
    head = f"{'size':>8} {'bytes':>12} {'count':>11} {'time(us)':>11} {'algbw(GB/s)':>12} {'busbw(GB/s)':>12}"
    if nominal_gbps:
        head += f" {'of nominal':>10}"
    lines = [head + f" {'#wrong':>7}"]
    for r in rows:
        line = f"{_human(r.nbytes):>8} {r.nbytes:>12} {r.count:>11} {r.time_us:>11.1f} {r.algbw:>12.2f} {r.busbw:>12.2f}"
        if nominal_gbps:
            line += f" {fraction_of_nominal(r.busbw, nominal_gbps, rails):>9.0%}"
        lines.append(line + f" {r.wrong:>7}")
    return "\n".join(lines)


def verdict(rows: Sequence[Row], nominal_gbps: float | None, min_fraction: float, rails: int = 1,
            nodes: int = 2) -> tuple[bool, str]:
    """(passed, one line) on the largest size's bus bandwidth against min_fraction of the nominal rate of
    ``rails`` links; one node crossed no fabric, so no threshold applies there."""
    wrong = sum(r.wrong for r in rows)
    if wrong:
        return False, f"fabric check failed: {wrong} element(s) of the all-reduce results were wrong (a bad link or GPU)"
    last = rows[-1]
    if nodes == 1:
        return True, (f"fabric check: bus bandwidth {last.busbw:.2f} GB/s at {_human(last.nbytes)} on one node: "
                      "inside the node (NVLink / PCIe), no fabric crossed, no threshold; run it on 2+ nodes")
    if not nominal_gbps:
        return True, f"fabric check: bus bandwidth {last.busbw:.2f} GB/s at {_human(last.nbytes)} (no --nominal-gbps: no threshold)"
    frac = fraction_of_nominal(last.busbw, nominal_gbps, rails)
    links = f"{rails} x {nominal_gbps:g} Gb/s" if rails != 1 else f"{nominal_gbps:g} Gb/s"
    where = (f"bus bandwidth {last.busbw:.2f} GB/s at {_human(last.nbytes)} is {frac:.0%} of the nominal "
             f"{links} ({rails * nominal_gbps / 8:g} GB/s)")
    if frac < min_fraction:
        return False, f"fabric check failed: {where}, below --min-fraction {min_fraction:g}"
    return True, f"fabric check passed: {where} (>= {min_fraction:g})"


# ------------------------------------------------------------------------------- settings / CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", metavar="FILE",
                   help=f"YAML with any of: {', '.join(SETTINGS)} (e.g. jobs/cluster/nccl-check.yaml); flags win")
    p.add_argument("--root", metavar="URI", help="run root: rank 0 also writes the table as JSON to "
                   "<root>/fabric-check/<UTC time>.json (default: no file)")
    s = p.add_argument_group("the sweep")
    s.add_argument("--min-bytes", metavar="SIZE", help="smallest tensor, e.g. 1M (default: 1M on GPUs, 64K on gloo)")
    s.add_argument("--max-bytes", metavar="SIZE", help="largest tensor, the one the verdict reads (default: 1G on "
                   "GPUs, 4M on gloo)")
    s.add_argument("--factor", type=int, metavar="F", help="each size is F times the one before (default 4)")
    s.add_argument("--warmup", type=int, metavar="N", help="untimed all-reduces per size (default 5)")
    s.add_argument("--iters", type=int, metavar="N", help="timed all-reduces per size (default 20)")
    s.add_argument("--dtype", choices=sorted(DTYPES), help="element type (default bf16, what training reduces)")
    s.add_argument("--backend", choices=["auto", "nccl", "gloo"],
                   help="process group backend (default auto: nccl when a GPU is there, else gloo)")
    s.add_argument("--nccl-algo", metavar="ALGO", help="NCCL_ALGO for the check unless the pod sets it, e.g. Ring: "
                   "its busbw is what the links carried (Tree on 2 nodes and NVLink/IB SHARP report more than the "
                   "wire); default: NCCL's choice")
    v = p.add_argument_group("the verdict")
    v.add_argument("--nominal-gbps", type=float, metavar="GBPS",
                   help="the rate of one network link (NIC port) in Gb/s, e.g. 400 (NDR InfiniBand, 400G RoCE), 200 "
                   "(HDR), 800 (XDR); rows then show busbw as a fraction of --rails such links")
    v.add_argument("--rails", type=int, metavar="N", help="network links per node that NCCL uses (default: the "
                   "processes per node, one NIC per GPU as on a rail-optimized node)")
    v.add_argument("--min-fraction", type=float, metavar="X", help="with --nominal-gbps: exit 1 when the bus "
                   "bandwidth at the largest size is below X times the nominal rate (default 0.7)")
    d = p.add_argument_group("topology (default: $PET_* from the PyTorchJob, else one local node)")
    d.add_argument("--nnodes", metavar="N", help="nodes (pods); locally without --node-rank: N simulated nodes")
    d.add_argument("--node-rank", type=int, metavar="R", help="this node's rank")
    d.add_argument("--nproc-per-node", metavar="P", help="processes per node: a number, or auto/gpu/cpu")
    d.add_argument("--master-addr", metavar="HOST", help="address of node 0")
    d.add_argument("--master-port", type=int, metavar="PORT", help="rendezvous port on node 0")


EPILOG = """\
examples:
  llmpipe fabric-check --nnodes 2 --nproc-per-node 1             # 2 simulated nodes on this machine (gloo)
  llmpipe fabric-check --nominal-gbps 400 --min-fraction 0.8     # inside a PyTorchJob: every pod runs this
  make deploy-nccl-check                                         # the PyTorchJob, with pretrain's pod shape

Read the busbw column at the largest size: across nodes it should come near the node's links together
(8 rails x 400 Gb/s NDR = 400 GB/s; NVIDIA sees 46-48 GB/s per NDR NIC); far below means a missing RDMA
path (NCCL fell back to TCP sockets), a bad cable or NIC, or a wrong NCCL_IB_HCA / NCCL_SOCKET_IFNAME.
Exit 1 (one line) when below --min-fraction. One node crosses no fabric: no threshold there."""


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "fabric-check", help="all-reduce bandwidth across the nodes (bus bandwidth vs the link's nominal rate)",
        description="An all-reduce bandwidth test over torch.distributed (NCCL on GPUs, gloo on CPUs): tensors of "
        "growing size, warm-up then timed calls; rank 0 prints time, algorithm and bus bandwidth per size (the "
        "nccl-tests convention: busbw = algbw * 2(n-1)/n) and the ratio to --nominal-gbps.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return p


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """The config file's settings under the flags', checked."""
    out = dict(SETTINGS)
    data: dict[str, Any] = {}
    if getattr(args, "config", None):
        import yaml

        try:
            with open(args.config, encoding="utf-8") as fh:
                data = yaml.safe_load(fh) or {}
        except OSError as exc:
            raise ConfigError(f"{args.config}: {exc.strerror or exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{args.config}: a mapping of settings, e.g. nominal_gbps: 400")
        unknown = sorted(set(data) - set(SETTINGS))
        if unknown:
            raise ConfigError(f"{args.config}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(SETTINGS)}")
        out.update(data)
    explicit = {k for k in ("min_bytes", "max_bytes") if getattr(args, k, None) is not None or k in data}
    for key in SETTINGS:
        if getattr(args, key, None) is not None:
            out[key] = getattr(args, key)
    out["explicit_sizes"] = sorted(explicit)
    for key in ("factor", "warmup", "iters"):
        out[key] = int(out[key])
    if out["iters"] < 1 or out["warmup"] < 0:
        raise ConfigError("iters must be >= 1 and warmup >= 0")
    if out["dtype"] not in DTYPES:
        raise ConfigError(f"dtype {out['dtype']!r}: one of {', '.join(DTYPES)}")
    if out["nominal_gbps"] is not None and float(out["nominal_gbps"]) <= 0:
        raise ConfigError("nominal_gbps must be > 0 (Gb/s of one link, e.g. 400)")
    if out["rails"] is not None and int(out["rails"]) < 1:
        raise ConfigError("rails must be >= 1 (network links per node)")
    if not 0 <= float(out["min_fraction"]) <= 1.5:
        raise ConfigError(f"min_fraction {out['min_fraction']}: a fraction of the nominal rate, e.g. 0.7")
    return out


def worker_argv(args: argparse.Namespace) -> list[str]:
    """The arguments the workers get: everything but the topology (torchrun's business)."""
    out: list[str] = []
    for key in ("config", "root", *SETTINGS):
        value = getattr(args, key, None)
        if value is not None:
            out += [f"--{key.replace('_', '-')}", str(value)]
    return out


# ------------------------------------------------------------------------------------ worker


def measure(dist: Any, torch: Any, nbytes: int, dtype: Any, device: Any, warmup: int, iters: int,
            world: int) -> Row:
    """One size: a checked all-reduce of ones (every element must come back as n), then warm-up and timed
    all-reduces of zeros (in place, so values never grow), the time averaged over the ranks."""
    elem = torch.tensor([], dtype=dtype).element_size()
    count = nbytes // elem
    buf = torch.ones(count, dtype=dtype, device=device)
    dist.all_reduce(buf)
    wrong = int((buf != world).sum().item())
    buf.zero_()
    for _ in range(warmup):
        dist.all_reduce(buf)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    dist.barrier()
    start = time.perf_counter()
    for _ in range(iters):
        dist.all_reduce(buf)
    sync()
    seconds = (time.perf_counter() - start) / iters
    # time and wrong count over all ranks (nccl-tests: Allreduce of deltaSec with MPI_SUM / nranks, errors summed)
    stats = torch.tensor([seconds, float(wrong)], dtype=torch.float64, device=device)
    dist.all_reduce(stats)
    seconds, wrong = stats[0].item() / world, int(stats[1].item())
    algbw = alg_bandwidth(count * elem, seconds)
    return Row(count * elem, count, seconds * 1e6, algbw, bus_bandwidth(algbw, world), wrong)


def run_worker(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> int:
    """Inside torchrun: the sweep on this rank; rank 0 prints the table and the verdict."""
    from pipeline.training.launcher import ERROR_PREFIX, RankErrorHandler, error_line, worker_rank

    env = dict(os.environ if env is None else env)
    rank, world, local = worker_rank(env)
    try:
        cfg = settings(args)
        return _sweep(cfg, args, env, rank, world, local)
    except BaseException as exc:  # noqa: BLE001 - one line the launcher relays (pipeline.training.launcher)
        if isinstance(exc, KeyboardInterrupt):
            raise
        print(f"{ERROR_PREFIX} {error_line(exc, rank, world)}", file=sys.stderr, flush=True)
        RankErrorHandler(env).record_exception(exc)
        return exc.exit_code if isinstance(exc, PipelineError) else 1


def _sweep(cfg: dict[str, Any], args: argparse.Namespace, env: Mapping[str, str], rank: int, world: int,
           local: int) -> int:
    import torch
    import torch.distributed as dist

    backend = cfg["backend"]
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise ConfigError("backend nccl needs a GPU and none is visible; --backend gloo for a CPU test")
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    dtype = getattr(torch, DTYPES[cfg["dtype"]])
    elem = torch.tensor([], dtype=dtype).element_size()
    lo, hi = ("1M", "1G") if device.type == "cuda" else CPU_SIZES
    lo = cfg["min_bytes"] if "min_bytes" in cfg["explicit_sizes"] else lo
    hi = cfg["max_bytes"] if "max_bytes" in cfg["explicit_sizes"] else hi
    plan = sizes(parse_size(lo), parse_size(hi), cfg["factor"], elem)
    per_node = int(env.get("LOCAL_WORLD_SIZE") or 1)
    nodes = max(1, world // per_node)
    rails = int(cfg["rails"]) if cfg["rails"] is not None else per_node
    if backend == "nccl" and cfg["nccl_algo"] and "NCCL_ALGO" not in os.environ:
        os.environ["NCCL_ALGO"] = str(cfg["nccl_algo"])  # read by NCCL when the communicator is created
        env = {**env, "NCCL_ALGO": str(cfg["nccl_algo"])}
    dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    try:
        if rank == 0:
            where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
            nccl = f", NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}" if backend == "nccl" else ""
            knobs = " ".join(f"{k}={v}" for k, v in sorted(env.items()) if k.startswith("NCCL_"))
            print(f"fabric check: all-reduce over {world} ranks ({nodes} nodes x {per_node}), "
                  f"{backend}{nccl}, {cfg['dtype']} on {where}, {cfg['warmup']} warm-up + {cfg['iters']} timed calls "
                  f"per size" + (f"\n  {knobs}" if knobs else ""), flush=True)
        rows = []
        for nbytes in plan:
            row = measure(dist, torch, nbytes, dtype, device, cfg["warmup"], cfg["iters"], world)
            rows.append(row)
            if rank == 0 and len(rows) == 1:
                print(format_table(rows, cfg["nominal_gbps"], rails), flush=True)
            elif rank == 0:
                print(format_table(rows[-1:], cfg["nominal_gbps"], rails).splitlines()[1], flush=True)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    if rank != 0:
        return 0
    nominal = float(cfg["nominal_gbps"]) if cfg["nominal_gbps"] is not None else None
    ok, line = verdict(rows, nominal, float(cfg["min_fraction"]), rails, nodes)
    if args.root:
        _write_report(args.root, {**cfg, "rails": rails, "nodes": nodes}, rows, world, backend, ok, line)
    if not ok:
        raise FabricCheckFailed(line)
    print(line, flush=True)
    return 0


def _write_report(root: str, cfg: dict[str, Any], rows: Sequence[Row], world: int, backend: str, ok: bool,
                  line: str) -> None:
    from pipeline.storage import Storage

    storage = Storage(root)
    path = storage.path("fabric-check", time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + ".json")
    storage.fs.makedirs(os.path.dirname(path), exist_ok=True)
    report = {"ranks": world, "nodes": cfg["nodes"], "backend": backend, "dtype": cfg["dtype"],
              "nominal_gbps": cfg["nominal_gbps"], "rails": cfg["rails"], "min_fraction": cfg["min_fraction"],
              "passed": ok, "verdict": line,
              "rows": [dataclasses.asdict(r) for r in rows]}
    with storage.fs.open(path, "w") as fh:
        fh.write(json.dumps(report, indent=2) + "\n")
    print(f"fabric check: report {storage.url('fabric-check', os.path.basename(path))}", flush=True)


# ------------------------------------------------------------------------------------ launch


def launch(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> int:
    """Start torchrun node agent(s) running this module on every rank (the training launcher's topology rules)."""
    from pipeline.training import free_port
    from pipeline.training.launcher import DEFAULT_MASTER_ADDR, _nnodes, _run_agents, topology_from, torchrun_command

    env = dict(os.environ if env is None else env)
    settings(args)  # a bad config fails here, once, not on every rank
    flags = {k: getattr(args, k) for k in TOPOLOGY}
    in_pod = any(k.startswith("PET_") for k in env) or "RANK" in env
    simulate = flags["nnodes"] is not None and _nnodes(flags["nnodes"], "--nnodes") > 1 and flags["node_rank"] is None \
        and not in_pod
    if flags["master_port"] is None and not in_pod and (simulate or flags["nnodes"] is None or str(flags["nnodes"]) == "1"):
        flags["master_port"] = free_port()
    topo = topology_from(env, flags)
    if simulate and flags["master_addr"] is None and topo.rdzv_backend == "static":
        topo = dataclasses.replace(topo, node_rank=0, master_addr=DEFAULT_MASTER_ADDR)
    child_env = {k: v for k, v in env.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    ranks = list(range(topo.nnodes)) if simulate else [topo.node_rank]
    cmds = [torchrun_command(topo, worker_argv(args), node_rank=r, module="pipeline.fabric") for r in ranks]
    for cmd in cmds:
        print(f"fabric check: {shlex.join(cmd)}  [{topo.source}]", file=sys.stderr, flush=True)
    return _run_agents(cmds, child_env)


def main(args: argparse.Namespace) -> int:
    """``llmpipe fabric-check``: launch, or (under torchrun) run this rank's sweep."""
    if "LOCAL_RANK" in os.environ:
        return run_worker(args)
    return launch(args)


def _module_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.fabric", description=__doc__.splitlines()[0],
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        return main(args)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    from torch.distributed.elastic.multiprocessing.errors import record

    from pipeline.training.launcher import RankErrorHandler

    sys.exit(record(_module_main, error_handler=RankErrorHandler())())
