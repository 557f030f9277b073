"""Document filters of the clean stage (pipeline.data.filters): each check alone, then the whole filter."""

from __future__ import annotations

import json
import pickle

import pytest

from pipeline.data.filters import LengthConfig, RepetitionConfig, ScriptConfig
from pipeline.stages.clean import CleanConfig
from pipeline.data.filters import (
    ALL_REASONS,
    DocumentFilter,
    FilterResult,
    length_reason,
    reason_names,
    repetition_reason,
    script_reason,
    script_shares,
    words,
)
from tests.conftest import CORPUS

LENGTH_OFF = {name: None for name in LengthConfig.model_fields}
REPETITION_OFF = dict(max_dup_line_frac=None, max_dup_para_frac=None, max_dup_line_char_frac=None,
                      max_dup_para_char_frac=None, max_top_ngram_frac={}, max_dup_ngram_frac={}, ngram_min_words=0)


def length(**kw) -> LengthConfig:
    return LengthConfig(**{**LENGTH_OFF, **kw})


def repetition(**kw) -> RepetitionConfig:
    return RepetitionConfig(**{**REPETITION_OFF, **kw})


# ---------------------------------------------------------------------------------- words


def test_words_are_unicode_aware():
    assert words("Қазақстан Республикасы — әдемі ел! Ұлы дала, өңір, һәм іні.") == [
        "Қазақстан", "Республикасы", "әдемі", "ел", "Ұлы", "дала", "өңір", "һәм", "іні"]
    assert words("Don't stop-now, Алма-Ата’s 3.14") == ["Don't", "stop-now", "Алма-Ата’s", "3", "14"]
    assert words("-- ... !!!") == []


# --------------------------------------------------------------------------------- length


@pytest.mark.parametrize(
    "field, limit, ok, bad",
    [
        ("min_chars", 10, "a" * 10, "a" * 9),
        ("max_chars", 10, "a" * 10, "a" * 11),
        ("min_words", 3, "Қазақстан әдемі ел", "Қазақстан әдемі"),
        ("max_words", 3, "бір екі үш", "бір екі үш төрт"),
        ("min_mean_word_length", 2.0, "ab cd", "ab c"),
        ("max_mean_word_length", 15.0, "ә" * 15, "ә" * 16),
        ("min_lines", 2, "one\ntwo", "one\n\n"),
        ("max_lines", 2, "one\n\ntwo", "one\ntwo\nthree"),
        ("max_paragraph_chars", 10, "a" * 10 + "\n\n" + "b" * 10, "a" * 11 + "\n\nb"),
    ],
)
def test_each_length_limit_at_and_beyond_its_threshold(field, limit, ok, bad):
    cfg = length(**{field: limit})
    assert length_reason(ok, cfg) is None
    assert length_reason(bad, cfg) == f"length.{field}"


def test_length_checks_run_in_field_order():
    cfg = length(min_chars=100, min_words=50)
    assert length_reason("short", cfg) == "length.min_chars"


def test_no_words_fails_the_mean_word_length():
    assert length_reason("!!! ???", length(min_mean_word_length=1.0)) == "length.min_mean_word_length"


def test_default_length_config_keeps_a_normal_paragraph():
    text = "Бүгін ауа райы жақсы, балалар далада ойнап жүр. Ертең жаңбыр жауады деп күтілуде."
    assert length_reason(text, LengthConfig()) is None


# ----------------------------------------------------------------------------- repetition


def _lines(unique: int, dups: int) -> str:
    lines = [f"line number {i} is here" for i in range(unique)]
    return "\n".join(lines + lines[:dups])


def test_duplicate_line_fraction():
    cfg = repetition(max_dup_line_frac=0.3)
    assert repetition_reason(_lines(7, 3), cfg) is None  # 3 of 10 lines are copies: at the limit
    assert repetition_reason(_lines(6, 4), cfg) == "repetition.dup_line_frac"


def test_duplicate_line_character_fraction():
    cfg = repetition(max_dup_line_char_frac=0.2)
    dup = "a" * 10
    assert repetition_reason(f"{dup}\n{dup}\n" + "b" * 28, cfg) is None  # 10 / 50 chars
    assert repetition_reason(f"{dup}\n{dup}\n" + "b" * 27, cfg) == "repetition.dup_line_char_frac"


def test_duplicate_paragraph_fractions():
    paras = [f"Paragraph {i} talks about one thing." for i in range(7)]
    text_ok = "\n\n".join(paras + paras[:3])
    text_bad = "\n\n".join(paras[:6] + paras[:4])
    cfg = repetition(max_dup_para_frac=0.3)
    assert repetition_reason(text_ok, cfg) is None
    assert repetition_reason(text_bad, cfg) == "repetition.dup_para_frac"
    dup = "a" * 10
    cfg = repetition(max_dup_para_char_frac=0.2)
    assert repetition_reason(f"{dup}\n\n{dup}\n\n" + "b" * 26, cfg) is None  # 10 / 50 chars
    assert repetition_reason(f"{dup}\n\n{dup}\n\n" + "b" * 25, cfg) == "repetition.dup_para_char_frac"


def test_lines_repeated_inside_one_paragraph_are_not_duplicate_paragraphs():
    text = "same line\nsame line\nsame line\nother"
    assert repetition_reason(text, repetition(max_dup_para_frac=0.0, max_dup_para_char_frac=0.0)) is None
    assert repetition_reason(text, repetition(max_dup_line_frac=0.3)) == "repetition.dup_line_frac"


def test_top_ngram_share():
    # ("ab", "cd") twice: 8 of the word characters
    cfg = repetition(max_top_ngram_frac={2: 0.2})
    fill = ["qqqqqqq0", "qqqqqqq1", "qqqqqqq2", "qqqqqqq3"]
    assert repetition_reason("ab cd ab cd " + " ".join(fill), cfg) is None  # 8 / 40
    assert repetition_reason("ab cd ab cd " + " ".join(fill[:3] + ["qqqqqq4"]), cfg) == "repetition.top_ngram_2"


def test_top_ngram_that_occurs_once_is_not_repetition():
    assert repetition_reason("один два три", repetition(max_top_ngram_frac={2: 0.01, 3: 0.01})) is None


def test_duplicated_ngrams_counted_without_double_counting():
    # a..f twice: the copies of (a..e) and (b..f) overlap; they cover words 6..11 = 6 of 12 chars.
    # Counting each copy separately would give 10/12; counting first occurrences too, 12/12.
    text = "a b c d e f a b c d e f"
    assert repetition_reason(text, repetition(max_dup_ngram_frac={5: 0.5})) is None
    assert repetition_reason(text, repetition(max_dup_ngram_frac={5: 0.49})) == "repetition.dup_ngram_5"
    assert repetition_reason(text, repetition(max_dup_ngram_frac={6: 0.49})) == "repetition.dup_ngram_6"
    assert repetition_reason(text, repetition(max_dup_ngram_frac={7: 0.0})) is None  # no 7-gram repeats


def test_ngram_checks_skip_short_documents():
    text = "a b c d e f a b c d e f"  # 12 words
    assert repetition_reason(text, repetition(max_dup_ngram_frac={5: 0.1}, ngram_min_words=13)) is None
    assert repetition_reason(text, repetition(max_dup_ngram_frac={5: 0.1}, ngram_min_words=12)) == "repetition.dup_ngram_5"


def test_kazakh_ngrams():
    phrase = "Шындылықты тексеру қатесі орын алды"
    text = ". ".join([phrase] * 3 + ["Бүгін ауа райы жақсы", "Ертең жаңбыр жауады"])
    assert repetition_reason(text, repetition(max_dup_ngram_frac={5: 0.15})) == "repetition.dup_ngram_5"
    assert repetition_reason(text, repetition(max_top_ngram_frac={2: 0.2})) == "repetition.top_ngram_2"


def test_default_repetition_config_keeps_real_prose_and_drops_spam():
    prose = (CORPUS / "en" / "fortunes.txt").read_text(encoding="utf-8").split("\n%\n")
    kept = sum(repetition_reason(t, RepetitionConfig()) is None for t in prose)
    assert kept / len(prose) > 0.95
    spam = "\n".join(["Buy cheap watches online today, best prices guaranteed."] * 25)
    assert repetition_reason(spam, RepetitionConfig()) == "repetition.dup_line_frac"


# --------------------------------------------------------------------------------- script


def test_script_shares():
    assert script_shares("Привет hello") == pytest.approx({"cyrillic": 6 / 11, "latin": 5 / 11})
    assert script_shares("әғқңөұүһі ӘҒҚҢӨҰҮҺІ") == {"cyrillic": 1.0, "latin": 0.0}
    assert script_shares("café naïve") == {"cyrillic": 0.0, "latin": 1.0}
    assert script_shares("123 !!! ...") == {"cyrillic": 0.0, "latin": 0.0}
    assert script_shares("Καλημέρα мир")["cyrillic"] == pytest.approx(3 / 11)  # Greek counts as letters


def test_script_reason():
    cfg = ScriptConfig()
    assert script_reason("Сәлем, әлем! Hi", "kk", cfg) is None
    assert script_reason("Hello world, Сәлем", "kk", cfg) == "script"
    assert script_reason("Привет, мир", "en", cfg) == "script"
    assert script_reason("Hello world", "en", cfg) is None
    assert script_reason("Hello world", "kk", cfg) == "script"  # ASCII fast path
    assert script_reason("12345 !!!", "kk", cfg) is None  # no letters: nothing to judge
    assert script_reason("Hello", None, cfg) is None
    assert script_reason("Hello", "de", cfg) is None  # no expected script
    assert script_reason("Hello", "kk", ScriptConfig(enabled=False)) is None


def test_script_share_at_the_threshold():
    cfg = ScriptConfig(min_share=0.6)
    assert script_reason("абвгде abcd", "ru", cfg) is None  # 6 / 10
    assert script_reason("абвгд abcde", "ru", cfg) == "script"  # 5 / 10


# ----------------------------------------------------------------------------- the filter


@pytest.fixture(scope="module")
def doc_filter() -> DocumentFilter:
    return DocumentFilter(CleanConfig())


KK = "Менің атым Айгүл, мен Алматыда тұрамын. Бүгін ауа райы жақсы, балалар далада ойнап жүр."
RU = "Вчера я ходил в магазин за хлебом и молоком, а потом гулял в парке с собакой."
EN = "The weather is nice today, so we went for a long walk in the park with the dog."
DE = "Das Wetter ist heute schön, deshalb sind wir mit dem Hund lange im Park spazieren gegangen."


def test_keeps_good_documents_and_returns_normalised_text(doc_filter):
    for text, lang in ((KK, "kk"), (RU, "ru"), (EN, "en")):
        res = doc_filter("  " + text.replace(" ", "  ") + "\u200b\n\n\n", None)
        assert res == FilterResult(text, lang, res.lang_score, None)
        assert 0.5 < res.lang_score <= 1.0


def test_empty_after_normalisation(doc_filter):
    res = doc_filter(" \t\u200b\n\n\x00 ")
    assert (res.text, res.reason, res.lang) == ("", "empty", None)


def test_language_not_kept(doc_filter):
    res = doc_filter(DE, "kk")
    assert (res.reason, res.lang) == ("langid.not_kept", "de")


def test_low_score_uses_per_language_then_default_minimum():
    cfg = CleanConfig(langid={"languages": ["kk", "ru", "en", "de"], "min_score": {"en": 0.9999}, "default_min_score": 0.9999})
    f = DocumentFilter(cfg)
    assert f(EN).reason == "langid.low_score"
    assert f(DE).reason == "langid.low_score"  # no entry for de: default_min_score
    cfg = CleanConfig(langid={"languages": ["kk", "ru", "en", "de"], "min_score": {"en": 0.9999}, "default_min_score": 0.1})
    f = DocumentFilter(cfg)
    assert f(EN).reason == "langid.low_score"
    assert f(DE).reason is None


def test_short_kazakh_is_kept_through_the_letter_rule(doc_filter):
    res = doc_filter("Пароль өзгертілмеді, қайталап көріңіз.")
    assert res.lang == "kk" and res.reason is None


def test_without_langid_the_hint_is_the_language():
    f = DocumentFilter(CleanConfig(langid={"enabled": False}))
    res = f(EN, "ru")
    assert (res.lang, res.lang_score, res.reason) == ("ru", None, "script")
    assert f(EN, "en").reason is None
    assert f(EN, None).reason is None


def test_order_langid_before_length_before_repetition(doc_filter):
    assert doc_filter("Das ist gut.").reason in {"langid.not_kept", "langid.low_score"}
    cfg = CleanConfig(length={"min_words": 100}, repetition={"max_dup_line_frac": 0.0})
    f = DocumentFilter(cfg)
    assert f(RU + "\n" + RU).reason == "length.min_words"
    assert DocumentFilter(CleanConfig(repetition={"max_dup_line_frac": 0.0}))(RU + "\n" + RU).reason == "repetition.dup_line_frac"


def test_per_language_overrides():
    cfg = CleanConfig(per_language={
        "kk": {"length": {"min_words": 20}},
        "ru": {"repetition": {"max_dup_line_frac": 0.0}},
    })
    f = DocumentFilter(cfg)
    assert f(KK).reason == "length.min_words"  # 15 words: below 20 for kk only
    assert f(RU).reason is None and f(EN).reason is None  # global min_words 3
    # one short line repeated among four: 1 copy in 5 lines is within the global 0.3, not ru's 0.0
    ru_doc = "\n".join([RU, "Да, так.", "Сегодня хорошая погода, и дети играют во дворе до самого вечера.",
                        "Завтра обещают дождь, поэтому лучше взять зонт на работу.", "Да, так."])
    assert DocumentFilter(CleanConfig())(ru_doc).reason is None
    assert f(ru_doc).reason == "repetition.dup_line_frac"
    assert f(ru_doc.replace("Да, так.", "Нет.", 1)).reason is None  # no copy left


def test_batch_matches_single_calls_and_accepts_no_hints(doc_filter):
    texts = [KK, RU, EN, DE, "", "Да.", RU + "\n" + RU]
    hints = ["kk", "ru", "en", None, None, "ru", "ru"]
    assert doc_filter.batch(texts, hints) == [doc_filter(t, h) for t, h in zip(texts, hints)]
    assert doc_filter.batch(texts, None) == doc_filter.batch(texts, [None] * len(texts))
    assert doc_filter.batch([], []) == []


def test_pickles_as_its_config(doc_filter):
    blob = pickle.dumps(doc_filter)
    assert len(blob) < 20_000
    copy = pickle.loads(blob)
    assert copy.batch([KK, DE], [None, None]) == doc_filter.batch([KK, DE], [None, None])


# -------------------------------------------------------------------------------- reasons


def test_reason_names():
    assert ALL_REASONS == (
        "empty", "langid.not_kept", "langid.low_score", "script",
        "length.min_chars", "length.max_chars", "length.min_words", "length.max_words",
        "length.min_mean_word_length", "length.max_mean_word_length", "length.min_lines", "length.max_lines",
        "length.max_paragraph_chars",
        "repetition.dup_line_frac", "repetition.dup_para_frac",
        "repetition.dup_line_char_frac", "repetition.dup_para_char_frac",
    )
    names = reason_names(CleanConfig())
    assert names[: len(ALL_REASONS)] == list(ALL_REASONS)
    assert names[len(ALL_REASONS):] == [f"repetition.top_ngram_{n}" for n in (2, 3, 4)] + [
        f"repetition.dup_ngram_{n}" for n in range(5, 11)]
    cfg = CleanConfig(per_language={"kk": {"repetition": {"max_dup_ngram_frac": {12: 0.05}}}})
    assert "repetition.dup_ngram_12" in reason_names(cfg)


def _fixture_docs() -> tuple[list[str], list[str]]:
    texts, hints = [], []
    for lang in ("en", "ru"):
        docs = (CORPUS / lang / "fortunes.txt").read_text(encoding="utf-8").split("\n%\n")
        texts += docs
        hints += [lang] * len(docs)
    for line in (CORPUS / "kk" / "catalogs.jsonl").read_text(encoding="utf-8").splitlines():
        texts.append(json.loads(line)["text"])
        hints.append("kk")
    for line in (CORPUS / "planted.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        texts.append(row["text"])
        hints.append(row["lang"])
    return texts, hints


def test_real_fixtures_every_reason_is_a_known_name_and_languages_agree(doc_filter):
    texts, hints = _fixture_docs()
    results = doc_filter.batch(texts, hints)
    known = set(reason_names(CleanConfig()))
    assert {r.reason for r in results} - {None} <= known
    n_planted = len((CORPUS / "planted.jsonl").read_text(encoding="utf-8").splitlines())
    real = list(zip(results, hints))[: len(texts) - n_planted]
    assert sum(r.lang == h for r, h in real) / len(real) > 0.97
    for lang in ("en", "ru"):
        kept = [r.reason is None for r, h in zip(results, hints) if h == lang]
        assert sum(kept) / len(kept) > 0.9, lang


def test_planted_problems_are_caught(doc_filter):
    rows = [json.loads(l) for l in (CORPUS / "planted.jsonl").read_text(encoding="utf-8").splitlines()]
    by_id = {r["id"]: doc_filter(r["text"], r["lang"]) for r in rows}
    assert by_id["repetitive-en"].reason.startswith("repetition.")
    assert by_id["short-ru"].reason is not None
    for wrong in ("wrong-de", "wrong-fr", "wrong-uk"):
        assert by_id[wrong].reason == "langid.not_kept"
    assert by_id["exact-en"].reason is None  # ALL CAPS English still reads as English
    assert by_id["near-ru-orig"].reason is None and by_id["near-kk-orig"].reason is None
