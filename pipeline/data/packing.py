"""Packing: documents -> token ids -> fixed-length blocks in train / val shards.

One :class:`Packer` per rank. Each document goes to ``val`` or ``train`` by a stable hash of
its id (so the split does not depend on the number of ranks or on batch boundaries), is
tokenized with the fast tokenizer (no special tokens from the tokenizer itself), framed with
BOS / EOS ids, and appended to that split's running token stream; every full ``seq_len``
block goes to the split's :class:`~pipeline.data.shards.ShardWriter`. What is left at the end
(shorter than one block) is dropped and counted.

With ``stream_by`` (default: language and source) a training document goes to the token stream of its
*stream*, e.g. ``kk/kk-web`` (its ``lang``, then its ``source``), which has its own blocks, shards and tail: every
training block then holds documents of one language and source, and the index records each stream's block range
(:mod:`pipeline.data.shards`, version 2), which is what pretraining's per-phase ``mix`` weights. The price is one
dropped tail (< ``seq_len`` tokens) per stream and rank instead of one per rank.

Tokenization dominates the cost; the rest works on whole numpy arrays per batch (no per-token
Python code beyond handing the tokenizer's id lists to numpy).
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from itertools import chain
from typing import Any, Literal

import fsspec
import numpy as np
from pydantic import Field, field_validator
from tokenizers import Tokenizer

from pipeline.config import StrictModel
from pipeline.data.shards import ShardInfo, ShardWriter, dtype_for_vocab, new_index


class PackingConfig(StrictModel):
    """How documents become fixed-length blocks (the pack stage's config adds where they come from and go)."""

    seq_len: int = Field(2048, ge=32, le=8192, description="tokens per block")
    val_fraction: float = Field(0.01, ge=0, lt=1, description="share of documents routed to validation (by id hash)")
    blocks_per_shard: int = Field(8192, ge=1)
    add_bos: bool = True
    add_eos: bool = True
    val_by_language: bool = Field(True, description="also write each language's validation documents as split "
                                                    "val_<lang> (pretraining reports loss and bits per byte per "
                                                    "language); ~val_fraction more storage")
    stream_by: list[Literal["lang", "source"]] = Field(
        ["lang", "source"], description="pack the training documents of each language and/or source (the clean "
        "documents' lang and source columns) into blocks of their own, one stream each (e.g. kk/kk-web), recorded in "
        "index.json: what pretrain's per-phase `mix` weights; [] mixes every document into one stream (the layout "
        "before streams; a phase over it cannot have a mix)")
    seed: int = 0

    @field_validator("stream_by")
    @classmethod
    def _stream_by(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"names a column twice: {v}")
        return [c for c in ("lang", "source") if c in v]  # one order: the stream name is lang/source


SPLITS = ("train", "val")
_HASH_SCALE = float(2**64)


UNKNOWN = "unknown"  # the stream label of a document without a language / source (clean's word for it)


def stream_name(lang: str | None, source: str | None) -> str:
    """A stream's name: its language, then its source, those it was packed by (``kk/kk-web``, ``kk``, ``kk-web``)."""
    return "/".join(v for v in (lang, source) if v is not None)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name.replace("/", "."))


def route_to_val(doc_id: str, val_fraction: float, seed: int = 0) -> bool:
    """True when document ``doc_id`` belongs to validation: a stable hash of (seed, id) in [0, 1)."""
    if val_fraction <= 0:
        return False
    h = hashlib.blake2b(f"{seed}\x1f{doc_id}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(h, "little") / _HASH_SCALE < val_fraction


class Packer:
    """Tokenize, frame, concatenate and cut blocks for one rank; see the module docstring."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        cfg: PackingConfig,
        fs: fsspec.AbstractFileSystem,
        dirpath: str,
        rank: int,
        *,
        bos_id: int | None,
        eos_id: int | None,
        vocab_size: int,
    ):
        if cfg.add_bos and bos_id is None:
            raise ValueError("add_bos is set but the tokenizer has no bos id")
        if cfg.add_eos and eos_id is None:
            raise ValueError("add_eos is set but the tokenizer has no eos id")
        self.tokenizer, self.cfg, self.fs, self.dirpath, self.rank = tokenizer, cfg, fs, dirpath, rank
        self.vocab_size = int(vocab_size)
        self.bos_id, self.eos_id = bos_id, eos_id
        self.dtype = dtype_for_vocab(self.vocab_size)
        for name, tid in (("bos", bos_id), ("eos", eos_id)):
            if tid is not None and not 0 <= tid < self.vocab_size:
                raise ValueError(f"{name} id {tid} is outside the vocabulary (size {self.vocab_size})")
        self._pre = [bos_id] if cfg.add_bos else []
        self._post = [eos_id] if cfg.add_eos else []
        self.framing = [name for name, on in (("bos", cfg.add_bos), ("eos", cfg.add_eos)) if on]
        self.seq_len = cfg.seq_len
        # one token stream per key: a split ("train", "val", "val_<lang>"), or a training stream ("train/<stream>")
        self.writers: dict[str, ShardWriter] = {}
        self._tail: dict[str, np.ndarray] = {}
        self.documents: dict[str, int] = {}
        self.empty_documents: dict[str, int] = {}
        self.doc_tokens: dict[str, int] = {}  # the documents' own tokens, without BOS/EOS
        self.stream_tokens: dict[str, int] = {}  # with BOS/EOS: what was packed (blocks + dropped tail)
        self.doc_bytes: dict[str, int] = {}  # UTF-8 bytes of the documents' text (bits per byte)
        self.streams: dict[str, dict[str, str | None]] = {}  # training stream -> its lang and source
        self._stream_dims: tuple[str, ...] | None = None  # the columns training streams are cut by, once known
        self._slugs: set[str] = set()
        for split in SPLITS:
            self._open(split)
        self._encode = getattr(tokenizer, "encode_batch_fast", None) or tokenizer.encode_batch
        self._closed: dict[str, Any] | None = None

    def _open(self, key: str, file_prefix: str | None = None) -> None:
        if key in self.writers:
            return
        self.writers[key] = ShardWriter(self.fs, self.dirpath, file_prefix or key, self.rank, self.seq_len, self.dtype,
                                        self.cfg.blocks_per_shard)
        self._tail[key] = np.zeros(0, dtype=self.dtype)
        for counter in (self.documents, self.empty_documents, self.doc_tokens, self.stream_tokens, self.doc_bytes):
            counter[key] = 0

    def _stream_key(self, lang: str | None, source: str | None) -> str:
        name = stream_name(lang, source)
        key = f"train/{name}"
        if key not in self.writers:
            slug = _slug(name)
            while f"train.{slug}" in self._slugs:  # two names with one file-safe spelling
                slug += "_"
            self._slugs.add(f"train.{slug}")
            self.streams[name] = {"lang": lang, "source": source}
            self._open(key, f"train.{slug}")
        return key

    # ---------------------------------------------------------------------------- feeding
    def add(self, ids: list[str], texts: list[str], langs: list[str | None] | None = None,
            sources: list[str | None] | None = None) -> None:
        """Pack one batch of documents (``ids[i]`` names ``texts[i]``, in language ``langs[i]``, from source
        ``sources[i]``): with ``val_by_language``, a validation document also goes to split ``val_<lang>``; with
        ``stream_by``, a training document goes to the stream of its language and/or source (those of the two
        given: every batch of one Packer must give the same ones)."""
        if self._closed is not None:
            raise ValueError("add() after close()")
        for what, col in (("languages", langs), ("sources", sources)):
            if col is not None and len(col) != len(texts):
                raise ValueError(f"{len(ids)} ids for {len(texts)} texts and {len(col)} {what}")
        if len(ids) != len(texts):
            raise ValueError(f"{len(ids)} ids for {len(texts)} texts")
        if not texts:
            return
        cfg = self.cfg
        encodings = self._encode(list(texts), add_special_tokens=False)
        id_lists = [e.ids for e in encodings]
        nbytes = [len(t.encode("utf-8")) for t in texts]
        train = list(range(len(texts)))
        if cfg.val_fraction > 0:
            val = [route_to_val(str(d), cfg.val_fraction, cfg.seed) for d in ids]
            if any(val):
                self._append("val", [lst for lst, v in zip(id_lists, val) if v], [b for b, v in zip(nbytes, val) if v])
                if langs is not None and cfg.val_by_language:
                    for lang in sorted({str(g) for g, v in zip(langs, val) if v and g}):
                        pick = [v and g == lang for g, v in zip(langs, val)]
                        split = f"val_{lang}"
                        self._open(split)
                        self._append(split, [lst for lst, k in zip(id_lists, pick) if k],
                                     [b for b, k in zip(nbytes, pick) if k])
                train = [i for i, v in enumerate(val) if not v]
        dims = tuple(d for d, col in (("lang", langs), ("source", sources)) if d in cfg.stream_by and col is not None)
        if self._stream_dims is None:
            self._stream_dims = dims
        elif dims != self._stream_dims:
            raise ValueError(f"this batch gives streams by {list(dims)}, earlier ones by {list(self._stream_dims)}: "
                             "give the same columns with every batch")
        if not dims:
            self._append("train", [id_lists[i] for i in train], [nbytes[i] for i in train])
            return
        groups: dict[str, list[int]] = {}
        for i in train:
            lang = (str(langs[i]) if langs[i] else UNKNOWN) if "lang" in dims else None  # type: ignore[index]
            source = (str(sources[i]) if sources[i] else UNKNOWN) if "source" in dims else None  # type: ignore[index]
            groups.setdefault(self._stream_key(lang, source), []).append(i)
        for key, members in groups.items():
            self._append(key, [id_lists[i] for i in members], [nbytes[i] for i in members])

    def _append(self, key: str, id_lists: list[list[int]], nbytes: list[int] | None = None) -> None:
        if not id_lists:
            return
        self.doc_bytes[key] += sum(nbytes or [])
        n = len(id_lists)
        lengths = np.fromiter(map(len, id_lists), dtype=np.int64, count=n)
        empty = int(np.count_nonzero(lengths == 0))
        self.documents[key] += n
        self.empty_documents[key] += empty
        if empty == n:
            return
        doc_tokens = int(lengths.sum())
        frame = len(self._pre) + len(self._post)
        framed = doc_tokens + frame * (n - empty)
        pre, post = self._pre, self._post
        if frame:
            pieces = [p for lst in id_lists if lst for p in (pre, lst, post)]
        else:
            pieces = id_lists
        tail = self._tail[key]
        stream = np.empty(len(tail) + framed, dtype=self.dtype)
        stream[: len(tail)] = tail
        try:
            stream[len(tail) :] = np.fromiter(chain.from_iterable(pieces), dtype=self.dtype, count=framed)
        except OverflowError:
            raise ValueError(f"a token id does not fit {self.dtype} (vocab_size {self.vocab_size})") from None
        body = stream[len(tail) :]
        if body.size and int(body.max()) >= self.vocab_size:
            raise ValueError(f"token id {int(body.max())} >= vocab_size {self.vocab_size}")
        self.doc_tokens[key] += doc_tokens
        self.stream_tokens[key] += framed
        full = len(stream) // self.seq_len
        if full:
            self.writers[key].write_blocks(stream[: full * self.seq_len].reshape(full, self.seq_len))
        self._tail[key] = stream[full * self.seq_len :].copy()

    # ---------------------------------------------------------------------------- finishing
    def close(self) -> dict[str, Any]:
        """Finish the shards; returns the per-split statistics (JSON-serialisable).

        ``shards`` maps split -> list of shard dicts (``file`` relative to ``dirpath``,
        ``blocks``, ``bytes``, ``sha256``; ``stream`` for a training stream's); ``dropped_tail_tokens`` counts the
        stream tokens (BOS/EOS included) after the last full block, which are not written. With training streams,
        ``streams`` maps ``"train"`` -> stream -> its ``lang``, ``source`` and the same counters."""
        if self._closed is not None:
            return self._closed
        infos: dict[str, list[ShardInfo]] = {k: w.close() for k, w in self.writers.items()}
        counters = {"documents": self.documents, "empty_documents": self.empty_documents,
                    "document_tokens": self.doc_tokens, "stream_tokens": self.stream_tokens,
                    "document_bytes": self.doc_bytes}
        keys = {k: k for k in infos if not k.startswith("train/")}
        per_split: dict[str, dict[str, Any]] = {
            k: {"shards": [i.to_dict() for i in infos[k]], "blocks": sum(i.blocks for i in infos[k]),
                "dropped_tail_tokens": int(len(self._tail[k])), **{c: v[k] for c, v in counters.items()}}
            for k in keys}
        streams: dict[str, dict[str, Any]] = {}
        for name in sorted(self.streams):
            key = f"train/{name}"
            blocks = sum(i.blocks for i in infos[key])
            entry = {**self.streams[name], **{c: v[key] for c, v in counters.items()}, "blocks": blocks,
                     "tokens": blocks * self.seq_len, "dropped_tail_tokens": int(len(self._tail[key]))}
            streams[name] = entry
            train = per_split["train"]
            train["shards"] += [{**i.to_dict(), "stream": name} for i in infos[key]]
            for c in (*counters, "blocks", "dropped_tail_tokens"):
                train[c] += entry[c]
        self._closed = {
            "rank": self.rank,
            "seq_len": self.seq_len,
            "dtype": np.dtype(self.dtype).name,
            "vocab_size": self.vocab_size,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "framing": self.framing,
            **{c: {s: per_split[s][c] for s in per_split} for c in counters},
            "blocks": {s: per_split[s]["blocks"] for s in per_split},
            "tokens": {s: per_split[s]["blocks"] * self.seq_len for s in per_split},
            "dropped_tail_tokens": {s: per_split[s]["dropped_tail_tokens"] for s in per_split},
            "shards": {s: per_split[s]["shards"] for s in per_split},
            **({"streams": {"train": streams}} if streams else {}),
        }
        return self._closed

    def abort(self) -> None:
        for w in self.writers.values():
            w.abort()


# ------------------------------------------------------------------------------------ merge

_SUMMED = ("documents", "empty_documents", "document_tokens", "stream_tokens", "document_bytes", "dropped_tail_tokens")


def merge_indexes(
    parts: list[dict[str, Any]],
    *,
    seq_len: int,
    vocab_size: int,
    bos_id: int | None,
    eos_id: int | None,
    from_indexes: bool | None = None,
    framing: list[str] | None = None,
) -> dict[str, Any]:
    """One index from per-rank results, shards in the order of ``parts`` (rank order).

    ``parts`` are either :meth:`Packer.close` statistics or indexes (as written for each rank
    part); ``from_indexes`` says which, and is detected when left ``None``. Per-split counters
    (documents, dropped tail tokens, ...) are summed; ``blocks``/``tokens`` are recomputed from
    the shard lists. Shard file names must be unique across parts (they carry the rank). ``framing`` (which
    special tokens frame each document) is the given one, else the parts' when they all agree. Training streams
    (``stream_by``) are merged by name: counters summed, each stream's shards in part order, streams in name order
    (:func:`~pipeline.data.shards.new_index` computes their block ranges)."""
    splits: dict[str, dict[str, Any]] = {s: {"shards": [], **{k: 0 for k in _SUMMED}} for s in SPLITS}
    for part in parts:
        is_index = from_indexes if from_indexes is not None else "splits" in part
        if part.get("seq_len", seq_len) != seq_len:
            raise ValueError(f"part has seq_len {part.get('seq_len')}, expected {seq_len}")
        if is_index:
            per_split = {name: (sp.get("shards", []), sp, sp.get("streams")) for name, sp in part["splits"].items()}
        else:
            names = set(part.get("shards", {}))
            per_split = {name: (part["shards"].get(name, []), {k: part.get(k, {}).get(name, 0) for k in _SUMMED},
                                part.get("streams", {}).get(name)) for name in names}
        for name, (shards, counters, streams) in per_split.items():
            entry = splits.setdefault(name, {"shards": [], **{k: 0 for k in _SUMMED}})
            for s in (x.to_dict() if isinstance(x, ShardInfo) else x for x in shards):
                shard = {"file": s["file"], "blocks": int(s["blocks"]), "bytes": int(s["bytes"]), "sha256": s["sha256"]}
                if s.get("stream") is not None:
                    shard["stream"] = s["stream"]
                entry["shards"].append(shard)
            for k in _SUMMED:
                entry[k] += int(counters.get(k, 0) or 0)
            for sname, st in (streams or {}).items():  # the same stream of every part: its counters add up
                acc = entry.setdefault("streams", {}).setdefault(
                    sname, {"lang": st.get("lang"), "source": st.get("source"), **{k: 0 for k in _SUMMED}})
                if (acc["lang"], acc["source"]) != (st.get("lang"), st.get("source")):
                    raise ValueError(f"stream {sname!r} has language / source {acc['lang']!r} / {acc['source']!r} in "
                                     f"one part and {st.get('lang')!r} / {st.get('source')!r} in another")
                for k in _SUMMED:
                    acc[k] += int(st.get(k, 0) or 0)
    counts = Counter(s["file"] for sp in splits.values() for s in sp["shards"])
    dupes = sorted(f for f, c in counts.items() if c > 1)
    if dupes:
        raise ValueError(f"shard names repeat across parts: {', '.join(dupes[:5])}")
    if framing is None:
        found = {tuple(p["framing"]) if p.get("framing") is not None else None for p in parts}
        if len(found) > 1:
            raise ValueError(f"parts were framed differently ({sorted(map(str, found))}): pack them with one config")
        framing = list(found.pop()) if found and None not in found else None
    return new_index(seq_len=seq_len, vocab_size=vocab_size, bos_id=bos_id, eos_id=eos_id, splits=splits,
                     framing=framing)
