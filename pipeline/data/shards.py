"""Token shards: the on-storage format of packed training data and its writer (the training reader,
which needs torch, is :mod:`pipeline.data.packed`; this module stays light for the pack stage).

Format (versions 1 and 2)
-------------------------
A shard is a raw little-endian array of token ids of shape ``(blocks, seq_len)``; the dtype is
``uint16`` when every id fits (``vocab_size <= 65535``), else ``uint32``. Shards are named
``{split}-{rank:05d}-{n:05d}.bin`` and live flat in one folder next to ``index.json``::

    {
      "format": "llmpipe-token-shards", "version": 1,
      "seq_len": 2048, "dtype": "uint16", "byteorder": "little",
      "vocab_size": 32000, "bos_id": 1, "eos_id": 2, "framing": ["bos", "eos"],
      "splits": {
        "train": {"blocks": 123, "tokens": 251904, "documents": 40, "dropped_tail_tokens": 17,
                  "shards": [{"file": "train-00000-00000.bin", "blocks": 100, "bytes": 409600,
                              "sha256": "..."}, ...]},
        "val": {...}
      }
    }

``framing`` names the special tokens that frame every document in the blocks (``bos`` before it, ``eos``
after it; absent in indexes written before the field): pretraining's document masking finds document starts
with it. The order of ``shards`` is the order of the split: block ``i`` of the split (its stable
``sample_id``) is found by walking the shard list, so nothing per block is stored.

Version 2 adds *streams* to a split (pack's ``stream_by``: each language and/or source packed into blocks of its
own, so every block holds documents of one stream only; pretraining mixes the streams with per-phase weights).
Each shard of such a split names its ``stream``; the shards of one stream are contiguous, streams in sorted name
order, and ``streams`` gives each one's block range ``[start, start + blocks)`` of the split and its counters::

    "train": {"blocks": 300, ..., "shards": [{"file": "train.kk.kk-web-00000-00000.bin", "stream": "kk/kk-web", ...}, ...],
              "streams": {"kk/kk-web": {"lang": "kk", "source": "kk-web", "start": 0, "blocks": 120, "tokens": 491520,
                                        "documents": 80, ...},
                          "ru/ru-web": {"lang": "ru", "source": "ru-web", "start": 120, "blocks": 180, ...}}}

A split without ``streams`` (every version 1 index, and version 2 packed with ``stream_by: []``) mixes documents of
every language and source in its blocks. An index is written as version 1 when no split has streams, so readers of
version 1 keep reading those; this code reads both.

Everything goes through an ``fsspec`` filesystem and a path inside it: a local folder (a PVC
mount on a cluster) or an ``s3://`` prefix.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import fsspec
import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from pipeline.errors import CorruptShardError, InputError
from pipeline.storage import sha256_file

FORMAT = "llmpipe-token-shards"
FORMAT_VERSION = 2  # what this code writes when a split has streams (else 1: the same JSON as before streams)
READ_VERSIONS = (1, 2)
INDEX = "index.json"
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}


# ------------------------------------------------------------------------------------ basics


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """The smallest id dtype (little-endian) holding ids ``0 .. vocab_size - 1``."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    if vocab_size <= 65535:
        return DTYPES["uint16"]
    if vocab_size <= 2**32 - 1:
        return DTYPES["uint32"]
    raise ValueError(f"vocab_size {vocab_size} does not fit uint32 token ids")


def dtype_name(dtype: np.dtype | str) -> str:
    dt = np.dtype(dtype)
    for name, known in DTYPES.items():
        if dt.newbyteorder("<") == known:
            return name
    raise ValueError(f"unsupported shard dtype {dt}; use uint16 or uint32")


def shard_name(split: str, rank: int, n: int) -> str:
    return f"{split}-{rank:05d}-{n:05d}.bin"


def is_local_fs(fs: fsspec.AbstractFileSystem) -> bool:
    proto = fs.protocol
    return "file" in (proto if isinstance(proto, (tuple, list)) else (proto,))


def display_path(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A path as the user would write it (``s3://bucket/key`` rather than ``bucket/key``)."""
    if is_local_fs(fs):
        return path
    try:
        return fs.unstrip_protocol(path)
    except Exception:  # noqa: BLE001 - only for messages
        return path


# ------------------------------------------------------------------------------- index model
#
# One definition of ``index.json`` for the writer (new_index / write_index / ShardWriter) and the
# reader (read_index): pydantic models, strict (JSON types, no coercion) and closed (unknown keys
# are errors). Values that are absent on disk stay absent when dumped (``exclude_unset``), so an
# index reads back, and is rewritten, with the same keys and values.


class _IndexModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object as stored (keys that were never given are left out)."""
        return self.model_dump(exclude_unset=True)


class ShardInfo(_IndexModel):
    """One shard of a split: its file (relative to the shard folder), blocks, bytes and sha256."""

    file: str
    blocks: int
    bytes: int
    sha256: str
    stream: str | None = None  # version 2: the stream (language / source) of every block in the shard

    @field_validator("file")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        if "/" in v or v in ("", ".", ".."):
            raise ValueError(f"{v!r} must be a plain file name")
        return v


class StreamIndex(_IndexModel):
    """One stream of a split (version 2): what its documents share, its block range and the packer's counters."""

    lang: str | None = None  # None: the split was not packed by language
    source: str | None = None  # None: nor by source
    start: int  # first block of the stream in the split
    blocks: int
    tokens: int | None = None
    documents: int | None = None
    empty_documents: int | None = None
    document_tokens: int | None = None
    stream_tokens: int | None = None
    document_bytes: int | None = None
    dropped_tail_tokens: int | None = None


class SplitIndex(_IndexModel):
    """One split: its shards in order, totals, the packer's per-split counters, and (version 2) its streams."""

    shards: list[ShardInfo]
    blocks: int | None = None
    tokens: int | None = None
    documents: int | None = None
    empty_documents: int | None = None
    document_tokens: int | None = None
    stream_tokens: int | None = None
    document_bytes: int | None = None  # UTF-8 bytes of the documents' text: bits per byte = loss x tokens / bytes
    dropped_tail_tokens: int | None = None
    streams: dict[str, StreamIndex] | None = None

    @model_validator(mode="after")
    def _blocks_add_up(self) -> "SplitIndex":
        total = sum(s.blocks for s in self.shards)
        if self.blocks is not None and self.blocks != total:
            raise ValueError(f"blocks {self.blocks} != sum over its shards {total}")
        if self.streams is None:
            labelled = next((s for s in self.shards if s.stream is not None), None)
            if labelled is not None:
                raise ValueError(f"shard {labelled.file} names stream {labelled.stream!r} but the split lists no streams")
            return self
        # the shards of each stream are contiguous and its range is where they are
        ranges: dict[str, list[int]] = {}
        pos, last = 0, None
        for s in self.shards:
            if s.stream not in self.streams:
                raise ValueError(f"shard {s.file} names stream {s.stream!r}, which is not in streams "
                                 f"({', '.join(sorted(self.streams)) or 'none'})")
            if s.stream != last:
                if s.stream in ranges:
                    raise ValueError(f"the shards of stream {s.stream!r} are not contiguous ({s.file})")
                ranges[s.stream] = [pos, 0]
                last = s.stream
            ranges[s.stream][1] += s.blocks
            pos += s.blocks
        for name, st in self.streams.items():
            start, blocks = ranges.get(name, [st.start, 0])
            if (st.start, st.blocks) != (start, blocks):
                raise ValueError(f"stream {name!r} lists blocks [{st.start}, {st.start + st.blocks}) but its shards "
                                 f"hold [{start}, {start + blocks})")
        return self


class ShardIndex(_IndexModel):
    """``index.json`` of a shard folder (see the module docstring)."""

    format: Literal["llmpipe-token-shards"]
    version: Literal[1, 2]
    seq_len: int
    dtype: Literal["uint16", "uint32"]
    byteorder: Literal["little"] = "little"
    vocab_size: int
    bos_id: int | None = None
    eos_id: int | None = None
    framing: list[Literal["bos", "eos"]] | None = None  # None: unknown (an index older than the field)
    splits: dict[str, SplitIndex]

    @model_validator(mode="before")
    @classmethod
    def _format_and_version(cls, data: Any) -> Any:
        # checked before any field: another format or version may have other fields altogether
        if isinstance(data, ShardIndex):
            return data
        if not isinstance(data, dict):
            raise ValueError("expected a JSON object")
        if data.get("format") != FORMAT:
            raise ValueError(f"format is {data.get('format')!r}, expected {FORMAT!r}")
        if data.get("version") not in READ_VERSIONS:
            raise ValueError(f"format version {data.get('version')!r} is not supported "
                             f"(this code reads versions {', '.join(map(str, READ_VERSIONS))})")
        return data

    @field_validator("seq_len", "vocab_size", mode="before")
    @classmethod
    def _positive(cls, v: Any) -> Any:
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"must be a positive integer, got {v!r}")
        return v

    @model_validator(mode="after")
    def _sizes_fit(self) -> "ShardIndex":
        dtype = DTYPES[self.dtype]
        if np.iinfo(dtype).max < self.vocab_size - 1:
            raise ValueError(f"dtype {self.dtype} cannot hold vocab_size {self.vocab_size}")
        block_bytes = self.seq_len * dtype.itemsize
        for name, split in self.splits.items():
            if split.streams is not None and self.version < 2:
                raise ValueError(f"split {name!r} has streams, which need format version 2 (the index says "
                                 f"{self.version})")
            for s in split.shards:
                if s.bytes != s.blocks * block_bytes:
                    raise ValueError(f"split {name!r}: {s.file} lists {s.bytes} bytes but {s.blocks} blocks of "
                                     f"{self.seq_len} x {self.dtype} are {s.blocks * block_bytes} bytes")
        return self


def _loc(loc: tuple[Any, ...]) -> tuple[str, str]:
    """A pydantic error location as the user reads it: ``("split 'train'", "shards[0].file")``."""
    parts = list(loc)
    head = ""
    if len(parts) >= 2 and parts[0] == "splits":
        head, parts = f"split {parts[1]!r}", parts[2:]
    tail = ""
    for p in parts:
        tail += f"[{p}]" if isinstance(p, int) else (f".{p}" if tail else str(p))
    return head, tail


def _one_line(exc: ValidationError) -> str:
    """The first problem of a ValidationError as one line (pydantic's own text spans several)."""
    errors = exc.errors(include_url=False)
    e = errors[0]
    head, tail = _loc(e["loc"])
    if e["type"] == "value_error":  # our validators; a field's message follows its name
        problem = f"{tail} {e['ctx']['error']}" if tail else str(e["ctx"]["error"])
    elif e["type"] == "missing":
        problem = f"{tail} is missing"
    elif e["type"] == "extra_forbidden":
        problem = f"unknown key {tail!r} (value {e['input']!r})"
    else:
        msg = f"{e['msg'][:1].lower()}{e['msg'][1:]}, got {e['input']!r}"
        problem = f"{tail}: {msg}" if tail else msg
    line = f"{head}: {problem}" if head else problem
    more = len(errors) - 1
    return line + (f" (and {more} more problem(s))" if more else "")


def parse_index(index: Any, where: str) -> ShardIndex:
    """Validate an index (a JSON object or a :class:`ShardIndex`); :class:`InputError` ``"{where}: ..."``."""
    try:
        return ShardIndex.model_validate(index)
    except ValidationError as exc:
        raise InputError(f"{where}: {_one_line(exc)}") from None


# ------------------------------------------------------------------------------------ writer


class ShardWriter:
    """Streams ``(k, seq_len)`` blocks into consecutive shard files of ``blocks_per_shard`` blocks.

    The sha256 and size of each shard are computed from the bytes as they are written, so the
    shards never need to be read back. Files are named ``{split}-{rank:05d}-{n:05d}.bin``
    directly under ``dirpath``; atomicity of the folder as a whole is the caller's business
    (stages write into a temporary output folder that is committed at the end).
    """

    def __init__(
        self,
        fs: fsspec.AbstractFileSystem,
        dirpath: str,
        split: str,
        rank: int,
        seq_len: int,
        dtype: np.dtype,
        blocks_per_shard: int,
    ):
        if seq_len < 1 or blocks_per_shard < 1:
            raise ValueError("seq_len and blocks_per_shard must be >= 1")
        self.fs, self.dirpath, self.split, self.rank = fs, dirpath.rstrip("/"), split, rank
        self.seq_len, self.blocks_per_shard = seq_len, blocks_per_shard
        self.dtype = DTYPES[dtype_name(dtype)]
        self._max_id = int(np.iinfo(self.dtype).max)
        self._infos: list[ShardInfo] = []
        self._fh: Any = None
        self._hash: Any = None
        self._blocks = 0
        self._bytes = 0
        self._closed = False
        if is_local_fs(fs):
            fs.makedirs(self.dirpath, exist_ok=True)

    @property
    def blocks_written(self) -> int:
        return sum(i.blocks for i in self._infos) + self._blocks

    def write_blocks(self, blocks: np.ndarray) -> None:
        if self._closed:
            raise ValueError("write_blocks on a closed ShardWriter")
        blocks = np.asarray(blocks)
        if blocks.ndim != 2 or blocks.shape[1] != self.seq_len:
            raise ValueError(f"expected blocks of shape (k, {self.seq_len}), got {blocks.shape}")
        if blocks.shape[0] == 0:
            return
        if blocks.dtype != self.dtype:
            if blocks.dtype.kind not in "iu":
                raise ValueError(f"token blocks must be integers, got {blocks.dtype}")
            if blocks.dtype.itemsize > self.dtype.itemsize or blocks.dtype.kind == "i":
                lo, hi = int(blocks.min()), int(blocks.max())
                if lo < 0 or hi > self._max_id:
                    raise ValueError(f"token id {hi if hi > self._max_id else lo} does not fit shard dtype {self.dtype}")
            blocks = blocks.astype(self.dtype)
        blocks = np.ascontiguousarray(blocks)
        start = 0
        while start < blocks.shape[0]:
            if self._fh is None:
                self._open_next()
            take = min(self.blocks_per_shard - self._blocks, blocks.shape[0] - start)
            buf = memoryview(blocks[start : start + take]).cast("B")
            self._hash.update(buf)
            self._fh.write(buf)
            self._blocks += take
            self._bytes += buf.nbytes
            start += take
            if self._blocks == self.blocks_per_shard:
                self._finish()

    def close(self) -> list[ShardInfo]:
        """Finish the open shard; returns every shard written, in order."""
        if not self._closed:
            if self._fh is not None:
                self._finish()
            self._closed = True
        return list(self._infos)

    def abort(self) -> None:
        """Close the open file without recording it (its content is incomplete)."""
        if self._fh is not None:
            try:
                self._fh.close()
            finally:
                self._fh = None
        self._closed = True

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _open_next(self) -> None:
        name = shard_name(self.split, self.rank, len(self._infos))
        self._name = name
        self._fh = self.fs.open(posixpath.join(self.dirpath, name), "wb")
        self._hash = hashlib.sha256()
        self._blocks = 0
        self._bytes = 0

    def _finish(self) -> None:
        self._fh.close()
        self._fh = None
        self._infos.append(ShardInfo(file=self._name, blocks=self._blocks, bytes=self._bytes, sha256=self._hash.hexdigest()))
        self._blocks = 0
        self._bytes = 0


# ------------------------------------------------------------------------------------- index


def new_index(*, seq_len: int, vocab_size: int, bos_id: int | None, eos_id: int | None,
              splits: dict[str, dict[str, Any]] | None = None, framing: list[str] | None = None) -> dict[str, Any]:
    """An index with the global fields filled in and the given splits (totals recomputed).

    A split with ``streams`` (name -> ``lang``, ``source`` and counters) gets its shards ordered by stream (sorted
    names; the given order within a stream) and each stream's ``start`` / ``blocks`` / ``tokens`` computed from the
    shards naming it; the index is then version 2, else version 1. Built as a :class:`ShardIndex`, so a bad split
    or shard entry is an error here already."""
    entries: dict[str, dict[str, Any]] = {}
    for name, split in (splits or {}).items():
        shards = [dict(s) for s in split.get("shards", [])]
        entry = {k: v for k, v in split.items() if k not in ("shards", "streams")}
        if split.get("streams") is not None:
            streams = {k: dict(v) for k, v in split["streams"].items()}
            order = {k: i for i, k in enumerate(sorted(streams))}
            unknown = sorted({str(s.get("stream")) for s in shards if s.get("stream") not in order})
            if unknown:
                raise InputError(f"new shard index: split {name!r}: shards name streams {', '.join(unknown)} that are "
                                 f"not in its streams ({', '.join(sorted(streams)) or 'none'})")
            shards.sort(key=lambda s: order[s["stream"]])  # stable: each stream's shards keep their order
            start = 0
            for key in sorted(streams):
                n = sum(int(s["blocks"]) for s in shards if s["stream"] == key)
                streams[key].update(start=start, blocks=n, tokens=n * int(seq_len))
                start += n
            entry["streams"] = {k: streams[k] for k in sorted(streams)}  # block order, as on disk
        blocks = sum(int(s["blocks"]) for s in shards)
        entries[name] = {**entry, "blocks": blocks, "tokens": blocks * int(seq_len), "shards": shards}
    with_streams = any("streams" in e for e in entries.values())
    index = parse_index({
        "format": FORMAT,
        "version": FORMAT_VERSION if with_streams else 1,
        "seq_len": int(seq_len),
        "dtype": dtype_name(dtype_for_vocab(vocab_size)),
        "byteorder": "little",
        "vocab_size": int(vocab_size),
        "bos_id": bos_id,
        "eos_id": eos_id,
        **({"framing": list(framing)} if framing is not None else {}),
        "splits": entries,
    }, "new shard index")
    return index.to_dict()


def write_index(fs: fsspec.AbstractFileSystem, dirpath: str, index: dict[str, Any] | ShardIndex) -> None:
    """Write ``index.json`` (validated first, so a bad index is never written)."""
    model = parse_index(index, display_path(fs, posixpath.join(dirpath, INDEX)))
    if is_local_fs(fs):
        fs.makedirs(dirpath, exist_ok=True)
    data = (json.dumps(model.to_dict(), indent=2, sort_keys=True) + "\n").encode("utf-8")
    with fs.open(posixpath.join(dirpath.rstrip("/"), INDEX), "wb") as fh:
        fh.write(data)


def read_index(fs: fsspec.AbstractFileSystem, dirpath: str) -> dict[str, Any]:
    """Read and validate ``index.json``; :class:`InputError` naming the path if missing or invalid."""
    path = posixpath.join(dirpath.rstrip("/"), INDEX)
    where = display_path(fs, path)
    try:
        raw = fs.cat_file(path)
    except FileNotFoundError:
        raise InputError(f"{where} does not exist: not a shard folder (run the pack stage)") from None
    try:
        index = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{where} is not valid JSON: {exc}") from None
    return parse_index(index, where).to_dict()


# ------------------------------------------------------------------------------------ verify


def _sizes(fs: fsspec.AbstractFileSystem, dirpath: str) -> dict[str, int]:
    """File name -> size for the folder, in one listing."""
    try:
        entries = fs.ls(dirpath, detail=True)
    except FileNotFoundError:
        return {}
    return {posixpath.basename(e["name"].rstrip("/")): int(e.get("size") or 0) for e in entries if e.get("type") != "directory"}


def check_shards(fs: fsspec.AbstractFileSystem, dirpath: str, index: dict[str, Any], splits: list[str],
                  *, checksums: bool) -> None:
    dirpath = dirpath.rstrip("/")
    sizes = _sizes(fs, dirpath)
    shards = [s for name in splits for s in index["splits"][name]["shards"]]
    for s in shards:
        where = display_path(fs, posixpath.join(dirpath, s["file"]))
        actual = sizes.get(s["file"])
        if actual is None:
            raise CorruptShardError(f"shard {where} is missing (listed in {INDEX} with {s['bytes']} bytes)")
        if actual != s["bytes"]:
            kind = "truncated" if actual < s["bytes"] else "longer than listed"
            raise CorruptShardError(f"shard {where} is {kind}: expected {s['bytes']} bytes, found {actual} bytes")
    if not checksums or not shards:
        return

    def check(s: dict[str, Any]) -> None:
        path = posixpath.join(dirpath, s["file"])
        actual = sha256_file(fs, path)
        if actual != s["sha256"]:
            raise CorruptShardError(f"shard {display_path(fs, path)} is corrupt: expected sha256 {s['sha256']}, found {actual}")

    workers = min(len(shards), 4 if is_local_fs(fs) else 8)
    if workers <= 1:
        for s in shards:
            check(s)
        return
    with ThreadPoolExecutor(workers) as pool:  # hashlib and file reads release the GIL
        for fut in [pool.submit(check, s) for s in shards]:
            fut.result()


def verify_shards(fs: fsspec.AbstractFileSystem, dirpath: str, *, split: str | None = None) -> None:
    """Recompute size and sha256 of every shard (of ``split``, or all splits) against ``index.json``.

    Raises :class:`CorruptShardError` naming the file, the expected and the actual value."""
    index = read_index(fs, dirpath)
    if split is not None and split not in index["splits"]:
        raise InputError(f"{display_path(fs, dirpath)} has no split {split!r} (splits: {', '.join(index['splits'])})")
    check_shards(fs, dirpath, index, [split] if split else list(index["splits"]), checksums=True)
