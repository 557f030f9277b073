"""Smoke test of benchmarks/bench_data.py on a few dozen real fixture documents.

Checks only that every measurement runs, returns positive throughputs and that the two sides
of each comparison processed the same documents. Nothing here looks at how fast anything is.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from tests.conftest import FIXTURES

pytest.importorskip("datatrove", reason="datatrove is not installed (it comes with the `bench` extra: pip install -e '.[bench]')")

from pipeline.stages.clean import CleanConfig  # noqa: E402
from pipeline.stages.pack import PackConfig  # noqa: E402

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_data.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_data", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_data"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("bench_data", None)


@pytest.fixture(scope="module")
def tiny(bench):
    """36 documents (12 per language, interleaved) from the committed kk/ru/en fixtures."""
    corpus = [doc for doc in bench.load_corpus(FIXTURES) if doc[1] in ("kk", "ru", "en")]
    texts, hints = bench.build_input(corpus, mb=0.2)
    per_lang: dict[str, int] = {}
    picked_t, picked_h = [], []
    for text, lang in zip(texts, hints):
        if per_lang.get(lang, 0) < 12:
            per_lang[lang] = per_lang.get(lang, 0) + 1
            picked_t.append(text)
            picked_h.append(lang)
    assert per_lang == {"kk": 12, "ru": 12, "en": 12}
    return picked_t, picked_h


def test_build_input_slices_and_replicates(bench):
    docs = [("а" * 100, "kk"), ("b" * 100, "en")]
    texts, hints = bench.build_input(docs, mb=0.001)  # 1000 bytes: replicas needed
    assert bench.utf8_bytes(texts) >= 1000
    assert set(hints[:2]) == {"kk", "en"} and set(hints) == {"kk", "en"}


def test_missing_corpus_says_how_to_get_it(bench, tmp_path):
    with pytest.raises(bench.CorpusMissing, match="make corpus"):
        bench.load_corpus(tmp_path)


def test_clean_both_sides_process_the_same_documents(bench, tiny):
    texts, hints = tiny
    res = bench.bench_clean(texts, hints, CleanConfig(), repeat=1, warmup_docs=5)
    cases = res["cases"]
    assert set(cases) == {"ours", "datatrove", "ours_filters", "datatrove_filters"}
    for name, case in cases.items():
        assert case["documents"] == len(texts), name
        assert 0 <= case["kept"] <= len(texts), name
        assert case["docs_per_s"] > 0 and case["mb_per_s"] > 0, name
    assert res["ratio"] > 0 and res["ratio_filters"] > 0
    assert res["kept_texts"] and len(res["kept_texts"]) == cases["ours"]["kept"]


def test_pack_both_sides_process_the_same_documents(bench, tiny):
    texts, hints = tiny
    tokenizer, special = bench.train_tokenizer(texts, hints, vocab_size=400)
    assert special["bos_id"] is not None and special["eos_id"] is not None
    cfg = PackConfig(seq_len=32, batch_size=8, blocks_per_shard=16, val_fraction=0.1)
    res = bench.bench_pack(texts, tokenizer, special, cfg, repeat=1, warmup_docs=4)
    assert res["tokens"] > 0
    for name in res["cases"]:
        assert res["cases"][name]["documents"] == len(texts), name
        assert res["cases"][name]["tokens_per_s"] > 0, name
    assert res["ratio"] > 0
    assert res["packer_document_tokens"] == res["tokens"]


@pytest.mark.slow
def test_main_end_to_end_writes_json(bench, tmp_path, capsys):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "corpus").symlink_to(FIXTURES / "corpus", target_is_directory=True)
    out = tmp_path / "bench.json"
    rc = bench.main(["--cache", str(cache), "--mb", "0.05", "--repeat", "1", "--vocab", "400", "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "ratio ours/datatrove" in printed and "ratio ours/bare" in printed
    res = json.loads(out.read_text())
    assert "error" not in res["clean_e2e"], res["clean_e2e"]
    assert res["clean_e2e"]["documents"] == res["environment"]["documents"]
    assert res["pack"]["cases"]["ours"]["tokens_per_s"] > 0
