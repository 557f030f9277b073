"""``llmpipe serve``: arguments and the command."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any, Callable

from pipeline.errors import ConfigError, InputError

DEFAULT_PORT = 8000
CACHE = ".serve-cache"  # under a local run root: the fetched versions (not an artifact: no manifest)


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "serve",
        help="serve the registry's champion through an OpenAI-compatible API (chat completions, streaming)",
        description="Resolve models:/NAME@ALIAS in the MLflow registry (the run root's embedded store, or "
        "$MLFLOW_TRACKING_URI), download that version once, and serve it on HOST:PORT with an OpenAI-compatible API "
        "(/v1/chat/completions with the model's chat template, streaming, stop, max_tokens; /v1/models). The model id "
        "clients send is the registered name. /ready answers 200 once a warm-up generation has succeeded, /metrics "
        "is Prometheus text, and every request is logged with the model version. Binds 127.0.0.1 unless told "
        "otherwise: there is no authentication.",
        epilog="examples:\n"
        "  llmpipe serve --root runs/demo                      # the demo's champion on http://127.0.0.1:8000/v1\n"
        "  llmpipe serve --root runs/demo --model models:/llm-pipeline-demo/1 --port 8001\n"
        "  MLFLOW_TRACKING_URI=http://mlflow:5000 llmpipe serve --fetch-only /models --model models:/llm-pipeline@champion\n"
        "  llmpipe serve --model-dir /models --host 0.0.0.0    # a pod: serve what the init container fetched\n\n"
        "then, from Python:\n"
        "  from openai import OpenAI\n"
        "  client = OpenAI(base_url='http://127.0.0.1:8000/v1', api_key='unused')\n"
        "  client.chat.completions.create(model='llm-pipeline-demo', messages=[{'role': 'user', 'content': 'Сәлем!'}])",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--root", metavar="URI", help="run root whose embedded MLflow store to use when $MLFLOW_TRACKING_URI "
                                                 "is unset (default: $LLMPIPE_ROOT or runs/default)")
    p.add_argument("--model", metavar="URI", help="models:/NAME@ALIAS or models:/NAME/VERSION (default: the root's "
                                                  "registered model @champion)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:0, auto (default cpu)")
    p.add_argument("--dtype", default="auto", help="auto (from the weights), float32, bfloat16, ...")
    p.add_argument("--cache-dir", metavar="DIR", help=f"where fetched versions go (default: <root>/{CACHE} for a local "
                                                      "root, else ~/.cache/llmpipe/serve)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--fetch-only", metavar="DIR", help="resolve and download into DIR (DIR/served.json, "
                                                          "DIR/v<version>/hf/) and exit: a pod's init container")
    mode.add_argument("--model-dir", metavar="DIR", help="serve what --fetch-only put in DIR; no registry access")


def _default_model(root: str) -> str:
    from pipeline.storage import Storage

    manifest = Storage(root, create=False).manifest("registry")
    name = ((manifest or {}).get("metrics") or {}).get("name")
    if not name:
        raise ConfigError(f"{root} has no registry/ artifact to take the model name from: pass --model "
                          "models:/NAME@champion (or run the pipeline through register)")
    return f"models:/{name}@champion"


def main(args: argparse.Namespace, tracking_client: Callable[[argparse.Namespace], Any]) -> int:
    from pipeline import default_root, tracking
    from pipeline.storage import Storage
    from pipeline.serving import resolve, server

    if not 0 < args.port < 65536:
        raise ConfigError(f"--port {args.port} is not a TCP port")
    if args.model_dir:
        served = resolve.read_served(args.model_dir)
    else:
        root = default_root(args.root)
        uri = args.model or _default_model(root)
        client = tracking_client(args)
        tracking_uri = tracking.resolve_uri(Storage(root, create=False) if not os.environ.get("MLFLOW_TRACKING_URI") else None)
        into = args.fetch_only or args.cache_dir
        if not into:
            local = "://" not in root or root.startswith("file://")
            into = os.path.join(root.removeprefix("file://"), CACHE) if local else str(Path.home() / ".cache/llmpipe/serve")
        served = resolve.fetch(client, uri, into, tracking_uri)
        if args.fetch_only:
            print(json.dumps(served.to_json(), indent=2))
            return 0
    if not Path(served.folder, "config.json").exists():
        raise InputError(f"{served.folder} has no config.json: fetch the model again (--fetch-only)")
    server.run(served, host=args.host, port=args.port, device=args.device, dtype=args.dtype)
    return 0
