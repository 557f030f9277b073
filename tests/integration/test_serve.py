"""`llmpipe serve` against the official `openai` client: a tiny trained Llama registered in a real `mlflow server`,
resolved through its alias, served by a real `llmpipe serve` process on loopback."""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.localserver import stop, wait_http
from tests.conftest import _free_port

NAME = "tiny-chat"
PROMPTS = {"kk": "Қазақстанның астанасы қай қала?", "ru": "Какая столица Казахстана?", "en": "What is the capital of Kazakhstan?"}


def register(tracking_uri: str, folder: Path, name: str = NAME, alias: str = "champion") -> int:
    """Log ``folder`` (an HF model + tokenizer) with MLflow's transformers flavour, as the register stage does, and
    point ``alias`` at the new version."""
    import mlflow
    from mlflow import MlflowClient
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    # set_tracking_uri / set_registry_uri change process-wide state and os.environ (MLFLOW_TRACKING_URI, ...):
    # put all of it back afterwards, so later tests' clients and monkeypatched environments are their own
    import mlflow.tracking._model_registry.utils as registry_state
    import mlflow.tracking._tracking_service.utils as tracking_state

    env_keys = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    before = tracking_state._tracking_uri, registry_state._registry_uri, {k: os.environ.get(k) for k in env_keys}
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    try:
        with mlflow.start_run() as run:
            info = mlflow.transformers.log_model(transformers_model={"model": model, "tokenizer": tok}, name="model",
                                                 task="text-generation", pip_requirements=["transformers"])
        client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
        try:
            client.get_registered_model(name)
        except mlflow.exceptions.MlflowException:
            client.create_registered_model(name)
        mv = client.create_model_version(name, info.model_uri, run_id=run.info.run_id,
                                         model_id=getattr(info, "model_id", None))
        client.set_registered_model_alias(name, alias, mv.version)
    finally:
        mlflow.set_tracking_uri(before[0])
        mlflow.set_registry_uri(before[1])
        for key, value in before[2].items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return int(mv.version)


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    wait_http(url + "/ready", proc, timeout=timeout, what="llmpipe serve")


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    from tests.fixtures.quantize_model import build

    folder = tmp_path_factory.mktemp("tiny-chat") / "hf"
    build(folder, steps=60)
    return folder


@pytest.fixture(scope="module")
def server(model_folder, mlflow_server, tmp_path_factory):
    version = register(mlflow_server, model_folder)
    base = tmp_path_factory.mktemp("serve")
    port = _free_port()
    log = open(base / "serve.log", "wb")
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server, "LLMPIPE_TRACKING": "on"}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "serve", "--model", f"models:/{NAME}@champion",
                             "--port", str(port), "--cache-dir", str(base / "cache")],
                            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=base)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc)
        yield {"url": url, "version": version, "log": base / "serve.log", "cache": base / "cache", "proc": proc}
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server["url"] + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference(model_folder):
    """Greedy continuations of the chat prompts in this process: transformers' own chat template and generate()."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_folder)
    model = AutoModelForCausalLM.from_pretrained(model_folder).eval()

    def greedy(text: str, n: int) -> str:
        ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=n, do_sample=False)
        return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)

    return greedy


def _chat(client, text: str, **kw):
    return client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": text}], **kw)


@pytest.mark.parametrize("lang", sorted(PROMPTS))
def test_chat_completion_follows_the_chat_template(client, reference, lang):
    r = _chat(client, PROMPTS[lang], max_tokens=12, temperature=0)
    assert r.model == NAME and r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == reference(PROMPTS[lang], 12)  # the same tokens as generate() greedy
    assert r.usage.completion_tokens <= 12 and r.usage.prompt_tokens > 0


def test_streaming_gives_the_same_text(client):
    full = _chat(client, PROMPTS["kk"], max_tokens=12, temperature=0).choices[0].message.content
    chunks = list(_chat(client, PROMPTS["kk"], max_tokens=12, temperature=0, stream=True))
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # really streamed
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full
    assert all(c.model == NAME for c in chunks)


def test_max_tokens_and_stop_sequences(client):
    r = _chat(client, PROMPTS["en"], max_tokens=3, temperature=0)
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"
    full = _chat(client, PROMPTS["en"], max_tokens=16, temperature=0).choices[0].message.content
    words = full.split()
    assert len(words) >= 3, full
    stop = words[len(words) // 2]
    cut = _chat(client, PROMPTS["en"], max_tokens=16, temperature=0, stop=[stop]).choices[0]
    assert stop not in cut.message.content and full.startswith(cut.message.content.rstrip())
    assert cut.finish_reason == "stop"
    # streamed: the same cut, even when the stop sequence arrives split over several chunks
    chunks = list(_chat(client, PROMPTS["en"], max_tokens=16, temperature=0, stop=[stop], stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == cut.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]


def test_malformed_requests_are_4xx_and_the_server_stays_up(client, server):
    import openai

    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=NAME, messages="not a list")
    assert bad.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "x"}], max_tokens=-1)
    req = urllib.request.Request(server["url"] + "/v1/chat/completions", data=b"{not json", method="POST",
                                 headers={"content-type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as http:
        urllib.request.urlopen(req, timeout=10)
    assert http.value.code == 400 and json.loads(http.value.read())["error"]["code"] == "invalid_json"
    with urllib.request.urlopen(server["url"] + "/ready", timeout=5) as r:
        assert r.status == 200
    assert _chat(client, "still there?", max_tokens=2).choices


def test_a_model_it_does_not_serve_is_404(client):
    import openai

    with pytest.raises(openai.NotFoundError) as exc:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert exc.value.body["code"] == "model_not_found" and NAME in exc.value.body["message"]
    assert [m.id for m in client.models.list()] == [NAME]


def test_concurrent_clients(server):
    from openai import OpenAI

    def one(i: int) -> str:
        c = OpenAI(base_url=server["url"] + "/v1", api_key="unused", max_retries=0, timeout=300)
        lang = sorted(PROMPTS)[i % 3]
        return _chat(c, PROMPTS[lang], max_tokens=6, temperature=0).choices[0].message.content

    with cf.ThreadPoolExecutor(8) as pool:
        out = list(pool.map(one, range(16)))
    assert len(out) == 16 and all(isinstance(o, str) for o in out)
    assert out[0] == out[3] == out[6]  # the same prompt, greedy: the same answer under load


def test_metrics_and_request_logs_carry_the_version(client, server):
    _chat(client, PROMPTS["ru"], max_tokens=2)
    with urllib.request.urlopen(server["url"] + "/metrics", timeout=5) as r:
        text = r.read().decode()
    v = server["version"]
    assert f'llmpipe_serve_requests_total{{model="{NAME}",path="/v1/chat/completions",status="200",version="{v}"}}' in text
    assert "llmpipe_serve_completion_tokens_total" in text and "llmpipe_serve_request_seconds_bucket" in text
    log = server["log"].read_text()
    assert f"model={NAME} model_version={v} status=200" in log
    served = json.loads((server["cache"] / "served.json").read_text())
    assert served["name"] == NAME and served["version"] == v and served["alias"] == "champion"


def test_fetch_only_and_bad_uris_from_an_embedded_store(model_folder, tmp_path, monkeypatch, capsys):
    from pipeline import tracking

    root = tmp_path / "root"
    (root / "mlflow").mkdir(parents=True)
    uri = tracking.sqlite_uri(str(root / "mlflow" / "mlflow.db"))
    version = register(uri, model_folder, name="local")
    monkeypatch.setenv("LLMPIPE_TRACKING", "on")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "models"
    assert main(["serve", "--root", str(root), "--model", "models:/local@champion", "--fetch-only", str(out)]) == 0
    served = json.loads(capsys.readouterr().out)
    assert served["version"] == version and Path(served["folder"]).name == "hf"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert AutoModelForCausalLM.from_pretrained(served["folder"]) is not None
    assert AutoTokenizer.from_pretrained(served["folder"]).chat_template
    capsys.readouterr()
    assert main(["serve", "--root", str(root), "--model", "models:/local@nosuch", "--fetch-only", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "models:/local@nosuch does not exist" in err
    assert main(["serve", "--model-dir", str(tmp_path / "empty")]) == 1
    assert "fetch a model first" in capsys.readouterr().err
