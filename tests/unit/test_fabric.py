"""`llmpipe fabric-check` (pipeline/fabric.py): the bandwidth arithmetic against nccl-tests' convention, and the
check end to end through real torchrun on gloo with 2 simulated nodes (one process each), as the PyTorchJob runs
it: the table, the verdict and the exit code."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import fabric

REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------ arithmetic


def test_bus_bandwidth_is_nccl_tests_all_reduce_formula():
    # nccl-tests src/all_reduce.cu AllReduceGetBw: baseBw = count*typesize / 1e9 / sec; busBw = baseBw * 2(n-1)/n
    algbw = fabric.alg_bandwidth(1 << 30, 0.05)
    assert algbw == pytest.approx((1 << 30) / 1e9 / 0.05)
    assert fabric.bus_bandwidth(algbw, 2) == pytest.approx(algbw)  # 2 ranks: factor 1
    assert fabric.bus_bandwidth(algbw, 8) == pytest.approx(algbw * 14 / 8)
    assert fabric.bus_bandwidth(algbw, 64) == pytest.approx(algbw * 126 / 64)
    assert fabric.bus_bandwidth(algbw, 1) == 0.0  # one rank: nothing crossed a link
    # 400 Gb/s = 50 GB/s: a bus bandwidth of 45 GB/s is 90% of an NDR rail, 360 GB/s 90% of 8 of them
    assert fabric.fraction_of_nominal(45.0, 400) == pytest.approx(0.9)
    assert fabric.fraction_of_nominal(360.0, 400, rails=8) == pytest.approx(0.9)
    # NVIDIA's DGX A100 figure (NVIDIA/nccl#1576): 192 GB/s over 8 x 200 Gb/s HDR = 96%
    assert fabric.fraction_of_nominal(192.0, 200, rails=8) == pytest.approx(0.96)


def test_sizes_grow_by_the_factor_to_exactly_the_largest():
    assert fabric.sizes(1 << 20, 1 << 30, 4, 2) == [1 << 20, 1 << 22, 1 << 24, 1 << 26, 1 << 28, 1 << 30]
    assert fabric.sizes(4096, 100_000, 4, 4) == [4096, 16384, 65536, 100_000]
    assert fabric.sizes(3, 7, 2, 2) == [2, 6]  # whole elements
    assert [fabric.parse_size(s) for s in ("4096", "64K", "1M", "1G", "2MiB")] == [4096, 65536, 1 << 20, 1 << 30, 2 << 20]
    for bad in ("", "-1", "1T", "x"):
        with pytest.raises(fabric.ConfigError):
            fabric.parse_size(bad)
    with pytest.raises(fabric.ConfigError, match="factor"):
        fabric.sizes(1, 8, 1, 1)


def test_verdict_reads_the_largest_size():
    rows = [fabric.Row(1 << 20, 1 << 19, 100.0, 10.0, 10.0, 0), fabric.Row(1 << 30, 1 << 29, 30000.0, 20.0, 40.0, 0)]
    ok, line = fabric.verdict(rows, 400, 0.7)
    assert ok and "40.00 GB/s at 1G is 80% of the nominal 400 Gb/s (50 GB/s)" in line
    ok, line = fabric.verdict(rows, 400, 0.9)
    assert not ok and line.startswith("fabric check failed:") and "below --min-fraction 0.9" in line
    assert fabric.verdict(rows, None, 0.9)[0]  # no nominal rate: no threshold
    bad = [*rows[:1], fabric.Row(1 << 30, 1 << 29, 30000.0, 20.0, 40.0, 3)]
    ok, line = fabric.verdict(bad, 400, 0.1)
    assert not ok and "3 element(s)" in line
    ok, line = fabric.verdict(rows, 400, 0.9, rails=8)  # 40 GB/s of 8 x 400 Gb/s: 10%
    assert not ok and "is 10% of the nominal 8 x 400 Gb/s (400 GB/s)" in line
    ok, line = fabric.verdict(rows, 400, 0.99, rails=8, nodes=1)  # one node: no fabric, no threshold
    assert ok and "one node" in line
    table = fabric.format_table(rows, 400).splitlines()
    assert "busbw(GB/s)" in table[0] and "of nominal" in table[0] and table[2].split()[-2] == "80%"


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    fabric.add_arguments(p)
    return p.parse_args(argv)


def test_settings_config_then_flags(tmp_path):
    cfg = fabric.settings(_args("--config", str(REPO / "jobs" / "cluster" / "nccl-check.yaml")))
    assert (cfg["nominal_gbps"], cfg["rails"], cfg["min_fraction"], cfg["max_bytes"], cfg["dtype"], cfg["nccl_algo"]) == (
        400, None, 0.7, "1G", "bf16", "Ring")
    cfg = fabric.settings(_args("--config", str(REPO / "jobs" / "cluster" / "nccl-check.yaml"), "--nominal-gbps", "200"))
    assert cfg["nominal_gbps"] == 200
    bad = tmp_path / "bad.yaml"
    bad.write_text("nominal_gbs: 400\n")
    with pytest.raises(fabric.ConfigError, match="unknown setting.*nominal_gbs"):
        fabric.settings(_args("--config", str(bad)))
    with pytest.raises(fabric.ConfigError, match="nominal_gbps"):
        fabric.settings(_args("--nominal-gbps", "0"))
    # the workers get every setting, never the topology
    assert fabric.worker_argv(_args("--nnodes", "2", "--iters", "3", "--root", "r")) == ["--root", "r", "--iters", "3"]


def test_help_names_the_convention_and_the_rates():
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "fabric-check", "--help"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    for word in ("2(n-1)/n", "--nominal-gbps", "--min-fraction", "400", "make deploy-nccl-check", "--nnodes"):
        assert word in out, word


# --------------------------------------------------------------------- end to end: torchrun on gloo


def _check(*argv: str, sizes: tuple[str, str] = ("4K", "256K")) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"}
    for k in [k for k in env if k.startswith("PET_") or k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")]:
        del env[k]
    return subprocess.run([sys.executable, "-m", "pipeline.cli", "fabric-check", "--nnodes", "2", "--nproc-per-node",
                           "1", "--min-bytes", sizes[0], "--max-bytes", sizes[1], "--warmup", "1", "--iters", "3", *argv],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=240)


def test_two_simulated_nodes_on_gloo_print_every_size_and_fail_a_forced_threshold(tmp_path):
    """One real run (torchrun, 2 node agents, gloo): the table has every size with the bandwidth arithmetic of
    nccl-tests, the report is written, and a threshold no loopback reaches fails it: exit 1, the verdict as the
    last line. (The passing verdict and its exit 0 are the same path up to the verdict: test_verdict_*.)"""
    root = tmp_path / "root"
    run = _check("--nominal-gbps", "400", "--min-fraction", "0.9", "--root", str(root))
    assert run.returncode == 1, run.stderr[-3000:]
    out = run.stdout + run.stderr
    assert "all-reduce over 2 ranks (2 nodes x 1), gloo, bf16 on cpu" in out
    rows = re.findall(r"^\[node 0\]\s+(\d+[KMG]?)\s+(\d+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+(\d+)%\s+(\d+)$", out, re.M)
    assert [r[1] for r in rows] == ["4096", "16384", "65536", "262144"]  # every size, in order
    for _, nbytes, count, time_us, algbw, busbw, _, wrong in rows:
        assert int(count) * 2 == int(nbytes) and wrong == "0"  # bf16, every result right
        # 2 ranks: busbw = algbw * 2(2-1)/2 = algbw = bytes / time (rounded in print)
        assert float(busbw) == float(algbw) == pytest.approx(int(nbytes) / 1e9 / (float(time_us) / 1e6), abs=0.006)
    (report,) = (root / "fabric-check").glob("*.json")
    data = json.loads(report.read_text())
    assert not data["passed"] and (data["ranks"], data["nodes"], data["rails"]) == (2, 2, 1)
    assert [r["nbytes"] for r in data["rows"]] == [4096, 16384, 65536, 262144]
    for r in data["rows"]:
        assert r["busbw"] == pytest.approx(r["algbw"]) and r["algbw"] == pytest.approx(r["nbytes"] / 1e9 / (r["time_us"] / 1e6))
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("error: distributed launch failed (exit 1): rank 0/2: FabricCheckFailed: fabric check failed: "
                           "bus bandwidth ") and "at 256K" in last and "below --min-fraction 0.9" in last, last
    assert data["verdict"] in last
