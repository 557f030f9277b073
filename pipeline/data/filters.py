"""Document filters of the clean stage: normalise, identify the language, drop bad documents.

:class:`DocumentFilter` runs, per document and in this order, stopping at the first reason:

1. normalisation (:mod:`pipeline.data.normalize`); nothing left -> ``"empty"``;
2. language ID (if ``langid.enabled``): fastText's top label, plus the Kazakh-letter rule of
   :mod:`pipeline.data.langid`; a label outside ``langid.languages`` -> ``"langid.not_kept"``,
   a probability below that language's ``min_score`` (else ``default_min_score``) ->
   ``"langid.low_score"``. With language ID off, the document's language hint is its language;
3. script: the share of letters in the script the language is written in (``"script"``);
4. length: :func:`length_reason` with ``cfg.length_for(lang)``;
5. repetition: :func:`repetition_reason` with ``cfg.repetition_for(lang)``;
6. PII (a kept document only, as FineWeb does at the end of its pipeline): e-mail addresses,
   phone numbers and IP addresses replaced by placeholders (:mod:`pipeline.data.pii`, ``cfg.pii``),
   counted in :attr:`DocumentFilter.pii_counts` / :attr:`DocumentFilter.pii_documents`.

Thresholds can differ by language (``per_language``) and by source (``per_source``, keyed by the
``source`` column collect writes, i.e. the source's ``name``): a document's length and repetition
limits are the global ones, then its language's overrides, then its source's; a source can also
set its own minimum language-ID scores and PII settings (``DocumentFilter.batch(texts, hints, sources)``).

Every check is also a pure function of a text and a config, tested on its own.

Definitions (Gopher, Rae et al. 2021, appendix A, with the details below made explicit):

- *words* are runs of Unicode word characters (letters of every script, Kazakh ә ғ қ ң ө ұ ү
  һ і included, digits, ``_``), joined across inner apostrophes and hyphens (``don't``,
  ``Алма-Ата``), so punctuation never becomes part of an n-gram;
- *lines* are the non-blank lines, *paragraphs* the non-blank blocks between blank lines,
  both stripped; a *duplicate* is every copy of a line/paragraph after its first;
- line/paragraph character shares are over ``len(text)``; n-gram shares are over the
  characters of all words (the same unit as the numerator);
- ``top_ngram_<n>``: characters of the most frequent word n-gram times its count, only when
  it occurs more than once (a short document whose n-grams are all unique is not repetitive);
- ``dup_ngram_<n>``: characters of the words covered by a copy of an earlier n-gram (the
  first occurrence is not a duplicate, as for lines), each word counted once however many
  duplicated n-grams overlap it;
- the n-gram checks skip documents of fewer than ``ngram_min_words`` words: in a 20-word
  quote one repeated phrase is already 20% of it (on real fortunes the Gopher thresholds drop
  3-6% of short quotes for a refrain or a parallel construction).

A value exactly at a threshold passes; only one beyond it is a reason.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from itertools import compress
from operator import itemgetter
from typing import Any, Callable, Literal

from pydantic import Field, ValidationError, model_validator

from pipeline.config import StrictModel
from pipeline.data.langid import LangIdConfig, LanguageIdentifier
from pipeline.data.normalize import NormalizeConfig, make_normalizer
from pipeline.data.pii import PII_KINDS, PIIConfig, PIIRedactor


class LengthConfig(StrictModel):
    min_chars: int | None = Field(20, ge=0)
    max_chars: int | None = Field(1_000_000, ge=1)
    min_words: int | None = Field(3, ge=0)
    max_words: int | None = Field(200_000, ge=1)
    min_mean_word_length: float | None = Field(2.0, ge=0)
    max_mean_word_length: float | None = Field(15.0, ge=0)
    min_lines: int | None = Field(None, ge=0)
    max_lines: int | None = Field(None, ge=1)
    max_paragraph_chars: int | None = Field(50_000, ge=1, description="longest allowed blank-line paragraph")


class RepetitionConfig(StrictModel):
    """Gopher-style repetition filters (Rae et al. 2021, table A1). None disables a check."""

    max_dup_line_frac: float | None = Field(0.30, ge=0, le=1, description="share of lines that are duplicates")
    max_dup_para_frac: float | None = Field(0.30, ge=0, le=1, description="share of paragraphs that are duplicates")
    max_dup_line_char_frac: float | None = Field(0.20, ge=0, le=1, description="share of characters in duplicate lines")
    max_dup_para_char_frac: float | None = Field(0.20, ge=0, le=1, description="share of characters in duplicate paragraphs")
    max_top_ngram_frac: dict[int, float] = Field(
        default_factory=lambda: {2: 0.20, 3: 0.18, 4: 0.16},
        description="n -> max share of characters covered by the most frequent n-gram",
    )
    max_dup_ngram_frac: dict[int, float] = Field(
        default_factory=lambda: {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10},
        description="n -> max share of word characters in repeated copies of n-grams (first occurrences not counted)",
    )
    ngram_min_words: int | None = Field(
        50, ge=0, description="documents with fewer words skip the n-gram checks (their shares are noise)"
    )


class ScriptConfig(StrictModel):
    enabled: bool = True
    expected: dict[str, Literal["cyrillic", "latin"]] = Field(
        default_factory=lambda: {"kk": "cyrillic", "ru": "cyrillic", "en": "latin"},
        description="language -> script its letters must mostly be in",
    )
    min_share: float = Field(0.6, ge=0, le=1, description="min share of letters in the expected script")


class LanguageOverrides(StrictModel):
    """Per-language threshold overrides, merged over the global ones."""

    length: dict[str, Any] = Field(default_factory=dict)
    repetition: dict[str, Any] = Field(default_factory=dict)


class SourceOverrides(LanguageOverrides):
    """Per-source overrides (keyed by the documents' ``source``, the collect source's name): length and
    repetition thresholds merged over the global and per-language ones, minimum language-ID scores
    merged over ``langid.min_score``, PII settings merged over ``pii``."""

    min_score: dict[str, float] = Field(
        default_factory=dict, description="language -> minimum fastText probability for this source's documents"
    )
    pii: dict[str, Any] = Field(default_factory=dict, description="PII settings for this source's documents")

    @model_validator(mode="after")
    def _check_scores(self) -> "SourceOverrides":
        for lang, score in self.min_score.items():
            if not 0 <= score <= 1:
                raise ValueError(f"min_score.{lang}: {score} is not between 0 and 1")
        return self


class FilterConfig(StrictModel):
    """What the document filter does: normalisation, language ID, script, length and repetition checks,
    PII replacement, with per-language and per-source overrides (the clean stage's config adds its input,
    output and dedup)."""

    normalize: NormalizeConfig = Field(default_factory=NormalizeConfig)
    length: LengthConfig = Field(default_factory=LengthConfig)
    repetition: RepetitionConfig = Field(default_factory=RepetitionConfig)
    per_language: dict[str, LanguageOverrides] = Field(default_factory=dict)
    per_source: dict[str, SourceOverrides] = Field(
        default_factory=dict, description="source name (collect's `name`) -> overrides, applied after per_language"
    )
    script: ScriptConfig = Field(default_factory=ScriptConfig)
    langid: LangIdConfig = Field(default_factory=LangIdConfig)
    pii: PIIConfig = Field(default_factory=PIIConfig)

    @model_validator(mode="after")
    def _check_overrides(self) -> "FilterConfig":
        sections: dict[str, dict[str, Any]] = {"per_language": self.per_language, "per_source": self.per_source}
        for section, overrides in sections.items():
            for key, ov in overrides.items():
                try:
                    LengthConfig(**{**self.length.model_dump(), **ov.length})
                    RepetitionConfig(**{**self.repetition.model_dump(), **ov.repetition})
                    if isinstance(ov, SourceOverrides):
                        PIIConfig(**{**self.pii.model_dump(), **ov.pii})
                except ValidationError as exc:
                    first = exc.errors()[0]
                    loc = ".".join(str(p) for p in first["loc"])
                    raise ValueError(f"{section}.{key}: {loc}: {first['msg']}") from None
        return self

    def _merged(self, field: str, lang: str | None, source: str | None) -> dict[str, Any] | None:
        """The overrides of ``field`` for a language and a source, language first; None when there are none."""
        merged: dict[str, Any] | None = None
        for ov in (self.per_language.get(lang or ""), self.per_source.get(source or "")):
            if ov is not None and getattr(ov, field):
                merged = {**(merged or {}), **getattr(ov, field)}
        return merged

    def length_for(self, lang: str | None, source: str | None = None) -> LengthConfig:
        ov = self._merged("length", lang, source)
        return LengthConfig(**{**self.length.model_dump(), **ov}) if ov else self.length

    def repetition_for(self, lang: str | None, source: str | None = None) -> RepetitionConfig:
        ov = self._merged("repetition", lang, source)
        return RepetitionConfig(**{**self.repetition.model_dump(), **ov}) if ov else self.repetition

    def pii_for(self, source: str | None = None) -> PIIConfig:
        ov = self.per_source.get(source or "")
        return PIIConfig(**{**self.pii.model_dump(), **ov.pii}) if ov is not None and ov.pii else self.pii

    def min_score_for(self, lang: str | None, source: str | None = None) -> float:
        """The minimum language-ID probability for a document of ``lang`` from ``source``."""
        ov = self.per_source.get(source or "")
        if ov is not None and lang in ov.min_score:
            return ov.min_score[lang]  # type: ignore[index]
        return self.langid.min_score.get(lang or "", self.langid.default_min_score)



_WORD = re.compile(r"\w+(?:['’\-]\w+)*")
_BLANK_LINES = re.compile(r"\n(?:[^\S\n]*\n)+")  # a blank line may hold spaces in unnormalised text
_LETTERS = re.compile(r"[^\W\d_]+")
_SCRIPT_RUNS = {
    "cyrillic": re.compile(r"[\u0400-\u0482\u048a-\u052f\u1c80-\u1c8f\ua640-\ua66e\ua680-\ua69d]+"),
    "latin": re.compile(r"[A-Za-z\u00aa\u00ba\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u024f\u1e00-\u1eff\uff21-\uff3a\uff41-\uff5a]+"),
}
SCRIPTS = tuple(_SCRIPT_RUNS)
_ASCII_LETTER = re.compile(r"[A-Za-z]")

LENGTH_REASONS = tuple(f"length.{name}" for name in LengthConfig.model_fields)
REPETITION_REASONS = (
    "repetition.dup_line_frac",
    "repetition.dup_para_frac",
    "repetition.dup_line_char_frac",
    "repetition.dup_para_char_frac",
)
ALL_REASONS: tuple[str, ...] = (
    "empty",
    "langid.not_kept",
    "langid.low_score",
    "script",
    *LENGTH_REASONS,
    *REPETITION_REASONS,
)
"""Every reason name except the n-gram ones, whose names depend on the config (see :func:`reason_names`)."""


def reason_names(cfg: FilterConfig) -> list[str]:
    """All reasons ``DocumentFilter(cfg)`` can give, n-gram ones included (per-language and per-source ones too)."""
    tops: set[int] = set()
    dups: set[int] = set()
    for lang in [None, *cfg.per_language]:
        for source in [None, *cfg.per_source]:
            rep = cfg.repetition_for(lang, source)
            tops.update(rep.max_top_ngram_frac)
            dups.update(rep.max_dup_ngram_frac)
    return [*ALL_REASONS, *(f"repetition.top_ngram_{n}" for n in sorted(tops)),
            *(f"repetition.dup_ngram_{n}" for n in sorted(dups))]


def words(text: str) -> list[str]:
    """The words the checks count (see the module docstring)."""
    return _WORD.findall(text)


@dataclass(slots=True)
class FilterResult:
    text: str  # the normalised text (what is kept)
    lang: str | None
    lang_score: float | None
    reason: str | None  # None: keep


# ------------------------------------------------------------------------ per-document data


class _Doc:
    """A text and its words, lines and paragraphs, each split at most once."""

    __slots__ = ("text", "_words", "_word_lens", "_lines", "_paras")

    def __init__(self, text: str):
        self.text = text
        self._words: list[str] | None = None
        self._word_lens: list[int] | None = None
        self._lines: list[str] | None = None
        self._paras: list[str] | None = None

    @property
    def words(self) -> list[str]:
        if self._words is None:
            self._words = _WORD.findall(self.text)
        return self._words

    @property
    def word_lens(self) -> list[int]:
        if self._word_lens is None:
            self._word_lens = list(map(len, self.words))
        return self._word_lens

    @property
    def lines(self) -> list[str]:
        if self._lines is None:
            self._lines = [s for s in map(str.strip, self.text.split("\n")) if s]
        return self._lines

    @property
    def paragraphs(self) -> list[str]:
        if self._paras is None:
            text = self.text
            if "\n" not in text:
                stripped = text.strip()
                self._paras = [stripped] if stripped else []
            else:
                self._paras = [s for s in map(str.strip, _BLANK_LINES.split(text)) if s]
        return self._paras


def _duplicates(items: list[str]) -> tuple[int, int]:
    """(number of copies after the first, their characters)."""
    if len(set(items)) == len(items):
        return 0, 0
    seen: set[str] = set()
    n = chars = 0
    for item in items:
        if item in seen:
            n += 1
            chars += len(item)
        else:
            seen.add(item)
    return n, chars


# ------------------------------------------------------------------------------ length


class _LengthCheck:
    """LengthConfig as plain attributes, checked in field order."""

    def __init__(self, cfg: LengthConfig):
        self.c = cfg.model_dump()
        c = self.c
        self.needs_words = any(c[k] is not None for k in ("min_words", "max_words", "min_mean_word_length", "max_mean_word_length"))
        self.needs_lines = c["min_lines"] is not None or c["max_lines"] is not None

    def __call__(self, doc: _Doc) -> str | None:
        c = self.c
        n = len(doc.text)
        if c["min_chars"] is not None and n < c["min_chars"]:
            return "length.min_chars"
        if c["max_chars"] is not None and n > c["max_chars"]:
            return "length.max_chars"
        if self.needs_words:
            nw = len(doc.words)
            if c["min_words"] is not None and nw < c["min_words"]:
                return "length.min_words"
            if c["max_words"] is not None and nw > c["max_words"]:
                return "length.max_words"
            mean = sum(doc.word_lens) / nw if nw else 0.0
            if c["min_mean_word_length"] is not None and mean < c["min_mean_word_length"]:
                return "length.min_mean_word_length"
            if c["max_mean_word_length"] is not None and mean > c["max_mean_word_length"]:
                return "length.max_mean_word_length"
        if self.needs_lines:
            nl = len(doc.lines)
            if c["min_lines"] is not None and nl < c["min_lines"]:
                return "length.min_lines"
            if c["max_lines"] is not None and nl > c["max_lines"]:
                return "length.max_lines"
        limit = c["max_paragraph_chars"]
        if limit is not None and n > limit and max(map(len, doc.paragraphs)) > limit:
            return "length.max_paragraph_chars"
        return None


def length_reason(text: str, cfg: LengthConfig) -> str | None:
    """The first length limit ``text`` breaks (``"length.<field>"``), or None."""
    return _LengthCheck(cfg)(_Doc(text))


# -------------------------------------------------------------------------- repetition


class _RepetitionCheck:
    """RepetitionConfig as plain attributes; the Gopher repetition checks in a fixed order."""

    def __init__(self, cfg: RepetitionConfig):
        self.line_frac = cfg.max_dup_line_frac
        self.line_chars = cfg.max_dup_line_char_frac
        self.para_frac = cfg.max_dup_para_frac
        self.para_chars = cfg.max_dup_para_char_frac
        self.min_words = cfg.ngram_min_words or 0
        self.top = sorted(cfg.max_top_ngram_frac.items())
        self.dup = sorted(cfg.max_dup_ngram_frac.items())
        self.top_names = {n: f"repetition.top_ngram_{n}" for n, _ in self.top}
        self.dup_names = {n: f"repetition.dup_ngram_{n}" for n, _ in self.dup}

    def __call__(self, doc: _Doc) -> str | None:
        text = doc.text
        if self.line_frac is not None or self.line_chars is not None:
            lines = doc.lines
            if len(lines) > 1:
                n, chars = _duplicates(lines)
                if self.line_frac is not None and n > self.line_frac * len(lines):
                    return "repetition.dup_line_frac"
                if self.line_chars is not None and chars > self.line_chars * len(text):
                    return "repetition.dup_line_char_frac"
        if self.para_frac is not None or self.para_chars is not None:
            paras = doc.paragraphs
            if len(paras) > 1:
                n, chars = _duplicates(paras)
                if self.para_frac is not None and n > self.para_frac * len(paras):
                    return "repetition.dup_para_frac"
                if self.para_chars is not None and chars > self.para_chars * len(text):
                    return "repetition.dup_para_char_frac"
        if self.top or self.dup:
            return self._ngrams(doc)
        return None

    def _ngrams(self, doc: _Doc) -> str | None:
        words = doc.words
        nw = len(words)
        if nw < max(2, self.min_words) or len(set(words)) == nw:
            return None  # no word occurs twice, so no n-gram does
        lens = doc.word_lens
        total = sum(lens)
        # once no n-gram of size n repeats, none of a larger size does either
        no_repeat_from = nw + 1
        for n, limit in self.top:
            if n >= no_repeat_from or n > nw:
                continue
            counts = Counter(zip(*[words[i:] for i in range(n)]))
            gram, count = max(counts.items(), key=itemgetter(1))
            if count < 2:
                no_repeat_from = min(no_repeat_from, n)
                continue
            if count * sum(map(len, gram)) > limit * total:
                return self.top_names[n]
        for n, limit in self.dup:
            if n >= no_repeat_from or n > nw:
                continue
            grams = list(zip(*[words[i:] for i in range(n)]))
            counts = Counter(grams)
            if len(counts) == len(grams):
                no_repeat_from = min(no_repeat_from, n)
                continue
            repeated = {g for g, k in counts.items() if k > 1}
            seen: set[tuple[str, ...]] = set()
            covered = bytearray(nw)
            ones = b"\x01" * n
            for i in compress(range(len(grams)), map(repeated.__contains__, grams)):
                g = grams[i]
                if g in seen:  # a copy of an earlier occurrence
                    covered[i : i + n] = ones
                else:
                    seen.add(g)
            if sum(compress(lens, covered)) > limit * total:
                return self.dup_names[n]
        return None


def repetition_reason(text: str, cfg: RepetitionConfig) -> str | None:
    """The first Gopher repetition limit ``text`` breaks (``"repetition.<check>"``), or None."""
    return _RepetitionCheck(cfg)(_Doc(text))


# ------------------------------------------------------------------------------ script


def _letters(text: str) -> int:
    return sum(map(len, _LETTERS.findall(text)))


def script_shares(text: str) -> dict[str, float]:
    """Share of ``text``'s letters in each script: ``{"cyrillic": x, "latin": y}`` (0 without letters)."""
    letters = _letters(text)
    if not letters:
        return {name: 0.0 for name in SCRIPTS}
    return {name: sum(map(len, rx.findall(text))) / letters for name, rx in _SCRIPT_RUNS.items()}


def script_reason(text: str, lang: str | None, cfg: ScriptConfig) -> str | None:
    """``"script"`` when less than ``cfg.min_share`` of the letters are in ``lang``'s script.

    None when the check is off, the language has no expected script, or there are no letters."""
    if not cfg.enabled or lang is None:
        return None
    script = cfg.expected.get(lang)
    if script is None:
        return None
    if text.isascii():  # O(1) in CPython: every letter is a basic Latin one
        if script == "latin" or _ASCII_LETTER.search(text) is None:
            return None
        return "script" if cfg.min_share > 0 else None
    letters = _letters(text)
    if not letters:
        return None
    in_script = sum(map(len, _SCRIPT_RUNS[script].findall(text)))
    return "script" if in_script < cfg.min_share * letters else None


# ---------------------------------------------------------------------------- the filter


class DocumentFilter:
    """All checks of the clean stage, configured once; pickles as its config (the counters start again at zero).

    Counters, accumulated over every :meth:`batch` call of this object (of kept documents only, since
    PII is replaced in the documents that are kept):

    - ``pii_counts``: matches replaced, by kind: ``{"email": n, "phone": n, "ip": n}`` (every kind the
      config enables is present, zero included);
    - ``pii_documents``: kept documents with at least one replacement, by kind, plus ``"any"``;
    - ``per_source_documents``: documents (kept or not) whose source has a ``per_source`` entry, by
      source, so a ``per_source`` key that never matches (a typo of a collect source's name) shows.
    """

    def __init__(self, cfg: FilterConfig):
        self.cfg = cfg
        self.normalize: Callable[[str], str] = make_normalizer(cfg.normalize)
        self.langid = LanguageIdentifier(cfg.langid) if cfg.langid.enabled else None
        self.languages = frozenset(cfg.langid.languages)
        self._per_key: dict[tuple[str | None, str | None], tuple[_LengthCheck, _RepetitionCheck]] = {}
        self._min_scores: dict[tuple[str | None, str | None], float] = {}
        self._redactors: dict[str | None, PIIRedactor] = {}
        kinds = {k for s in [None, *cfg.per_source] for k in self._redactor(s).kinds}
        self.pii_counts: Counter[str] = Counter({k: 0 for k in PII_KINDS if k in kinds})
        self.pii_documents: Counter[str] = Counter({k: 0 for k in PII_KINDS if k in kinds})
        if kinds:
            self.pii_documents["any"] = 0
        self.per_source_documents: Counter[str] = Counter({s: 0 for s in cfg.per_source})

    def __getstate__(self) -> dict[str, Any]:
        return {"cfg": self.cfg}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["cfg"])  # type: ignore[misc]

    def _source_key(self, source: str | None) -> str | None:
        """``source`` when it has per-source overrides, else None (the checks of every other source are shared)."""
        return source if source is not None and source in self.cfg.per_source else None

    def _checks(self, lang: str | None, source: str | None) -> tuple[_LengthCheck, _RepetitionCheck]:
        key = (lang, source)
        checks = self._per_key.get(key)
        if checks is None:
            checks = (_LengthCheck(self.cfg.length_for(lang, source)),
                      _RepetitionCheck(self.cfg.repetition_for(lang, source)))
            self._per_key[key] = checks
        return checks

    def _min_score(self, lang: str | None, source: str | None) -> float:
        key = (lang, source)
        score = self._min_scores.get(key)
        if score is None:
            score = self._min_scores[key] = self.cfg.min_score_for(lang, source)
        return score

    def _redactor(self, source: str | None) -> PIIRedactor:
        redactor = self._redactors.get(source)
        if redactor is None:
            redactor = self._redactors[source] = PIIRedactor(self.cfg.pii_for(source))
        return redactor

    def _check(self, text: str, lang: str | None, score: float | None, source: str | None) -> str | None:
        if self.langid is not None:
            if lang not in self.languages:
                return "langid.not_kept"
            if score is not None and score < self._min_score(lang, source):
                return "langid.low_score"
        if script_reason(text, lang, self.cfg.script) is not None:
            return "script"
        length, repetition = self._checks(lang, source)
        doc = _Doc(text)
        return length(doc) or repetition(doc)

    def _redact(self, text: str, source: str | None) -> str:
        redactor = self._redactor(source)
        if not redactor:
            return text
        text, counts = redactor(text)
        if counts:
            self.pii_counts.update(counts)
            self.pii_documents.update(counts.keys())
            self.pii_documents["any"] += 1
        return text

    def __call__(self, text: str, lang_hint: str | None = None, source: str | None = None) -> FilterResult:
        return self.batch([text], [lang_hint], [source])[0]

    def batch(self, texts: list[str], lang_hints: list[str | None] | None = None,
              sources: list[str | None] | None = None) -> list[FilterResult]:
        """Filter many documents; language ID runs as one fastText call for the batch.

        ``lang_hints`` and ``sources`` (the documents' ``lang_hint`` and ``source`` columns) are optional;
        a source with a ``per_source`` entry gets its overrides, any other source the common settings."""
        hints = lang_hints if lang_hints is not None else [None] * len(texts)
        srcs = sources if sources is not None else [None] * len(texts)
        if len(hints) != len(texts) or len(srcs) != len(texts):
            raise ValueError(f"batch: {len(texts)} texts but {len(hints)} language hints and {len(srcs)} sources")
        keys = [self._source_key(s) for s in srcs] if self.cfg.per_source else [None] * len(texts)
        if self.cfg.per_source:
            self.per_source_documents.update(k for k in keys if k is not None)
        normed = list(map(self.normalize, texts))
        preds: list[tuple[str | None, float | None]]
        if self.langid is not None:
            nonempty = [t for t in normed if t]
            it = iter(self.langid.predict_batch(nonempty))
            preds = [next(it) if t else (None, None) for t in normed]
        else:
            preds = [(h, None) for h in hints]
        out = []
        for text, (lang, score), key in zip(normed, preds, keys):
            if not text:
                out.append(FilterResult(text, lang, score, "empty"))
                continue
            reason = self._check(text, lang, score, key)
            out.append(FilterResult(text if reason is not None else self._redact(text, key), lang, score, reason))
        return out
