"""The end of `make demo`: serve the run root's champion for a moment, talk to it with the `openai` client, stop the
server, and print the command and the snippet that do the same by hand."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from pipeline.localserver import ServerDidNotStart, free_port, stop, wait_http


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--root", required=True)
    args = ap.parse_args()
    manifest = Path(args.root, "registry", "manifest.json")
    if not manifest.exists():
        print(f"no registry/ in {args.root}: nothing to serve", file=sys.stderr)
        return 1
    name = json.loads(manifest.read_text())["metrics"]["name"]
    port = free_port()
    log = Path(args.root, ".serve-cache", "demo-serve.log")
    log.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "serve", "--root", args.root, "--port", str(port)],
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            ready = json.loads(wait_http(url + "/ready", proc, timeout=300, what="llmpipe serve"))
        except ServerDidNotStart as exc:
            print(f"{exc}; its log: {log}", file=sys.stderr)
            return 1
        from openai import OpenAI

        client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        question = "Қазақстанның астанасы қай қала?"
        r = client.chat.completions.create(model=name, messages=[{"role": "user", "content": question}], max_tokens=24)
        print(f"\n== serve: {name} version {ready['version']} (champion) answered through the OpenAI API ==")
        print(f"  user:      {question}")
        print(f"  assistant: {r.choices[0].message.content!r}  ({r.usage.completion_tokens} tokens; a tiny demo model)")
    finally:
        stop(proc)
    print(f"""
To serve it yourself (stops with Ctrl-C):
  .venv/bin/llmpipe serve --root {args.root}            # http://127.0.0.1:8000/v1
then:
  curl -s http://127.0.0.1:8000/v1/chat/completions -H 'content-type: application/json' \\
    -d '{{"model": "{name}", "messages": [{{"role": "user", "content": "Сәлем!"}}], "max_tokens": 32}}'
or:
  from openai import OpenAI
  client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
  print(client.chat.completions.create(model="{name}", messages=[{{"role": "user", "content": "Сәлем!"}}]).choices[0].message.content)
""")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
