"""`llmpipe run init` end to end: a BPE tokenizer artifact made here -> models/init/ (a nested
artifact name), loaded back with AutoModelForCausalLM / AutoTokenizer; then a pretrained init
from that output with another tokenizer plus SOLAR up-scaling; the same on an s3:// root.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")

from pipeline.cli import main  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
TEXTS = {
    "kk": ["Қазақстан Республикасы — Орталық Азиядағы мемлекет. Астанасы — Астана қаласы."] * 20,
    "ru": ["Москва — столица России, крупнейший город страны. Река Москва течёт через город."] * 20,
    "en": ["The quick brown fox jumps over the lazy dog. Language models learn from text."] * 20,
}


def commit_bpe_tokenizer(root: str, vocab_size: int, seed: int = 0, langs: tuple[str, ...] = ("kk", "ru", "en")) -> int:
    """Train a small byte-level BPE with the project's trainer and commit it as ``tokenizer/``."""
    import tempfile

    from pipeline.data.tokenization import TokenizerConfig
    from pipeline.data.tokenization import save_hf, train_bpe
    from pipeline.storage import Storage

    cfg = TokenizerConfig(vocab_size=vocab_size, min_frequency=1, train_chars=5000, seed=seed,
                          mix={lang: 1.0 for lang in langs})
    tok = train_bpe({lang: TEXTS[lang] for lang in langs}, cfg)
    out = Storage(root).begin("tokenizer")
    with tempfile.TemporaryDirectory() as tmp:
        save_hf(tok, cfg, tmp)
        out.put_local(tmp)
    out.commit({"stage": "tokenizer", "config_hash": f"x{vocab_size}", "inputs": {}, "metrics": {}})
    return tok.get_vocab_size()


def _load(folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)


def test_run_init_demo_config_then_pretrained_upscale(tmp_path, capsys):
    root = tmp_path / "root"
    n_tokens = commit_bpe_tokenizer(str(root), 320)
    argv = ["run", "init", "-c", str(REPO / "jobs/demo/init.yaml"), "--root", str(root), "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "== init: done" in out and "random (tiny)" in out

    # the nested artifact name: committed in place, no temporaries or old copies beside it
    assert sorted(p.name for p in (root / "models").iterdir()) == ["init"]
    manifest = json.loads((root / "models" / "init" / "manifest.json").read_text())
    tok_manifest = json.loads((root / "tokenizer" / "manifest.json").read_text())
    assert manifest["stage"] == "init" and manifest["inputs"]["tokenizer"]["fingerprint"] == tok_manifest["fingerprint"]
    m = manifest["metrics"]
    assert m["tokenizer_size"] == n_tokens and m["vocab_size"] == 320 and m["layers"] == 2
    assert m["params_total"] == m["params_embedding"] + m["params_non_embedding"]

    model, tok = _load(root / "models" / "init")
    ids = tok("Қазақстан Республикасы", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
    assert model.config.bos_token_id == tok.bos_token_id and model.config.eos_token_id == tok.eos_token_id
    assert model.generation_config.pad_token_id == tok.pad_token_id is not None

    assert main(argv) == 0
    assert "== init: up to date" in capsys.readouterr().out
    assert main([*argv, "--force"]) == 0
    assert sorted(p.name for p in (root / "models").iterdir()) == ["init"]

    # a second project starts from that checkpoint with its own (English-only, smaller) tokenizer
    other = tmp_path / "other"
    n_other = commit_bpe_tokenizer(str(other), 290, seed=1, langs=("en",))
    cfg = tmp_path / "pretrained.yaml"
    cfg.write_text(
        f"source: pretrained\npretrained_path: {root / 'models' / 'init'}\n"
        "scale:\n  mode: up\n  target_layers: 4\n  copy: solar\n",
        encoding="utf-8",
    )
    assert main(["run", "init", "-c", str(cfg), "--root", str(other), "--no-progress"]) == 0
    assert "scaled up" in capsys.readouterr().out
    m2 = json.loads((other / "models" / "init" / "manifest.json").read_text())["metrics"]
    assert m2["vocab_matched"] + m2["vocab_new"] == n_other == m2["tokenizer_size"]
    assert m2["vocab_matched"] > 256  # the byte alphabet and the special tokens at least
    assert m2["scale"]["layer_map"] == [0, 1, 0, 1] and m2["layers"] == 4

    new, new_tok = _load(other / "models" / "init")
    base_vocab = tok.get_vocab()
    for token, nid in list(new_tok.get_vocab().items())[:50]:
        if token in base_vocab:
            assert torch.equal(new.model.embed_tokens.weight[nid], model.model.embed_tokens.weight[base_vocab[token]])
    for i, j in enumerate([0, 1, 0, 1]):
        assert torch.equal(new.model.layers[i].self_attn.q_proj.weight, model.model.layers[j].self_attn.q_proj.weight)
    with torch.no_grad():
        assert torch.isfinite(new(new_tok("The quick fox", return_tensors="pt")["input_ids"]).logits).all()


def test_run_init_bad_input_is_one_line(tmp_path, capsys):
    root = tmp_path / "root"
    commit_bpe_tokenizer(str(root), 300)
    rc = main(["run", "init", "--root", str(root), "--no-progress", "--set", "source=pretrained",
               "--set", f"pretrained_path={tmp_path / 'missing'}"])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("error: pretrained_path") and "not a local folder" in err and err.count("\n") == 1
    assert not (root / "models" / "init").exists()
    rc = main(["run", "init", "--root", str(root), "--set", "preset=tiny", "--set", "scale.mode=up", "--set", "scale.target_layers=3"])
    assert rc == 2 and "even number" in capsys.readouterr().err


def test_run_init_on_s3_root(tmp_path, s3_env, capsys):
    import fsspec

    opts = json.loads(os.environ["LLMPIPE_STORAGE_OPTIONS"])
    root = f"s3://{s3_env}/runs/init"
    commit_bpe_tokenizer(root, 300)
    assert main(["run", "init", "--root", root, "--no-progress", "--set", "preset=tiny", "--set", "dtype=bfloat16"]) == 0
    fs = fsspec.filesystem("s3", **opts)
    manifest = json.loads(fs.cat_file(f"{s3_env}/runs/init/models/init/manifest.json"))
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {f["path"] for f in manifest["files"]}
    assert [p for p in fs.find(f"{s3_env}/runs/init") if ".tmp-" in p] == []

    from pipeline.storage import Artifact, Storage

    local = Artifact(Storage(root), "models/init", manifest).download(str(tmp_path / "dl"))
    model, tok = _load(local)
    with torch.no_grad():
        assert torch.isfinite(model(tok("Москва", return_tensors="pt")["input_ids"]).logits.float()).all()
