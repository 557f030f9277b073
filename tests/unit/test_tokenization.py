"""Tokenizer library: training, HF save/load, chat template, fertility math, extension.

Everything runs on tiny inline corpora (no cache, no network) with small vocabularies.
"""

from __future__ import annotations

import json

import pytest
from tokenizers import Regex, Tokenizer, models, pre_tokenizers

from pipeline.data.tokenization import ExtendConfig, SpecialTokens, TokenizerConfig
from pipeline.data.tokenization import (
    build_pretokenizer,
    count_words,
    extend_tokenizer,
    fertility_report,
    format_report_markdown,
    load_reference,
    sample_mix,
    save_hf,
    train_bpe,
)
from pipeline.errors import ConfigError, InputError

KK = [
    "Қазақстан — Орталық Азиядағы мемлекет. Астанасы — Астана қаласы, ең ірі қаласы — Алматы.",
    "Біз бүгін мектепке бардық, ал ертең әжемізге қонаққа барамыз.",
    "Файлды ашу үшін мәзірден «Файл» бөлімін таңдаңыз, содан кейін «Ашу» батырмасын басыңыз.",
    "Баптауларды сақтау мүмкін емес: дискіде бос орын жеткіліксіз.",
    "Әр-түрлі құжаттарды өңдеу, түзету және басып шығару үшін өңдегішті қолданыңыз.",
    "Құпиясөз қате енгізілді. Қайталап көріңіз немесе әкімшіге хабарласыңыз.",
]
RU = [
    "Москва — столица России, крупнейший по численности населения город страны.",
    "Кто-то постучал в дверь, и собака громко залаяла из-за забора.",
    "Не удалось сохранить файл: на диске недостаточно свободного места.",
    "Ёжик в тумане шёл медленно, прислушиваясь к каждому шороху.",
]
EN = [
    "The quick brown fox jumps over the lazy dog, doesn't it? Yes, it's 2024.",
    "Anarchism is a political philosophy that advocates self-governed societies.",
    "Could not save the file: there is not enough free space on the disk.",
    "I'm sure they'll come back tomorrow morning with the rest of the team.",
]
ROUND_TRIP = [
    "Қазақ тілі — түркі тілдерінің бірі. Әңгіме, ғылым, құқық, өнер, ұлт, үміт, һәм, із.",
    "ҚАЗАҚСТАН Республикасы  және\tтабиғат\n\nжаңа жол",
    "Съешь же ещё этих мягких французских булок, да выпей чаю!",
    "Hello, world! It's 3.14159 — naïve café; tabs\tand  double  spaces.\n",
    "<|im_start|> is a special token, <|pad|> too.",
    "emoji 🙂 and CJK 漢字 and ʼapostrophe’s",
]


def corpus(repeat: int = 20) -> dict[str, list[str]]:
    return {"kk": KK * repeat, "ru": RU * repeat, "en": EN * repeat}


def small_cfg(**kw) -> TokenizerConfig:
    base = dict(vocab_size=600, min_frequency=2, train_chars=20_000, seed=0)
    base.update(kw)
    return TokenizerConfig(**base)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_bpe(corpus(), small_cfg())


# ---------------------------------------------------------------------------------- training


def test_train_bpe_small_vocab_and_special_ids(tok):
    cfg = small_cfg()
    assert 256 < tok.get_vocab_size() <= cfg.vocab_size
    for i, special in enumerate(cfg.special_tokens.all()):
        assert tok.token_to_id(special) == i
    # specials are atomic and not split by the pre-tokenizer
    enc = tok.encode("<|im_start|>user", add_special_tokens=False)
    assert enc.ids[0] == tok.token_to_id("<|im_start|>")


def test_special_tokens_extra_fixed_ids():
    st = SpecialTokens(extra=["<|tool|>", "<|eos_alias|>"])
    t = train_bpe(corpus(5), small_cfg(special_tokens=st.model_dump()))
    assert [t.token_to_id(s) for s in st.all()] == list(range(len(st.all())))
    assert st.all()[:3] == [st.bos, st.eos, st.pad]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip_exact(tok, text):
    assert tok.decode(tok.encode(text, add_special_tokens=False).ids, skip_special_tokens=False) == text


def test_training_is_deterministic():
    a = train_bpe(corpus(), small_cfg(vocab_size=400))
    b = train_bpe(corpus(), small_cfg(vocab_size=400))
    assert a.to_str() == b.to_str()


def test_kazakh_words_learn_whole_tokens(tok):
    # a frequent Kazakh word in the tiny corpus becomes one token (with its leading space)
    assert len(tok.encode(" қаласы", add_special_tokens=False).ids) == 1


def test_sample_mix_shares_and_repeat():
    cfg = small_cfg(train_chars=10_000, mix={"kk": 0.5, "ru": 0.25, "en": 0.25, "de": 0.0})
    sample, stats = sample_mix({**corpus(1), "fr": ["ignored"]}, cfg)
    assert set(sample) == {"kk", "ru", "en"}
    assert stats["kk"]["chars"] >= 5000 > stats["kk"]["chars"] - max(map(len, KK))
    assert stats["kk"]["repeat"] > 1  # the tiny kk corpus is repeated to reach its share
    assert sample == sample_mix(corpus(1), cfg)[0]  # deterministic for a seed
    with pytest.raises(InputError, match="no training text"):
        sample_mix({"de": ["Hallo Welt"]}, cfg)


def test_unicode_form_nfc_applied():
    t = train_bpe(corpus(5), small_cfg(vocab_size=400, unicode_form="NFC"))
    decomposed = "и\u0306"  # й as и + combining breve
    assert t.decode(t.encode(decomposed, add_special_tokens=False).ids) == "й"


# ----------------------------------------------------------------------------- pre-tokenizers


def pieces(kind: str, text: str) -> list[str]:
    from tokenizers import decoders

    dec = decoders.ByteLevel()
    return [dec.decode([p]) for p, _ in build_pretokenizer(kind).pre_tokenize_str(text)]


def test_cyrillic_aware_pretokenizer_keeps_words_together():
    got = pieces("cyrillic-aware", "Әр-түрлі құжаттар, кто-то don't 1984\nҚала")
    assert got == ["Әр-түрлі", " құжаттар", ", кто-то", " don't", " ", "198", "4", "\nҚала"]
    assert pieces("cyrillic-aware", "\n\n«Ашу»") == ["\n\n«Ашу", "»"]  # up to three leading non-letters
    assert pieces("cyrillic-aware", "a \n\n\t«Ашу»") == ["a", " \n\n", "\t«Ашу", "»"]
    # llama3 splits the contraction and the hyphenated words
    assert " кто" in pieces("llama3", "Әр-түрлі кто-то don't") and "'t" in pieces("llama3", "don't")
    assert pieces("gpt2", "Қала") == ["Қала"]


def test_unknown_pretokenizer_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown pretokenizer"):
        build_pretokenizer("bert")


# ------------------------------------------------------------------------------------ HF save


@pytest.fixture(scope="module")
def hf_dir(tok, tmp_path_factory):
    d = tmp_path_factory.mktemp("hf")
    save_hf(tok, small_cfg(model_max_length=1024), str(d))
    return d


def test_save_hf_loads_offline_and_round_trips(hf_dir):
    from transformers import AutoTokenizer

    at = AutoTokenizer.from_pretrained(str(hf_dir), local_files_only=True)
    st = SpecialTokens()
    assert at.bos_token == st.bos and at.eos_token == st.eos and at.pad_token == st.pad
    assert at.bos_token_id == 0 and at.eos_token_id == 1 and at.pad_token_id == 2
    assert at.model_max_length == 1024
    assert set(st.chat) <= set(at.all_special_tokens)
    for text in ROUND_TRIP:
        ids = at(text, add_special_tokens=False)["input_ids"]
        assert at.decode(ids) == text
    files = {p.name for p in hf_dir.iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json"} <= files


def test_chat_template_renders_chatml(hf_dir):
    from transformers import AutoTokenizer

    at = AutoTokenizer.from_pretrained(str(hf_dir), local_files_only=True)
    messages = [{"role": "system", "content": "Сен көмекшісің."}, {"role": "user", "content": "Сәлем!"}]
    text = at.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == ("<|begin_of_text|><|im_start|>system\nСен көмекшісің.<|im_end|>\n<|im_start|>user\nСәлем!<|im_end|>\n"
                    "<|im_start|>assistant\n")
    ids = at.apply_chat_template(messages, tokenize=True, add_generation_prompt=False, return_dict=False)
    assert ids.count(at.convert_tokens_to_ids("<|im_start|>")) == 2
    assert ids.count(at.convert_tokens_to_ids("<|im_end|>")) == 2
    assert ids[0] == at.bos_token_id and ids.count(at.bos_token_id) == 1


def test_bos_is_added_like_pack_adds_it_and_tool_tokens_survive_decoding(hf_dir):
    """The saved tokenizer puts BOS before a text encoded with special tokens (pack puts it before every document;
    the GGUF's add_bos follows from this), none without; the tool-call markers are tokens of their own that a decode
    skipping special tokens keeps (the tool-call parser reads them)."""
    from transformers import AutoTokenizer

    at = AutoTokenizer.from_pretrained(str(hf_dir), local_files_only=True)
    plain = at("Сәлем әлем", add_special_tokens=False)["input_ids"]
    assert at("Сәлем әлем")["input_ids"] == [at.bos_token_id, *plain]
    call = at.convert_tokens_to_ids("<tool_call>")
    assert call not in (at.unk_token_id, None) and at("<tool_call>", add_special_tokens=False)["input_ids"] == [call]
    text = 'Жауап <tool_call>\n{"name": "f"}\n</tool_call>'
    assert at.decode(at(text)["input_ids"], skip_special_tokens=True) == text


# ---------------------------------------------------------------------------------- fertility


def _char_tokenizer() -> Tokenizer:
    chars = sorted(set("ab cd.xyzé"))
    t = Tokenizer(models.WordLevel({c: i for i, c in enumerate(chars)} | {"[UNK]": len(chars)}, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return t


def _word_tokenizer() -> Tokenizer:
    vocab = {w: i for i, w in enumerate(["ab", "cd", "x", "é", "."])} | {"[UNK]": 5}
    t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    return t


def test_fertility_math_by_hand():
    texts = {"xx": ["ab cd.", "x é"]}  # words: ab, cd, x, é = 4; bytes: 6 + 4 (é is 2 bytes) = 10
    rep = fertility_report({"char": _char_tokenizer(), "word": _word_tokenizer()}, texts)
    lang = rep["languages"]["xx"]
    assert lang["docs"] == 2 and lang["words"] == 4 and lang["bytes"] == 10
    char, word = lang["tokenizers"]["char"], lang["tokenizers"]["word"]
    assert char["tokens"] == 9  # a b ␠ c d . x ␠ é
    assert char["fertility"] == pytest.approx(9 / 4)
    assert char["bytes_per_token"] == pytest.approx(10 / 9)
    assert char["split_word_share"] == pytest.approx(2 / 4)  # ab, cd split; x, é not
    assert word["tokens"] == 5  # ab cd . x é
    assert word["fertility"] == pytest.approx(5 / 4)
    assert word["split_word_share"] == 0
    assert char["ratios"]["word"] == pytest.approx(9 / 5)
    assert word["ratios"]["char"] == pytest.approx(5 / 9)
    md = format_report_markdown(rep, goals={"xx": 2.0}, baseline="word")
    assert "| xx |" in md and "PASS" in md


def test_word_definition():
    assert count_words("don't stop — әр-түрлі 2024 год_а") == 7  # don't|stop|әр|түрлі|2024|год|а
    assert count_words("") == 0


def test_fertility_ignores_special_tokens(tok):
    rep = fertility_report({"ours": tok}, {"kk": ["Сәлем әлем"]})
    assert rep["languages"]["kk"]["tokenizers"]["ours"]["tokens"] == len(tok.encode("Сәлем әлем", add_special_tokens=False).ids)


# ---------------------------------------------------------------------------------- extension


def test_extension_adds_merges_and_lowers_fertility():
    base = train_bpe({"en": EN * 30}, small_cfg(vocab_size=320, mix={"en": 1.0}))
    cfg = small_cfg(mix={"kk": 1.0}, extend=ExtendConfig(base="unused", new_tokens=60))
    ext, added = extend_tokenizer(base, {"kk": KK * 10}, cfg)
    assert 0 < len(added) <= 60
    assert ext.get_vocab_size() >= base.get_vocab_size() + len(added)
    # the base's tokens keep their ids
    bv, ev = base.get_vocab(), ext.get_vocab()
    assert all(ev[t] == i for t, i in bv.items())
    before = fertility_report({"base": base, "ext": ext}, {"kk": KK, "en": EN})
    kk = before["languages"]["kk"]["tokenizers"]
    assert kk["ext"]["fertility"] < kk["base"]["fertility"]
    # English text is encoded as before, and every text round-trips
    for text in EN:
        assert ext.encode(text, add_special_tokens=False).ids == base.encode(text, add_special_tokens=False).ids
    for text in ROUND_TRIP:
        assert ext.decode(ext.encode(text, add_special_tokens=False).ids, skip_special_tokens=False) == text
    assert any(a.strip() and any(ch in a for ch in "қәңғүұөі") for a in added)


def test_extension_adds_missing_special_tokens_and_saves(tmp_path):
    base = train_bpe({"en": EN * 30}, small_cfg(vocab_size=320, mix={"en": 1.0}, special_tokens={"chat": [], "pad": "<|end_of_text|>"}))
    cfg = small_cfg(mix={"kk": 1.0}, extend=ExtendConfig(base="unused", new_tokens=10))
    ext, _ = extend_tokenizer(base, {"kk": KK * 5}, cfg)
    assert ext.token_to_id("<|im_start|>") is not None and ext.token_to_id("<|pad|>") is not None
    save_hf(ext, cfg, str(tmp_path))
    from transformers import AutoTokenizer

    at = AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    assert at.decode(at("Сәлем, әлем!", add_special_tokens=False)["input_ids"]) == "Сәлем, әлем!"


def test_extend_needs_extend_config(tok):
    with pytest.raises(ConfigError, match="extend"):
        extend_tokenizer(tok, corpus(1), small_cfg())


# --------------------------------------------------------------------------------- references


def test_load_reference_errors_name_the_path(tmp_path):
    missing = tmp_path / "nope" / "tokenizer.json"
    with pytest.raises(InputError, match=str(missing)):
        load_reference(str(missing))
    with pytest.raises(InputError, match="has no tokenizer.json"):
        load_reference(str(tmp_path))
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(InputError, match="not a valid tokenizer.json"):
        load_reference(str(bad))


def test_load_reference_file_or_folder(tok, tmp_path):
    tok.save(str(tmp_path / "tokenizer.json"))
    a = load_reference(str(tmp_path))
    b = load_reference(str(tmp_path / "tokenizer.json"))
    assert a.get_vocab() == b.get_vocab() == tok.get_vocab()
    assert json.loads(a.to_str())["model"]["type"] == "BPE"


def test_an_extended_qwen_tokenizer_keeps_its_regex_and_its_gguf_preset(tmp_path):
    """A tokenizer extended from a Qwen-family base keeps the base's pre-tokenizer (Qwen 2's regex: one digit per
    pre-token), so the GGUF says qwen2, not llama-bpe; ours says llama-bpe; round 1's regex has no preset."""
    import json

    from pipeline.quantization.gguf_export import _pre_name

    qwen_like = train_bpe({"en": EN * 30}, small_cfg(vocab_size=320, mix={"en": 1.0}, pretokenizer="qwen2"))
    cfg = small_cfg(mix={"kk": 1.0}, extend=ExtendConfig(base="unused", new_tokens=40))
    ext, added = extend_tokenizer(qwen_like, {"kk": KK * 10}, cfg)
    assert added
    save_hf(ext, cfg, str(tmp_path / "ext"))
    raw = json.loads((tmp_path / "ext" / "tokenizer.json").read_text(encoding="utf-8"))
    assert _pre_name(raw)[0] == "qwen2"
    assert ext.encode("2024", add_special_tokens=False).tokens == ["2", "0", "2", "4"]
    save_hf(train_bpe(corpus(), small_cfg()), small_cfg(), str(tmp_path / "ours"))
    assert _pre_name(json.loads((tmp_path / "ours" / "tokenizer.json").read_text(encoding="utf-8")))[0] == "llama-bpe"


def test_lm_eval_is_told_to_add_bos_when_the_tokenizer_does(hf_dir):
    from transformers import AutoTokenizer

    from pipeline.evaluation.harness import adds_bos

    assert adds_bos(AutoTokenizer.from_pretrained(str(hf_dir), local_files_only=True))
    nobos = small_cfg(add_bos=False)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        save_hf(train_bpe(corpus(), nobos), nobos, tmp)
        assert not adds_bos(AutoTokenizer.from_pretrained(tmp, local_files_only=True))
