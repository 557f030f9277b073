"""How the data stages scale: clean (every step) and pack on generated corpora of growing size.

Documents are random combinations of 2-5 real paragraphs of one language from the offline corpus
(``make corpus``: kk, ru, en), so they are distinct; 4% of them are exact copies (case changed) and 4%
near copies (3% of the words changed) of earlier documents, so that deduplication has work to do.

Two series, both run through ``llmpipe run`` in fresh run roots (the real stages, local worker processes,
the same steps and barriers as the pods of an Indexed Job):

* **weak scaling**: a fixed number of documents per rank (``--docs-per-rank``), the corpus growing with
  the ranks (``--sizes``). Every step's peak resident memory per rank should stay flat and the total work
  (CPU seconds, summed over the ranks) should grow linearly; the table prints each step's growth exponent
  (the slope of log value against log corpus size: 0 = flat, 1 = linear). On this 2-core machine the ranks
  share two cores, so wall time is total work / 2, not what a cluster sees.
* **per-rank growth**: one rank, growing documents (``--rank-sizes``): memory per rank against documents
  per rank, fitted linearly, gives the projection for a corpus of ``--project-docs`` documents on
  ``--project-pods`` pods (memory per pod, and wall time per step at one core per pod).

``resolve`` runs on one rank over every confirmed near-duplicate pair of the corpus: its memory follows the
number of duplicate pairs, which the series are too small to show beside the process's imports. It is measured
instead at the projected size: the pairs-per-document rate of the largest weak-scaling corpus (or
``--pairs-per-doc``) times ``--project-docs`` synthetic confirmed pairs through the same ``dedup.greedy``, in a
fresh process. ``--from-json`` reprints the tables from an earlier run's ``--json`` (and redoes that measurement).

Nothing here asserts. Results go to docs/benchmarks.md with the command line.

    .venv/bin/python benchmarks/bench_scale.py --cache .cache                     # ~20-25 min on 2 cores
    .venv/bin/python benchmarks/bench_scale.py --cache .cache --sizes 20000,40000 --rank-sizes 5000,10000
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_data import CorpusMissing, load_corpus  # noqa: E402

STEPS = ["signatures", "buckets", "exchange", "confirm", "resolve", "filter", "merge"]


def paragraphs(cache: Path) -> dict[str, list[str]]:
    pools: dict[str, list[str]] = {}
    for text, lang, _src in load_corpus(cache):
        for para in text.split("\n\n"):
            if len(para.split()) >= 8 and lang in ("kk", "ru", "en"):
                pools.setdefault(lang, []).append(para.strip())
    return pools


def _near(text: str, rate: float, rng: random.Random) -> str:
    ws = text.split(" ")
    for i in rng.sample(range(len(ws)), max(1, int(rate * len(ws)))):
        ws[i] = rng.choice(["өзгерді", "изменено", "changed"])
    return " ".join(ws)


def write_corpus(path: Path, n: int, pools: dict[str, list[str]], seed: int) -> int:
    """``n`` documents as jsonl; returns the bytes of text."""
    rng = random.Random(seed)
    langs = sorted(pools)
    recent: list[str] = []
    size = 0
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n):
            r = rng.random()
            if r < 0.04 and recent:
                text = rng.choice(recent).upper()
            elif r < 0.08 and recent:
                text = _near(rng.choice(recent), 0.03, rng)
            else:
                pool = pools[langs[i % len(langs)]]
                text = "\n\n".join(rng.choice(pool) for _ in range(rng.randint(2, 5)))
                recent.append(text)
                if len(recent) > 5000:
                    recent.pop(rng.randrange(len(recent)))
            size += len(text.encode("utf-8"))
            fh.write(json.dumps({"id": f"doc{i:08d}", "text": text}, ensure_ascii=False) + "\n")
    return size


def llmpipe(*args: str) -> None:
    cmd = [sys.executable, "-m", "pipeline.cli", *args, "--no-progress"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")


def manifest(root: Path, name: str) -> dict[str, Any]:
    return json.loads((root / name / "manifest.json").read_text())


def measure(work: Path, n: int, workers: int, pools: dict[str, list[str]], pack: bool) -> dict[str, Any]:
    root = work / f"n{n}-w{workers}"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    data = root / "docs.jsonl"
    mb = write_corpus(data, n, pools, seed=n) / 1e6
    cfg = root / "cfg"
    cfg.mkdir()
    (cfg / "collect.yaml").write_text(f'sources:\n  - name: gen\n    paths: ["{data}"]\n    id_field: id\n'
                                      f"docs_per_part: 50000\n")
    (cfg / "clean.yaml").write_text(f"workers: {workers}\ndocs_per_part: 50000\nsamples_per_reason: 5\n")
    (cfg / "tokenizer.yaml").write_text("vocab_size: 4000\ntrain_chars: 3000000\n")
    (cfg / "pack.yaml").write_text(f"workers: {workers}\nseq_len: 512\n")
    run_root = root / "run"
    t0 = time.perf_counter()
    llmpipe("run", "collect", "-c", str(cfg / "collect.yaml"), "--root", str(run_root))
    collect_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    llmpipe("run", "clean", "-c", str(cfg / "clean.yaml"), "--root", str(run_root))
    clean_s = time.perf_counter() - t0
    m = manifest(run_root, "clean")
    steps = dict(m["metrics"]["steps"])
    steps["merge"] = {"seconds": m["duration_s"], "peak_rss_mb": m.get("peak_rss_mb") or 0.0}
    out: dict[str, Any] = {"documents": n, "workers": workers, "mb": round(mb, 1), "collect_s": round(collect_s, 1),
                           "clean_s": round(clean_s, 1), "steps": steps, "kept": m["metrics"]["kept"],
                           "dropped": m["metrics"]["dropped_by_reason"], "dedup": m["metrics"]["dedup"]}
    if pack:
        llmpipe("run", "tokenizer", "-c", str(cfg / "tokenizer.yaml"), "--root", str(run_root))
        t0 = time.perf_counter()
        llmpipe("run", "pack", "-c", str(cfg / "pack.yaml"), "--root", str(run_root))
        p = manifest(run_root, "shards")
        out["pack"] = {"seconds": round(time.perf_counter() - t0, 1), "peak_rss_mb": p.get("parts_peak_rss_mb") or 0.0,
                       "merge_peak_rss_mb": p.get("peak_rss_mb") or 0.0}
    shutil.rmtree(root, ignore_errors=True)
    return out


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log y against log x."""
    pts = [(math.log(x), math.log(max(y, 1e-9))) for x, y in zip(xs, ys)]
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    den = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / den if den else float("nan")


def linear(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares (intercept, slope) of y against x."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    den = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else 0.0
    return my - b * mx, b


RESOLVE_AT_SCALE = r"""
import json, sys, time
import numpy as np
from pipeline.data import dedup

def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
docs, pairs = int(sys.argv[1]), int(sys.argv[2])
before = hwm()
rng = np.random.default_rng(0)
conf = np.zeros(pairs, dtype=dedup.PAIR)
l = np.sort(rng.integers(1, docs, pairs))
conf["l"] = l
conf["e"] = l - 1 - rng.integers(0, 1000, pairs) % l  # an earlier document, near it in the corpus
conf.sort(order=("l", "e"))
del l
t0 = time.perf_counter()
near = dedup.greedy(conf)
print(json.dumps({"pairs": pairs, "near": len(near), "seconds": time.perf_counter() - t0,
                  "peak_rss_mb": hwm(), "import_rss_mb": before}))
"""


def resolve_at_scale(docs: int, pairs: int) -> dict[str, Any]:
    """resolve's work at the projected size, measured: ``pairs`` confirmed pairs (sorted, each document's
    earlier neighbours near it) over ``docs`` documents through :func:`pipeline.data.dedup.greedy`, in a
    fresh process whose peak resident memory is read from /proc. A linear fit of the one-rank series
    cannot see resolve's growth: at 100k documents its pairs take a few MB beside the ~265 MB of imports."""
    got = subprocess.run([sys.executable, "-c", RESOLVE_AT_SCALE, str(docs), str(pairs)], check=True,
                         capture_output=True, text=True)
    return json.loads(got.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path, default=Path(".cache"), help="where `make corpus` put the corpus")
    ap.add_argument("--sizes", default="25000,100000,400000", help="corpus sizes of the weak-scaling series")
    ap.add_argument("--docs-per-rank", type=int, default=12500, help="documents per rank in the weak-scaling series")
    ap.add_argument("--rank-sizes", default="12500,25000,50000,100000", help="documents on one rank (second series)")
    ap.add_argument("--no-pack", action="store_true", help="clean only")
    ap.add_argument("--pack-max", type=int, default=100_000, help="pack only the corpora up to this many documents")
    ap.add_argument("--project-docs", type=float, default=100e6, help="corpus size to project to")
    ap.add_argument("--project-pods", type=int, default=64, help="pods to project to")
    ap.add_argument("--pairs-per-doc", type=float,
                    help="confirmed near-duplicate pairs per document for resolve's projection (default: the rate "
                    "measured on the largest weak-scaling corpus; real web text may have more)")
    ap.add_argument("--json", type=Path, help="write the measurements here")
    ap.add_argument("--from-json", type=Path, help="print the tables (and measure resolve at scale) from an earlier "
                    "run's --json instead of measuring the series again")
    ap.add_argument("--work", type=Path, help="scratch folder (default: a temporary folder)")
    args = ap.parse_args(argv)
    try:
        pools = paragraphs(args.cache)
    except CorpusMissing as exc:
        print(exc, file=sys.stderr)
        return 2
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-scale-"))
    sizes = [int(s) for s in args.sizes.split(",")]
    rank_sizes = [int(s) for s in args.rank_sizes.split(",")]
    weak, single = [], []
    if args.from_json:
        earlier = json.loads(args.from_json.read_text())
        weak, single, sizes, rank_sizes = earlier["weak"], earlier["single"], [], []
    for n in sizes:
        w = max(1, n // args.docs_per_rank)
        print(f"weak scaling: {n:,} documents on {w} ranks ...", file=sys.stderr, flush=True)
        weak.append(measure(work, n, w, pools, pack=not args.no_pack and n <= args.pack_max))
        print(json.dumps(weak[-1]), file=sys.stderr, flush=True)
    for n in rank_sizes:
        print(f"one rank: {n:,} documents ...", file=sys.stderr, flush=True)
        single.append(measure(work, n, 1, pools, pack=not args.no_pack and n <= args.pack_max))
        print(json.dumps(single[-1]), file=sys.stderr, flush=True)

    rows = [*STEPS, *(["pack"] if not args.no_pack else [])]

    def series(records: list[dict[str, Any]], step: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        """(record, measurement) of ``step`` in the records that have it (pack is skipped above --pack-max)."""
        if step == "pack":
            return [(r, r["pack"]) for r in records if "pack" in r]
        return [(r, r["steps"][step]) for r in records]

    ns = [r["documents"] for r in weak]
    print(f"\nweak scaling, {args.docs_per_rank:,} documents per rank (peak RSS per rank in MB; step seconds = the "
          "slowest rank, ranks sharing 2 cores)")
    print(f"{'step':<11}" + "".join(f"{n:>16,}" for n in ns) + f"{'mem exp':>9}{'work exp':>9}")
    for step in rows:
        got = series(weak, step)
        if not got:
            continue
        xs = [r["documents"] for r, _ in got]
        mems = [m["peak_rss_mb"] for _, m in got]
        # total work of a step: the slowest rank's wall time x the ranks sharing the cores
        work_s = [m["seconds"] * min(r["workers"], os.cpu_count() or 1) for r, m in got]
        cells = "".join(f"{m['peak_rss_mb']:>8.0f} {m['seconds']:>6.1f}s" for _, m in got)
        exps = (f"{slope(xs, mems):>9.2f}{slope(xs, work_s):>9.2f}") if len(got) > 1 else ""
        print(f"{step:<11}{cells:<{16 * len(ns)}}{exps}")
    print("".join([f"{'clean wall':<11}", *(f"{r['clean_s']:>15.1f}s" for r in weak)]))

    rn = [r["documents"] for r in single]
    print("\none rank (peak RSS in MB, seconds)")
    print(f"{'step':<11}" + "".join(f"{n:>16,}" for n in rn) + f"{'MB/1M docs':>12}{'s/1M docs':>11}")
    per_rank = args.project_docs / args.project_pods
    projection = {}
    for step in rows:
        got = series(single, step)
        if len(got) < 2:
            continue
        xs = [r["documents"] for r, _ in got]
        a, b = linear(xs, [m["peak_rss_mb"] for _, m in got])
        ta, tb = linear(xs, [m["seconds"] for _, m in got])
        scale = args.project_docs if step == "resolve" else per_rank  # resolve: one rank, the whole corpus's pairs
        projection[step] = {"peak_rss_mb": a + max(b, 0.0) * scale, "seconds": ta + max(tb, 0.0) * scale}
        cells = "".join(f"{m['peak_rss_mb']:>8.0f} {m['seconds']:>6.1f}s" for _, m in got)
        print(f"{step:<11}{cells:<{16 * len(rn)}}{b * 1e6:>12.0f}{tb * 1e6:>11.0f}")
    if "resolve" in projection and weak:
        rate = args.pairs_per_doc
        if rate is None:
            rate = weak[-1]["dedup"]["confirmed_pairs"] / weak[-1]["documents"]
        pairs = int(rate * args.project_docs)
        print(f"\nresolve at scale: {pairs:,} confirmed pairs ({rate:.3f} per document) over "
              f"{args.project_docs:,.0f} documents ...", file=sys.stderr, flush=True)
        r = resolve_at_scale(int(args.project_docs), pairs)
        base = min(m["peak_rss_mb"] for _, m in series(single, "resolve"))  # the stage's own imports
        projection["resolve"] = {"peak_rss_mb": base + r["peak_rss_mb"] - r["import_rss_mb"], "seconds": r["seconds"],
                                 "measured": r}
    print(f"\nprojection (linear fit of the one-rank series; resolve measured at the projected pair count): {args.project_docs:,.0f} documents on {args.project_pods} "
          f"pods ({per_rank:,.0f} per pod, one core each; resolve on one pod over the whole corpus's pairs)")
    for step, pr in projection.items():
        print(f"  {step:<11} {pr['peak_rss_mb'] / 1024:6.2f} GB per pod   {pr['seconds'] / 3600:6.2f} h")
    total_h = sum(pr["seconds"] for s, pr in projection.items() if s != "pack") / 3600
    print(f"  clean total {total_h:.2f} h wall (steps in sequence)")
    if args.json:
        args.json.write_text(json.dumps({"weak": weak, "single": single, "projection": projection}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
