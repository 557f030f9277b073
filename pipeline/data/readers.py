"""Input readers of the collect stage: one :class:`Source` -> a stream of documents and problems.

``kind: files`` takes local files, folders (recursive), globs (``**`` recurses) and ``s3://``
prefixes or globs, all through fsspec. Formats are chosen by extension, after an optional
compression suffix (``.gz``, ``.bz2``, ``.xz``, ``.lzma`` through fsspec, ``.zst``/``.zstd`` through
``zstandard``: see :data:`COMPRESSIONS`):

* ``.jsonl`` / ``.json`` / ``.ndjson``: one JSON object per line, text in ``source.text_field``
  (a ``.json`` file whose first character is ``[`` is read as one JSON array, whole);
* ``.parquet``: read by row batches, column ``source.text_field``;
* anything else (``.txt``, no extension, ...) is text, split by ``source.split_mode``:
  ``file`` (whole file), ``paragraph`` (runs of blank lines separate), ``line``, ``regex``
  (lines that ``source.separator`` matches *in full* separate, e.g. ``^%$`` for fortune files).
  A binary file that sneaks in (a fortune ``.dat`` index) is caught by the binary check.

``kind: hf`` reads a dataset from the hub by name, or a local folder: one written by
``save_to_disk`` (``load_from_disk``), or a folder of json/jsonl/parquet/csv/txt files
(``load_dataset("<format>", data_dir=...)``, splits inferred from file names as the hub does).

Everything is streamed: text and jsonl line by line, parquet by row batch, hf datasets by
batch. Only ``split_mode: file`` holds a whole (decompressed) file in memory.

Nothing is dropped silently. :func:`iter_source` yields :class:`Document` items and, for every
skipped thing, a :class:`Problem`; the stage counts problems by ``reason``:

``invalid_utf8``
    one per file; ``detail`` gives the byte offset (in the decompressed stream). Reading of the
    file stops there; documents before that offset were already yielded and are kept (the
    detail says how many), which is what a streaming reader can promise. Invalid UTF-8 inside
    the first 8 KB means no document of that file is yielded.
``binary``
    NUL bytes or mostly control bytes in the first 8 KB; the file is skipped.
``empty_file``
    a file with no bytes (after decompression).
``unreadable``
    I/O errors, corrupt compression, a parquet file that pyarrow cannot read or that lacks
    the text column; documents yielded before the error are kept (the detail says how many).
``bad_record``
    per record: a jsonl line that is not valid JSON or not an object, a row without the text
    field or whose text is not a string (``detail`` names the line or row).
``empty_document``
    per record whose text is empty after ``strip()`` inside a good file (not yielded). In
    ``split_mode: line`` every blank line is one; in ``regex`` mode two adjacent separators
    make one, while the zero-line chunk before the first / after the last separator is just
    framing and is not counted; ``paragraph`` mode never produces one; in ``file`` mode a
    whitespace-only file is one.

Ids are stable and unique: ``{source_name}/{relative_path}#{n}``, where ``relative_path`` is the
file's path relative to the folder of the path/glob that matched it (the file name for a
single file; the full path when two patterns would give the same relative path) and ``n`` is
the 0-based position of the record in its file (txt: chunk index, jsonl: line index, parquet /
hf: row index), so an id does not move when another record is dropped. With
``source.id_field`` the id is ``{source_name}/{value}`` (values are trusted to be unique; a row
without the field falls back to the derived id). hf rows without ``id_field`` get
``{source_name}/{split}#{n}``.
"""

from __future__ import annotations

import codecs
import contextlib
import io
import json
import os
import posixpath
import re
import tempfile
from dataclasses import dataclass
from typing import IO, Any, Iterator, Literal

import fsspec
import zstandard
from pydantic import Field, model_validator

from pipeline.config import StrictModel
from pipeline.errors import InputError
from pipeline.storage import storage_options_from_env


class Source(StrictModel):
    """One input of the collect stage.

    ``kind: files`` reads local paths or globs (``**`` recurses) and ``s3://`` prefixes;
    ``kind: hf`` streams a Hugging Face dataset by name or from a local dataset folder.
    """

    kind: Literal["files", "hf"] = "files"
    name: str | None = Field(None, description="label stored as each document's `source`; defaults to the path or dataset")
    paths: list[str] = Field(default_factory=list, description="files, folders, globs or s3:// prefixes (kind: files)")
    dataset: str | None = Field(None, description="dataset name on the hub, or a local folder (kind: hf)")
    dataset_config: str | None = None
    split: str = "train"
    streaming: bool = True
    text_field: str = Field("text", description="column holding the text in .jsonl/.parquet/hf rows")
    id_field: str | None = Field(None, description="column holding a document id; else one is derived")
    language: str | None = Field(None, description="language hint stored on each document (kk, ru, en, ...)")
    split_mode: Literal["file", "paragraph", "line", "regex"] = Field(
        "file", description="how a .txt file becomes documents: whole file, blank-line paragraphs, lines, or a separator regex"
    )
    separator: str | None = Field(None, description="separator line regex for split_mode=regex (e.g. '^%$' for fortune files)")
    max_documents: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _check_kind(self) -> "Source":
        if self.kind == "files" and not self.paths:
            raise ValueError("kind 'files' needs `paths` (files, folders, globs or s3:// prefixes)")
        if self.kind == "hf" and not self.dataset:
            raise ValueError("kind 'hf' needs `dataset` (a hub name or a local dataset folder)")
        if self.split_mode == "regex":
            if not self.separator:
                raise ValueError("split_mode 'regex' needs `separator`")
            try:
                re.compile(self.separator)
            except re.error as exc:
                raise ValueError(f"separator is not a valid regex: {exc}") from None
        return self


HEAD_BYTES = 8192
_READ_BUFFER = 1 << 20
_PARQUET_BATCH = 4096
_HF_BATCH = 1000
_GLOB_CHARS = re.compile(r"[*?\[]")
# bytes that do not occur in text: C0 controls except \t \n \v \f \r \x1b (and \b, seen in man pages)
_NON_TEXT = bytes(b for b in range(32) if b not in b"\t\n\x0b\x0c\r\x1b\x08") + b"\x7f"
_BINARY_SHARE = 0.10

JSON_EXT = {".jsonl", ".json", ".ndjson"}
PARQUET_EXT = {".parquet"}
# Compression is fsspec's: its inference from the name (fsspec.utils.infer_compression: .gz, .bz2, .xz, .lzma, .zst)
# and its decompressors (fsspec.compression.compr), with three exceptions kept here. (1) zstd: fsspec's zstandard
# wrapper (fsspec/compression.py, zstandard_file) stops after the first frame, and `zstd -c a b > c` writes several,
# so zstd is read with read_across_frames=True (see _decompress). (2) Two spellings fsspec does not infer, .gzip and
# .zstd. (3) zip, which fsspec infers, is not a compression here: an archive of several files, of which fsspec would
# read only the first, silently.
COMPRESSIONS = ("gzip", "bz2", "xz", "lzma", "zstd")
_MORE_COMPRESSION_EXT = {".gzip": "gzip", ".zstd": "zstd"}

REASONS = ("invalid_utf8", "binary", "empty_file", "unreadable", "bad_record", "empty_document")


@dataclass(slots=True)
class Document:
    id: str
    text: str
    source: str
    lang_hint: str | None


@dataclass(slots=True)
class Problem:
    path: str
    reason: str
    detail: str


@dataclass(slots=True)
class DataFile:
    """One file found by :func:`list_files` (or a collect source's paths)."""

    url: str  # what the user would recognise: an absolute local path or proto://bucket/key
    path: str  # the path inside ``fs``
    rel: str  # path relative to the pattern's folder, used in ids
    fs: Any


# ------------------------------------------------------------------------------ naming


def source_name(source: Source) -> str:
    """``source.name``, else a short name from the paths (``data/en/*.txt`` -> ``en``) or dataset."""
    if source.name:
        return source.name
    if source.kind == "hf":
        ds = (source.dataset or "hf").rstrip("/\\")
        short = os.path.basename(ds) or ds
        return f"{short}-{source.dataset_config}" if source.dataset_config else short
    names: list[str] = []
    for p in source.paths:
        _, _, rest = p.rpartition("://")
        parts = [x for x in rest.replace("\\", "/").split("/") if x]
        # the last component without glob characters; a plain file gives its stem
        while parts and _GLOB_CHARS.search(parts[-1]):
            parts.pop()
        if not parts:
            continue
        last = parts[-1]
        if len(parts) == len([x for x in rest.split("/") if x]):  # no glob part: a file or folder
            last = _strip_extensions(last)
        if last not in names:
            names.append(last)
    return "+".join(names) or "files"


def _strip_extensions(name: str) -> str:
    stem, ext = os.path.splitext(name)
    if compression_of(name):
        stem, ext = os.path.splitext(stem)
    return stem if ext else name


# ------------------------------------------------------------------------------ expansion


def _url(fs: Any, path: str) -> str:
    protos = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    if "file" in protos or "local" in protos:
        return path
    return fs.unstrip_protocol(path)


def _is_hidden(rel: str) -> bool:
    return any(part.startswith(".") for part in rel.split("/"))


def _list(pattern: str, opts: dict[str, Any], *, globs: bool = True) -> tuple[Any, list[tuple[str, str]]]:
    """(filesystem, sorted ``(path, rel)``) of one entry of a source's ``paths``: a folder (recursively), a glob
    (unless ``globs`` is false: then ``*?[`` are plain characters), or a file; hidden names are skipped (see
    :func:`expand_paths`). InputError when it cannot be opened or listed."""
    raw = os.path.expanduser(pattern) if "://" not in pattern else pattern
    try:
        fs, root = fsspec.core.url_to_fs(raw, **opts)
    except Exception as exc:  # unknown protocol, missing optional dependency, bad options
        raise InputError(f"cannot open {pattern!r}: {type(exc).__name__}: {exc}") from None
    root = root.rstrip("/") or root
    found: list[tuple[str, str]] = []  # (path, rel)
    try:
        if globs and _GLOB_CHARS.search(root):
            parts = root.split("/")
            first = next(i for i, part in enumerate(parts) if _GLOB_CHARS.search(part))
            base = "/".join(parts[:first])
            # like the shell, wildcards do not match hidden names unless the pattern spells a dot
            dots = any(part.startswith(".") for part in parts[first:])
            hits = fs.glob(root, detail=True)
            for path, info in hits.items():
                rel = _rel(path, base)
                if info.get("type") == "file" and (dots or not _is_hidden(rel)):
                    found.append((path, rel))
        elif fs.isdir(root):
            for path in fs.find(root):
                rel = _rel(path, root)
                if not _is_hidden(rel):  # .git, .DS_Store, editor swap files
                    found.append((path, rel))
        elif fs.isfile(root):
            found.append((root, posixpath.basename(root)))
    except (FileNotFoundError, PermissionError, OSError) as exc:
        raise InputError(f"cannot list {pattern!r}: {type(exc).__name__}: {exc}") from None
    return fs, sorted(found)


def _expand(source: Source, storage_options: dict[str, Any] | None) -> list[DataFile]:
    if source.kind != "files":
        raise InputError(f"expand_paths: source {source_name(source)!r} is kind {source.kind!r}, not 'files'")
    opts = storage_options_from_env() if storage_options is None else dict(storage_options)
    out: list[DataFile] = []
    seen_paths: set[str] = set()
    seen_rel: set[str] = set()
    for pattern in source.paths:
        fs, found = _list(pattern, opts)
        if not found:
            raise InputError(
                f"path {pattern!r} matched no files (source {source_name(source)!r}); "
                "check the path, the glob (use ** to recurse) or the s3 prefix and credentials"
            )
        for path, rel in found:
            if path in seen_paths:
                continue
            seen_paths.add(path)
            if rel in seen_rel:
                rel = path.lstrip("/")
            seen_rel.add(rel)
            out.append(DataFile(url=_url(fs, path), path=path, rel=rel, fs=fs))
    return out


def list_files(path: str, *, storage_options: dict[str, Any] | None = None, globs: bool = True) -> list[DataFile]:
    """The files of one path -- a folder (recursively), a glob or a file -- in reading order, hidden names
    skipped, exactly as one entry of a collect source's ``paths`` is expanded; ``[]`` when it matches nothing.
    ``globs=False``: the path is a file or folder name, even with ``*?[`` in it. Post-training reads its data
    files and folders through this. ``storage_options=None``: those in ``LLMPIPE_STORAGE_OPTIONS``."""
    opts = storage_options_from_env() if storage_options is None else dict(storage_options)
    fs, found = _list(path, opts, globs=globs)
    return [DataFile(url=_url(fs, p), path=p, rel=rel, fs=fs) for p, rel in found]


def _rel(path: str, base: str) -> str:
    base = base.rstrip("/")
    if base and path.startswith(base + "/"):
        return path[len(base) + 1 :]
    if not base and not path.startswith("/"):
        return path
    return path.lstrip("/")


def expand_paths(source: Source, *, storage_options: dict[str, Any] | None = None) -> list[str]:
    """The files a ``kind: files`` source reads, in reading order.

    Each entry of ``source.paths`` is expanded on its own (a folder recursively; a glob with
    fsspec's ``**``; both skip hidden names such as ``.git/`` unless the glob part of the pattern
    starts a name with a dot) and sorted; entries keep the user's order and a
    file matched twice is read once. An entry that matches nothing raises :class:`InputError`.
    """
    return [f.url for f in _expand(source, storage_options)]


# ------------------------------------------------------------------------------ byte streams


class _Prefixed(io.RawIOBase):
    """``head`` followed by the rest of ``stream``: lets us sniff 8 KB and still stream."""

    def __init__(self, head: bytes, stream: IO[bytes]):
        self._head = memoryview(head)
        self._stream = stream

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:  # type: ignore[override]
        if self._head.nbytes:
            n = min(len(b), self._head.nbytes)
            b[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        data = self._stream.read(len(b))
        n = len(data)
        b[:n] = data
        return n


def compression_of(name: str) -> str | None:
    """The compression a file name says (one of :data:`COMPRESSIONS`), or None."""
    found = fsspec.utils.infer_compression(name) or _MORE_COMPRESSION_EXT.get(posixpath.splitext(name)[1].lower())
    return found if found in COMPRESSIONS else None


def split_ext(path: str) -> tuple[str, str | None]:
    """(format extension, compression) of a file name, both lower case: ``a.JSONL.gz`` -> ``(".jsonl", "gzip")``."""
    name = posixpath.basename(path).lower()
    stem, ext = posixpath.splitext(name)
    compression = compression_of(name)
    if compression:
        stem, ext = posixpath.splitext(stem)
    return ext, compression


def _decompress(raw: IO[bytes], compression: str | None) -> IO[bytes]:
    if compression is None:
        return raw
    if compression == "zstd":  # every frame, not only the first (see COMPRESSIONS)
        return zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
    return fsspec.compression.compr[compression](raw, mode="rb")


def _open_decompressed(f: DataFile, compression: str | None) -> tuple[IO[bytes], list[Any]]:
    """The decompressed stream of a file and what to close when done with it (the stream, then the file)."""
    raw = f.fs.open(f.path, "rb")
    try:
        stream = _decompress(raw, compression)
    except BaseException:
        _close_all([raw])
        raise
    return stream, [raw] if stream is raw else [raw, stream]


@contextlib.contextmanager
def open_bytes(f: DataFile, compression: str | None) -> Iterator[IO[bytes]]:
    """The decompressed bytes of a file, closed (with the file) on exit."""
    stream, closers = _open_decompressed(f, compression)
    try:
        yield stream
    finally:
        _close_all(closers)


@contextlib.contextmanager
def open_parquet(f: DataFile, compression: str | None) -> Iterator[Any]:
    """A ``pyarrow.parquet.ParquetFile`` of a parquet file; a compressed one is spooled, decompressed, to a
    temporary file first (parquet needs seeks). :class:`SkippedFile` (``empty_file``) when there are no bytes."""
    import pyarrow.parquet as pq  # heavy: only when a parquet file is read

    if not f.fs.size(f.path):
        raise SkippedFile("empty_file", "file has no bytes")
    with f.fs.open(f.path, "rb") as raw:
        if compression:
            with tempfile.TemporaryFile() as tmp, _decompress(raw, compression) as dec:
                while chunk := dec.read(_READ_BUFFER):
                    tmp.write(chunk)
                if not tmp.tell():
                    raise SkippedFile("empty_file", "no bytes after decompression")
                tmp.seek(0)
                yield pq.ParquetFile(tmp)
        else:
            yield pq.ParquetFile(raw)


def _read_head(stream: IO[bytes]) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while size < HEAD_BYTES:
        chunk = stream.read(HEAD_BYTES - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _binary_reason(head: bytes) -> str | None:
    if b"\x00" in head:
        return f"NUL byte at offset {head.index(0)} in the first {len(head)} bytes"
    if head:
        non_text = len(head) - len(head.translate(None, _NON_TEXT))
        if non_text / len(head) > _BINARY_SHARE:
            return f"{non_text} of the first {len(head)} bytes are control bytes"
    return None


def _close_all(closers: list[Any]) -> None:
    for c in reversed(closers):
        try:
            c.close()
        except Exception:  # noqa: BLE001 - closing after an error must not hide it
            pass


class SkippedFile(Exception):
    """A whole-file problem found while opening (empty, binary): a :class:`Problem` in collect, an error in
    post-training."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


# ------------------------------------------------------------------------------ readers


class _Reader:
    def __init__(self, source: Source, name: str):
        self.source = source
        self.name = name
        self.lang = source.language
        self.text_field = source.text_field
        self.id_field = source.id_field
        self.sep = re.compile(source.separator) if source.split_mode == "regex" and source.separator else None

    # -- helpers
    def _doc(self, f: DataFile, n: int, text: str, rid: Any = None) -> Document:
        if rid is not None and rid != "":
            return Document(f"{self.name}/{rid}", text, self.name, self.lang)
        return Document(f"{self.name}/{f.rel}#{n}", text, self.name, self.lang)

    def _empty(self, f: DataFile, what: str) -> Problem:
        return Problem(f.url, "empty_document", f"{what}: empty after strip()")

    # -- entry point per file
    def read_file(self, f: DataFile) -> Iterator[Document | Problem]:
        ext, compression = split_ext(f.path)
        state = {"docs": 0}
        try:
            if ext in PARQUET_EXT:
                gen = self._parquet(f, compression, state)
            else:
                gen = self._text_like(f, ext, compression, state)
            yield from gen
        except SkippedFile as skip:
            yield Problem(f.url, skip.reason, skip.detail)
        except _Invalid as bad:
            yield Problem(f.url, "invalid_utf8", f"{bad.detail}{_kept(state['docs'])}")
        except Exception as exc:  # noqa: BLE001 - OSError/EOFError (gzip), ZstdError, ArrowInvalid, fs backends
            yield Problem(f.url, "unreadable", f"{type(exc).__name__}: {exc}{_kept(state['docs'])}")

    def _open_stream(self, f: DataFile, compression: str | None) -> tuple[IO[bytes], list[Any]]:
        stream, closers = _open_decompressed(f, compression)
        try:
            head = _read_head(stream)
            if not head:
                what = "no bytes after decompression" if compression else "file has no bytes"
                raise SkippedFile("empty_file", what)
            why = _binary_reason(head)
            if why:
                raise SkippedFile("binary", f"looks binary: {why}")
        except BaseException:
            _close_all(closers)
            raise
        buffered = io.BufferedReader(_Prefixed(head, stream), buffer_size=_READ_BUFFER)
        closers.append(buffered)
        return buffered, closers

    def _text_like(self, f: DataFile, ext: str, compression: str | None, state: dict[str, int]) -> Iterator[Document | Problem]:
        stream, closers = self._open_stream(f, compression)
        try:
            if ext in JSON_EXT:
                yield from self._jsonl(f, stream, state, ext)
            else:
                yield from self._txt(f, stream, state)
        finally:
            _close_all(closers)

    # -- text
    def _lines(self, stream: IO[bytes]) -> Iterator[tuple[int, str]]:
        """(byte offset after the line, decoded line without its newline); strict UTF-8, BOM dropped."""
        offset = 0
        first = True
        for raw in stream:
            line = raw
            if first:
                first = False
                if line.startswith(codecs.BOM_UTF8):
                    line = line[3:]
                    offset += 3
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise _Invalid(offset + exc.start, exc.reason) from None
            offset += len(line)
            if text.endswith("\n"):
                text = text[:-2] if text.endswith("\r\n") else text[:-1]
            yield offset, text

    def _txt(self, f: DataFile, stream: IO[bytes], state: dict[str, int]) -> Iterator[Document | Problem]:
        mode = self.source.split_mode
        if mode == "file":
            text = _decode_whole(stream.read()).strip()
            if text:
                state["docs"] += 1
                yield self._doc(f, 0, text)
            else:
                yield self._empty(f, "whole file (#0)")
            return
        if mode == "line":
            for n, (_, line) in enumerate(self._lines(stream)):
                text = line.strip()
                if text:
                    state["docs"] += 1
                    yield self._doc(f, n, text)
                else:
                    yield self._empty(f, f"line {n + 1} (#{n})")
            return
        if mode == "paragraph":
            buf: list[str] = []
            n = 0
            for _, line in self._lines(stream):
                if line.strip():
                    buf.append(line)
                elif buf:
                    state["docs"] += 1
                    yield self._doc(f, n, "\n".join(buf).strip())
                    n += 1
                    buf = []
            if buf:
                state["docs"] += 1
                yield self._doc(f, n, "\n".join(buf).strip())
            return
        # regex: lines the separator matches in full separate documents; the zero-line chunk
        # before the first or after the last separator is framing, not an empty document
        sep = self.sep
        assert sep is not None
        buf = []
        n = 0
        seen_sep = False
        lineno = 0
        for _, line in self._lines(stream):
            lineno += 1
            if sep.fullmatch(line) is None:
                buf.append(line)
                continue
            if buf or seen_sep:
                text = "\n".join(buf).strip()
                if text:
                    state["docs"] += 1
                    yield self._doc(f, n, text)
                else:
                    yield self._empty(f, f"chunk #{n} ending at line {lineno}")
                n += 1
            seen_sep = True
            buf = []
        if buf:
            text = "\n".join(buf).strip()
            if text:
                state["docs"] += 1
                yield self._doc(f, n, text)
            else:
                yield self._empty(f, f"chunk #{n} at end of file")

    # -- json lines
    def _record(self, f: DataFile, n: int, obj: Any, where: str) -> Document | Problem:
        if not isinstance(obj, dict):
            return Problem(f.url, "bad_record", f"{where}: not a JSON object ({type(obj).__name__})")
        text = obj.get(self.text_field)
        if text is None:
            if self.text_field in obj:
                return Problem(f.url, "bad_record", f"{where}: field {self.text_field!r} is null")
            keys = ", ".join(list(obj)[:10])
            return Problem(f.url, "bad_record", f"{where}: no field {self.text_field!r} (fields: {keys})")
        if not isinstance(text, str):
            return Problem(f.url, "bad_record", f"{where}: field {self.text_field!r} is {type(text).__name__}, not a string")
        text = text.strip()
        if not text:
            return self._empty(f, where)
        rid = obj.get(self.id_field) if self.id_field else None
        return self._doc(f, n, text, rid)

    def _jsonl(self, f: DataFile, stream: IO[bytes], state: dict[str, int], ext: str) -> Iterator[Document | Problem]:
        if ext == ".json":
            first = stream.peek(64)[:64].lstrip(codecs.BOM_UTF8).lstrip()  # type: ignore[attr-defined]
            if first.startswith(b"["):
                yield from self._json_array(f, stream, state)
                return
        # the hot loop of the stage: lines decoded strictly, parsed with raw_decode, the common
        # case (an object with a string text) handled inline
        raw_decode = json.JSONDecoder().raw_decode
        text_field, id_field, name, lang, url = self.text_field, self.id_field, self.name, self.lang, f.url
        prefix = f"{name}/{f.rel}#"
        offset = 0
        for n, raw in enumerate(stream):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise _Invalid(offset + exc.start, exc.reason) from None
            offset += len(raw)
            line = line.strip()
            if n == 0 and line.startswith("\ufeff"):
                line = line[1:].lstrip()
            if not line:
                continue  # blank lines are not records
            try:
                obj, end = raw_decode(line)
                if end != len(line):
                    raise ValueError(f"extra data after the value at column {end + 1}")
            except ValueError as exc:
                yield Problem(url, "bad_record", f"line {n + 1}: invalid JSON: {exc}")
                continue
            text = obj.get(text_field) if type(obj) is dict else None
            if type(text) is str and (text := text.strip()):
                rid = obj.get(id_field) if id_field else None
                state["docs"] += 1
                if rid is None or rid == "":
                    yield Document(f"{prefix}{n}", text, name, lang)
                else:
                    yield Document(f"{name}/{rid}", text, name, lang)
            else:
                yield self._record(f, n, obj, f"line {n + 1}")

    def _json_array(self, f: DataFile, stream: IO[bytes], state: dict[str, int]) -> Iterator[Document | Problem]:
        text = _decode_whole(stream.read())
        try:
            rows = json.loads(text)
        except ValueError as exc:
            yield Problem(f.url, "bad_record", f"whole file: invalid JSON array: {exc}")
            return
        for n, obj in enumerate(rows):
            item = self._record(f, n, obj, f"element {n}")
            if isinstance(item, Document):
                state["docs"] += 1
            yield item

    # -- parquet
    def _parquet(self, f: DataFile, compression: str | None, state: dict[str, int]) -> Iterator[Document | Problem]:
        with open_parquet(f, compression) as pf:
            yield from self._parquet_rows(f, pf, state)

    def _parquet_rows(self, f: DataFile, pf: Any, state: dict[str, int]) -> Iterator[Document | Problem]:
        names = pf.schema_arrow.names
        if self.text_field not in names:
            rows = pf.metadata.num_rows
            raise SkippedFile(
                "unreadable",
                f"no column {self.text_field!r} (columns: {', '.join(names[:20])}); {rows} rows skipped; set text_field",
            )
        cols = [self.text_field] + ([self.id_field] if self.id_field and self.id_field in names else [])
        n = 0
        name, lang, url, field = self.name, self.lang, f.url, self.text_field
        prefix = f"{name}/{f.rel}#"
        for batch in pf.iter_batches(batch_size=_PARQUET_BATCH, columns=cols):
            texts = batch.column(0).to_pylist()
            ids = batch.column(1).to_pylist() if len(cols) > 1 else None
            for i, text in enumerate(texts):
                if type(text) is str and (text := text.strip()):
                    state["docs"] += 1
                    rid = ids[i] if ids is not None else None
                    if rid is None or rid == "":
                        yield Document(f"{prefix}{n}", text, name, lang)
                    else:
                        yield Document(f"{name}/{rid}", text, name, lang)
                elif text is None:
                    yield Problem(url, "bad_record", f"row {n}: {field!r} is null")
                elif isinstance(text, str):
                    yield self._empty(f, f"row {n}")
                else:
                    yield Problem(url, "bad_record", f"row {n}: {field!r} is {type(text).__name__}, not a string")
                n += 1


class _Invalid(Exception):
    def __init__(self, offset: int, reason: str):
        super().__init__(reason)
        self.detail = f"invalid UTF-8 at byte offset {offset} ({reason})"


def _kept(docs: int) -> str:
    return f"; the rest of the file was skipped (the {docs} documents before it were kept)" if docs else ""


# ------------------------------------------------------------------------------ hf datasets


_HF_FORMATS = {
    ".jsonl": "json",
    ".json": "json",
    ".ndjson": "json",
    ".parquet": "parquet",
    ".csv": "csv",
    ".tsv": "csv",
    ".txt": "text",
    ".arrow": "arrow",
}


def _hf_local_format(folder: str) -> str | None:
    """The packaged builder for a folder of data files (json, parquet, ...), or None."""
    found: set[str] = set()
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if name.startswith("."):
                continue
            ext, _ = split_ext(name)
            if ext in _HF_FORMATS:
                found.add(_HF_FORMATS[ext])
    if len(found) > 1:
        raise InputError(
            f"hf dataset folder {folder!r} mixes data formats ({', '.join(sorted(found))}); "
            "keep one format per folder or use kind: files"
        )
    return found.pop() if found else None


def _hf_load(source: Source) -> Any:
    import datasets

    name = source.dataset or ""
    local = os.path.expanduser(name)
    kwargs: dict[str, Any] = {"split": source.split, "streaming": source.streaming}
    if os.path.isdir(local):
        if any(os.path.exists(os.path.join(local, m)) for m in ("dataset_info.json", "state.json", "dataset_dict.json")):
            ds = datasets.load_from_disk(local)
            if isinstance(ds, datasets.DatasetDict):
                if source.split not in ds:
                    raise InputError(
                        f"hf dataset {name!r} has no split {source.split!r} (splits: {', '.join(ds)}); set `split`"
                    )
                ds = ds[source.split]
            return ds
        fmt = _hf_local_format(local)
        if fmt is not None and not os.path.exists(os.path.join(local, "README.md")):
            return datasets.load_dataset(fmt, data_dir=local, **kwargs)
        return datasets.load_dataset(local, source.dataset_config, **kwargs)
    if os.path.isfile(local):
        ext, _ = split_ext(local)
        fmt = _HF_FORMATS.get(ext)
        if fmt is None:
            raise InputError(f"hf dataset {name!r} is a file of unknown format; use kind: files")
        return datasets.load_dataset(fmt, data_files={source.split: local}, **kwargs)
    return datasets.load_dataset(name, source.dataset_config, **kwargs)


def _hf_error(source: Source, exc: BaseException) -> InputError:
    name = source.dataset
    what = f"hf dataset {name!r}" + (f" (config {source.dataset_config!r})" if source.dataset_config else "")
    offline = os.environ.get("HF_HUB_OFFLINE") in {"1", "true", "True"} or os.environ.get("HF_DATASETS_OFFLINE") in {"1", "true", "True"}
    hint = (
        "check the dataset name, `dataset_config` and `split`"
        + ("; HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set, so only cached or local datasets load" if offline else "")
        + "; a local folder must exist (save_to_disk output or a folder of json/parquet files)"
    )
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return InputError(f"{what}, split {source.split!r}, could not be read: {type(exc).__name__}: {msg[:500]} ({hint})")


def _open_hf(source: Source) -> Any:
    """Load the dataset and check its columns: errors surface here, as InputError."""
    try:
        ds = _hf_load(source)
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - DatasetNotFoundError, FileNotFoundError, ValueError, offline errors
        raise _hf_error(source, exc) from exc
    columns = getattr(ds, "column_names", None)
    if columns is not None and source.text_field not in columns:
        raise InputError(
            f"hf dataset {source.dataset!r} has no column {source.text_field!r} (columns: {', '.join(columns)}); set `text_field`"
        )
    return ds


def _iter_hf(source: Source, name: str, ds: Any) -> Iterator[Document | Problem]:
    columns = getattr(ds, "column_names", None)
    wanted = [source.text_field] + ([source.id_field] if source.id_field and (columns is None or source.id_field in columns) else [])
    if columns is not None and hasattr(ds, "select_columns"):
        ds = ds.select_columns(wanted)
    where_base = f"{source.dataset}[{source.split}]"
    lang = source.language
    n = 0
    it = ds.iter(batch_size=_HF_BATCH) if hasattr(ds, "iter") else None
    try:
        if it is None:  # pragma: no cover - very old datasets
            it = ({k: [row.get(k)] for k in wanted} for row in ds)
        for batch in it:
            texts = batch.get(source.text_field)
            if texts is None:
                size = len(next(iter(batch.values()), []))
                for _ in range(size):
                    yield Problem(where_base, "bad_record", f"row {n}: no field {source.text_field!r}")
                    n += 1
                continue
            ids = batch.get(source.id_field) if source.id_field else None
            for i, text in enumerate(texts):
                if not isinstance(text, str):
                    kind = "null" if text is None else type(text).__name__ + ", not a string"
                    yield Problem(where_base, "bad_record", f"row {n}: {source.text_field!r} is {kind}")
                else:
                    text = text.strip()
                    if not text:
                        yield Problem(where_base, "empty_document", f"row {n}: empty after strip()")
                    else:
                        rid = ids[i] if ids is not None else None
                        if rid is not None and rid != "":
                            yield Document(f"{name}/{rid}", text, name, lang)
                        else:
                            yield Document(f"{name}/{source.split}#{n}", text, name, lang)
                n += 1
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - streaming/network/parse errors while iterating
        raise _hf_error(source, exc) from exc


# ------------------------------------------------------------------------------ entry point


def iter_source(source: Source, *, storage_options: dict[str, Any] | None = None) -> Iterator[Document | Problem]:
    """Documents of one source in a deterministic order, with a :class:`Problem` for every skip.

    Paths are expanded (and an hf dataset loaded) when this is called, so :class:`InputError`
    for a path that matches nothing or a dataset that cannot load is raised here, not at the
    first ``next()``. At most ``source.max_documents`` documents are yielded (problems do not
    count); reading stops as soon as the cap is reached. ``storage_options`` go to fsspec (e.g. an S3 endpoint);
    ``None`` means those in ``LLMPIPE_STORAGE_OPTIONS``.
    """
    name = source_name(source)
    # expansion and dataset loading happen now, so a bad path or dataset raises at the call,
    # before the caller has opened progress bars or output files
    if source.kind == "hf":
        items: Iterator[Document | Problem] = _iter_hf(source, name, _open_hf(source))
    else:
        files = _expand(source, storage_options)
        reader = _Reader(source, name)
        items = (item for f in files for item in reader.read_file(f))
    return items if source.max_documents is None else _capped(items, source.max_documents)


def _capped(items: Iterator[Document | Problem], cap: int) -> Iterator[Document | Problem]:
    emitted = 0
    try:
        for item in items:
            yield item
            if isinstance(item, Document):
                emitted += 1
                if emitted >= cap:
                    return
    finally:
        close = getattr(items, "close", None)
        if close:
            close()


def _decode_whole(data: bytes) -> str:
    """A whole file as strict UTF-8 (BOM skipped); _Invalid with the byte offset otherwise."""
    start = 3 if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[start:].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _Invalid(start + exc.start, exc.reason) from None
