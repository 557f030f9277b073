"""`init` with `scale: {mode: down, target_layers: N, select: importance}` over a run root holding a tokenizer and
packed shards (tests/fixtures/quantize_model.commit_shards, the real shard format): the report's per-start scores,
the chosen run, the perplexity before and after on the same validation blocks, the saved model's depth; a pretrained
checkpoint whose pass-through run must be the one dropped (and then costs no perplexity); the config errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")

from pipeline.cli import main  # noqa: E402

WORDS = [f"w{i}" for i in range(61)]  # + 3 specials: 64 tokens
VOCAB = 64


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def _run_root(root: Path) -> None:
    """tokenizer/ and shards/ (20 train, 5 val blocks of 32 word ids) committed under ``root``."""
    from pipeline.storage import Storage
    from tests.fixtures.quantize_model import commit_shards

    storage = Storage(str(root))
    out = storage.begin("tokenizer")
    _tokenizer().save_pretrained(out.path())
    out.commit({"stage": "tokenizer", "config_hash": "x", "inputs": {}, "metrics": {}})
    blocks = np.random.default_rng(0).integers(3, VOCAB, size=(25, 32))
    commit_shards(storage, blocks, VOCAB, bos=1, eos=2)


def _config(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _metrics(root: Path) -> dict:
    return json.loads((root / "models" / "init" / "manifest.json").read_text(encoding="utf-8"))


IMPORTANCE = """
scale: {mode: down, target_layers: 4, select: importance}
validation: {artifact: shards, max_blocks: 4, batch_size: 2}
"""


def test_importance_downscale_of_a_random_model_reports_scores_and_perplexity(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    root = tmp_path / "root"
    _run_root(root)
    cfg = _config(tmp_path / "init.yaml", "source: random\npreset: tiny\nnum_layers: 7\n" + IMPORTANCE)
    assert main(["run", "init", "-c", str(cfg), "--root", str(root), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "dropped run" in out and "run scores" in out and "val perplexity" in out and "before ->" in out

    manifest = _metrics(root)
    assert set(manifest["inputs"]) == {"tokenizer", "shards"}  # the blocks are an input: new shards make init stale
    m = manifest["metrics"]
    sc = m["scale"]
    assert sc["mode"] == "down" and sc["select"] == "importance" and sc["keep_last_layer"] is True
    assert (sc["from_layers"], sc["to_layers"], sc["run_length"]) == (7, 4, 3)
    assert list(sc["scores"]) == ["0", "1", "2", "3"]  # runs of 3 that keep layer 6
    assert all(0.0 < d < 1.0 for d in sc["scores"].values())
    start = min(range(4), key=lambda s: sc["scores"][str(s)])
    assert sc["run_start"] == start and sc["dropped"] == [start, start + 1, start + 2]
    assert sc["layer_map"] == [i for i in range(7) if i not in sc["dropped"]]
    assert sc["score_tokens"] == 4 * 32  # every position of the 4 measured blocks
    for key in ("perplexity_before", "perplexity_after", "loss_before", "loss_after"):
        assert isinstance(sc[key], float) and np.isfinite(sc[key])
    assert sc["perplexity_after"] == pytest.approx(np.exp(sc["loss_after"]))
    assert (sc["val_blocks"], sc["val_tokens"]) == (4, 4 * 31)
    # the saved model's own validation numbers, and its depth
    assert m["val_perplexity"] == sc["perplexity_after"] and m["validation"] == "shards/val" and m["layers"] == 4
    model = AutoModelForCausalLM.from_pretrained(root / "models" / "init")
    assert model.config.num_hidden_layers == len(model.model.layers) == 4

    assert main(["run", "init", "-c", str(cfg), "--root", str(root), "--no-progress"]) == 0
    assert "== init: up to date" in capsys.readouterr().out


def test_importance_drops_the_pass_through_run_of_a_pretrained_model(tmp_path):
    """Layers 2 and 3 of a 6-layer checkpoint add nothing to the stream: they are the run dropped, and the
    perplexity is the same after as before; the hand list (drop_layers) gets before/after too."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    root = tmp_path / "root"
    _run_root(root)
    src = tmp_path / "src"
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                         bos_token_id=1, eos_token_id=2, pad_token_id=0))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
        for i in (2, 3):
            model.model.layers[i].self_attn.o_proj.weight.zero_()
            model.model.layers[i].mlp.down_proj.weight.zero_()
    model.save_pretrained(src)
    _tokenizer().save_pretrained(src)

    cfg = _config(tmp_path / "init.yaml", f"source: pretrained\npretrained_path: {src}\n" + IMPORTANCE.replace(
        "target_layers: 4", "target_layers: 4, keep_last_layer: false"))
    assert main(["run", "init", "-c", str(cfg), "--root", str(root), "--no-progress"]) == 0
    sc = _metrics(root)["metrics"]["scale"]
    assert list(sc["scores"]) == ["0", "1", "2", "3", "4"]  # keep_last_layer false: the run 4..5 is a candidate
    assert sc["scores"]["2"] < 1e-6 < min(v for k, v in sc["scores"].items() if k != "2")
    assert sc["dropped"] == [2, 3] and sc["layer_map"] == [0, 1, 4, 5]
    assert sc["perplexity_after"] == pytest.approx(sc["perplexity_before"], rel=1e-5)
    new = AutoModelForCausalLM.from_pretrained(root / "models" / "init")
    ids = torch.tensor([[1, 5, 9, 14, 20]])
    with torch.no_grad():
        assert torch.allclose(new(ids).logits, model(ids).logits, atol=1e-5)

    hand = _config(tmp_path / "hand.yaml", f"source: pretrained\npretrained_path: {src}\n"
                   "scale: {mode: down, drop_layers: [0]}\nvalidation: {artifact: shards, max_blocks: 4}\n")
    assert main(["run", "init", "-c", str(hand), "--root", str(root), "--no-progress"]) == 0
    sc = _metrics(root)["metrics"]["scale"]
    assert sc["layer_map"] == [1, 2, 3, 4, 5] and "scores" not in sc
    assert sc["perplexity_after"] != pytest.approx(sc["perplexity_before"], rel=1e-5)  # a real layer is gone


def _error(capsys, argv) -> tuple[int, str]:
    rc = main(argv)
    return rc, capsys.readouterr().err


def test_config_errors_say_what_to_write(tmp_path, capsys):
    root = tmp_path / "root"
    _run_root(root)
    base = ["run", "init", "--root", str(root), "--no-progress", "--set", "preset=tiny", "--set", "scale.mode=down"]
    rc, err = _error(capsys, [*base, "--set", "scale.target_layers=1"])
    assert rc == 2 and "validation: {artifact: shards}" in err
    rc, err = _error(capsys, [*base, "--set", "scale.target_layers=2", "--set", "validation.artifact=shards"])
    assert rc == 2 and "must be below the model's 2 layers" in err
    rc, err = _error(capsys, [*base, "--set", "scale.target_layers=1", "--set", "scale.drop_layers=[0]"])
    assert rc == 2 and "exactly one of drop_layers" in err and "got both" in err
    rc, err = _error(capsys, base)
    assert rc == 2 and "got neither" in err
    rc, err = _error(capsys, [*base, "--set", "scale.drop_layers=[0]", "--set", "scale.select=importance"])
    assert rc == 2 and "select apply to target_layers" in err
    # an artifact that is not there, and blocks packed with another tokenizer: refused before any model is built
    rc, err = _error(capsys, ["run", "init", "--root", str(root), "--no-progress", "--set", "preset=tiny",
                              "--set", "validation.artifact=missing"])
    assert rc == 1 and "missing/" in err and "no committed output" in err
    from pipeline.storage import Storage
    from tests.fixtures.quantize_model import commit_shards

    commit_shards(Storage(str(root)), np.random.default_rng(1).integers(3, 100, size=(10, 32)), 100, bos=1, eos=2,
                  name="shards-other")
    rc, err = _error(capsys, [*base, "--set", "scale.target_layers=1", "--set", "validation.artifact=shards-other"])
    assert rc == 1 and "tokenizer of 64 tokens but the shards were packed with 100" in err
    assert not (root / "models" / "init").exists()
