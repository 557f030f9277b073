"""Exact and MinHash LSH near-duplicate detection (pipeline.data.dedup)."""

from __future__ import annotations

import json
import pickle
import random
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import numpy as np
import pytest

from pipeline.data.dedup import DedupConfig
from pipeline.data import dedup
from pipeline.data.dedup import (
    EXACT,
    KEEP,
    NEAR,
    MinHasher,
    exact_key,
    PAIR,
    band_records,
    bucket_step,
    confirm,
    find_duplicates,
    greedy,
    key_matrix,
    lsh_params,
    min_agree,
    task_of,
    words,
)
from tests.conftest import CORPUS

CFG = DedupConfig(threshold=0.8, shingle_words=5)  # the mechanics below were worked out on these values


def _fortunes(lang: str) -> list[str]:
    text = (CORPUS / lang / "fortunes.txt").read_text(encoding="utf-8")
    return [d.strip() for d in text.split("\n%\n") if d.strip()]


def _kazakh() -> list[str]:
    lines = (CORPUS / "kk" / "catalogs.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["text"] for line in lines]


def _long(docs: list[str], n_words: int) -> list[str]:
    """Distinct documents of about ``n_words`` words, each made of whole consecutive docs."""
    out, buf = [], []
    for d in docs:
        buf.append(d)
        if sum(len(b.split()) for b in buf) >= n_words:
            out.append("\n\n".join(buf))
            buf = []
    return out


def _change_words(text: str, k: int, seed: int) -> str:
    rng = random.Random(seed)
    ws = text.split(" ")
    for i in rng.sample(range(len(ws)), k):
        ws[i] = "ЗАМЕНА" if i % 2 else "changed"
    return " ".join(ws)


@pytest.fixture(scope="module")
def hasher() -> MinHasher:
    return MinHasher(CFG)


@pytest.fixture(scope="module")
def corpus() -> dict[str, list[str]]:
    return {"en": _long(_fortunes("en"), 150), "ru": _long(_fortunes("ru"), 150), "kk": _long(_kazakh(), 150)}


def _true_jaccard(a: str, b: str, n: int = CFG.shingle_words) -> float:
    def shingles(t: str) -> set[tuple[str, ...]]:
        w = words(t)
        return {tuple(w[i : i + n]) for i in range(max(len(w) - n + 1, 1))} if w else set()

    sa, sb = shingles(a), shingles(b)
    return len(sa & sb) / len(sa | sb)


# ------------------------------------------------------------------------------- words


def test_words_are_unicode_aware_and_casefolded():
    assert words("Қазақ тілі — ӘДЕМІ тіл! Ұлы ғасыр, өнер; үміт. Һ і ң") == [
        "қазақ", "тілі", "әдемі", "тіл", "ұлы", "ғасыр", "өнер", "үміт", "һ", "і", "ң"
    ]
    assert words("Привет,МИР... don't_stop 42") == ["привет", "мир", "don", "t_stop", "42"]
    assert words("зáмок") == ["зáмок"]  # a combining stress mark stays inside the word
    assert words("  ...  ") == []


# ------------------------------------------------------------------------------- exact


def test_exact_key_collides_on_case_whitespace_punctuation():
    base = "Ол бүгін мектепке барды. Он сегодня пошёл в школу."
    variants = [
        "  ОЛ   бүгін\tмектепке барды!!  он СЕГОДНЯ пошёл в школу  \n",
        "ол бүгін мектепке барды он сегодня пошёл в школу",
        "Ол, бүгін, мектепке — барды... «Он сегодня пошёл в школу»",
    ]
    key = exact_key(base)
    assert isinstance(key, bytes) and len(key) == 16
    assert all(exact_key(v) == key for v in variants)
    assert exact_key("Ол бүгін мектепке барды. Он сегодня пошёл в кино.") != key
    assert exact_key("ab c") != exact_key("a bc")  # word boundaries count
    assert exact_key("") == exact_key(" ... ") != exact_key("x")


def test_exact_key_is_the_hash_of_the_word_sequence(corpus):
    import xxhash

    for text in corpus["kk"][:3] + corpus["ru"][:3] + ["tail punctuation!", "!lead", "a", "_"]:
        assert exact_key(text) == xxhash.xxh3_128_digest(" ".join(words(text)).encode("utf-32-le"))


def test_exact_duplicates_keep_the_first_copy():
    texts = ["Hello   World.", "other text here", "hello world", "HELLO, WORLD!", "other  TEXT here?"]
    dup_of, kind = find_duplicates([exact_key(t) for t in texts], None, CFG)
    assert dup_of.tolist() == [-1, -1, 0, 0, 1]
    assert kind.tolist() == [KEEP, KEEP, EXACT, EXACT, EXACT]
    assert dup_of.dtype == np.int64


def test_exact_keys_accepted_as_list_or_array():
    keys = [exact_key(t) for t in ["a b", "c d", "A B", "c, d", "e"]]
    as_array = np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(-1, 16)
    as_void = np.frombuffer(b"".join(keys), dtype="V16")
    ref = find_duplicates(keys, None, CFG)
    for other in (as_array, as_void):
        got = find_duplicates(other, None, CFG)
        assert np.array_equal(ref[0], got[0]) and np.array_equal(ref[1], got[1])
    with pytest.raises(ValueError, match="16 bytes"):
        find_duplicates([b"short"], None, CFG)


# ---------------------------------------------------------------------------- minhash


def test_signature_shape_dtype_and_batch_consistency(hasher, corpus):
    texts = corpus["en"][:5] + corpus["kk"][:5] + ["", "one", "two words", "... !!!"]
    sigs = hasher.signatures(texts)
    assert sigs.shape == (len(texts), CFG.num_perm) and sigs.dtype == np.uint32
    for i, t in enumerate(texts):
        assert np.array_equal(hasher.signature(t), sigs[i])
    assert hasher.signatures([]).shape == (0, CFG.num_perm)
    assert (sigs[texts.index("")] == 0xFFFFFFFF).all() and (sigs[texts.index("... !!!")] == 0xFFFFFFFF).all()


def test_signatures_do_not_depend_on_grouping(hasher, corpus, monkeypatch):
    texts = corpus["ru"] + corpus["kk"]
    ref = hasher.signatures(texts)
    monkeypatch.setattr(dedup, "_CHARS_PER_GROUP", 3000)
    monkeypatch.setattr(dedup, "_ROWS_PER_BLOCK", 97)
    assert np.array_equal(hasher.signatures(texts), ref)


def test_shingle_counts_and_short_documents(hasher):
    texts = ["a b c d e f g", "a b c", "A, b. C!", "", "x"]
    sh, counts = hasher.shingle_hashes(texts)
    assert counts.tolist() == [3, 1, 1, 0, 1]
    assert len(sh) == 6 and sh.max() < 2**32
    sigs = hasher.signatures(texts)
    assert np.array_equal(sigs[1], sigs[2])  # the same three words: the same single shingle
    assert not np.array_equal(sigs[1], sigs[4])


def test_same_seed_same_signature_across_instances_pickles_and_processes(corpus):
    texts = corpus["kk"][:3] + corpus["ru"][:3]
    a, b = MinHasher(DedupConfig(seed=7)), MinHasher(DedupConfig(seed=7))
    ref = a.signatures(texts)
    assert np.array_equal(ref, b.signatures(texts))
    assert np.array_equal(ref, pickle.loads(pickle.dumps(a)).signatures(texts))
    assert not np.array_equal(ref, MinHasher(DedupConfig(seed=8)).signatures(texts))
    # a fresh interpreter (other hash salt, own word table) computes the same values
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        remote = pool.submit(a.signatures, texts).result(timeout=120)
    assert np.array_equal(ref, remote)


def test_estimated_jaccard_tracks_the_true_one(hasher, corpus):
    base = corpus["en"][0]
    for k in (2, 10, 30):
        other = _change_words(base, k, seed=k)
        s = hasher.signatures([base, other])
        est = float(np.mean(s[0] == s[1]))
        assert abs(est - _true_jaccard(base, other)) < 0.12


# --------------------------------------------------------------------------------- lsh


def test_lsh_params_sanity():
    for threshold, num_perm in [(0.5, 128), (0.8, 128), (0.9, 256), (0.7, 16)]:
        b, r = lsh_params(threshold, num_perm)
        assert b >= 1 and r >= 1 and b * r <= num_perm
        # the S-curve P(candidate | s) = 1 - (1 - s^r)^b rises around the threshold
        p = lambda s: 1 - (1 - s**r) ** b  # noqa: E731
        if num_perm >= 128:  # (16 permutations cannot draw a steep curve)
            assert p(min(threshold + 0.1, 0.99)) > 0.9 and p(threshold - 0.3) < 0.2 and 0.3 < p(threshold) < 0.99
    assert lsh_params(0.9, 128)[1] > lsh_params(0.5, 128)[1]  # stricter threshold: longer bands
    assert lsh_params(0.8, 128, fp_weight=0.5, fn_weight=0.5) == (9, 13)  # the classic equal weights
    assert lsh_params(0.8, 128) == (12, 10)  # default: recall first (candidates are verified)
    with pytest.raises(ValueError):
        lsh_params(1.0, 128)


def test_band_overrides_are_validated():
    assert DedupConfig(bands=16, rows=8).bands == 16
    with pytest.raises(ValueError, match="both"):
        DedupConfig(bands=16)
    with pytest.raises(ValueError, match="exceeds num_perm"):
        DedupConfig(num_perm=64, bands=16, rows=8)


# ------------------------------------------------------------------------ near dups


def test_near_duplicates_found_in_three_languages(hasher, corpus):
    texts, expect = [], []
    for lang in ("en", "ru", "kk"):
        docs = corpus[lang]
        assert len(docs) >= 4, lang
        first = len(texts)
        texts += docs[:4]
        expect += [-1] * 4
        texts.append(_change_words(docs[1], 3, seed=1))  # a few words changed
        expect.append(first + 1)
        texts.append(_change_words(docs[2], 1, seed=2))
        expect.append(first + 2)
    sigs = hasher.signatures(texts)
    dup_of, kind = find_duplicates([exact_key(t) for t in texts], sigs, CFG)
    assert dup_of.tolist() == expect
    assert [int(k) for k, e in zip(kind, expect) if e >= 0] == [NEAR] * 6
    # clearly different documents are not candidates
    unrelated = hasher.signatures([corpus["en"][0], corpus["ru"][0], corpus["kk"][0], corpus["kk"][3]])
    assert (find_duplicates(None, unrelated, CFG)[0] == -1).all()


def test_planted_fixture_near_duplicates(hasher):
    rows = [json.loads(line) for line in (CORPUS / "planted.jsonl").read_text(encoding="utf-8").splitlines()]
    by_id = {r["id"]: r["text"] for r in rows}
    texts = [by_id["near-ru-orig"], by_id["near-kk-orig"], by_id["near-ru"], by_id["near-kk"]]
    dup_of, kind = find_duplicates([exact_key(t) for t in texts], hasher.signatures(texts), CFG)
    assert dup_of.tolist() == [-1, -1, 0, 1] and kind.tolist() == [KEEP, KEEP, NEAR, NEAR]


def test_exact_first_then_near_and_dup_of_points_to_kept(hasher, corpus):
    a = corpus["ru"][0]
    texts = [a, a.upper(), _change_words(a, 2, seed=3), corpus["kk"][0], corpus["kk"][0] + " "]
    dup_of, kind = find_duplicates([exact_key(t) for t in texts], hasher.signatures(texts), CFG)
    assert kind.tolist() == [KEEP, EXACT, NEAR, KEEP, EXACT]
    assert dup_of.tolist() == [-1, 0, 0, -1, 3]
    assert (kind[dup_of[dup_of >= 0]] == KEEP).all()
    # switches
    assert find_duplicates([exact_key(t) for t in texts], hasher.signatures(texts), CFG.model_copy(update={"near": False}))[1].tolist() == [0, 1, 0, 0, 1]
    no_exact = find_duplicates([exact_key(t) for t in texts], hasher.signatures(texts), CFG.model_copy(update={"exact": False}))[1]
    assert no_exact.tolist() == [KEEP, NEAR, NEAR, KEEP, NEAR]  # exact copies still look alike


def test_keep_first_is_deterministic_and_order_driven(hasher, corpus):
    a = corpus["kk"][1]
    b = _change_words(a, 2, seed=5)
    fwd = find_duplicates(None, hasher.signatures([a, b]), CFG)
    rev = find_duplicates(None, hasher.signatures([b, a]), CFG)
    assert fwd[0].tolist() == [-1, 0] and rev[0].tolist() == [-1, 0]
    again = find_duplicates(None, hasher.signatures([a, b]), CFG)
    assert np.array_equal(fwd[0], again[0]) and np.array_equal(fwd[1], again[1])


def test_greedy_rule_does_not_chain():
    """A~B and B~C but A and C far apart: B goes (copy of A), C stays (B is gone)."""
    rng = np.random.default_rng(0)
    cfg = DedupConfig(bands=16, rows=8, threshold=0.8)
    a = rng.integers(0, 2**32, 128, dtype=np.uint64).astype(np.uint32)
    b = a.copy()
    b[64:84] = rng.integers(0, 2**32, 20, dtype=np.uint64).astype(np.uint32)  # 108/128 agree with a
    c = b.copy()
    c[100:120] = rng.integers(0, 2**32, 20, dtype=np.uint64).astype(np.uint32)  # 108/128 with b, 88/128 with a
    dup_of, kind = find_duplicates(None, np.stack([a, b, c]), cfg)
    assert dup_of.tolist() == [-1, 0, -1] and kind.tolist() == [KEEP, NEAR, KEEP]


def test_large_bucket_of_copies_is_linear():
    rng = np.random.default_rng(1)
    base = rng.integers(0, 2**32, 128, dtype=np.uint64).astype(np.uint32)
    other = rng.integers(0, 2**32, (500, 128), dtype=np.uint64).astype(np.uint32)
    sigs = np.concatenate([other[:250], np.tile(base, (3000, 1)), other[250:]])
    dup_of, kind = find_duplicates(None, sigs, CFG)
    assert (dup_of[251:3250] == 250).all() and (kind[251:3250] == NEAR).all()
    assert (dup_of[:251] == -1).all() and (dup_of[3250:] == -1).all()


def test_input_validation():
    with pytest.raises(ValueError, match="2 exact keys but 3 signatures"):
        find_duplicates([exact_key("a"), exact_key("b")], np.zeros((3, 128), np.uint32), CFG)
    dup_of, kind = find_duplicates(None, None, CFG)
    assert len(dup_of) == 0 and len(kind) == 0


# ---------------------------------------------------------------- sharding invariance


def _split(n: int, world: int) -> list[tuple[int, int]]:
    return [(n * r // world, n * (r + 1) // world) for r in range(world)]


def _sharded_decisions(texts: list[str], world: int, cfg: DedupConfig) -> tuple[np.ndarray, np.ndarray]:
    """The clean stage's sharded dedup, in one process: each rank makes the bucket records of its slice,
    each of `world` bucket tasks takes the records of its hash range, pairs are confirmed and resolved."""
    outboxes: list[list[np.ndarray]] = [[] for _ in range(world)]
    sigs = []
    for lo, hi in _split(len(texts), world):
        hasher = MinHasher(cfg)  # each rank builds its own
        part = texts[lo:hi]
        s = hasher.signatures(part) if cfg.near else None
        keys = key_matrix([exact_key(t) for t in part]) if cfg.exact else None
        recs = band_records(s, keys, np.arange(lo, hi, dtype=np.int64), cfg)
        dest = task_of(recs["h"], world)
        for t in range(world):
            outboxes[t].append(recs[dest == t])
        sigs.append(s)
    exact, pairs = [], []
    for t in range(world):
        e, p = bucket_step(np.concatenate(outboxes[t]), cfg.near)
        exact.append(e)
        pairs.append(p)
    dup_of = np.full(len(texts), -1, dtype=np.int64)
    kind = np.zeros(len(texts), dtype=np.int8)
    ex = np.concatenate(exact)
    assert len(np.unique(ex["l"])) == len(ex)  # each copy reported by exactly one task
    dup_of[ex["l"]], kind[ex["l"]] = ex["e"], EXACT
    pairs = np.unique(np.concatenate(pairs))
    if cfg.near and len(pairs):
        sig = np.concatenate(sigs)
        near = greedy(pairs[confirm(sig[pairs["l"]], sig[pairs["e"]], min_agree(cfg, cfg.num_perm))])
        dup_of[near["l"]], kind[near["l"]] = near["e"], NEAR
    return dup_of, kind


@pytest.mark.parametrize("exact,near", [(True, True), (True, False), (False, True)])
def test_decisions_do_not_depend_on_the_number_of_ranks(corpus, exact, near):
    rng = random.Random(11)
    base = corpus["en"] + corpus["ru"] + corpus["kk"]
    texts = list(base)
    for _ in range(40):  # exact copies, near copies and copies of copies, scattered
        src = rng.choice(texts)
        texts.insert(rng.randrange(len(texts) + 1), rng.choice([src.upper(), _change_words(src, 2, rng.random()), src]))
    cfg = CFG.model_copy(update={"exact": exact, "near": near})
    hasher = MinHasher(cfg)
    ref = find_duplicates([exact_key(t) for t in texts] if exact else None, hasher.signatures(texts) if near else None, cfg)
    for world in (1, 2, 3, 7):
        dup_of, kind = _sharded_decisions(texts, world, cfg)
        assert np.array_equal(dup_of, ref[0]) and np.array_equal(kind, ref[1]), world
    dup_of, kind = ref
    assert ((kind == EXACT).sum() >= 10) == exact and ((kind == NEAR).sum() >= 10) == near
    assert (dup_of[kind > 0] < np.flatnonzero(kind > 0)).all()


def test_exact_copies_are_left_out_of_the_near_buckets():
    """Bucket [A, X, B(=A), C]: C is paired with A (first) and X (predecessor once B, an exact copy, is
    left out), as when exact dedup runs first over the whole corpus."""
    recs = np.zeros(4, dtype=dedup.KEYED_RECORD)
    recs["d"] = [0, 1, 2, 3]
    recs["h"] = 42
    recs["k0"] = [7, 8, 7, 9]
    exact, pairs = bucket_step(recs[::-1].copy(), near=True)
    assert exact.tolist() == [(2, 0)]
    assert sorted(pairs.tolist()) == [(1, 0), (3, 0), (3, 1)]


def test_greedy_keeps_a_document_whose_neighbours_went():
    """A~B, B~C, A!~C: B goes as a copy of A; C stays (its only neighbour B went)."""
    pairs = np.array([(1, 0), (2, 1)], dtype=PAIR)
    assert greedy(pairs).tolist() == [(1, 0)]
    assert greedy(np.zeros(0, dtype=PAIR)).tolist() == []


def test_task_of_splits_the_hash_range_evenly():
    h = np.random.default_rng(0).integers(0, 2**64, size=100_000, dtype=np.uint64)
    counts = np.bincount(task_of(h, 7), minlength=7)
    assert counts.min() > 0.95 * len(h) / 7 and task_of(h, 1).max() == 0
    assert task_of(np.array([0, 2**64 - 1], dtype=np.uint64), 7).tolist() == [0, 6]


