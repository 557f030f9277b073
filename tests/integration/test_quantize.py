"""`llmpipe run quantize` end to end on a tiny trained Llama (tests/fixtures/quantize_model.py):
int8 (optimum-quanto) and GGUF F16 / Q8_0 / Q4_0, sizes and perplexities against the original,
the manifest's metrics contract, report.md, loading the outputs back; clear errors before any
compute; and (slow, needs llama-cpp-python: `make test-llamacpp`) the GGUF files in llama.cpp.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from pipeline.cli import main  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
DEMO_CFG = str(REPO / "jobs" / "demo" / "quantize.yaml")


@pytest.fixture(scope="module")
def template_root(tmp_path_factory) -> Path:
    from tests.fixtures.quantize_model import commit_run_root

    root = tmp_path_factory.mktemp("quantize-template")
    commit_run_root(root)
    return root


def _run(root: Path, *extra: str) -> int:
    # the demo config's int8 and GGUF variants (GPTQ / AWQ: tests/integration/test_quantize_w4.py)
    return main(["run", "quantize", "-c", DEMO_CFG, "--root", str(root), "--no-progress", "--set", "max_blocks=12",
                 "--set", "variants=[int8,gguf-f16,gguf-q8_0,gguf-q4_0]", *extra])


def _manifest(root: Path) -> dict:
    return json.loads((root / "quantized" / "manifest.json").read_text(encoding="utf-8"))


def test_quantize_all_variants(run_root, capsys):
    import gguf
    from transformers import AutoModelForCausalLM

    from pipeline.quantization.int8 import load_int8

    assert _run(run_root, "--set", "llamacpp=off") == 0
    out = capsys.readouterr().out
    assert "== quantize: done" in out and "gguf-q4_0" in out

    manifest = _manifest(run_root)
    m = manifest["metrics"]
    assert manifest["stage"] == "quantize" and set(manifest["inputs"]) == {"models/dpo", "shards"}
    # the metrics contract (tracking and the demo summary read it)
    assert m["model"] == "models/dpo"
    orig = m["original"]
    assert isinstance(orig["size_bytes"], int) and orig["size_bytes"] > 0 and isinstance(orig["perplexity"], float)
    assert set(m["variants"]) == {"int8", "gguf-f16", "gguf-q8_0", "gguf-q4_0"}
    files = {f["path"]: f["size"] for f in manifest["files"]}
    for name, v in m["variants"].items():
        assert {"size_bytes", "perplexity", "perplexity_delta_pct", "path"} <= set(v), name
        assert isinstance(v["size_bytes"], int) and isinstance(v["perplexity"], float)
        assert v["perplexity_delta_pct"] == pytest.approx(100 * (v["perplexity"] - orig["perplexity"]) / orig["perplexity"], abs=1e-3)
        assert (run_root / "quantized" / v["path"]).exists(), v["path"]
    for name in ("gguf-f16", "gguf-q8_0", "gguf-q4_0"):
        assert files[m["variants"][name]["path"]] == m["variants"][name]["size_bytes"]
    assert m["eval_blocks"] == 12 and m["seq_len"] == 64 and m["llamacpp"] is None
    assert "report.md" in files

    v = m["variants"]
    # sizes: fp32 original > int8 / F16 > Q8_0 > Q4_0
    assert v["gguf-q4_0"]["size_bytes"] < v["gguf-q8_0"]["size_bytes"] < v["gguf-f16"]["size_bytes"] < orig["size_bytes"]
    assert v["int8"]["size_bytes"] < orig["size_bytes"]
    # quality: F16 ~ original, Q8_0 and int8 very close, 4-bit worse than both
    d = {k: x["perplexity_delta_pct"] for k, x in v.items()}
    assert abs(d["gguf-f16"]) < 0.05, d
    assert abs(d["gguf-q8_0"]) < 0.5 and abs(d["int8"]) < 0.5, d
    assert d["gguf-q4_0"] > 0 and d["gguf-q4_0"] > abs(d["gguf-q8_0"]) and d["gguf-q4_0"] > abs(d["int8"]), d
    assert v["gguf-q4_0"]["tensor_types"] == {"F32": 5, "Q4_0": 14, "Q8_0": 1}  # tied: the embedding is the head

    report = (run_root / "quantized" / "report.md").read_text(encoding="utf-8")
    for name in v:
        assert f"| {name} | `{v[name]['path']}`" in report
    assert "QuantizedModelForCausalLM.from_pretrained" in report and "tokenizer.ggml.pre = llama-bpe" in report

    # int8 loads back as documented and predicts like the original
    original = AutoModelForCausalLM.from_pretrained(run_root / "models" / "dpo").eval()
    q = load_int8(str(run_root / "quantized" / "int8"))
    ids = torch.tensor([[0, 5, 17, 42, 99, 7, 300, 12]])
    with torch.no_grad():
        a, b = original(ids).logits, q(input_ids=ids).logits
    assert (a - b).abs().max() < 0.05 * a.abs().max()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.85

    # the GGUF file is what it says
    r = gguf.GGUFReader(str(run_root / "quantized" / v["gguf-q8_0"]["path"]))
    assert r.get_field("general.architecture").contents() == "llama"
    assert r.get_field("general.source.llmpipe_artifact").contents() == "models/dpo"
    assert len(r.get_field("tokenizer.ggml.tokens").contents()) == original.config.vocab_size

    # unchanged config and inputs: up to date; llama.cpp/threads settings do not change the hash
    assert _run(run_root, "--set", "llamacpp=off", "--set", "threads=1") == 0
    assert "== quantize: up to date" in capsys.readouterr().out


def test_only_some_variants_and_another_model(run_root, capsys):
    # models/sft as the source, just the 8-bit GGUF: only that file, and the int8 folder is absent
    shutil.copytree(run_root / "models" / "dpo", run_root / "models" / "sft")
    manifest = json.loads((run_root / "models" / "sft" / "manifest.json").read_text())
    manifest["stage"] = "sft"
    (run_root / "models" / "sft" / "manifest.json").write_text(json.dumps(manifest))
    assert _run(run_root, "--set", "model=models/sft", "--set", "variants=[gguf-q8_0]", "--set", "llamacpp=off") == 0
    m = _manifest(run_root)["metrics"]
    assert list(m["variants"]) == ["gguf-q8_0"] and m["model"] == "models/sft"
    assert sorted(p.name for p in (run_root / "quantized").iterdir()) == ["gguf", "manifest.json", "report.md"]
    assert [p.name for p in (run_root / "quantized" / "gguf").iterdir()] == ["sft-q8_0.gguf"]


def test_quantize_on_s3_root(template_root, s3_env, capsys):
    """Inputs read from and outputs committed to an s3:// run root (a real S3 API on loopback)."""
    import os

    import fsspec

    opts = json.loads(os.environ["LLMPIPE_STORAGE_OPTIONS"])
    fs = fsspec.filesystem("s3", **opts)
    for local in sorted(template_root.rglob("*")):
        if local.is_file():
            fs.put_file(str(local), f"{s3_env}/run/{local.relative_to(template_root).as_posix()}")
    root = f"s3://{s3_env}/run"
    assert main(["run", "quantize", "--root", root, "--no-progress", "--set", "max_blocks=4", "--set", "llamacpp=off",
                 "--set", "variants=[int8,gguf-q4_0]"]) == 0
    manifest = json.loads(fs.cat_file(f"{s3_env}/run/quantized/manifest.json"))
    assert set(manifest["metrics"]["variants"]) == {"int8", "gguf-q4_0"}
    for entry in manifest["files"]:
        assert fs.size(f"{s3_env}/run/quantized/{entry['path']}") == entry["size"]
    assert "gguf/dpo-q4_0.gguf" in {e["path"] for e in manifest["files"]}
    assert [p for p in fs.find(f"{s3_env}/run") if ".tmp-" in p] == []


def _expect_error(capsys, code: int, argv_root: Path, *extra: str) -> str:
    assert _run(argv_root, *extra) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_clear_errors_before_compute(template_root, tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    from pipeline.storage import Storage

    # unknown variant: a config error naming the value and the choices
    err = _expect_error(capsys, 2, template_root, "--set", "variants=[int8,gguf-q5_0]")
    assert "unknown variant 'gguf-q5_0'" in err and "gguf-q4_0" in err

    # no model artifact: say which stage makes it
    root = tmp_path / "no-model"
    shutil.copytree(template_root / "shards", root / "shards")
    err = _expect_error(capsys, 1, root)
    assert "needs 'models/dpo/'" in err and "llmpipe run dpo" in err

    # a model of no supported family
    root = tmp_path / "gpt2"
    shutil.copytree(template_root, root)
    shutil.rmtree(root / "models" / "dpo")
    out = Storage(str(root)).begin("models/dpo")
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=600, bos_token_id=0, eos_token_id=0)).save_pretrained(out.path())
    out.commit({"stage": "dpo", "config_hash": "x", "inputs": {}, "metrics": {}})
    err = _expect_error(capsys, 1, root)
    assert "'gpt2' model" in err and "supported model families (model_type): llama (Llama), qwen2" in err

    # shards tokenised with another vocabulary
    from tests.fixtures.quantize_model import commit_shards

    root = tmp_path / "big-ids"
    shutil.copytree(template_root, root)
    import numpy as np

    commit_shards(Storage(str(root)), np.full((10, 16), 5000, dtype=np.int64), 6000, bos=0, eos=1)
    err = _expect_error(capsys, 1, root, "--set", "llamacpp=off")
    assert "token id 5000" in err and "vocabulary of 600" in err
    assert not (root / "quantized").exists()


def test_llamacpp_required_but_missing(template_root, capsys):
    from pipeline.quantization.quality import llama_cpp_version

    if llama_cpp_version() is not None:
        pytest.skip("llama_cpp is installed here")
    err = _expect_error(capsys, 1, template_root, "--set", "llamacpp=require")
    assert "llamacpp: require" in err and "make test-llamacpp" in err


# ------------------------------------------------------------------------- llama.cpp (slow)


def _need_llama_cpp():
    from pipeline.quantization.quality import llama_cpp_version

    if llama_cpp_version() is None:
        pytest.skip("llama_cpp (llama-cpp-python) is not importable: `make test-llamacpp` builds and installs it")


@pytest.mark.slow
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_gguf_runs_in_llama_cpp(tmp_path, tied):
    """The F16 file generates in llama.cpp exactly what the HF model generates (greedy, token ids in),
    and llama.cpp's perplexity of each file agrees with the dequantized HF model's."""
    _need_llama_cpp()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.quantization import gguf_export as ge
    from pipeline.quantization import quality
    from tests.fixtures.quantize_model import build

    folder = tmp_path / "model"
    info = build(folder, tied=tied)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    prompt = tok('{"instruction": "Назови столицу страны.", "input": "Франция", "output": "')["input_ids"]
    want = quality.hf_greedy(model, prompt, 24)
    blocks = info["blocks"][::5][:8]
    ppl_hf = quality.perplexity(model, blocks)
    for target in ("F16", "Q8_0", "Q4_0"):
        path = str(tmp_path / f"m-{target}.gguf")
        ge.write_gguf(path, model.state_dict(), model.config, str(folder), target)
        got = quality.llamacpp_greedy(path, prompt, 24, threads=2)
        ppl_cpp = quality.llamacpp_perplexity(path, blocks, threads=2)
        back = AutoModelForCausalLM.from_pretrained(folder).eval()
        back.load_state_dict(ge.read_gguf_state_dict(path)[0], strict=False)
        ppl_deq = quality.perplexity(back, blocks)
        print(f"{target}: greedy match {got == want}; perplexity HF {ppl_hf:.4f}, dequantized {ppl_deq:.4f}, llama.cpp {ppl_cpp:.4f}")
        if target == "F16":
            assert got == want, (got, want)
            assert ppl_cpp == pytest.approx(ppl_hf, rel=5e-3)
        assert ppl_cpp == pytest.approx(ppl_deq, rel=2e-2)


def _heldout_texts() -> dict[str, list[str]]:
    """Held-out kk/ru/en documents: the offline corpus' heldout files when `make corpus` fetched them (one document
    per blank-line-separated paragraph group, as fetch_corpus writes them), else the test corpus fixtures."""
    import os

    cache = Path(os.environ.get("LLMPIPE_CACHE", REPO / ".cache")) / "corpus" / "heldout"
    out: dict[str, list[str]] = {}
    for lang in ("kk", "ru", "en"):
        f = cache / f"{lang}.txt"
        if f.is_file():
            out[lang] = [d for d in f.read_text(encoding="utf-8").split("\n\n") if d.strip()]
        else:
            out[lang] = []
            for p in sorted((REPO / "tests" / "fixtures" / "corpus" / lang).glob("*.jsonl")):
                out[lang] += [json.loads(line)["text"] for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    return out


@pytest.mark.slow
def test_llama_cpp_tokenizes_text_like_training(tmp_path):
    """llama.cpp reads our GGUF's tokenizer (vocabulary, merges, tokenizer.ggml.pre, add_bos) and tokenizes held-out
    kk/ru/en text itself into exactly the ids the HF tokenizer gives, for every document; and greedy generation from
    a text prompt that llama.cpp tokenizes (BOS added as the GGUF says) equals transformers' from the HF tokenizer's
    ids (BOS added by its post-processor)."""
    _need_llama_cpp()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.quantization import gguf_export as ge
    from pipeline.quantization import quality
    from tests.fixtures.quantize_model import build

    folder = tmp_path / "model"
    build(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    path = str(tmp_path / "m-F16.gguf")
    ge.write_gguf(path, model.state_dict(), model.config, str(folder), "F16")
    from gguf import GGUFReader

    fields = GGUFReader(path).fields
    assert bytes(fields["tokenizer.ggml.pre"].parts[-1]).decode() == "llama-bpe"
    assert bool(fields["tokenizer.ggml.add_bos_token"].parts[-1][0]) is True
    shares = {}
    for lang, docs in _heldout_texts().items():
        ours = [tok(d, add_special_tokens=False)["input_ids"] for d in docs]
        theirs = quality.llamacpp_tokenize(path, docs)
        same = sum(a == b for a, b in zip(ours, theirs))
        shares[lang] = (same, len(docs))
        bad = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
        assert same == len(docs) > 0, (lang, same, len(docs), bad is not None and docs[bad][:200])
    print("llama.cpp ids identical to ours: " + ", ".join(f"{k} {s}/{n}" for k, (s, n) in shares.items()))
    prompt = '{"instruction": "Назови столицу страны.", "input": "Франция", "output": "'
    want_prompt = tok(prompt)["input_ids"]
    assert want_prompt[0] == tok.bos_token_id
    got_prompt, got = quality.llamacpp_greedy_text(path, prompt, 24, threads=2)
    assert got_prompt == want_prompt
    assert got == quality.hf_greedy(model, want_prompt, 24)


@pytest.mark.slow
def test_stage_with_llama_cpp(run_root, capsys):
    _need_llama_cpp()
    assert _run(run_root, "--set", "llamacpp=require", "--set", "variants=[gguf-f16,gguf-q8_0,gguf-q4_0]") == 0
    m = _manifest(run_root)["metrics"]
    assert m["llamacpp"]
    v = m["variants"]
    assert v["gguf-f16"]["llamacpp_greedy_match"] is True
    assert len(v["gguf-f16"]["llamacpp_greedy_tokens"]) == 16
    for name, x in v.items():
        assert x["llamacpp_perplexity"] == pytest.approx(x["perplexity"], rel=2e-2), name
    assert v["gguf-q4_0"]["llamacpp_perplexity"] > v["gguf-f16"]["llamacpp_perplexity"]
    assert "llama.cpp" in (run_root / "quantized" / "report.md").read_text(encoding="utf-8")
