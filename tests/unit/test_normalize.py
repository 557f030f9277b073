"""Text normalisation of the clean stage (pipeline.data.normalize)."""

from __future__ import annotations

import pytest

from pipeline.data.normalize import NormalizeConfig
from pipeline.data.normalize import make_normalizer

NORM = make_normalizer(NormalizeConfig())


def norm(text: str, **kw) -> str:
    return make_normalizer(NormalizeConfig(**kw))(text)


# ---------------------------------------------------------------------------- unicode form


def test_nfc_composes_decomposed_cyrillic_and_latin():
    assert NORM("и\u0306") == "й"  # и + combining breve
    assert NORM("е\u0308ж") == "ёж"
    assert NORM("cafe\u0301") == "café"
    assert NORM("Қазақстан") == "Қазақстан"  # precomposed Kazakh letters stay as they are


def test_nfkc_folds_compatibility_forms_and_none_keeps_them():
    assert norm("ﬁle ＡＢＣ", unicode_form="NFKC") == "file ABC"
    assert norm("ﬁle ＡＢＣ", unicode_form="NFC") == "ﬁle ＡＢＣ"
    assert norm("и\u0306", unicode_form="none") == "и\u0306"


# --------------------------------------------------------------------------- control chars


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("a\x00b", "ab"),  # NUL
        ("\x1b[31mred\x1b[0m", "[31mred[0m"),  # escape codes lose the ESC
        ("zero\u200bwidth", "zerowidth"),  # zero-width space (Cf)
        ("\ufeffBOM at start", "BOM at start"),
        ("soft\u00adhyphen", "softhyphen"),
        ("\u200fright-to-left mark", "right-to-left mark"),
        ("a\x7fb\x85c", "ab\nc"),  # DEL dropped, NEL is a line break
    ],
)
def test_control_and_format_characters_are_dropped(raw, expected):
    assert NORM(raw) == expected


def test_newline_and_tab_survive_control_stripping():
    assert norm("a\tb\nc\x00", collapse_whitespace=False) == "a\tb\nc"


def test_line_endings_become_newlines():
    assert NORM("one\r\ntwo\rthree\u2028four") == "one\ntwo\nthree\nfour"


def test_whitespace_controls_become_spaces_not_glue():
    assert NORM("page\x0cbreak\x0bvtab") == "page break vtab"


def test_strip_control_off_keeps_them():
    assert norm("a\x00b", strip_control=False) == "a\x00b"


# ------------------------------------------------------------------------------ whitespace


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("a  b\t\tc \t d", "a b c d"),
        ("  leading and trailing  ", "leading and trailing"),
        ("line one   \n   line two", "line one\nline two"),
        ("para one\n\n\n\n\npara two", "para one\n\npara two"),
        ("para one\n  \n \t \npara two", "para one\n\npara two"),  # blank lines holding blanks
        ("no\u00a0break\u2009thin\u3000ideographic", "no break thin ideographic"),
        ("\t\t-- Автор", "-- Автор"),
        ("single\nnewline\n\nkept", "single\nnewline\n\nkept"),
    ],
)
def test_whitespace_collapses(raw, expected):
    assert NORM(raw) == expected


def test_collapse_off_keeps_layout():
    assert norm("a  b\n\n\n\nc", collapse_whitespace=False) == "a  b\n\n\n\nc"


# ---------------------------------------------------------------------------- punctuation


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Wow!!!!!!", "Wow!!!"),
        ("Wait......", "Wait..."),
        ("Ну и ну???????", "Ну и ну???"),
        ("ok!!!", "ok!!!"),  # at the limit: unchanged
        ("?!?!?!?!", "?!?!?!?!"),  # not one repeated mark
        ("----------", "---"),
        ("Ааааааа!", "Ааааааа!"),  # letters are not punctuation
        ("1000000", "1000000"),
    ],
)
def test_punctuation_runs_are_capped(raw, expected):
    assert NORM(raw) == expected


def test_punctuation_cap_is_configurable_and_can_be_off():
    assert norm("Hey!!!!", max_repeated_punctuation=1) == "Hey!"
    assert norm("Hey!!!!", max_repeated_punctuation=None) == "Hey!!!!"


# ---------------------------------------------------------------------------- replacements


def test_replacements_apply_in_order_after_the_other_steps():
    cfg = dict(replacements=[(r"\d+", "0"), (r"0", "<num>"), (r"https?://\S+", "<url>")])
    assert norm("Call  123 or see https://example.kz/a?b=1", **cfg) == "Call <num> or see <url>"


def test_replacements_can_use_groups():
    assert norm("2024-05-01", replacements=[(r"(\d+)-(\d+)-(\d+)", r"\3.\2.\1")]) == "01.05.2024"


def test_invalid_replacement_regex_is_a_config_error():
    with pytest.raises(ValueError, match="not a valid regex"):
        NormalizeConfig(replacements=[("(", "x")])


# ------------------------------------------------------------------------------- general


def test_normalising_twice_changes_nothing():
    raw = " Сәлем\u00a0 әлем!!!!!\r\n\r\n\r\n\x00Hello\t\tworld \u200b\n"
    once = NORM(raw)
    assert once == "Сәлем әлем!!!\n\nHello world"
    assert NORM(once) == once


def test_empty_and_blank_text():
    assert NORM("") == ""
    assert NORM(" \n\t\u200b \n") == ""
