"""Whole-corpus deduplication for the ``clean`` stage: exact keys and MinHash LSH.

The clean stage runs in two steps, and this module serves both:

* **map** (sharded, N processes or pods): for every kept document compute
  :func:`exact_key` and a MinHash signature (:meth:`MinHasher.signatures`), then store them
  with :func:`save_dedup_state`.
* **reduce** (one task): load every shard's state in global document order
  (:func:`load_dedup_state`, concatenate) and call :func:`find_duplicates`.

Decisions depend only on the global order of the documents and on the config, never on how
the corpus was split into shards: the first occurrence is kept.

Words and shingles
    A word is a run of Unicode word characters (letters of any script, Kazakh and other
    Cyrillic letters included, digits, ``_``) plus combining accents (U+0300..U+036F, the
    stress marks of Russian text), found in the casefolded text. A shingle is a run of
    ``shingle_words`` consecutive words; a document with fewer words has a single shingle made
    of all of them, and a document without words has none (its signature is all ``0xFFFFFFFF``).

Hashing
    Every word is hashed once with 64-bit xxh3; a shingle's hash is an order-dependent
    polynomial of its word hashes, mixed by the murmur3 finalizer and folded to 32 bits. Each
    of the ``num_perm`` hash functions is a strongly universal multiply-add-shift hash
    ``h_i(x) = ((a_i * x + b_i) mod 2**64) >> 32`` (Dietzfelbinger 1996; ``x`` < 2**32,
    ``a_i``, ``b_i`` random 64-bit, ``a_i`` odd) drawn from ``numpy``'s PCG64 seeded with
    ``cfg.seed``. This is the usual ``(a*x + b) mod p`` family with the modulus replaced by
    a power of two and a shift, which needs no integer division: numpy evaluates it for all
    shingles of a whole batch of documents and all permutations at once. Signatures are
    ``uint32`` (half the memory of ``uint64`` in the reduce step; accidental equal minima
    happen with probability 2**-32).

Near duplicates
    The signature is cut into ``bands`` bands of ``rows`` rows (:func:`lsh_params`, or the
    ``bands``/``rows`` overrides of the config). Documents whose band hashes are equal in some
    band are candidates; they are grouped by sorting the band hashes (no Python dicts), and
    each member of a bucket is paired with the bucket's first (earliest) document and with its
    predecessor in the bucket, which bounds the candidate pairs to two per document and band
    even for a bucket holding thousands of copies. A candidate pair is confirmed when the
    signatures agree on at least ``threshold * num_perm`` positions (estimated Jaccard >=
    threshold).

    Then, in global order, a document is dropped as a near duplicate of the **earliest kept**
    document it is confirmed similar to; a document whose confirmed neighbours were all dropped
    themselves is kept. We chose this greedy rule over connected components (datatrove,
    text-dedup) because components chain: with A~B and B~C, C is dropped "as a copy of" A even
    when A and C share far less than the threshold. With the greedy rule every dropped document
    really is (by its signature) at least ``threshold`` similar to a document that stays in
    the corpus, and ``dup_of`` names that document. It is deterministic: it depends only on the
    signatures and their order.
"""

from __future__ import annotations

import math
import re
from typing import Sequence

import numpy as np
import xxhash
from pydantic import Field, model_validator

from pipeline.config import StrictModel


class DedupConfig(StrictModel):
    exact: bool = True
    near: bool = True
    num_perm: int = Field(128, ge=16, le=1024)
    threshold: float = Field(0.6, gt=0, lt=1, description="Jaccard similarity (of the shingle sets) from which documents are "
                                                          "near-duplicates; 0.6 on 2-word shingles finds copies with up to "
                                                          "~5-10% of their words changed and no similar-but-distinct pair "
                                                          "(make bench-dedup, docs/benchmarks.md)")
    shingle_words: int = Field(2, ge=1, le=32, description="word n-gram size of the MinHash shingles (2: calibrated "
                                                            "with threshold 0.6, see threshold)")
    seed: int = 1
    bands: int | None = Field(None, ge=1, description="LSH bands; with `rows`, overrides the (bands, rows) derived from threshold and num_perm")
    rows: int | None = Field(None, ge=1, description="signature rows per LSH band (set together with `bands`)")

    @model_validator(mode="after")
    def _check_bands(self) -> "DedupConfig":
        if (self.bands is None) != (self.rows is None):
            raise ValueError("set both `bands` and `rows`, or neither (then they follow threshold and num_perm)")
        if self.bands is not None and self.rows is not None and self.bands * self.rows > self.num_perm:
            raise ValueError(f"bands * rows = {self.bands * self.rows} exceeds num_perm = {self.num_perm}")
        return self


__all__ = [
    "KEEP",
    "EXACT",
    "NEAR",
    "SIGNATURE_DTYPE",
    "MinHasher",
    "exact_key",
    "find_duplicates",
    "lsh_params",
    "words",
    "RECORD",
    "KEYED_RECORD",
    "PAIR",
    "band_records",
    "bucket_step",
    "confirm",
    "greedy",
    "key_matrix",
    "min_agree",
    "task_of",
]

KEEP, EXACT, NEAR = 0, 1, 2
"""Values of the ``kind`` array returned by :func:`find_duplicates`."""

SIGNATURE_DTYPE = np.dtype(np.uint32)
KEY_BYTES = 16
EMPTY = np.uint32(0xFFFFFFFF)

_WORD_RE = re.compile(r"[\w\u0300-\u036f]+")
_M64 = (1 << 64) - 1
_SHINGLE_MUL = np.uint64(0x9E3779B97F4A7C15)  # odd: polynomial base of the shingle hash
_FMIX1 = np.uint64(0xFF51AFD7ED558CCD)
_FMIX2 = np.uint64(0xC4CEB9FE1A85EC53)
_BAND_MUL = np.uint64(0x100000001B3)
_U33 = np.uint64(33)
_U32 = np.uint64(32)
_CHARS_PER_GROUP = 4_000_000  # characters per vectorised group inside signatures()
_ROWS_PER_BLOCK = 8192  # shingles per (rows x num_perm) block of the MinHash product

_WORD_TABLE: np.ndarray | None = None
_POW: np.ndarray = np.ones(1, dtype=np.uint64)
_CHAR_MUL = np.uint64(0x100000001B3)
_LEN_MUL = np.uint64(0x9FB21C651E98DF25)


def _word_table() -> np.ndarray:
    """Bool table over all code points: True for the characters ``_WORD_RE`` counts as word
    characters (built once per process from the regex itself, about 0.2 s)."""
    global _WORD_TABLE
    if _WORD_TABLE is None:
        table = np.zeros(0x110000, dtype=bool)
        for m in _WORD_RE.finditer("".join(map(chr, range(0x110000)))):
            table[m.start() : m.end()] = True
        _WORD_TABLE = table
    return _WORD_TABLE


def words(text: str) -> list[str]:
    """The words of ``text`` as the dedup sees them: casefolded, punctuation and spaces gone."""
    return _WORD_RE.findall(text.casefold())


def exact_key(text: str) -> bytes:
    """16-byte key of a document: xxh3-128 of ``" ".join(words(text))`` encoded as UTF-32-LE.

    Copies that differ only in case, whitespace, punctuation or symbols collide (they are the
    copies :class:`MinHasher` sees as the same word sequence). Computed with numpy on the code
    points, several times faster than a regex.
    """
    cps = np.frombuffer(text.casefold().encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    isw = _word_table()[cps]
    keep = isw.copy()
    keep[1:] |= isw[:-1]  # the word characters and the first character after each word
    out = np.where(isw, cps, np.uint32(32))[keep]
    if len(out) and out[-1] == 32:
        out = out[:-1]
    return xxhash.xxh3_128_digest(out.tobytes())


def _fmix64(x: np.ndarray) -> np.ndarray:
    """murmur3's 64-bit finalizer, in place on a uint64 array (wrapping arithmetic)."""
    x ^= x >> _U33
    x *= _FMIX1
    x ^= x >> _U33
    x *= _FMIX2
    x ^= x >> _U33
    return x


def _powers(n: int) -> np.ndarray:
    global _POW
    if len(_POW) < n:
        size = max(n, 2 * len(_POW), 64)
        p = np.full(size, _CHAR_MUL, dtype=np.uint64)
        p[0] = 1
        _POW = np.cumprod(p, dtype=np.uint64)  # wraps mod 2**64
    return _POW


def _word_hashes(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """64-bit hashes of the words of every text (same words as :func:`words`), in order, and
    the number of words per text. Vectorised over the whole batch: the casefolded texts are
    joined by newlines and decoded to code points; a word's hash is the polynomial of its
    code points, mixed with its length by the murmur3 finalizer."""
    folded = [t.casefold() for t in texts]
    starts_chr = np.zeros(len(texts) + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, folded), dtype=np.int64, count=len(folded)) + 1, out=starts_chr[1:])
    cps = np.frombuffer("\n".join(folded).encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    isw = _word_table()[cps]
    edge = np.diff(isw.view(np.int8), prepend=np.int8(0), append=np.int8(0))
    w_start = np.flatnonzero(edge == 1)
    w_len = np.flatnonzero(edge == -1) - w_start
    n_words = np.bincount(np.searchsorted(starts_chr, w_start, side="right") - 1, minlength=len(texts))
    if not len(w_start):
        return np.zeros(0, dtype=np.uint64), n_words.astype(np.int64)
    chars = cps[isw].astype(np.uint64)
    first = np.zeros(len(w_start), dtype=np.int64)
    np.cumsum(w_len[:-1], out=first[1:])
    pos = np.arange(len(chars), dtype=np.int64) - np.repeat(first, w_len)
    chars *= _powers(int(w_len.max()))[pos]
    csum = np.zeros(len(chars) + 1, dtype=np.uint64)
    np.cumsum(chars, out=csum[1:])
    h = csum[first + w_len] - csum[first]
    h ^= w_len.astype(np.uint64) * _LEN_MUL
    return _fmix64(h), n_words.astype(np.int64)


class MinHasher:
    """MinHash signatures of ``cfg.num_perm`` uint32 values, deterministic for ``cfg.seed``.

    Only the config's ``num_perm``, ``shingle_words`` and ``seed`` matter; instances built
    from equal values give equal signatures in any process (the hash parameters come from
    numpy's PCG64, the word hash is seeded xxh3, never Python's salted ``hash``). Picklable.
    """

    def __init__(self, cfg: DedupConfig):
        self.num_perm = int(cfg.num_perm)
        self.shingle_words = int(cfg.shingle_words)
        self.seed = int(cfg.seed)
        rng = np.random.Generator(np.random.PCG64(self.seed))
        self.a = rng.integers(0, 1 << 64, size=self.num_perm, dtype=np.uint64, endpoint=False) | np.uint64(1)
        self.b = rng.integers(0, 1 << 64, size=self.num_perm, dtype=np.uint64, endpoint=False)

    def __getstate__(self) -> dict:
        return {"num_perm": self.num_perm, "shingle_words": self.shingle_words, "seed": self.seed}

    def __setstate__(self, state: dict) -> None:
        self.__init__(DedupConfig(**state))

    def __repr__(self) -> str:
        return f"MinHasher(num_perm={self.num_perm}, shingle_words={self.shingle_words}, seed={self.seed})"

    # ------------------------------------------------------------------------- shingles

    def shingle_hashes(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """32-bit shingle hashes of all ``texts`` (as uint64) and each text's shingle count."""
        n = self.shingle_words
        w, n_words = _word_hashes(texts)
        total = len(w)
        starts = np.zeros(len(texts), dtype=np.int64)
        np.cumsum(n_words[:-1], out=starts[1:])
        short = (n_words > 0) & (n_words < n)
        short_idx = np.flatnonzero(short)
        short_val = np.zeros(len(short_idx), dtype=np.uint64)
        # s[i] = w[i]*M^(k-1) + ... + w[i+k-1] for windows of k = 1..n words (wrapping)
        s = w.copy()
        for k in range(1, n + 1):
            if k > 1 and total >= k:
                s[: total - k + 1] *= _SHINGLE_MUL
                s[: total - k + 1] += w[k - 1 :]
            hit = n_words[short_idx] == k
            if hit.any():
                short_val[hit] = s[starts[short_idx[hit]]]
        counts = np.where(n_words >= n, n_words - n + 1, np.where(n_words > 0, 1, 0))
        out_starts = np.zeros(len(texts), dtype=np.int64)
        np.cumsum(counts[:-1], out=out_starts[1:])
        n_sh = int(counts.sum())
        # position of each shingle in s: its doc's first word + its rank inside the doc
        src = np.arange(n_sh, dtype=np.int64) + np.repeat(starts - out_starts, counts)
        sh = s[src] if total else np.zeros(0, dtype=np.uint64)
        if len(short_idx):
            sh[out_starts[short_idx]] = short_val
        _fmix64(sh)
        sh >>= _U32
        return sh, counts

    # ----------------------------------------------------------------------- signatures

    def signature(self, text: str) -> np.ndarray:
        """Signature of one text: shape ``(num_perm,)``, dtype uint32."""
        return self.signatures([text])[0]

    def signatures(self, texts: Sequence[str]) -> np.ndarray:
        """Signatures of a batch: shape ``(len(texts), num_perm)``, dtype uint32 (the fast path)."""
        n_docs = len(texts)
        result = np.empty((n_docs, self.num_perm), dtype=SIGNATURE_DTYPE)
        # groups of at most _CHARS_PER_GROUP characters bound the temporary arrays
        lo = 0
        while lo < n_docs:
            hi, chars = lo + 1, len(texts[lo])
            while hi < n_docs and chars + len(texts[hi]) <= _CHARS_PER_GROUP:
                chars += len(texts[hi])
                hi += 1
            result[lo:hi] = self._signatures(texts[lo:hi])
            lo = hi
        return result

    def _signatures(self, texts: Sequence[str]) -> np.ndarray:
        n_docs = len(texts)
        out = np.full((n_docs, self.num_perm), np.iinfo(np.uint64).max, dtype=np.uint64)
        sh, counts = self.shingle_hashes(texts)
        doc_of = np.repeat(np.arange(n_docs, dtype=np.int64), counts)
        a, b = self.a, self.b
        # (num_perm, rows) blocks: numpy reduces contiguous rows far faster than columns
        block = np.empty((self.num_perm, min(_ROWS_PER_BLOCK, max(len(sh), 1))), dtype=np.uint64)
        a_col, b_col = a[:, None], b[:, None]
        for lo in range(0, len(sh), _ROWS_PER_BLOCK):
            x = sh[lo : lo + _ROWS_PER_BLOCK]
            m = len(x)
            h = block[:, :m]
            np.multiply(a_col, x[None, :], out=h)
            h += b_col
            d = doc_of[lo : lo + m]
            piece_start = np.flatnonzero(np.concatenate(([True], d[1:] != d[:-1])))
            mins = np.minimum.reduceat(h, piece_start, axis=1).T
            docs = d[piece_start]
            out[docs] = np.minimum(out[docs], mins)
        # min of the 64-bit values == min of their top 32 bits (ties broken by low bits)
        out >>= _U32
        return out.astype(SIGNATURE_DTYPE)


# ------------------------------------------------------------------------------------ LSH


def _integrate(f, lo: float, hi: float, steps: int = 200) -> float:
    if hi <= lo:
        return 0.0
    x = np.linspace(lo, hi, steps + 1)
    y = f(x)
    return float(np.sum((y[1:] + y[:-1]) * 0.5 * np.diff(x)))


def lsh_params(threshold: float, num_perm: int, fp_weight: float = 0.2, fn_weight: float = 0.8) -> tuple[int, int]:
    """``(bands, rows)`` with ``bands * rows <= num_perm`` minimising the weighted error.

    A pair of Jaccard similarity ``s`` becomes a candidate with probability
    ``1 - (1 - s**rows)**bands``. The false-positive area is that probability integrated over
    ``s`` in ``[0, threshold]``, the false-negative area its complement over ``[threshold, 1]``;
    the result minimises ``fp_weight * FP + fn_weight * FN`` (ties: fewer bands).

    The default weights favour recall: :func:`find_duplicates` confirms every candidate pair
    with its estimated Jaccard, so a false positive costs one signature comparison while a
    false negative loses a duplicate. For threshold 0.8 and 128 permutations this gives
    (12, 10): a pair at Jaccard 0.85 is a candidate with probability 0.93, at 0.9 with 0.994
    (equal weights would give (9, 13): 0.69 and 0.93).
    """
    if not 0 < threshold < 1:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    if num_perm < 1:
        raise ValueError(f"num_perm must be >= 1, got {num_perm}")
    best: tuple[float, int, int] | None = None
    for bands in range(1, num_perm + 1):
        for rows in range(1, num_perm // bands + 1):
            fp = _integrate(lambda s: 1 - (1 - s**rows) ** bands, 0.0, threshold)
            fn = _integrate(lambda s: (1 - s**rows) ** bands, threshold, 1.0)
            err = fp_weight * fp + fn_weight * fn
            if best is None or err < best[0] - 1e-12:
                best = (err, bands, rows)
    assert best is not None
    return best[1], best[2]


def _band_params(cfg: DedupConfig, num_perm: int) -> tuple[int, int]:
    bands = getattr(cfg, "bands", None)
    rows = getattr(cfg, "rows", None)
    if bands and rows:
        if bands * rows > num_perm:
            raise ValueError(f"dedup bands*rows = {bands}*{rows} exceeds the signature length {num_perm}")
        return int(bands), int(rows)
    return _cached_lsh_params(float(cfg.threshold), int(num_perm))


_LSH_CACHE: dict[tuple[float, int], tuple[int, int]] = {}


def _cached_lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    key = (threshold, num_perm)
    if key not in _LSH_CACHE:
        _LSH_CACHE[key] = lsh_params(threshold, num_perm)
    return _LSH_CACHE[key]


def _band_hash(sig: np.ndarray, lo: int, hi: int, band: int) -> np.ndarray:
    """64-bit hash of the columns ``lo:hi`` of every row of ``sig`` (uint32)."""
    h = np.full(len(sig), np.uint64((0xCBF29CE484222325 + band * 0x9E3779B97F4A7C15) & _M64), dtype=np.uint64)
    for j in range(lo, hi):
        h ^= sig[:, j].astype(np.uint64)
        h *= _BAND_MUL
    return _fmix64(h)


# ------------------------------------------------------------------ bucket records and steps
#
# Whole-corpus decisions without the whole corpus in one process (see the module docstring):
#
#   band_records  each rank turns its documents' signatures (and exact keys) into records
#                 (band, band hash, document[, key]), sent to bucket task ``task_of(hash)``;
#   bucket_step   each task sorts its records: equal (band, hash) is a bucket; inside a bucket a
#                 document whose key equals an earlier one's is an exact duplicate (all copies share
#                 every bucket: equal keys mean equal words, hence equal signatures); the others are
#                 paired with the bucket's first document and with their predecessor;
#   confirm       a candidate pair stands when the two signatures agree on >= threshold * num_perm
#                 positions;
#   greedy        in global order, a document goes as a near duplicate of its earliest confirmed
#                 neighbour that is still kept.
#
# `find_duplicates` runs the same four functions in one process, so the one-process and the sharded
# decisions are the same by construction (and tests/unit/test_dedup.py checks it).

RECORD = np.dtype([("b", "<u2"), ("h", "<u8"), ("d", "<i8")])
"""A bucket record: band, 64-bit band hash, document (its position in the stage's input)."""
KEYED_RECORD = np.dtype([("b", "<u2"), ("h", "<u8"), ("d", "<i8"), ("k0", "<u8"), ("k1", "<u8")])
"""A bucket record with the document's exact key (when exact dedup is on)."""
PAIR = np.dtype([("l", "<i8"), ("e", "<i8")])
"""A pair of documents: later, earlier (``l > e``); ``np.unique``/``np.sort`` order them by (l, e)."""


def key_matrix(keys: Sequence[bytes] | np.ndarray) -> np.ndarray:
    """Exact keys as an ``(n, 2)`` uint64 array."""
    return _as_key_matrix(keys)


def task_of(h: np.ndarray, n_tasks: int) -> np.ndarray:
    """The bucket task (0..n_tasks-1) of each 64-bit hash: equal slices of the hash range."""
    if n_tasks == 1:
        return np.zeros(len(h), dtype=np.int64)
    return (((h >> _U32) * np.uint64(n_tasks)) >> _U32).astype(np.int64)


def band_records(signatures: np.ndarray | None, keys: np.ndarray | None, docs: np.ndarray, cfg: DedupConfig) -> np.ndarray:
    """The bucket records of a batch of documents: one per band when near dedup is on (``signatures``
    given), else one per document bucketed by its key (exact dedup alone). ``keys``: ``(n, 2)`` uint64
    (see :func:`key_matrix`) or None without exact dedup. Rows come band after band."""
    n = len(docs)
    dtype = KEYED_RECORD if keys is not None else RECORD
    if signatures is None:
        if keys is None:
            raise ValueError("band_records needs signatures, keys or both")
        out = np.empty(n, dtype=dtype)
        out["b"], out["h"], out["d"] = 0, keys[:, 0], docs
        out["k0"], out["k1"] = keys[:, 0], keys[:, 1]
        return out
    bands, rows = _band_params(cfg, signatures.shape[1])
    out = np.empty(n * bands, dtype=dtype)
    for band in range(bands):
        sl = slice(band * n, (band + 1) * n)
        out["b"][sl] = band
        out["h"][sl] = _band_hash(signatures, band * rows, (band + 1) * rows, band)
        out["d"][sl] = docs
        if keys is not None:
            out["k0"][sl], out["k1"][sl] = keys[:, 0], keys[:, 1]
    return out


def _starts(*cols: np.ndarray) -> np.ndarray:
    """Where a run of equal values (over all columns, rows already sorted) starts."""
    new = np.zeros(len(cols[0]), dtype=bool)
    new[:1] = True
    for c in cols:
        new[1:] |= c[1:] != c[:-1]
    return new


def bucket_step(records: np.ndarray, near: bool) -> tuple[np.ndarray, np.ndarray]:
    """One bucket task: ``(exact, pairs)`` from all records whose hash falls in the task's range.

    ``exact``: PAIR array (later = the duplicate, earlier = the first document with its key), from
    keyed records only. ``pairs``: unique candidate PAIRs from the buckets of the documents that are
    not exact duplicates (empty unless ``near``). Depends only on the set of records, not on their
    order or on which rank sent them. The bands are sorted one at a time, so the temporaries of the
    sort are one band's, not all of them."""
    empty = np.zeros(0, dtype=PAIR)
    if not len(records):
        return empty, empty
    order = np.argsort(records["b"], kind="stable")
    bands = records["b"][order]
    cuts = np.flatnonzero(np.diff(bands)) + 1
    exact_parts, pair_parts = [], []
    for lo, hi in zip(np.concatenate(([0], cuts)), np.concatenate((cuts, [len(order)]))):
        e, p = _bucket_band(records[order[lo:hi]], near)
        exact_parts.append(e)
        pair_parts.append(p)
    del order, bands
    exact = np.concatenate(exact_parts)
    exact.sort()
    pairs = np.unique(np.concatenate(pair_parts)) if pair_parts else empty
    return exact, pairs


def _bucket_band(records: np.ndarray, near: bool) -> tuple[np.ndarray, np.ndarray]:
    """:func:`bucket_step` for the records of one band."""
    empty = np.zeros(0, dtype=PAIR)
    exact = empty
    if "k0" in records.dtype.names:
        r = records[np.lexsort((records["d"], records["k1"], records["k0"], records["h"]))]
        first = _starts(r["h"], r["k0"], r["k1"])
        dup = ~first
        if r["b"][0] == 0:  # every document has a band-0 record: report each copy once
            head = np.flatnonzero(first)[np.cumsum(first) - 1]
            exact = np.empty(int(dup.sum()), dtype=PAIR)
            exact["l"], exact["e"] = r["d"][dup], r["d"][head[dup]]
        records = r[first]
        del r
    if not near:
        return exact, empty
    r = records[np.lexsort((records["d"], records["h"]))]
    new = _starts(r["h"])
    member = np.flatnonzero(~new)
    if not len(member):
        return exact, empty
    head = np.flatnonzero(new)[np.cumsum(new) - 1]
    pairs = np.empty(2 * len(member), dtype=PAIR)
    d = r["d"]
    pairs["l"] = np.concatenate((d[member], d[member]))
    pairs["e"] = np.concatenate((d[head[member]], d[member - 1]))
    return exact, np.unique(pairs)


def min_agree(cfg: DedupConfig, num_perm: int) -> int:
    """Signature positions two documents must share to be near duplicates (estimated Jaccard >= threshold)."""
    return max(1, math.ceil(cfg.threshold * num_perm - 1e-9))


def confirm(later: np.ndarray, earlier: np.ndarray, needed: int, chunk: int = 16384) -> np.ndarray:
    """Which pairs of signature rows (``later[i]``, ``earlier[i]``) agree on at least ``needed`` positions."""
    ok = np.empty(len(later), dtype=bool)
    for lo in range(0, len(later), chunk):
        ok[lo : lo + chunk] = np.count_nonzero(later[lo : lo + chunk] == earlier[lo : lo + chunk], axis=1) >= needed
    return ok


def greedy(confirmed: np.ndarray, chunk: int = 1 << 20) -> np.ndarray:
    """Near duplicates from confirmed PAIRs (sorted by (l, e)): in global order, a document is dropped
    as a copy of its earliest confirmed neighbour that is still kept. Returns PAIRs (dropped, kept
    document it copies). Memory and time follow the number of pairs, not of documents: the documents
    are renumbered densely, and the pairs are walked ``chunk`` at a time (a Python loop; the rule is
    sequential by nature)."""
    m = len(confirmed)
    if not m:
        return np.zeros(0, dtype=PAIR)
    # dense renumbering by sort + searchsorted rather than np.unique(return_inverse=True), whose int64
    # permutation and inverse over 2m positions doubled the peak (measured: 5.3 GB -> see bench-scale)
    narrow = np.int32 if max(int(confirmed["l"].max()), int(confirmed["e"].max())) < 2**31 else np.int64
    docs = np.concatenate((confirmed["l"], confirmed["e"])).astype(narrow)
    docs.sort()
    docs = docs[np.concatenate(([True], docs[1:] != docs[:-1]))]
    lt_all = np.searchsorted(docs, confirmed["l"]).astype(narrow)
    er_all = np.searchsorted(docs, confirmed["e"]).astype(narrow)
    kept = bytearray(b"\x01") * len(docs)
    out_l: list[np.ndarray] = []
    out_e: list[np.ndarray] = []
    lo = 0
    while lo < m:
        hi = min(m, lo + chunk)
        if hi < m:  # end the chunk with a whole document's pairs
            hi = int(np.searchsorted(lt_all, lt_all[hi - 1], side="right"))
        lt, er = lt_all[lo:hi].tolist(), er_all[lo:hi].tolist()
        got_l: list[int] = []
        got_e: list[int] = []
        i, n = 0, len(lt)
        while i < n:
            doc = lt[i]
            j = i
            while j < n and lt[j] == doc:
                j += 1
            for t in range(i, j):
                if kept[er[t]]:
                    kept[doc] = 0
                    got_l.append(doc)
                    got_e.append(er[t])
                    break
            i = j
        out_l.append(np.asarray(got_l, dtype=np.int64))
        out_e.append(np.asarray(got_e, dtype=np.int64))
        lo = hi
    out_li, out_ei = np.concatenate(out_l), np.concatenate(out_e)
    out = np.empty(len(out_li), dtype=PAIR)
    out["l"], out["e"] = docs[out_li], docs[out_ei]  # back to positions (int64 in PAIR)
    return out


def _as_key_matrix(keys: Sequence[bytes] | np.ndarray) -> np.ndarray:
    """Keys as an ``(n, 2)`` uint64 array."""
    if isinstance(keys, np.ndarray):
        arr = keys
        if arr.dtype.kind in "SV":
            if arr.dtype.itemsize != KEY_BYTES:
                raise ValueError(f"exact keys must be {KEY_BYTES} bytes, got dtype {arr.dtype}")
            return np.frombuffer(np.ascontiguousarray(arr).tobytes(), dtype=np.uint64).reshape(-1, 2)
        if arr.dtype == np.uint64 and arr.ndim == 2 and arr.shape[1] == 2:
            return arr
        arr = np.ascontiguousarray(arr, dtype=np.uint8)
        if arr.ndim != 2 or arr.shape[1] != KEY_BYTES:
            raise ValueError(f"exact keys must have shape (n, {KEY_BYTES}), got {arr.shape}")
        return arr.view(np.uint64).reshape(-1, 2)
    try:
        raw = b"".join(keys)
    except TypeError:
        raw = b"".join(bytes(k) for k in keys)
    if len(raw) != KEY_BYTES * len(keys):
        raise ValueError(f"every exact key must be {KEY_BYTES} bytes (use exact_key)")
    return np.frombuffer(raw, dtype=np.uint64).reshape(-1, 2)


def find_duplicates(
    keys: Sequence[bytes] | np.ndarray | None,
    signatures: np.ndarray | None,
    cfg: DedupConfig,
) -> tuple[np.ndarray, np.ndarray]:
    """Decide which documents are duplicates, in global order (the first occurrence is kept), in one
    process: the bucket records of every document go to one bucket task.

    ``keys``: one :func:`exact_key` per document (a list of 16-byte ``bytes``, or an array of
    shape ``(n, 16)`` uint8 / dtype ``V16``), or None to skip exact dedup. ``signatures``:
    ``(n, num_perm)`` from :meth:`MinHasher.signatures`, or None to skip near dedup. Either
    step also runs only when ``cfg.exact`` / ``cfg.near`` is on.

    Returns ``(dup_of, kind)``: ``dup_of`` int64, -1 for a kept document, else the index of
    the kept document it duplicates; ``kind`` int8, ``KEEP`` (0), ``EXACT`` (1, reason
    ``dedup.exact``) or ``NEAR`` (2, ``dedup.near``). Exact duplicates are removed first; near
    duplicates are searched among the remaining documents (see the module docstring). The
    ``clean`` stage makes the same decisions over ranks (``band_records`` on each rank,
    ``bucket_step`` per hash range, ``confirm``, ``greedy``).
    """
    use_exact = cfg.exact and keys is not None
    use_near = cfg.near and signatures is not None
    n = None
    if keys is not None:
        n = len(keys)
    if signatures is not None:
        if signatures.ndim != 2:
            raise ValueError(f"signatures must be 2-D (n, num_perm), got shape {signatures.shape}")
        if n is not None and len(signatures) != n:
            raise ValueError(f"{n} exact keys but {len(signatures)} signatures")
        n = len(signatures)
    n = n or 0
    key_mat = _as_key_matrix(keys) if keys is not None else None  # checks the keys even when exact is off
    dup_of = np.full(n, -1, dtype=np.int64)
    kind = np.zeros(n, dtype=np.int8)
    if n == 0 or not (use_exact or use_near):
        return dup_of, kind
    records = band_records(signatures if use_near else None, key_mat if use_exact else None,
                           np.arange(n, dtype=np.int64), cfg)
    exact, pairs = bucket_step(records, use_near)
    dup_of[exact["l"]] = exact["e"]
    kind[exact["l"]] = EXACT
    if len(pairs):
        assert signatures is not None
        ok = confirm(signatures[pairs["l"]], signatures[pairs["e"]], min_agree(cfg, signatures.shape[1]))
        near = greedy(pairs[ok])
        dup_of[near["l"]] = near["e"]
        kind[near["l"]] = NEAR
    return dup_of, kind
