"""PII replacement (pipeline.data.pii) and the per-source overrides of the document filter (pipeline.data.filters)."""

from __future__ import annotations

import pickle

import pytest
from pydantic import ValidationError

from pipeline.data.filters import DocumentFilter, FilterConfig, reason_names
from pipeline.data.pii import PIIConfig, PIIRedactor, redact

EMAIL = "email@example.com"
PHONE = "+7 000 000 00 00"
IPV4 = "192.0.2.1"
IPV6 = "2001:db8::1"


# ---------------------------------------------------------------------------------- e-mail


@pytest.mark.parametrize("address", [
    "ivan.petrov@mail.ru", "INFO@Company.KZ", "a.b-c+tag@sub.domain.co.uk", "aigul_1990@gmail.com",
    "info@почта.рф", "user@example.қаз",
])
def test_email_addresses_are_replaced_and_counted(address):
    text, counts = redact(f"Хат жазыңыз: {address}, біз жауап береміз.")
    assert text == f"Хат жазыңыз: {EMAIL}, біз жауап береміз."
    assert counts == {"email": 1}


def test_several_emails_and_an_address_glued_to_a_word():
    text, counts = redact("Пишите на ivan@mail.ru или olga@yandex.ru.\nпочтаivan@mail.ru")
    assert text == f"Пишите на {EMAIL} или {EMAIL}.\nпочта{EMAIL}"
    assert counts == {"email": 3}


@pytest.mark.parametrize("text", [
    "logo@2x.png", "icon@3x.webp", "the @property decorator", "write to user@localhost", "@aigul_kz in Instagram",
    "npm i @scope/package", "a @ b.com",
])
def test_not_email_addresses(text):
    assert redact(text) == (text, {})


# ----------------------------------------------------------------------------------- phone


@pytest.mark.parametrize("phone", [
    "+7 701 123 45 67", "+7 (727) 123-45-67", "+77011234567", "+7-701-123-45-67", "+7 7172 74-30-00",
    "+7 495 123-45-67", "8 (727) 123-45-67", "8 701 123 45 67", "8-800-555-35-35", "87011234567",
    "8(727)1234567", "8 7172 74 30 00", "(727) 123-45-67", "(7172) 12-34-56", "123-45-67",
    "+44 20 7946 0958", "+1-202-555-0143", "+49 30 1234567", "(202) 555-0143", "202-555-0143", "202.555.0143",
])
def test_phone_numbers_are_replaced_and_counted(phone):
    text, counts = redact(f"Анықтама телефоны: {phone}. Звоните с 9 до 18.")
    assert text == f"Анықтама телефоны: {PHONE}. Звоните с 9 до 18."
    assert counts == {"phone": 1}


def test_phone_in_brackets_and_at_the_ends_of_a_text():
    assert redact("+7 701 123 45 67 немесе (+7 702 765 43 21)") == (f"{PHONE} немесе ({PHONE})", {"phone": 2})


@pytest.mark.parametrize("text", [
    "2023 жылы 15 қыркүйекте", "В 1999-2000 годах", "баға: 1 500 000 теңге", "цена 12 500 ₸", "$1,299.99",
    "8 500 000 000 тенге бюджет", "+1 500 000 000 долларов", "рост на +15% за 2023 год", "12.5%", "3.14159",
    "2023-01-01", "01.02.2023", "2023.01.01", "15/03/2024", "в 12:30:45", "ISBN 978-601-7123-45-6",
    "ISBN 5-17-012345-6", "ISBN 978-0-306-40615-7", "9786017123456", "ИИН 850101300123", "123456789",
    "100-200-3000", "счёт 40817810099910004312", "координаты 51.1694, 71.4491", "тираж 10 000 экз.",
])
def test_not_phone_numbers(text):
    assert redact(text) == (text, {})


# -------------------------------------------------------------------------------------- IP


def test_public_ipv4_and_ipv6_are_replaced_private_ones_kept():
    text, counts = redact("Сервер 8.8.8.8 және 2606:4700:4700::1111 жауап береді; http://93.184.216.34/path; "
                          "жергілікті 192.168.1.1, 10.0.0.1, 127.0.0.1, ::1, fe80::1.")
    assert text == (f"Сервер {IPV4} және {IPV6} жауап береді; http://{IPV4}/path; "
                    "жергілікті 192.168.1.1, 10.0.0.1, 127.0.0.1, ::1, fe80::1.")
    assert counts == {"ip": 3}


def test_private_ips_too_when_asked():
    text, counts = redact("192.168.1.1 и fe80::1", PIIConfig(public_ips_only=False))
    assert (text, counts) == (f"{IPV4} и {IPV6}", {"ip": 2})


@pytest.mark.parametrize("text", [
    "version 1.2.3.4", "Version: 5.6.7.8", "v1.2.3.4", "1.2.3.4.5", "нұсқасы 2.0.1.5", "версия 4.4.4.4",
    "revision 1.17.2.7", "пункт 1.2.3.4", "256.1.1.1", "12:30:45", "00:1A:2B:3C:4D:5E", "std::vector<int>::iterator",
    "счёт 1:0:0", "2001.01.01",
])
def test_not_ip_addresses(text):
    assert redact(text) == (text, {})


def test_a_plain_dotted_quad_is_an_address():
    assert redact("IP-адрес 95.56.234.1-де, 1.2.3.4.") == (f"IP-адрес {IPV4}-де, {IPV4}.", {"ip": 2})


# --------------------------------------------------------------------------------- together


MIXED = ("Байланыс: aigul@mail.kz, +7 701 123 45 67, сервер 8.8.8.8.\n"
         "Контакты: ivan@yandex.ru, 8 (727) 123-45-67, IPv6 2a00:1450:4001:81b::200e.\n"
         "Contact: john@example.org, (202) 555-0143. Founded in 2012, 1 500 000 users, version 1.2.3.4.")


def test_all_kinds_counted_and_the_text_around_them_kept():
    text, counts = redact(MIXED)
    assert text == (f"Байланыс: {EMAIL}, {PHONE}, сервер {IPV4}.\n"
                    f"Контакты: {EMAIL}, {PHONE}, IPv6 {IPV6}.\n"
                    f"Contact: {EMAIL}, {PHONE}. Founded in 2012, 1 500 000 users, version 1.2.3.4.")
    assert counts == {"email": 3, "phone": 3, "ip": 2}


def test_replacing_twice_changes_nothing_more():
    once, _ = redact(MIXED)
    assert redact(once) == (once, {})


@pytest.mark.parametrize("kind", ["email", "phone", "ip"])
def test_each_kind_can_be_turned_off(kind):
    text, counts = redact(MIXED, PIIConfig(**{kind: False}))
    assert kind not in counts and len(counts) == 2
    assert {"email": "aigul@mail.kz", "phone": "+7 701 123 45 67", "ip": "8.8.8.8"}[kind] in text


def test_disabled_and_custom_placeholders():
    assert redact(MIXED, PIIConfig(enabled=False)) == (MIXED, {})
    assert not PIIRedactor(PIIConfig(enabled=False))
    cfg = PIIConfig(email_replacement="<EMAIL>", phone_replacement="<PHONE>", ipv4_replacement="<IP>")
    assert redact("a@b.kz, +7 701 123 45 67, 8.8.8.8", cfg) == ("<EMAIL>, <PHONE>, <IP>", {"email": 1, "phone": 1, "ip": 1})


# ------------------------------------------------------------------- in the document filter

KK = "Менің атым Айгүл, мен Алматыда тұрамын. Бүгін ауа райы жақсы, балалар далада ойнап жүр."
RU = "Вчера я ходил в магазин за хлебом и молоком, а потом гулял в парке с собакой."
KK_PII = KK + " Хабарласыңыз: aigul@mail.kz немесе +7 701 123 45 67."
RU_PII = RU + " Телефон 8 (727) 123-45-67, сервер 8.8.8.8, почта ivan@mail.ru и olga@mail.ru."
DE_PII = "Das Wetter ist heute schön, deshalb sind wir mit dem Hund lange im Park spazieren gegangen. Mail: max@web.de"


def test_document_filter_replaces_pii_in_kept_documents_and_counts_it():
    f = DocumentFilter(FilterConfig())
    assert f.pii_counts == {"email": 0, "phone": 0, "ip": 0}
    results = f.batch([KK_PII, RU_PII, KK, DE_PII], ["kk", "ru", "kk", None])
    assert [r.reason for r in results] == [None, None, None, "langid.not_kept"]
    assert results[0].text == KK + f" Хабарласыңыз: {EMAIL} немесе {PHONE}."
    assert results[1].text == RU + f" Телефон {PHONE}, сервер {IPV4}, почта {EMAIL} и {EMAIL}."
    assert results[2].text == KK
    assert results[3].text == DE_PII  # dropped: returned normalised, neither replaced nor counted
    assert f.pii_counts == {"email": 3, "phone": 2, "ip": 1}  # matches replaced
    assert f.pii_documents == {"email": 2, "phone": 2, "ip": 1, "any": 2}  # kept documents touched
    f.batch([KK_PII], None)
    assert f.pii_counts["email"] == 4 and f.pii_documents["any"] == 3  # accumulates over batches


def test_document_filter_without_pii_has_empty_counters():
    f = DocumentFilter(FilterConfig(pii={"enabled": False}))
    assert f(KK_PII).text == KK_PII
    assert f.pii_counts == {} and f.pii_documents == {}


def test_pii_counters_start_again_after_pickling_and_results_do_not_depend_on_batching():
    f = DocumentFilter(FilterConfig())
    texts = [KK_PII, RU_PII, KK] * 3
    whole = f.batch(texts)
    copy = pickle.loads(pickle.dumps(f))
    assert copy.pii_counts == {"email": 0, "phone": 0, "ip": 0}
    assert [copy(t) for t in texts] == whole
    assert copy.pii_counts == f.pii_counts


# --------------------------------------------------------------------------------- per source

WIKI_LIST = "\n".join(["Қазақстан қалалары:", "Алматы — оңтүстік астана", "Астана — елорда",
                       "Алматы — оңтүстік астана", "Шымкент — мегаполис", "Алматы — оңтүстік астана"])


def test_per_source_overrides_apply_only_to_that_source():
    cfg = FilterConfig(
        length={"min_words": 20},
        per_language={"kk": {"length": {"max_mean_word_length": 18}}},
        per_source={
            "kk-wikipedia": {"length": {"min_words": 3}, "repetition": {"max_dup_line_frac": None,
                                                                         "max_dup_line_char_frac": None}},
            "kk-fineweb2": {"min_score": {"kk": 0.99999}},
            "kk-news": {"pii": {"phone": False}},
        },
    )
    f = DocumentFilter(cfg)
    assert f(WIKI_LIST, "kk").reason == "length.min_words"  # 14 words: below the global 20
    assert f(WIKI_LIST, "kk", "kk-other").reason == "length.min_words"  # a source without overrides
    assert f(WIKI_LIST, "kk", "kk-wikipedia").reason is None  # min_words 3, repeated lines allowed
    lengths_only = FilterConfig(length={"min_words": 20}, per_source={"kk-wikipedia": {"length": {"min_words": 3}}})
    assert DocumentFilter(lengths_only)(WIKI_LIST, "kk", "kk-wikipedia").reason == "repetition.dup_line_frac"
    assert f(KK_PII, "kk").reason is None
    assert f(KK_PII, "kk", "kk-fineweb2").reason == "langid.low_score"  # this source's own kk minimum
    assert f(KK_PII, "kk", "kk-news").text == KK + f" Хабарласыңыз: {EMAIL} немесе +7 701 123 45 67."
    assert f.per_source_documents == {"kk-wikipedia": 1, "kk-fineweb2": 1, "kk-news": 1}
    # language first, then source: the kk override stays under a source that does not set it
    assert cfg.length_for("kk", "kk-wikipedia").model_dump() == {
        **cfg.length.model_dump(), "min_words": 3, "max_mean_word_length": 18}
    assert cfg.length_for("ru", "kk-wikipedia").max_mean_word_length == cfg.length.max_mean_word_length
    assert cfg.min_score_for("kk", "kk-fineweb2") == 0.99999
    assert cfg.min_score_for("kk", "kk-wikipedia") == cfg.langid.min_score["kk"]


def test_batch_takes_sources_as_a_third_argument():
    cfg = FilterConfig(per_source={"strict": {"length": {"min_words": 100}}})
    f = DocumentFilter(cfg)
    results = f.batch([KK, KK, KK], ["kk", "kk", "kk"], ["strict", "web", None])
    assert [r.reason for r in results] == ["length.min_words", None, None]
    assert f.batch([KK], ["kk"]) == f.batch([KK], ["kk"], [None])  # two arguments: as before
    with pytest.raises(ValueError, match="3 texts but 3 language hints and 2 sources"):
        f.batch([KK, KK, KK], None, ["strict", "web"])


def test_per_source_config_is_validated_with_its_path():
    with pytest.raises(ValidationError, match=r"per_source\.kk-wiki: min_words"):
        FilterConfig(per_source={"kk-wiki": {"length": {"min_words": -1}}})
    with pytest.raises(ValidationError, match=r"per_source\.kk-wiki: phone"):
        FilterConfig(per_source={"kk-wiki": {"pii": {"phone": "sometimes"}}})
    with pytest.raises(ValidationError, match="min_score.kk: 1.5 is not between 0 and 1"):
        FilterConfig(per_source={"kk-wiki": {"min_score": {"kk": 1.5}}})
    with pytest.raises(ValidationError, match="extra"):
        FilterConfig(per_source={"kk-wiki": {"lenght": {}}})


def test_reason_names_include_per_source_ngram_checks():
    cfg = FilterConfig(per_source={"wiki": {"repetition": {"max_top_ngram_frac": {5: 0.5}}}})
    assert "repetition.top_ngram_5" in reason_names(cfg)
    assert "repetition.top_ngram_5" not in reason_names(FilterConfig())


def test_cluster_clean_per_source_keys_are_collect_source_names():
    """jobs/cluster: every per_source key of a clean config names a source of collect.yaml (a renamed source
    would silently lose its settings), and the shipped PII step is on."""
    from pathlib import Path

    from pipeline.data.readers import source_name
    from pipeline.stages import load_config

    cluster = Path(__file__).resolve().parents[2] / "jobs" / "cluster"
    names = {source_name(s) for s in load_config("collect", cluster / "collect.yaml").sources}
    for path in sorted(cluster.glob("clean*.yaml")):
        cfg = load_config("clean", path)
        assert set(cfg.per_source) <= names, (path.name, set(cfg.per_source) - names)
        assert cfg.pii.enabled, path.name
    assert {"kk-wikipedia", "kk-fineweb2"} <= set(load_config("clean", cluster / "clean.yaml").per_source)
