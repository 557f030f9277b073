"""``llmpipe serve``: the champion through an OpenAI-compatible API.

The generation server is transformers' own (``transformers serve``: /v1/chat/completions with the model's chat
template, streaming, ``stop``, ``max_tokens``; transformers/cli/serving/). We build its app around the assembled HF
folder of the served version (pipeline/serving/resolve.py) and put a thin front before it, for what a platform needs
and it does not do:

* the model id clients send is the registered name (``llm-pipeline-demo``), not a path; another name is a 404 in
  OpenAI's error shape (``model_not_found``), and the server stays up;
* ``GET /ready`` answers 200 only after a short chat completion through the whole stack has succeeded (the pods'
  readinessProbe), ``GET /health`` is liveness;
* one log line per request with ``model_version=N``, status, latency and tokens;
* ``GET /metrics``: Prometheus counters and histograms of requests, latency and tokens, labelled with the version;
* ``GET /v1/models`` lists the served name with its version and alias.

Malformed requests get transformers' 422 (the front only reads ``model``); a request that is not JSON is our 400.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any

from pipeline.errors import PipelineError
from pipeline.serving.resolve import Served

log = logging.getLogger("llmpipe.serve")

_GENERATION_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/responses")


def _inner_app(folder: str, *, device: str, dtype: str) -> Any:
    """transformers' serving app (the pieces ``transformers serve`` assembles in transformers/cli/serve.py
    ``Serve.__init__``), pinned to ``folder``, without its own uvicorn."""
    try:
        from transformers.cli.serving.chat_completion import ChatCompletionHandler
        from transformers.cli.serving.completion import CompletionHandler
        from transformers.cli.serving.model_manager import ModelManager
        from transformers.cli.serving.response import ResponseHandler
        from transformers.cli.serving.server import build_server
        from transformers.cli.serving.systemone import SystemOneHandler
        from transformers.cli.serving.transcription import TranscriptionHandler
        from transformers.cli.serving.utils import GenerationState
    except ImportError as exc:  # pragma: no cover - the lock pins a transformers that has it
        import transformers

        raise PipelineError(f"llmpipe serve needs transformers' serving module (transformers {transformers.__version__}: "
                            f"{exc}); install the locked versions (make install)") from None
    manager = ModelManager(device=device, dtype=dtype, force_model=folder)
    state = GenerationState(continuous_batching=False, compile=False, cb_config=None)
    return build_server(
        manager,
        ChatCompletionHandler(model_manager=manager, generation_state=state, chat_template_kwargs={}),
        completion_handler=CompletionHandler(model_manager=manager, generation_state=state),
        response_handler=ResponseHandler(model_manager=manager, generation_state=state, chat_template_kwargs={}),
        transcription_handler=TranscriptionHandler(manager, state),
        systemone_handler=SystemOneHandler(model_manager=manager, generation_state=state, chat_template_kwargs={},
                                           decision_config=None),
        generation_state=state,
    )


class _Metrics:
    def __init__(self, served: Served):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        labels = ["model", "version"]
        self.labels = {"model": served.name, "version": str(served.version)}
        self.requests = Counter("llmpipe_serve_requests", "Requests by path and status", [*labels, "path", "status"],
                                registry=self.registry)
        self.latency = Histogram("llmpipe_serve_request_seconds", "Request latency (to the last byte)",
                                 [*labels, "path"], registry=self.registry,
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
        self.tokens = Counter("llmpipe_serve_completion_tokens", "Completion tokens generated", labels,
                              registry=self.registry)
        self.prompt_tokens = Counter("llmpipe_serve_prompt_tokens", "Prompt tokens read", labels, registry=self.registry)
        self.info = Gauge("llmpipe_serve_model_info", "The served model (value 1)", [*labels, "alias"],
                          registry=self.registry)
        self.info.labels(**self.labels, alias=served.alias or "").set(1)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


def _error(status: int, message: str, code: str, param: str | None = None) -> tuple[int, bytes]:
    body = {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}}
    return status, json.dumps(body).encode()


def build_app(served: Served, *, device: str = "cpu", dtype: str = "auto", warmup: bool = True) -> Any:
    """The ASGI app: our front around transformers' server for ``served``."""
    inner = _inner_app(served.folder, device=device, dtype=dtype)
    metrics = _Metrics(served)
    state = {"ready": False, "why": "warming up"}
    path_bytes = json.dumps(served.folder)[1:-1].encode()
    name_bytes = json.dumps(served.name)[1:-1].encode()
    created = int(time.time())

    async def send_json(send: Any, status: int, body: bytes, ctype: bytes = b"application/json") -> None:
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", ctype), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def warm() -> None:
        import httpx

        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=inner), base_url="http://warmup",
                                         timeout=600) as client:
                r = await client.post("/v1/chat/completions", json={
                    "model": served.folder, "max_tokens": 2,
                    "messages": [{"role": "user", "content": "Сәлем"}]})
            if r.status_code == 200 and r.json().get("choices"):
                state.update(ready=True, why="")
                log.info("ready: %s version %s answered a short generation", served.name, served.version)
            else:
                state["why"] = f"warm-up generation failed: HTTP {r.status_code} {r.text[:200]}"
        except Exception as exc:  # noqa: BLE001 - not ready, and /ready says why
            state["why"] = f"warm-up generation failed: {type(exc).__name__}: {exc}"
        if not state["ready"]:
            log.error("not ready: %s", state["why"])

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    if warmup:
                        await warm()
                    else:
                        state.update(ready=True, why="")
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return await inner(scope, receive, send)
        path, method = scope["path"], scope["method"]
        if path == "/health":
            return await send_json(send, 200, b'{"status":"ok"}')
        if path == "/ready":
            status = 200 if state["ready"] else 503
            body = {"ready": state["ready"], "model": served.name, "version": served.version}
            if state["why"]:
                body["why"] = state["why"]
            return await send_json(send, status, json.dumps(body).encode())
        if path == "/metrics":
            return await send_json(send, 200, metrics.render(), b"text/plain; version=0.0.4; charset=utf-8")
        if path == "/v1/models" and method == "GET":
            data = [{"id": served.name, "object": "model", "created": created, "owned_by": "llmpipe",
                     "version": served.version, "alias": served.alias, "uri": served.uri}]
            return await send_json(send, 200, json.dumps({"object": "list", "data": data}).encode())
        if path not in _GENERATION_PATHS or method != "POST":
            return await send_json(send, *_error(404, f"{method} {path} is not served here", "not_found"))

        t0 = time.perf_counter()
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        raw = b"".join(chunks)
        status_box = {"status": 500}
        usage = {"prompt": 0, "completion": 0}

        async def finish(status: int) -> None:
            seconds = time.perf_counter() - t0
            metrics.requests.labels(**metrics.labels, path=path, status=str(status)).inc()
            metrics.latency.labels(**metrics.labels, path=path).observe(seconds)
            metrics.tokens.labels(**metrics.labels).inc(usage["completion"])
            metrics.prompt_tokens.labels(**metrics.labels).inc(usage["prompt"])
            log.info("request path=%s model=%s model_version=%s status=%d seconds=%.3f prompt_tokens=%d "
                     "completion_tokens=%d", path, served.name, served.version, status, seconds, usage["prompt"],
                     usage["completion"])

        try:
            body = json.loads(raw or b"null")
        except ValueError:
            status, payload = _error(400, "the request body is not JSON", "invalid_json")
            await send_json(send, status, payload)
            return await finish(status)
        if not isinstance(body, dict):
            status, payload = _error(400, "the request body must be a JSON object", "invalid_request")
            await send_json(send, status, payload)
            return await finish(status)
        problem = check_request(path, body)
        if problem:
            status, payload = _error(400, problem[0], "invalid_request", problem[1])
            await send_json(send, status, payload)
            return await finish(status)
        model = body.get("model")
        if model is not None and model != served.name:
            status, payload = _error(404, f"The model '{model}' does not exist: this server serves '{served.name}' "
                                          f"(version {served.version})", "model_not_found", "model")
            await send_json(send, status, payload)
            return await finish(status)
        stops = body.get("stop")
        stops = [stops] if isinstance(stops, str) else [x for x in (stops or []) if x]
        cutter = _StopCutter(stops) if stops else None
        body["model"] = served.folder
        if path == "/v1/chat/completions" and body.get("stream"):
            body.setdefault("stream_options", {"include_usage": True})
        new_raw = json.dumps(body).encode()
        sent = False

        async def inner_receive() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": new_raw, "more_body": False}
            return await receive()

        async def inner_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status_box["status"] = message["status"]
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"content-length"]
                headers.append((b"x-model-version", str(served.version).encode()))
                message = dict(message, headers=headers)
            elif message["type"] == "http.response.body" and (message.get("body") or cutter is not None):
                data = message.get("body", b"").replace(path_bytes, name_bytes)  # clients see the name they asked for
                if cutter is not None:
                    data = cutter.feed(data, last=not message.get("more_body"))
                _count_usage(data, usage)
                message = dict(message, body=data)
            await send(message)

        scope = dict(scope, headers=[(k, v) for k, v in scope.get("headers", []) if k.lower() != b"content-length"]
                     + [(b"content-length", str(len(new_raw)).encode())])
        started = False

        async def guarded_send(message: dict[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await inner_send(message)

        try:
            await inner(scope, inner_receive, guarded_send)
        except Exception as exc:  # noqa: BLE001 - one failed request; the server stays up
            log.exception("request path=%s model_version=%s failed", path, served.version)
            status_box["status"] = 500
            if not started:
                await send_json(send, *_error(500, f"generation failed: {type(exc).__name__}: {exc}", "server_error"))
        finally:
            await finish(status_box["status"])

    return app


class _StopCutter:
    """OpenAI's ``stop``: the text ends *before* the first stop sequence. transformers stops generating after a stop
    string (``GenerationConfig.stop_strings``) but returns it; this removes it from a JSON response, and from a stream
    of chat chunks by holding back any tail that could still become a stop sequence."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.emitted = ""
        self.pending = ""
        self.stopped = False
        self.buffer = b""

    def _cut(self, text: str) -> tuple[str, bool]:
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        return (text[: min(hits)], True) if hits else (text, False)

    def feed(self, data: bytes, last: bool) -> bytes:
        self.buffer += data
        if not self.buffer.lstrip().startswith(b"data:"):
            if not last:  # a JSON response split over several body messages: cut it whole
                return b""
            try:
                obj = json.loads(self.buffer)
            except ValueError:
                return self.buffer
            for choice in obj.get("choices") or []:
                msg = choice.get("message") or {}
                key = "content" if "content" in msg else None
                if key and isinstance(msg.get(key), str):
                    msg[key], hit = self._cut(msg[key])
                elif isinstance(choice.get("text"), str):
                    choice["text"], hit = self._cut(choice["text"])
                else:
                    hit = False
                if hit:
                    choice["finish_reason"] = "stop"
            return json.dumps(obj).encode()
        events, _, rest = self.buffer.rpartition(b"\n\n")
        self.buffer = rest
        if not events:
            return b""
        out = []
        for event in events.split(b"\n\n"):
            payload = event.strip()[5:].strip() if event.strip().startswith(b"data:") else b""
            try:
                obj = json.loads(payload) if payload and payload != b"[DONE]" else None
            except ValueError:
                obj = None
            if obj is None:
                out.append(event)
                continue
            for choice in obj.get("choices") or []:
                delta = choice.get("delta") or {}
                piece = delta.get("content")
                if self.stopped:
                    if isinstance(piece, str):
                        delta["content"] = ""
                    if choice.get("finish_reason"):
                        choice["finish_reason"] = "stop"
                    continue
                if isinstance(piece, str):
                    full = self.emitted + self.pending + piece
                    text, hit = self._cut(full)
                    if hit:
                        delta["content"] = text[len(self.emitted):]
                        self.emitted, self.pending, self.stopped = text, "", True
                        choice["finish_reason"] = choice.get("finish_reason") or None
                    else:
                        hold = max((k for s in self.stops for k in range(1, len(s)) if full.endswith(s[:k])), default=0)
                        safe = len(full) - hold
                        delta["content"] = full[len(self.emitted):safe]
                        self.emitted, self.pending = full[:safe], full[safe:]
                if choice.get("finish_reason"):
                    if self.pending and not self.stopped:
                        delta["content"] = (delta.get("content") or "") + self.pending
                        self.emitted += self.pending
                        self.pending = ""
                    if self.stopped:
                        choice["finish_reason"] = "stop"
            out.append(b"data: " + json.dumps(obj).encode())
        return b"\n\n".join(out) + b"\n\n"


_ROLES = {"system", "developer", "user", "assistant", "tool"}


def check_request(path: str, body: dict[str, Any]) -> tuple[str, str | None] | None:
    """(message, param) for a request the generation server would fail on with a 500, else None: the shape of
    OpenAI's chat and text completion requests, only as far as what a server must not choke on."""
    if path == "/v1/chat/completions":
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            return "`messages` must be a non-empty array of {role, content} objects", "messages"
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in _ROLES:
                return (f"messages[{i}] must be an object whose role is one of {', '.join(sorted(_ROLES))}",
                        f"messages[{i}]")
            content = m.get("content")
            if content is not None and not isinstance(content, (str, list)):
                return f"messages[{i}].content must be a string or an array of content parts", f"messages[{i}].content"
    elif path == "/v1/completions":
        if not isinstance(body.get("prompt"), str):
            return "`prompt` must be a string", "prompt"
    for key in ("max_tokens", "max_completion_tokens"):
        v = body.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            return f"`{key}` must be a positive integer", key
    stop = body.get("stop")
    if stop is not None and not (isinstance(stop, str) or (isinstance(stop, list) and all(isinstance(x, str) for x in stop)
                                                           and len(stop) <= 4)):
        return "`stop` must be a string or an array of up to 4 strings", "stop"
    for key in ("temperature", "top_p"):
        v = body.get(key)
        if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0):
            return f"`{key}` must be a non-negative number", key
    if "stream" in body and not isinstance(body["stream"], bool):
        return "`stream` must be true or false", "stream"
    return None


def _count_usage(data: bytes, usage: dict[str, int]) -> None:
    """Token counts from a JSON response or the SSE chunks that carry ``usage``."""
    if b'"usage"' not in data:
        return
    for part in data.split(b"\n"):
        part = part.strip()
        if part.startswith(b"data:"):
            part = part[5:].strip()
        if not part.startswith(b"{"):
            continue
        try:
            u = json.loads(part).get("usage") or {}
        except ValueError:
            continue
        usage["prompt"] += int(u.get("prompt_tokens") or 0)
        usage["completion"] += int(u.get("completion_tokens") or 0)


def run(served: Served, *, host: str, port: int, device: str = "cpu", dtype: str = "auto") -> None:
    """Serve until interrupted (SIGINT / SIGTERM: uvicorn's graceful shutdown)."""
    import uvicorn

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    if host not in ("127.0.0.1", "localhost", "::1") and not os.environ.get("KUBERNETES_SERVICE_HOST"):
        log.warning("serving on %s: reachable from other machines; there is no authentication", host)
    app = build_app(served, device=device, dtype=dtype)
    print(f"serving {served.name} version {served.version} ({served.uri}) at http://{host}:{port}/v1 "
          f"(ready at /ready after a warm-up generation)", file=sys.stderr, flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", lifespan="on")
