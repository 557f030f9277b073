"""Packing: documents -> token ids -> fixed-length blocks in train / val shards.

One :class:`Packer` per rank. Each document goes to ``val`` or ``train`` by a stable hash of
its id (so the split does not depend on the number of ranks or on batch boundaries), is
tokenized with the fast tokenizer (no special tokens from the tokenizer itself), framed with
BOS / EOS ids, and appended to that split's running token stream; every full ``seq_len``
block goes to the split's :class:`~pipeline.data.shards.ShardWriter`. What is left at the end
(shorter than one block) is dropped and counted.

Tokenization dominates the cost; the rest works on whole numpy arrays per batch (no per-token
Python code beyond handing the tokenizer's id lists to numpy).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from itertools import chain
from typing import Any

import fsspec
import numpy as np
from pydantic import Field
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
    seed: int = 0


SPLITS = ("train", "val")
_HASH_SCALE = float(2**64)


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
        self.writers: dict[str, ShardWriter] = {}
        self._tail: dict[str, np.ndarray] = {}
        self.documents: dict[str, int] = {}
        self.empty_documents: dict[str, int] = {}
        self.doc_tokens: dict[str, int] = {}  # the documents' own tokens, without BOS/EOS
        self.stream_tokens: dict[str, int] = {}  # with BOS/EOS: what was packed (blocks + dropped tail)
        self.doc_bytes: dict[str, int] = {}  # UTF-8 bytes of the documents' text (bits per byte)
        for split in SPLITS:
            self._open(split)
        self._encode = getattr(tokenizer, "encode_batch_fast", None) or tokenizer.encode_batch
        self._closed: dict[str, Any] | None = None

    def _open(self, split: str) -> None:
        if split in self.writers:
            return
        self.writers[split] = ShardWriter(self.fs, self.dirpath, split, self.rank, self.seq_len, self.dtype,
                                          self.cfg.blocks_per_shard)
        self._tail[split] = np.zeros(0, dtype=self.dtype)
        for counter in (self.documents, self.empty_documents, self.doc_tokens, self.stream_tokens, self.doc_bytes):
            counter[split] = 0

    # ---------------------------------------------------------------------------- feeding
    def add(self, ids: list[str], texts: list[str], langs: list[str | None] | None = None) -> None:
        """Pack one batch of documents (``ids[i]`` names ``texts[i]``, in language ``langs[i]``: with
        ``val_by_language``, a validation document also goes to split ``val_<lang>``)."""
        if self._closed is not None:
            raise ValueError("add() after close()")
        if len(ids) != len(texts) or (langs is not None and len(langs) != len(texts)):
            raise ValueError(f"{len(ids)} ids for {len(texts)} texts" + (f" and {len(langs)} languages" if langs else ""))
        if not texts:
            return
        cfg = self.cfg
        encodings = self._encode(list(texts), add_special_tokens=False)
        id_lists = [e.ids for e in encodings]
        nbytes = [len(t.encode("utf-8")) for t in texts]
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
                id_lists = [lst for lst, v in zip(id_lists, val) if not v]
                nbytes = [b for b, v in zip(nbytes, val) if not v]
        self._append("train", id_lists, nbytes)

    def _append(self, split: str, id_lists: list[list[int]], nbytes: list[int] | None = None) -> None:
        if not id_lists:
            return
        self.doc_bytes[split] += sum(nbytes or [])
        n = len(id_lists)
        lengths = np.fromiter(map(len, id_lists), dtype=np.int64, count=n)
        empty = int(np.count_nonzero(lengths == 0))
        self.documents[split] += n
        self.empty_documents[split] += empty
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
        tail = self._tail[split]
        stream = np.empty(len(tail) + framed, dtype=self.dtype)
        stream[: len(tail)] = tail
        try:
            stream[len(tail) :] = np.fromiter(chain.from_iterable(pieces), dtype=self.dtype, count=framed)
        except OverflowError:
            raise ValueError(f"a token id does not fit {self.dtype} (vocab_size {self.vocab_size})") from None
        body = stream[len(tail) :]
        if body.size and int(body.max()) >= self.vocab_size:
            raise ValueError(f"token id {int(body.max())} >= vocab_size {self.vocab_size}")
        self.doc_tokens[split] += doc_tokens
        self.stream_tokens[split] += framed
        full = len(stream) // self.seq_len
        if full:
            self.writers[split].write_blocks(stream[: full * self.seq_len].reshape(full, self.seq_len))
        self._tail[split] = stream[full * self.seq_len :].copy()

    # ---------------------------------------------------------------------------- finishing
    def close(self) -> dict[str, Any]:
        """Finish the shards; returns the per-split statistics (JSON-serialisable).

        ``shards`` maps split -> list of shard dicts (``file`` relative to ``dirpath``,
        ``blocks``, ``bytes``, ``sha256``); ``dropped_tail_tokens`` counts the stream tokens
        (BOS/EOS included) after the last full block, which are not written."""
        if self._closed is not None:
            return self._closed
        infos: dict[str, list[ShardInfo]] = {s: w.close() for s, w in self.writers.items()}
        blocks = {s: sum(i.blocks for i in infos[s]) for s in infos}
        self._closed = {
            "rank": self.rank,
            "seq_len": self.seq_len,
            "dtype": np.dtype(self.dtype).name,
            "vocab_size": self.vocab_size,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "framing": self.framing,
            "documents": dict(self.documents),
            "empty_documents": dict(self.empty_documents),
            "document_tokens": dict(self.doc_tokens),
            "stream_tokens": dict(self.stream_tokens),
            "document_bytes": dict(self.doc_bytes),
            "blocks": blocks,
            "tokens": {s: blocks[s] * self.seq_len for s in infos},
            "dropped_tail_tokens": {s: int(len(self._tail[s])) for s in infos},
            "shards": {s: [i.to_dict() for i in infos[s]] for s in infos},
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
    special tokens frame each document) is the given one, else the parts' when they all agree."""
    splits: dict[str, dict[str, Any]] = {s: {"shards": [], **{k: 0 for k in _SUMMED}} for s in SPLITS}
    for part in parts:
        is_index = from_indexes if from_indexes is not None else "splits" in part
        if part.get("seq_len", seq_len) != seq_len:
            raise ValueError(f"part has seq_len {part.get('seq_len')}, expected {seq_len}")
        if is_index:
            per_split = {name: (sp.get("shards", []), sp) for name, sp in part["splits"].items()}
        else:
            names = set(part.get("shards", {}))
            per_split = {name: (part["shards"].get(name, []), {k: part.get(k, {}).get(name, 0) for k in _SUMMED})
                         for name in names}
        for name, (shards, counters) in per_split.items():
            entry = splits.setdefault(name, {"shards": [], **{k: 0 for k in _SUMMED}})
            entry["shards"].extend(
                {"file": s["file"], "blocks": int(s["blocks"]), "bytes": int(s["bytes"]), "sha256": s["sha256"]}
                for s in (x.to_dict() if isinstance(x, ShardInfo) else x for x in shards)
            )
            for k in _SUMMED:
                entry[k] += int(counters.get(k, 0) or 0)
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
