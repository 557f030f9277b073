"""Text normalisation for the clean stage: one precompiled function per config.

Steps, in order (each can be turned off in :class:`~pipeline.config.NormalizeConfig`):

1. Unicode normal form (NFC by default: ``е`` + combining breve -> ``й``; NFKC also folds
   compatibility forms such as full-width letters and ligatures).
2. Control and format characters (categories Cc, Cf: NUL, escape codes, zero-width spaces,
   soft hyphens, byte-order marks, bidi marks) are dropped; ``\\n`` and ``\\t`` stay. Line
   endings ``\\r\\n`` / ``\\r`` and the Unicode line/paragraph separators become ``\\n``
   first, and the whitespace controls (vertical tab, form feed, ``\\x1c``-``\\x1f``) a space.
3. Whitespace: any run of horizontal whitespace (spaces, tabs, no-break and other Unicode
   spaces) -> one space; lines are stripped at both ends; 3+ newlines -> 2 (one blank line
   keeps paragraphs apart); the text is stripped.
4. A run of one repeated punctuation or symbol character longer than
   ``max_repeated_punctuation`` is cut to that length (``"!!!!!!"`` -> ``"!!!"``).
5. The user's ``(regex, replacement)`` pairs, in order.
"""

from __future__ import annotations

import re
import sys
import unicodedata
from typing import Callable, Literal

from pydantic import Field, field_validator

from pipeline.config import StrictModel


class NormalizeConfig(StrictModel):
    unicode_form: Literal["NFC", "NFKC", "none"] = "NFC"
    strip_control: bool = Field(True, description="drop control and format characters except newline and tab")
    collapse_whitespace: bool = Field(True, description="runs of spaces/tabs -> one space; 3+ newlines -> 2")
    max_repeated_punctuation: int | None = Field(
        3, ge=1, description="cut runs of the same punctuation mark to this length (None: off)"
    )
    replacements: list[tuple[str, str]] = Field(
        default_factory=list, description="extra (regex, replacement) pairs applied in order"
    )

    @field_validator("replacements")
    @classmethod
    def _regexes_compile(cls, value: list[tuple[str, str]]) -> list[tuple[str, str]]:
        for pattern, _ in value:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"replacement pattern {pattern!r} is not a valid regex: {exc}") from None
        return value


_NEWLINES = re.compile(r"\r\n?|[\u2028\u2029\x85]")
_SPACE_CONTROLS = re.compile(r"[\x0b\x0c\x1c-\x1f]+")
# Patterns match only where the text changes: a single space or newline is left alone, so a
# clean text costs one scan per pattern and no replacement.
_HSPACE = re.compile(r"[^\S\n]{2,}|[^\S \n]")  # 2+ blanks, or one tab / no-break space / ...
_SPACE_AROUND_NEWLINE = re.compile(r" \n ?|\n ")
_MANY_NEWLINES = re.compile(r"\n{3,}")
_BLANKS = re.compile(r" [ \t]+|\t[ \t]*")  # _HSPACE for text whose only blanks are space and tab (2x faster)


def _control_class() -> str:
    """A regex character class of every Cc/Cf code point except ``\\n`` and ``\\t``."""
    ranges: list[tuple[int, int]] = []
    for cp in range(sys.maxunicode + 1):
        if chr(cp).isspace():  # \t \n \v \f \x1c-\x1f \x85: whitespace, handled as such
            continue
        if unicodedata.category(chr(cp)) in ("Cc", "Cf"):
            if ranges and ranges[-1][1] == cp - 1:
                ranges[-1] = (ranges[-1][0], cp)
            else:
                ranges.append((cp, cp))
    parts = [re.escape(chr(a)) if a == b else f"{re.escape(chr(a))}-{re.escape(chr(b))}" for a, b in ranges]
    return "[" + "".join(parts) + "]+"


_CONTROL: re.Pattern[str] | None = None


def _control_re() -> re.Pattern[str]:
    global _CONTROL
    if _CONTROL is None:
        _CONTROL = re.compile(_control_class())
    return _CONTROL


def make_normalizer(cfg: NormalizeConfig) -> Callable[[str], str]:
    """A function ``str -> str`` applying ``cfg``'s steps, regexes compiled once."""
    form = None if cfg.unicode_form == "none" else cfg.unicode_form
    control = _control_re() if cfg.strip_control else None
    collapse = cfg.collapse_whitespace
    punct = None
    punct_repl = ""
    if cfg.max_repeated_punctuation is not None:
        n = cfg.max_repeated_punctuation
        punct = re.compile(r"([^\w\s])\1{%d,}" % n)
        punct_repl = "\\1" * n
    replacements = [(re.compile(p), r) for p, r in cfg.replacements]
    is_normalized = unicodedata.is_normalized
    normalize = unicodedata.normalize
    cleanup = control is not None or collapse

    def normalizer(text: str) -> str:
        if form is not None and not is_normalized(form, text):
            text = normalize(form, text)
        if cleanup:
            # Fast path: with newlines and tabs set aside, a printable text holds no control,
            # format or exotic whitespace character (all non-printable), so only plain
            # substring tests decide what is left to do.
            if text.replace("\n", " ").replace("\t", " ").isprintable():
                if collapse and ("\t" in text or "  " in text):
                    text = _BLANKS.sub(" ", text)
            else:
                text = _NEWLINES.sub("\n", text)
                if control is not None:
                    text = _SPACE_CONTROLS.sub(" ", text)
                    text = control.sub("", text)
                if collapse:
                    text = _HSPACE.sub(" ", text)
            if collapse:
                if " \n" in text or "\n " in text:
                    text = _SPACE_AROUND_NEWLINE.sub("\n", text)
                if "\n\n\n" in text:
                    text = _MANY_NEWLINES.sub("\n\n", text)
                text = text.strip()
        if punct is not None:
            text = punct.sub(punct_repl, text)
        for pattern, repl in replacements:
            text = pattern.sub(repl, text)
        return text

    return normalizer
