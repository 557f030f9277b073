"""Vocabulary expansion: a tokenizer extended with kk tokens (pipeline.data.tokenization.extend_tokenizer) and the
rows its new tokens start from (pipeline.models.vocab: the mean of their pieces' rows under the base tokenizer).

The base tokenizer is a small byte-level BPE trained here on en/ru text and saved as a checkpoint's tokenizer; the
expansion learns kk merges on top of it, exactly as the tokenizer stage's ``extend`` does with Qwen's.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")

from pipeline.data.tokenization import (  # noqa: E402
    ExtendConfig,
    TokenizerConfig,
    extend_tokenizer,
    extension_report,
    fertility_report,
    format_extension_markdown,
    load_reference,
    save_hf,
    token_script,
    train_bpe,
)
from pipeline.errors import ConfigError  # noqa: E402
from pipeline.models import llama as L  # noqa: E402
from pipeline.models import vocab as V  # noqa: E402

EN = [
    "The quick brown fox jumps over the lazy dog, doesn't it? Yes, it's 2024.",
    "Could not save the file: there is not enough free space on the disk.",
    "Language models learn from text; the more text, the better they get.",
]
RU = [
    "Москва — столица России, крупнейший по численности населения город страны.",
    "Не удалось сохранить файл: на диске недостаточно свободного места.",
]
KK = [
    "Қазақстан — Орталық Азиядағы мемлекет. Астанасы — Астана қаласы, ең ірі қаласы — Алматы.",
    "Біз бүгін мектепке бардық, ал ертең әжемізге қонаққа барамыз.",
    "Файлды ашу үшін мәзірден «Файл» бөлімін таңдаңыз, содан кейін «Ашу» батырмасын басыңыз.",
    "Құпиясөз қате енгізілді. Қайталап көріңіз немесе әкімшіге хабарласыңыз.",
]
MARKER = "<|extra_marker|>"  # a special token the base lacks: added by the expansion, never a piece mean


def base_cfg(**kw) -> TokenizerConfig:
    return TokenizerConfig(**{"vocab_size": 400, "min_frequency": 2, "train_chars": 20_000, "seed": 0,
                              "mix": {"en": 1.0, "ru": 1.0}, **kw})


def build_expansion(tmp: Path, **base_kw):
    """(base HF tokenizer, expanded HF tokenizer, the base's folder, the expanded one's, the added token texts)."""
    from transformers import AutoTokenizer

    base_dir, ours_dir = tmp / "base", tmp / "ours"
    cfg = base_cfg(**base_kw)
    save_hf(train_bpe({"en": EN * 30, "ru": RU * 30}, cfg), cfg, str(base_dir))  # a checkpoint's tokenizer
    ext_cfg = base_cfg(**{**base_kw, "mix": {"kk": 1.0}, "special_tokens": {**base_kw.get("special_tokens", {}),
                                                                          "extra": [MARKER]},
                          "extend": ExtendConfig(base=str(base_dir), new_tokens=60)})
    ext, added = extend_tokenizer(load_reference(str(base_dir)), {"kk": KK * 10}, ext_cfg)
    save_hf(ext, ext_cfg, str(ours_dir))
    base = AutoTokenizer.from_pretrained(str(base_dir), local_files_only=True)
    ours = AutoTokenizer.from_pretrained(str(ours_dir), local_files_only=True)
    return base, ours, base_dir, ours_dir, added


@pytest.fixture(scope="module")
def expansion(tmp_path_factory):
    return build_expansion(tmp_path_factory.mktemp("vocab"))


@pytest.fixture(scope="module")
def qwen_expansion(tmp_path_factory):
    """A Qwen-like base: Qwen 2's pre-tokenizer (one digit per pre-token) and <|endoftext|> as EOS, which
    transformers' Qwen2Tokenizer (what AutoTokenizer loads beside a qwen2 config.json) keeps as it is."""
    return build_expansion(tmp_path_factory.mktemp("qwen-vocab"), pretokenizer="qwen2",
                           special_tokens={"eos": "<|endoftext|>"})


def _pieces(base, ours, rows: int):
    match = L.match_vocab(L.tokenizer_tokens(ours), base.get_vocab(), rows)
    pieces = V.decompose(L.tokenizer_tokens(ours), match.new_ids, base.backend_tokenizer, old_rows=rows,
                         added_ids=ours.added_tokens_decoder, to_text=lambda t: ours.convert_tokens_to_string([t]))
    return match, pieces


# ------------------------------------------------------------------------------ decomposition


def test_new_tokens_are_cut_into_the_base_pieces_they_are_made_of(expansion):
    base, ours, *_, added = expansion
    assert V.extends(L.tokenizer_tokens(ours), base.get_vocab())
    match, pieces = _pieces(base, ours, len(base))
    assert len(match.new_ids) == len(added) + 1  # the learned merges, and the marker
    assert pieces.fallback == {ours.convert_tokens_to_ids(MARKER): "added"}
    assert len(pieces.pieces) == len(added) and pieces.via_text == 0
    # the new ids come after every base id, and each new token is a string of base pieces (a merge: two or more)
    assert min(match.new_ids) == len(base)
    checked = 0
    for nid, ids in pieces.pieces.items():
        token = ours.convert_ids_to_tokens(nid)
        assert len(ids) >= 2 and all(0 <= i < len(base) for i in ids)
        assert "".join(base.convert_ids_to_tokens(ids)) == token
        # a whole word (one pre-token, whole characters): the pieces are what the base tokenizer makes of that text
        text = ours.convert_tokens_to_string([token])
        if "\ufffd" not in text and len(base.backend_tokenizer.pre_tokenizer.pre_tokenize_str(text)) == 1:
            assert base(text, add_special_tokens=False)["input_ids"] == ids, token
            checked += 1
    assert checked > len(added) // 2
    assert any(any(c in "қәңғүұөі" for c in ours.convert_tokens_to_string([ours.convert_ids_to_tokens(n)]))
               for n in pieces.pieces)
    stats = pieces.stats()
    assert stats["from_pieces"] == len(added) and stats["global_mean_added"] == 1 and stats["pieces_mean"] >= 2


def test_a_token_the_base_cannot_cut_gets_the_global_mean():
    from tokenizers import Tokenizer, models

    base = Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "ab": 2}, merges=[("a", "b")], unk_token=None))
    tokens = ["a", "b", "ab", "abab", "", "zz"]
    pieces = V.decompose(tokens, [3, 4, 5], base, old_rows=3, to_text=None)
    assert pieces.pieces == {3: [2, 2]}
    assert pieces.fallback == {4: "no pieces", 5: "no pieces"}


def test_auto_takes_pieces_only_for_an_extension():
    assert V.resolve_init("auto", True) == "pieces" and V.resolve_init("auto", False) == "mean"
    assert V.resolve_init("forbid", False) == "mean" and V.resolve_init("random", True) == "random"
    assert not V.extends(["a", "b", "c"], {"b": 0, "a": 1})  # same tokens, other ids
    assert not V.extends(["a"], {"a": 0, "b": 1})  # fewer tokens than the base
    assert V.extends(["a", "b", "new"], {"a": 0, "b": 1})
    with pytest.raises(ValueError, match="unknown new_token_init"):
        V.resolve_init("first", True)


# ------------------------------------------------------------------------------------- rows


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_new_rows_are_the_mean_of_their_pieces_rows(expansion, tied):
    base, ours, *_ = expansion
    old_rows, rows, hidden = L.padded_vocab(len(base), 64), L.padded_vocab(len(ours), 64), 16
    g = torch.Generator().manual_seed(0)
    embed = torch.randn(old_rows, hidden, generator=g)
    head = embed if tied else torch.randn(old_rows, hidden, generator=g)
    sd = {V.EMBED_KEY: embed, V.HEAD_KEY: head}
    match, pieces = _pieces(base, ours, old_rows)
    V.transfer_embeddings(sd, match, rows, "pieces", tied=tied, pieces=pieces, generator=g, std=0.02)
    new_embed, new_head = sd[V.EMBED_KEY], sd[V.HEAD_KEY]
    assert new_embed.shape == new_head.shape == (rows, hidden)
    assert (new_head is new_embed) == tied
    for nid, ids in pieces.pieces.items():
        torch.testing.assert_close(new_embed[nid], torch.stack([embed[i] for i in ids]).mean(dim=0), rtol=0, atol=1e-7)
        torch.testing.assert_close(new_head[nid], torch.stack([head[i] for i in ids]).mean(dim=0), rtol=0, atol=1e-7)
    if not tied:  # the head's own rows, not the embedding's
        nid, ids = next(iter(pieces.pieces.items()))
        assert not torch.allclose(new_head[nid], embed[ids].mean(dim=0))
    # the original rows are untouched, bit for bit
    assert torch.equal(new_embed[: len(base)], embed[: len(base)])
    assert torch.equal(new_head[: len(base)], head[: len(base)])
    # the marker (an added token) and the padding rows: the mean of the base's token rows
    marker = ours.convert_tokens_to_ids(MARKER)
    for r in (marker, rows - 1):
        torch.testing.assert_close(new_embed[r], embed[: len(base)].mean(dim=0))
        torch.testing.assert_close(new_head[r], head[: len(base)].mean(dim=0))


def tiny_model(family: str, vocab: int, *, tied: bool, seed: int = 0):
    import transformers

    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=tied)
    cls, cfg_cls = {"llama": ("LlamaForCausalLM", "LlamaConfig"), "qwen2": ("Qwen2ForCausalLM", "Qwen2Config"),
                    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config")}[family]
    extra = {"head_dim": 8} if family == "qwen3" else {}
    torch.manual_seed(seed)
    model = getattr(transformers, cls)(getattr(transformers, cfg_cls)(**common, **extra))
    with torch.no_grad():  # distinct, non-trivial values everywhere (norms and biases start at 1 / 0 otherwise)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


@pytest.mark.parametrize("family,tied", [("llama", False), ("qwen2", True), ("qwen3", False)])
def test_old_vocabulary_text_keeps_its_logits_and_loss(expansion, family, tied):
    """Text tokenised with old ids only: the expanded model gives the same logits on the old vocabulary's columns
    and the same loss over them as the model before expansion (the original rows are untouched; only the new
    tokens' columns are added, which the full softmax does see: their share of the probability is printed)."""
    import torch.nn.functional as F

    base, ours, *_ = expansion
    old_rows, rows = L.padded_vocab(len(base), 64), L.padded_vocab(len(ours), 64)
    old = tiny_model(family, old_rows, tied=tied)
    sd = {k: v.clone() for k, v in old.state_dict().items()}
    match, pieces = _pieces(base, ours, old_rows)
    V.transfer_embeddings(sd, match, rows, "pieces", tied=tied, pieces=pieces, generator=torch.Generator(), std=0.02)
    config = old.config.__class__(**{**old.config.to_dict(), "vocab_size": rows})
    new = type(old)(config).eval()
    new.load_state_dict(sd)
    assert torch.equal(new.model.embed_tokens.weight[: len(base)], old.model.embed_tokens.weight[: len(base)])

    batch = [base(t, add_special_tokens=True)["input_ids"][:40] for t in [*EN, *RU]]
    n = min(map(len, batch))
    ids = torch.tensor([b[:n] for b in batch])
    assert int(ids.max()) < len(base)  # old vocabulary only
    with torch.no_grad():
        before, after = old(ids).logits, new(ids).logits
    k = len(base)
    assert after.shape[-1] == rows > before.shape[-1] == old_rows
    diff = (after[..., :k] - before[..., :k]).abs().max().item()
    assert diff <= 1e-6, diff

    def old_vocab_loss(logits):
        return F.cross_entropy(logits[:, :-1, :k].reshape(-1, k), ids[:, 1:].reshape(-1))

    assert abs(old_vocab_loss(after).item() - old_vocab_loss(before).item()) <= 1e-6
    new_mass = after.softmax(-1)[..., match.new_ids].sum(-1).mean().item()
    print(f"{family} tied={tied}: logits max diff {diff:.1e}, new tokens' initial probability mass {new_mass:.4f}")


# ---------------------------------------------------------------------------- target size, report


def test_extension_up_to_a_target_size(expansion):
    *_, base_dir, _, _ = expansion
    base = load_reference(str(base_dir))
    cfg = base_cfg(mix={"kk": 1.0}, special_tokens={"extra": [MARKER]},
                   extend=ExtendConfig(base=str(base_dir), target_size=base.get_vocab_size() + 31))
    ext, added = extend_tokenizer(base, {"kk": KK * 10}, cfg)
    assert len(added) == 30 and ext.get_vocab_size() == base.get_vocab_size() + 31  # 30 merges + the marker
    with pytest.raises(ConfigError, match="not above the base"):
        extend_tokenizer(base, {"kk": KK}, base_cfg(extend=ExtendConfig(base="x", target_size=base.get_vocab_size())))
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="not both"):
        ExtendConfig(base="x", new_tokens=10, target_size=500)


def test_added_tokens_outside_the_bpe_vocabulary_keep_their_ids():
    """Qwen's layout: the BPE vocabulary is ids 0..n-1 and the added tokens (<|endoftext|>, <|im_start|>, ...) come
    after it without being in it. The expansion's merges come after those, and the added tokens stay where they
    were (before the fix, `tokenizers` moved them past the merges and left a hole at their old ids)."""
    from tokenizers import AddedToken, Tokenizer, models

    trained = json.loads(train_bpe({"en": EN * 30, "ru": RU * 30}, base_cfg(special_tokens={"chat": [], "tools": []})).to_str())
    vocab = {t: i for t, i in trained["model"]["vocab"].items() if not t.startswith("<|")}
    vocab = {t: i for i, t in enumerate(sorted(vocab, key=vocab.get))}
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["model"]["merges"]]
    base = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=None))
    base.pre_tokenizer, base.decoder = load_reference_like(trained)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    base.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    n = len(vocab)
    assert [base.token_to_id(t) for t in specials] == [n, n + 1, n + 2]
    cfg = base_cfg(mix={"kk": 1.0}, special_tokens={"bos": "<|endoftext|>", "eos": "<|endoftext|>",
                                                     "pad": "<|endoftext|>", "chat": specials[1:], "tools": []},
                   extend=ExtendConfig(base="x", new_tokens=20))
    ext, added = extend_tokenizer(base, {"kk": KK * 10}, cfg)
    assert len(added) == 20 and ext.get_vocab_size() == n + 3 + 20
    assert [ext.token_to_id(t) for t in specials] == [n, n + 1, n + 2]
    ids = sorted(ext.get_vocab().values())
    assert ids == list(range(n + 23))  # contiguous: no hole where the added tokens were
    assert ext.encode("<|im_start|>user", add_special_tokens=False).ids[0] == n + 1
    assert ext.encode(" Москва", add_special_tokens=False).ids == base.encode(" Москва", add_special_tokens=False).ids


def load_reference_like(data: dict):
    """The pre-tokenizer and decoder of a tokenizer.json dict."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(json.dumps(data))
    return tok.pre_tokenizer, tok.decoder


def test_extension_report_counts_and_compares(expansion):
    base, ours, base_dir, ours_dir, added = expansion
    held = {"kk": KK[:2], "en": EN[:2]}
    report = fertility_report({"ours": load_reference(str(ours_dir)), "base": load_reference(str(base_dir))}, held)
    ext = extension_report(report, added, base_size=len(base), size=len(ours), requested=60)
    assert ext["added"] == len(added) and ext["specials_added"] == 1 and sum(ext["by_script"].values()) == len(added)
    assert ext["by_script"].get("kazakh", 0) > 0
    kk, en = ext["languages"]["kk"], ext["languages"]["en"]
    assert kk["expanded_tokens"] < kk["base_tokens"] and kk["ratio"] < 1 and kk["tokens_saved"] > 0
    assert en["expanded_tokens"] == en["base_tokens"] and en["ratio"] == 1.0  # no kk merge applies to English
    md = format_extension_markdown(ext)
    assert f"Base: {len(base):,} tokens" in md and "| kk |" in md and "asked for 60" in md
    json.dumps(ext)  # JSON-ready (the stage writes it)
    assert [token_script(t) for t in (" қала", " Москва", "ing", "12,", "Aб")] == [
        "kazakh", "cyrillic", "latin", "no letters", "mixed"]


# --------------------------------------------------------------------------------- the stage


def _commit(root: Path, folder: Path) -> None:
    import shutil

    from pipeline.storage import Storage

    out = Storage(str(root)).begin("tokenizer")
    for f in folder.iterdir():
        shutil.copy(f, out.path())
    out.commit({"stage": "tokenizer", "config_hash": "x", "inputs": {}, "metrics": {}})


@pytest.mark.parametrize("family,tied", [("llama", False), ("qwen2", True), ("qwen3", True)])
def test_init_starts_new_tokens_from_their_pieces(request, tmp_path, capsys, family, tied):
    """`llmpipe run init` from a checkpoint whose tokenizer ours extends: auto -> pieces, rows as the library makes
    them, in the saved model (whose tokenizer encodes as ours); the same checkpoint under a tokenizer that does not
    extend it: auto -> mean."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.cli import main

    base, ours, base_dir, ours_dir, _ = request.getfixturevalue("expansion" if family == "llama" else "qwen_expansion")
    ckpt = tmp_path / "ckpt"
    old = tiny_model(family, L.padded_vocab(len(base), 64), tied=tied)
    if family != "llama":
        try:
            from pipeline.models.families import FAMILIES  # the init stage's Qwen support
        except ImportError:
            pytest.skip("init does not load Qwen checkpoints yet")
        assert family in FAMILIES
    old.config.bos_token_id, old.config.eos_token_id = base.bos_token_id, base.eos_token_id
    old.save_pretrained(ckpt)
    base.save_pretrained(ckpt)
    root = tmp_path / "run"
    _commit(root, ours_dir)
    assert main(["run", "init", "--root", str(root), "--no-progress", "--set", "source=pretrained",
                 "--set", f"pretrained_path={ckpt}"]) == 0
    assert "(pieces)" in capsys.readouterr().out
    m = json.loads((root / "models" / "init" / "manifest.json").read_text())["metrics"]
    assert m["new_token_init"] == "pieces" and m["vocab_extends_pretrained"] is True
    assert m["new_token_pieces"]["from_pieces"] == m["vocab_new"] - 1 and m["new_token_pieces"]["global_mean_added"] == 1
    new = AutoModelForCausalLM.from_pretrained(root / "models" / "init")
    assert type(new) is type(old)
    _, pieces = _pieces(base, ours, old.config.vocab_size)
    e_old, e_new = old.get_input_embeddings().weight, new.get_input_embeddings().weight
    h_old, h_new = old.get_output_embeddings().weight, new.get_output_embeddings().weight
    for nid, ids in pieces.pieces.items():
        torch.testing.assert_close(e_new[nid], e_old[ids].mean(dim=0), rtol=0, atol=1e-7)
        torch.testing.assert_close(h_new[nid], h_old[ids].mean(dim=0), rtol=0, atol=1e-7)
    assert torch.equal(e_new[: len(base)], e_old[: len(base)]) and torch.equal(h_new[: len(base)], h_old[: len(base)])
    saved = AutoTokenizer.from_pretrained(root / "models" / "init")  # what pretrain will load beside this config
    for text in [*KK, *RU, *EN, "2024 12345"]:
        assert saved(text)["input_ids"] == ours(text)["input_ids"], (type(saved).__name__, text)

    # a tokenizer that is not an extension of the checkpoint's (trained on its own): auto keeps the global mean
    other = tmp_path / "other"
    # (beside a qwen2 config it must be one Qwen2Tokenizer keeps, or init refuses it: families.tokenizer_reload_problem)
    qwen_kw = {} if family != "qwen2" else {"pretokenizer": "qwen2", "special_tokens": {"eos": "<|endoftext|>"}}
    cfg = base_cfg(vocab_size=380, mix={"en": 1.0, "kk": 1.0}, **qwen_kw)
    save_hf(train_bpe({"en": EN * 30, "kk": KK * 10}, cfg), cfg, str(tmp_path / "other-tok"))
    _commit(other, tmp_path / "other-tok")
    assert main(["run", "init", "--root", str(other), "--no-progress", "--set", "source=pretrained",
                 "--set", f"pretrained_path={ckpt}"]) == 0
    m = json.loads((other / "models" / "init" / "manifest.json").read_text())["metrics"]
    assert m["new_token_init"] == "mean" and m["vocab_extends_pretrained"] is False and "new_token_pieces" not in m


REFS = Path(__file__).resolve().parents[2] / ".cache" / "refs"


def test_the_recipe_expansion_of_qwen_through_init(tmp_path, monkeypatch, capsys):
    """The recipe's tokenizer config (tokenizer-qwen05b.yaml, fewer merges) on Qwen 3's real tokenizer, and its init
    config (init-qwen05b.yaml) on a tiny random Qwen2 checkpoint with Qwen 2.5's tokenizer layout (Qwen 3's without
    its last 4 added tokens), as Qwen2.5-0.5B is: ours extends it, the merges start from their pieces, the 6 added
    tokens from the mean, Qwen's logits are unchanged, and the saved folder encodes as our tokenizer artifact."""
    if not (REFS / "qwen3" / "tokenizer.json").is_file():
        pytest.skip("needs the reference tokenizers in .cache/refs (make corpus)")
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from pipeline.cli import main
    from pipeline.stages import load_config

    monkeypatch.setenv("REFS_DIR", str(REFS))
    qwen3 = load_reference(str(REFS / "qwen3"))
    cfg = load_config("tokenizer", Path(__file__).resolve().parents[2] / "jobs/cluster/tokenizer-qwen05b.yaml",
                      [f"extend.target_size={qwen3.get_vocab_size() + 2 + 120}", "train_chars=20000"])
    ext, added = extend_tokenizer(qwen3, {"kk": KK * 20, "ru": RU * 20}, cfg)
    assert len(added) == 120 and ext.token_to_id("<|endoftext|>") == 151_643 and ext.token_to_id("</think>") == 151_668
    root = tmp_path / "run"
    save_hf(ext, cfg, str(tmp_path / "tok"))
    _commit(root, tmp_path / "tok")

    # a Qwen2.5-shaped checkpoint: Qwen 3's tokenizer without <tool_response>, </tool_response>, <think>, </think>
    ckpt = tmp_path / "qwen25"
    ckpt.mkdir()
    raw = json.loads((REFS / "qwen3" / "tokenizer.json").read_text(encoding="utf-8"))
    raw["added_tokens"] = [t for t in raw["added_tokens"] if t["id"] < 151_665]
    (ckpt / "tokenizer.json").write_text(json.dumps(raw, ensure_ascii=False), encoding="utf-8")
    tcfg = json.loads((REFS / "qwen3" / "tokenizer_config.json").read_text(encoding="utf-8"))
    tcfg["added_tokens_decoder"] = {k: v for k, v in tcfg["added_tokens_decoder"].items() if int(k) < 151_665}
    (ckpt / "tokenizer_config.json").write_text(json.dumps(tcfg, ensure_ascii=False), encoding="utf-8")
    torch.manual_seed(0)
    old = Qwen2ForCausalLM(Qwen2Config(vocab_size=151_936, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
                                       max_position_embeddings=256)).eval()
    old.save_pretrained(ckpt)
    qwen25 = AutoTokenizer.from_pretrained(ckpt, local_files_only=True)
    assert len(qwen25) == 151_665

    monkeypatch.setenv("QWEN_PATH", str(ckpt))
    init_yaml = Path(__file__).resolve().parents[2] / "jobs/cluster/init-qwen05b.yaml"
    assert main(["run", "init", "-c", str(init_yaml), "--root", str(root), "--no-progress"]) == 0
    assert "(pieces)" in capsys.readouterr().out
    m = json.loads((root / "models" / "init" / "manifest.json").read_text())["metrics"]
    assert m["vocab_extends_pretrained"] is True and m["new_token_init"] == "pieces"
    assert m["vocab_matched"] == 151_665 and m["vocab_new"] == 4 + 120 + 2
    assert m["new_token_pieces"]["from_pieces"] == 120 and m["new_token_pieces"]["global_mean_added"] == 6
    new = AutoModelForCausalLM.from_pretrained(root / "models" / "init")
    saved = AutoTokenizer.from_pretrained(root / "models" / "init")
    ours = AutoTokenizer.from_pretrained(tmp_path / "tok")
    for text in [*KK, *RU, *EN, "<|im_start|>user\nСәлем<|im_end|>"]:
        assert saved(text)["input_ids"] == ours(text)["input_ids"], text
    e_old, e_new = old.get_input_embeddings().weight, new.get_input_embeddings().weight
    assert new.get_output_embeddings().weight.data_ptr() == e_new.data_ptr()  # tied
    checked = 0
    for text in added:  # a whole-character token that is one pre-token: its pieces are Qwen's ids for its text
        ours_ids = ours(text, add_special_tokens=False)["input_ids"]
        if len(ours_ids) == 1 and "\ufffd" not in text:
            pieces = qwen25(text, add_special_tokens=False)["input_ids"]
            torch.testing.assert_close(e_new[ours_ids[0]], e_old[pieces].mean(dim=0), rtol=0, atol=1e-7)
            checked += 1
    assert checked >= 60
    ids = torch.tensor([qwen25(EN[0] + " " + RU[0], add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        assert torch.equal(new(ids).logits[..., :151_665], old(ids).logits[..., :151_665])
