"""Serving throughput and latency: `llmpipe serve` under 1, 4 and 16 concurrent clients (the official `openai`
client, loopback) against the same model's bare ``generate()`` in one process, measured in the same run.

The model is a Hugging Face folder: ``--model-dir`` (e.g. the demo's champion after `llmpipe serve --fetch-only`),
else the tiny trained Llama of the test fixtures, built in a temporary folder. Every request generates exactly
``--max-tokens`` new tokens: both sides load a copy of the folder with ``eos_token_id`` unset (``min_tokens`` is not
in the API, and a small model stops after a token or two); the completion token counts the server reports are what
is summed. The baseline generates the same prompts one
after another with ``model.generate(do_sample=False, max_new_tokens=...)``, the chat template applied the same way.

Printed: completion tokens/s (all clients together), p50 / p95 request latency, and each as a ratio to the baseline
(tokens/s ratio > 1: the server does better than one bare generate() loop; on CPU it does not batch concurrent
requests, so expect about 1 or below). Bounded: ``--requests`` per level, loopback only; nothing asserts.

    .venv/bin/python benchmarks/bench_serve.py [--model-dir DIR] [--requests 32] [--max-tokens 32] [--json out.json]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.localserver import ServerDidNotStart, free_port, stop, wait_http  # noqa: E402

PROMPTS = ["Қазақстанның астанасы қай қала?", "Абай Құнанбайұлы кім болған?", "Какая столица Казахстана?",
           "Расскажи о степи.", "What is the capital of Kazakhstan?", "Tell me about the steppe."]


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def baseline(folder: str, n: int, max_tokens: int, threads: int) -> dict[str, float]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    lat, toks = [], 0
    for i in range(n + 1):
        ids = tok.apply_chat_template([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                                      add_generation_prompt=True, return_tensors="pt", return_dict=True)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=max_tokens, do_sample=False)
        if i:  # the first is warm-up
            lat.append(time.perf_counter() - t0)
            toks += out.shape[1] - ids["input_ids"].shape[1]
    return {"tokens_per_s": toks / sum(lat), "p50_s": percentile(lat, 0.5), "p95_s": percentile(lat, 0.95),
            "tokens": toks}


def level(url: str, name: str, clients: int, n: int, max_tokens: int) -> dict[str, float]:
    from openai import OpenAI

    local = threading.local()

    def one(i: int) -> tuple[float, int]:
        if not hasattr(local, "client"):  # one client per concurrent caller, reused as applications do
            local.client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
        c = local.client
        t0 = time.perf_counter()
        r = c.chat.completions.create(model=name, max_tokens=max_tokens, temperature=0,
                                      messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}])
        return time.perf_counter() - t0, r.usage.completion_tokens

    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(clients) as pool:
        res = list(pool.map(one, range(n)))
    wall = time.perf_counter() - t0
    lat = [r[0] for r in res]
    toks = sum(r[1] for r in res)
    return {"tokens_per_s": toks / wall, "p50_s": percentile(lat, 0.5), "p95_s": percentile(lat, 0.95), "tokens": toks}


def full_length_copy(folder: str, dest: Path) -> str:
    """``folder`` with ``eos_token_id`` unset in config.json and generation_config.json (the weights and the
    tokenizer linked, not copied), so that every request and every baseline generation runs to exactly
    ``--max-tokens``: a small model answers in a couple of tokens (the demo's says "1"), and what would be
    measured then is the request overhead, with tokens/s depending on how early each side stops."""
    dest.mkdir(parents=True)
    for f in Path(folder).iterdir():
        if f.name in ("config.json", "generation_config.json"):
            data = json.loads(f.read_text())
            data["eos_token_id"] = None
            (dest / f.name).write_text(json.dumps(data, indent=2))
        else:
            (dest / f.name).symlink_to(f.resolve())
    return str(dest)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", help="a Hugging Face model folder (default: the test fixtures' tiny trained Llama)")
    ap.add_argument("--requests", type=int, default=32, help="requests per concurrency level (and baseline generations)")
    ap.add_argument("--max-tokens", type=int, default=32, help="new tokens per request")
    ap.add_argument("--levels", default="1,4,16", help="concurrent clients")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads on both sides (OMP_NUM_THREADS for the server); the default 1 because "
                    "a small model's matmuls gain nothing from more, and on a shared machine a second thread that is "
                    "descheduled stalls every step (measured here: 32 tokens in 0.03 s on 1 thread, 0.4-0.7 s on 2)")
    ap.add_argument("--json", type=Path, help="write the numbers here")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    folder = args.model_dir
    if not folder:
        from tests.fixtures.quantize_model import build

        folder = str(work / "hf")
        print("building the tiny trained Llama of the test fixtures ...", file=sys.stderr, flush=True)
        build(folder, steps=60)
    source, folder = folder, full_length_copy(folder, work / "hf-full-length")
    name = "bench"
    (work / "served").mkdir()
    (work / "served" / "served.json").write_text(json.dumps(
        {"name": name, "version": 0, "alias": None, "uri": "local", "folder": str(Path(folder).resolve())}))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "serve", "--model-dir", str(work / "served"),
                             "--port", str(port)], stdout=open(work / "serve.log", "wb"), stderr=subprocess.STDOUT,
                            env=env)
    try:
        try:
            wait_http(url + "/ready", proc, timeout=300, what="llmpipe serve", log=work / "serve.log")
        except ServerDidNotStart as exc:
            raise SystemExit(str(exc)) from None
        base = baseline(folder, args.requests, args.max_tokens, args.threads)
        results = {"baseline": base}
        for clients in [int(x) for x in args.levels.split(",")]:
            level(url, name, clients, min(clients, 4), args.max_tokens)  # warm-up
            results[f"clients_{clients}"] = level(url, name, clients, args.requests, args.max_tokens)
    finally:
        stop(proc)
    print(f"\nmodel {source} (eos unset), {args.requests} requests per level, {args.max_tokens} new tokens each, "
          f"{os.cpu_count()} CPU cores, {args.threads} torch thread(s) per side, loopback")
    print(f"{'':<22}{'tokens/s':>10}{'x base':>8}{'p50 s':>9}{'x base':>8}{'p95 s':>9}{'x base':>8}")
    for key, r in results.items():
        label = "bare generate()" if key == "baseline" else f"serve, {key.split('_')[1]} clients"
        print(f"{label:<22}{r['tokens_per_s']:>10.1f}{r['tokens_per_s'] / base['tokens_per_s']:>8.2f}"
              f"{r['p50_s']:>9.3f}{r['p50_s'] / base['p50_s']:>8.2f}{r['p95_s']:>9.3f}{r['p95_s'] / base['p95_s']:>8.2f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
