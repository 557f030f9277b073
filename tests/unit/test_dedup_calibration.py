"""The near-duplicate calibration (benchmarks/exp_dedup_calibration.py) at a tiny size, on the committed fixtures.

The full run (``make bench-dedup``, docs/benchmarks.md) chose the dedup defaults of jobs/*/clean*.yaml. Here the same
corpus builder and scorer run on a few thousand words of the real kk/ru/en fixtures (18 bases with four copies each,
60 similar-but-distinct negatives, 40-120 words a document) and check what the choice rests on: the configured
defaults find the copies with 1-5% of their words edited and drop no negative, while the old default (5-word
shingles, threshold 0.8) keeps most of the 3% copies.
"""

from __future__ import annotations

import importlib.util
import random
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.data.dedup import exact_key, words
from tests.conftest import CORPUS

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "benchmarks" / "exp_dedup_calibration.py"
CLEAN_CONFIGS = ["jobs/cluster/clean.yaml", "jobs/cluster/clean-strict.yaml", "jobs/demo/clean.yaml", "jobs/demo/clean-strict.yaml"]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("exp_dedup_calibration", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["exp_dedup_calibration"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("exp_dedup_calibration", None)


@pytest.fixture(scope="module")
def corpus(bench):
    return bench.build_corpus(CORPUS, bases_per_lang=6, negatives_per_lang=2, min_words=40, max_words=120, seed=0)


@pytest.fixture(scope="module")
def keys(corpus):
    return [exact_key(t) for t in corpus.texts]


def _score(bench, corpus, keys, shingle_words: int, threshold: float) -> dict:
    sigs = bench.signatures(corpus, shingle_words)
    return bench.evaluate(corpus, keys, sigs, shingle_words, threshold)


def _configured() -> tuple[int, float]:
    dedup = yaml.safe_load((REPO / "jobs/cluster/clean.yaml").read_text())["dedup"]
    return dedup["shingle_words"], dedup["threshold"]


def test_corpus_is_planted_as_described(bench, corpus):
    counts = corpus.counts()
    assert counts == {"base": 18, "copy 1%": 18, "copy 3%": 18, "copy 5%": 18, "copy 10%": 18,
                      "boilerplate": 18, "template": 18, "half": 12, "neighbours": 12}
    assert {corpus.lang.count(lang) for lang in bench.LANGS} == {len(corpus) // 3}
    # every base comes before its copies
    first: dict[int, int] = {}
    for i, g in enumerate(corpus.group):
        first.setdefault(g, i)
    assert all(corpus.role[first[g]] == "base" for g in set(corpus.group) if corpus.group.count(g) > 1)
    # the planted similarity is ordered as intended: copies by edit rate, then the negatives
    jac = bench.pair_jaccards(corpus, [2])
    means = [jac[f"copy {r:.0%}"][2]["mean"] for r in bench.EDIT_RATES]
    assert means == sorted(means, reverse=True) and means[-1] > 0.6
    assert max(jac[f][2]["max"] for f in bench.FAMILIES) < 0.55
    assert jac["boilerplate"][2]["min"] > 0.1 and jac["half"][2]["min"] > 0.2  # similar, not unrelated


def test_edit_changes_the_requested_share_of_words(bench):
    text = " ".join(f"w{i}" for i in range(400))
    for rate in bench.EDIT_RATES:
        m = round(rate * 400)
        out = bench.edit(text, rate, random.Random(1), ["x", "y", "z"]).split()
        new = sum(w in ("x", "y", "z") for w in out)  # substitutions + insertions
        gone = 400 - sum(w.startswith("w") for w in out)  # substitutions + deletions
        assert new <= m and gone <= m and m <= new + gone <= 2 * m, (rate, new, gone)
        assert 0 < new < m or m < 4  # a mix of operations, not only one kind
    assert bench.edit("one\ntwo three", 0.01, random.Random(0), ["x"]).count("\n") == 1  # lines kept
    assert words(bench.edit("a b c", 0.0, random.Random(0), ["x"])) != ["a", "b", "c"]  # at least one edit


def test_configured_defaults_find_the_copies_and_keep_the_negatives(bench, corpus, keys):
    shingle_words, threshold = _configured()
    for path in CLEAN_CONFIGS:  # every clean config carries the calibrated values
        dedup = yaml.safe_load((REPO / path).read_text())["dedup"]
        assert (dedup["shingle_words"], dedup["threshold"]) == (shingle_words, threshold), path
    row = _score(bench, corpus, keys, shingle_words, threshold)
    assert row["recall 1%"] == 1.0
    assert row["recall 3%"] >= 0.9
    assert row["recall 5%"] >= 0.9
    assert row["precision"] >= 0.99
    assert all(row[f"false drops {f}"] == 0.0 for f in ("base",) + bench.FAMILIES), row


def test_old_default_keeps_most_3_percent_copies(bench, corpus, keys):
    row = _score(bench, corpus, keys, *bench.OLD_DEFAULT)
    assert row["recall 1%"] >= 0.8
    assert row["recall 3%"] <= 0.5, row  # the reason the defaults changed
    assert row["recall 5%"] <= 0.2
    assert row["precision"] == 1.0


def test_a_loose_configuration_is_caught_dropping_negatives(bench, corpus, keys):
    """The precision measure is not vacuous: bag-of-words shingles at a low threshold drop similar-but-distinct pages."""
    row = _score(bench, corpus, keys, 1, 0.3)
    assert row["recall 10%"] == 1.0
    assert row["precision"] < 0.95
    assert row["false drops template"] > 0.2


def test_choose_follows_the_stated_rule(bench):
    def row(n, t, r3, r5, margin, precision=1.0, template=0.0):
        r = {"shingle_words": n, "threshold": t, "recall <=3%": r3, "recall 5%": r5, "margin": margin,
             "precision": precision, "false drops base": 0.0, "false drops template": template}
        r.update({f"false drops {f}": r.get(f"false drops {f}", 0.0) for f in bench.FAMILIES})
        return r

    rows = [
        row(1, 0.5, 1.0, 1.0, 0.30, precision=0.98),  # not eligible: precision
        row(1, 0.6, 1.0, 1.0, 0.25, template=0.02),  # not eligible: drops 2% of the template pages
        row(2, 0.6, 1.0, 0.998, 0.19),
        row(3, 0.6, 1.0, 1.0, 0.13),
        row(5, 0.8, 0.2, 0.0, 0.30),  # widest margin, but misses the 3% copies
    ]
    assert bench.choose(rows)["shingle_words"] == 2  # recall ties within 0.005, then the widest margin
    assert bench.choose([rows[0], rows[1]]) is None
