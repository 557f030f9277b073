"""The run root: a local folder (a PVC mount on a cluster) or an ``s3://`` prefix, through fsspec.

Every stage output is an *artifact*: a folder under the root holding its files and a
``manifest.json``. Outputs are written under a temporary name and committed at the end:

* local filesystems: the finished folder (manifest inside) is renamed into place;
* object stores: files are moved into place and ``manifest.json`` is moved last.

Either way the manifest is the commit marker: a folder without one is never read as finished,
so a stage killed half-way leaves nothing that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import fsspec

from pipeline.errors import InputError

MANIFEST = "manifest.json"
_HASH_CHUNK = 4 << 20


def storage_options_from_env() -> dict[str, Any]:
    """Extra fsspec options as JSON in ``LLMPIPE_STORAGE_OPTIONS`` (e.g. an S3 endpoint)."""
    raw = os.environ.get("LLMPIPE_STORAGE_OPTIONS")
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise InputError(f"LLMPIPE_STORAGE_OPTIONS is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise InputError("LLMPIPE_STORAGE_OPTIONS must be a JSON object")
    return value


def sha256_file(fs: fsspec.AbstractFileSystem, path: str) -> str:
    digest = hashlib.sha256()
    with fs.open(path, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def hold_lock(path: str, what: str) -> IO[str]:
    """Take an exclusive POSIX record lock (``fcntl.lockf``) on the file ``path`` and return its open file: the lock
    lasts until that file is closed or the process ends (SIGKILL included; on NFS the server drops it), never longer.
    PipelineError naming the holder (pid, host, start, command, read from the file) when another process has it.
    Record locks are per process: the same process may take it again."""
    import datetime as dt
    import fcntl
    import socket
    import sys

    from pipeline.errors import PipelineError

    os.makedirs(os.path.dirname(path), exist_ok=True)
    fh = open(path, "a+", encoding="utf-8")
    try:
        fcntl.lockf(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        import errno

        if exc.errno not in (errno.EACCES, errno.EAGAIN):  # a filesystem without record locks (some FUSE/CSI mounts)
            print(f"warning: {path}: no file locks on this filesystem ({exc.strerror}); {what} is not protected "
                  "against a second writer", file=sys.stderr)
            return fh
        fh.seek(0)
        holder = fh.read().strip() or "another process"
        fh.close()
        raise PipelineError(f"{what} is being written by {holder} (lock {path}); wait for it to finish or stop it -- "
                            "the lock goes with the process") from None
    fh.seek(0)
    fh.truncate()
    fh.write(f"pid {os.getpid()} on {socket.gethostname()} since {dt.datetime.now().isoformat(timespec='seconds')}"
             f" ({' '.join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))[:200]})")
    fh.flush()
    return fh


def _malformed(manifest: dict[str, Any]) -> str | None:
    """What is wrong with the fields every reader relies on (None: nothing): ``stage`` a string, ``files`` a list of
    ``{path: str, size: int >= 0, sha256: str}``, ``metrics`` / ``inputs`` objects."""
    if "stage" in manifest and not isinstance(manifest["stage"], str):
        return "stage is not a string"
    for key in ("metrics", "inputs", "config"):
        if key in manifest and manifest[key] is not None and not isinstance(manifest[key], dict):
            return f"{key} is not an object"
    files = manifest.get("files", [])
    if not isinstance(files, list):
        return "files is not a list"
    for i, f in enumerate(files):
        if not isinstance(f, dict) or not isinstance(f.get("path"), str) or not f["path"]:
            return f"files[{i}] has no path"
        size = f.get("size")
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
            return f"files[{i}].size is not a byte count"
        if f.get("sha256") is not None and not isinstance(f["sha256"], str):
            return f"files[{i}].sha256 is not a string"
    return None


def fingerprint(manifest: dict[str, Any]) -> str:
    """Identity of an artifact for lineage: what produced it and what it holds (no timings)."""
    core = {k: manifest.get(k) for k in ("stage", "config_hash", "inputs", "files")}
    return hashlib.sha256(json.dumps(core, sort_keys=True).encode()).hexdigest()


class Storage:
    """A run root. ``uri`` is what the user gave; ``root`` is the path inside ``fs``."""

    def __init__(self, uri: str, storage_options: dict[str, Any] | None = None, *, create: bool = True):
        """``create=False`` (the read-only commands: show, summary, lineage, promote): a local root that does not
        exist is an InputError instead of a new empty folder made from a mistyped --root."""
        self.uri = uri.rstrip("/") or uri
        opts = {**storage_options_from_env(), **(storage_options or {})}
        self.storage_options = opts
        self.fs, self.root = fsspec.core.url_to_fs(self.uri, **opts)
        self.is_local = "file" in _protocols(self.fs)
        if self.is_local:
            self.root = os.path.abspath(self.root)
            if not create and not os.path.isdir(self.root):
                raise InputError(f"no run root at {self.root}: check --root (a stage run there creates it)")
            Path(self.root).mkdir(parents=True, exist_ok=True)

    # -- paths
    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def url(self, *parts: str) -> str:
        """A URL other libraries (pyarrow, datasets, torch readers) accept."""
        p = self.path(*parts)
        if self.is_local:
            return p
        proto = _protocols(self.fs)[0]
        return f"{proto}://{p}"

    # -- artifacts
    def manifest(self, name: str) -> dict[str, Any] | None:
        """The committed manifest of artifact ``name``, or None if it is not committed."""
        path = self.path(name, MANIFEST)
        try:
            with self.fs.open(path, "rb") as fh:
                data = json.loads(fh.read())
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InputError(f"{self.url(name, MANIFEST)} is not valid JSON ({exc}); delete it or rerun with --force") from None
        if not isinstance(data, dict):
            raise InputError(f"{self.url(name, MANIFEST)} holds a JSON {type(data).__name__}, not a manifest object; "
                             "delete it or rerun with --force")
        bad = _malformed(data)
        if bad:
            raise InputError(f"{self.url(name, MANIFEST)} is malformed ({bad}); delete it or rerun with --force")
        return data

    def begin(self, name: str) -> "OutputDir":
        """Start writing artifact ``name`` under a temporary folder (stale ones are removed)."""
        parent, base = posixpath.split(name)
        parent_path = self.path(parent) if parent else self.root
        if self.fs.exists(parent_path):
            for entry in self.fs.ls(parent_path, detail=False):
                stem = posixpath.basename(entry.rstrip("/"))
                if stem.startswith(f"{base}.tmp-"):
                    self.fs.rm(entry, recursive=True)
        tmp = f"{name}.tmp-{uuid.uuid4().hex[:10]}"
        out = OutputDir(self, name, tmp)
        if self.is_local:
            Path(self.path(tmp)).mkdir(parents=True)
        return out

    def remove(self, name: str) -> None:
        path = self.path(name)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    proto = fs.protocol
    return (proto,) if isinstance(proto, str) else tuple(proto)


@dataclass
class Artifact:
    """A committed output folder, read-only."""

    storage: Storage
    name: str
    manifest: dict[str, Any]

    @property
    def fingerprint(self) -> str:
        return self.manifest.get("fingerprint") or fingerprint(self.manifest)

    @property
    def metrics(self) -> dict[str, Any]:
        return self.manifest.get("metrics", {})

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        return self.storage.fs

    def path(self, *parts: str) -> str:
        return self.storage.path(self.name, *parts)

    def url(self, *parts: str) -> str:
        return self.storage.url(self.name, *parts)

    def verify(self, checksums: bool) -> list[str]:
        """What differs between the artifact's files and its manifest: a missing file, another size and, with
        ``checksums``, another sha256; one line each, naming the file and the expected / actual values."""
        problems = []
        for entry in self.manifest.get("files") or []:
            rel, full = entry.get("path"), self.path(str(entry.get("path")))
            try:
                size = int(self.fs.size(full))
            except FileNotFoundError:
                problems.append(f"{self.url(rel)}: missing (the manifest lists {entry.get('size')} bytes)")
                continue
            if entry.get("size") is not None and size != int(entry["size"]):
                problems.append(f"{self.url(rel)}: {size} bytes, the manifest says {entry['size']}")
            elif checksums and entry.get("sha256") and sha256_file(self.fs, full) != entry["sha256"]:
                problems.append(f"{self.url(rel)}: sha256 differs from the manifest's {entry['sha256'][:16]}...")
        return problems

    @property
    def size_bytes(self) -> int:
        return sum(int(f.get("size") or 0) for f in self.manifest.get("files") or [])

    def files(self, suffix: str = "") -> list[str]:
        """Relative paths of the artifact's files, in manifest order."""
        return [f["path"] for f in self.manifest.get("files", []) if f["path"].endswith(suffix)]

    def open(self, rel: str, mode: str = "rb") -> IO[Any]:
        return self.storage.fs.open(self.path(rel), mode)

    def read_json(self, rel: str) -> Any:
        with self.open(rel, "rb") as fh:
            return json.loads(fh.read())

    def download(self, local_dir: str) -> str:
        """A local copy of the whole folder (itself when the root is local)."""
        if self.storage.is_local:
            return self.path()
        for rel in self.files():
            target = os.path.join(local_dir, rel)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            self.storage.fs.get(self.path(rel), target)
        return local_dir


@dataclass
class OutputDir:
    """An artifact being written. Nothing here is visible as finished until ``commit``."""

    storage: Storage
    name: str
    tmp: str
    _known: dict[str, tuple[int, str]] = field(default_factory=dict)

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        return self.storage.fs

    def path(self, *parts: str) -> str:
        return self.storage.path(self.tmp, *parts)

    def open(self, rel: str, mode: str = "wb", **kwargs: Any) -> IO[Any]:
        """A file of the output (``kwargs`` go to fsspec's ``open``, e.g. ``block_size`` on an object store)."""
        if self.storage.is_local and "w" in mode:
            Path(self.path(rel)).parent.mkdir(parents=True, exist_ok=True)
        return self.fs.open(self.path(rel), mode, **kwargs)

    def write_text(self, rel: str, text: str) -> None:
        with self.open(rel, "wb") as fh:
            fh.write(text.encode("utf-8"))

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_text(rel, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=True) + "\n")

    def put_local(self, local_path: str, rel: str = "") -> None:
        """Copy a local file or folder (e.g. what a library saved) into the output."""
        src = Path(local_path)
        items = [(p, p.relative_to(src).as_posix()) for p in sorted(src.rglob("*")) if p.is_file()] if src.is_dir() else [(src, src.name)]
        for file, relpath in items:
            dest = posixpath.join(rel, relpath) if rel or src.is_dir() else relpath
            if self.storage.is_local:
                target = Path(self.path(dest))
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(file, target)
            else:
                self.fs.put_file(str(file), self.path(dest))

    def take_from(self, part: Artifact, rel: str, dest: str | None = None) -> None:
        """A file of a committed artifact (a rank's part) into the output at ``dest`` (default ``rel``): a hard
        link on a local filesystem (the merge of a sharded stage moves no bytes), a copy elsewhere."""
        src, dst = part.path(rel), self.path(dest or rel)
        if self.storage.is_local:
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            try:
                os.link(src, dst)
                return
            except OSError:
                pass
        self.fs.copy(src, dst)

    def record(self, rel: str, size: int, sha256: str) -> None:
        """Register a checksum computed while writing, so commit need not read the file back."""
        self._known[rel] = (size, sha256)

    def file_entries(self) -> list[dict[str, Any]]:
        base = self.path()
        entries = []
        found = self.fs.find(base, detail=True) if self.fs.exists(base) else {}
        for full, info in sorted(found.items()):
            rel = posixpath.relpath(full, base)
            if rel == MANIFEST:
                continue
            size = int(info.get("size") or 0)
            known = self._known.get(rel)
            digest = known[1] if known and known[0] == size else sha256_file(self.fs, full)
            entries.append({"path": rel, "size": size, "sha256": digest})
        return entries

    def commit(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Write the manifest and move the folder into place. Returns the final manifest."""
        manifest = dict(manifest)
        manifest["files"] = self.file_entries()
        manifest["fingerprint"] = fingerprint(manifest)
        body = json.dumps(manifest, indent=2, ensure_ascii=False, sort_keys=True).encode("utf-8")
        storage, fs = self.storage, self.fs
        final = storage.path(self.name)
        if storage.is_local:
            with open(self.path(MANIFEST), "wb") as fh:
                fh.write(body)
                fh.flush()
                os.fsync(fh.fileno())
            old = None
            if os.path.exists(final):
                old = f"{final}.old-{uuid.uuid4().hex[:8]}"
                os.rename(final, old)
            os.rename(self.path(), final)
            if old:
                shutil.rmtree(old, ignore_errors=True)
        else:
            if fs.exists(final):
                fs.rm(final, recursive=True)
            for entry in manifest["files"]:
                fs.mv(self.path(entry["path"]), storage.path(self.name, entry["path"]))
            with fs.open(storage.path(self.name, MANIFEST), "wb") as fh:
                fh.write(body)
            if fs.exists(self.path()):
                fs.rm(self.path(), recursive=True)
        return manifest

    def abort(self) -> None:
        try:
            if self.fs.exists(self.path()):
                self.fs.rm(self.path(), recursive=True)
        except OSError:
            pass
