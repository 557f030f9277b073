"""Data-stage throughput against baselines measured in the same run, on the same input.

1. clean: our per-document work (what the clean stage's ``run_part`` does to each
   document: normalisation + filters + fastText language ID via ``DocumentFilter.batch``,
   then ``exact_key`` and ``MinHasher.signatures`` for the kept ones) against datatrove's
   Gopher quality + Gopher repetition + fastText language filters and its MinHash signature
   step, configured with our thresholds and fed the same in-memory documents in one process
   (the steps are chained as generators, exactly what datatrove's executor does inside one
   task, without the executor). Both sides are also timed on their filters alone. The
   end-to-end ``llmpipe run clean`` wall time on the same input is printed for reference.
2. pack: tokens/s of ``pipeline.data.packing.Packer`` (tokenize + cut blocks + write shards)
   against a bare HF ``tokenizers`` ``encode_batch`` of the same texts, same tokenizer,
   same batches.

Every measurement is warmed up, then repeated (best of ``--repeat``); the two sides of a
ratio alternate within each round so that machine noise hits both alike. Nothing here asserts
on timings.

    .venv/bin/python benchmarks/bench_data.py --cache .cache [--mb 20] [--tokenizer DIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import gc
import gzip
import hashlib
import io
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from pipeline.data.tokenization import TokenizerConfig  # noqa: E402
from pipeline.stages.clean import CleanConfig  # noqa: E402
from pipeline.stages.pack import PackConfig  # noqa: E402

MB = 1_000_000
LANGS = ("kk", "ru", "en")
CLEAN_BATCH = 512  # documents per DocumentFilter.batch call, as in clean.run_part


class CorpusMissing(RuntimeError):
    pass


# ------------------------------------------------------------------------------------ input


def _lang_of(path: Path, root: Path, record: dict[str, Any] | None = None) -> str | None:
    if record:
        for key in ("lang", "language", "lang_hint"):
            value = record.get(key)
            if isinstance(value, str) and value:
                return value
    for part in path.relative_to(root).parts:
        stem = part.split(".")[0].split("-")[0].split("_")[0].lower()
        if stem in LANGS:
            return stem
    return None


def _open_text(path: Path) -> io.TextIOBase:
    name = path.name
    if name.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    if name.endswith(".zst"):
        import zstandard

        return io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(open(path, "rb")), encoding="utf-8")
    return open(path, encoding="utf-8")


def _iter_file(path: Path, root: Path) -> Iterator[tuple[str, str | None]]:
    name = path.name
    if ".jsonl" in name or name.endswith(".json"):
        with _open_text(path) as fh:
            for line in fh:
                line = line.strip()
                if not line:
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(rec, dict):
                    text = rec.get("text") or rec.get("content")
                    if isinstance(text, str) and text.strip():
                        yield text, _lang_of(path, root, rec)
    elif name.endswith(".parquet"):
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        cols = set(table.column_names)
        col = "text" if "text" in cols else "content"
        if col not in cols:
            return
        langs = table.column("lang").to_pylist() if "lang" in cols else [None] * table.num_rows
        for text, lang in zip(table.column(col).to_pylist(), langs):
            if text and text.strip():
                yield text, lang or _lang_of(path, root)
    elif ".txt" in name:
        with _open_text(path) as fh:
            body = fh.read()
        lang = _lang_of(path, root)
        sep = re.compile(r"\n%\n") if "\n%\n" in body else re.compile(r"\n\s*\n")
        for chunk in sep.split(body):
            if chunk.strip():
                yield chunk, lang


def load_corpus(cache: Path) -> list[tuple[str, str | None, str]]:
    """Every training document of ``<cache>/corpus`` (jsonl[.gz|.zst], parquet, txt) as
    ``(text, language, source file)``; the language comes from the record, else the folder
    name. ``heldout/`` is left out."""
    root = cache / "corpus"
    files = sorted(
        p for p in (root.rglob("*") if root.is_dir() else []) if p.is_file() and "heldout" not in p.relative_to(root).parts
    )
    docs = [(text, lang, str(path.relative_to(root))) for path in files for text, lang in _iter_file(path, root)]
    if not docs:
        raise CorpusMissing(
            f"no corpus under {root}: fetch it first with `make corpus` "
            f"(or `.venv/bin/python scripts/fetch_corpus.py --cache {cache}`)"
        )
    return docs


def build_input(docs: list[tuple], mb: float) -> tuple[list[str], list[str | None]]:
    """Interleave the sources in proportion to their bytes (so any prefix has the corpus's mix),
    then slice, or replicate, to ``mb`` MB of UTF-8 text. Replicas are exact copies: the
    per-document work is the same, and the end-to-end run drops them as exact duplicates.

    ``docs``: ``(text, language[, source])`` tuples; without a source, the language groups."""
    groups: dict[Any, list[tuple[str, str | None]]] = {}
    for doc in docs:
        groups.setdefault(doc[2] if len(doc) > 2 else doc[1], []).append((doc[0], doc[1]))
    keyed: list[tuple[float, int, str, str | None]] = []
    for g, (_, members) in enumerate(sorted(groups.items(), key=lambda kv: str(kv[0]))):
        sizes = [len(t.encode("utf-8")) for t, _ in members]
        total = float(sum(sizes)) or 1.0
        done = 0
        for (text, lang), size in zip(members, sizes):
            keyed.append(((done + size / 2) / total, g, text, lang))
            done += size
    keyed.sort(key=lambda k: (k[0], k[1]))
    budget = int(mb * MB)
    texts: list[str] = []
    hints: list[str | None] = []
    size = 0
    while size < budget and keyed:
        for _, _, text, lang in keyed:
            texts.append(text)
            hints.append(lang)
            size += len(text.encode("utf-8"))
            if size >= budget:
                break
    return texts, hints


def utf8_bytes(texts: Iterable[str]) -> int:
    return sum(len(t.encode("utf-8")) for t in texts)


# ------------------------------------------------------------------------------------ timing


@dataclass
class Timing:
    best_s: float = float("inf")
    runs_s: list[float] = field(default_factory=list)
    result: Any = None

    def add(self, seconds: float, result: Any) -> None:
        self.runs_s.append(seconds)
        if seconds < self.best_s:
            self.best_s = seconds
        self.result = result


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    gc.collect()
    t0 = time.perf_counter()
    result = fn()
    return time.perf_counter() - t0, result


def alternate(cases: dict[str, Callable[[], Any]], repeat: int) -> dict[str, Timing]:
    """Run every case once per round, ``repeat`` rounds; keep each case's best time."""
    timings = {name: Timing() for name in cases}
    # the inputs (and the other side's documents) stay alive throughout; freezing them keeps the
    # cyclic GC from re-scanning them on every collection, which would tax whichever side allocates more
    gc.collect()
    gc.freeze()
    try:
        for _ in range(repeat):
            for name, fn in cases.items():
                seconds, result = timed(fn)
                timings[name].add(seconds, result)
                del result
    finally:
        gc.unfreeze()
    return timings


# ------------------------------------------------------------------------------ clean: ours


class OursClean:
    """Our clean stage's per-document work, called through the library objects directly."""

    def __init__(self, cfg: CleanConfig):
        from pipeline.data.dedup import MinHasher, exact_key
        from pipeline.data.filters import DocumentFilter

        self.cfg = cfg
        self.doc_filter = DocumentFilter(cfg)
        self.hasher = MinHasher(cfg.dedup) if cfg.dedup.near else None
        self.exact_key = exact_key

    def run(self, texts: list[str], hints: list[str | None], dedup: bool = True) -> dict[str, Any]:
        kept: list[str] = []
        langs: list[str | None] = []
        n_sigs = 0
        for i in range(0, len(texts), CLEAN_BATCH):
            results = self.doc_filter.batch(texts[i : i + CLEAN_BATCH], hints[i : i + CLEAN_BATCH])
            kept_texts = []
            for r in results:
                if r.reason is None:
                    kept_texts.append(r.text)
                    langs.append(r.lang)
            kept.extend(kept_texts)
            if dedup:
                if self.cfg.dedup.exact:
                    [self.exact_key(t) for t in kept_texts]
                if self.hasher is not None and kept_texts:
                    n_sigs += len(self.hasher.signatures(kept_texts))
        return {"documents": len(texts), "kept": len(kept), "signatures": n_sigs, "kept_texts": kept, "kept_langs": langs}


# ------------------------------------------------------------------------- clean: datatrove


def _datatrove_word_tokenizer(kind: str) -> Any:
    """The word splitter datatrove's Gopher filters and MinHash use.

    datatrove picks one per language (spaCy for en/ru, Stanza for kk), none of which this
    project installs; ``regex`` is a plain regular-expression splitter (words and single
    punctuation marks, like spaCy's output) and is faster than spaCy, so it favours datatrove.
    ``spacy`` uses datatrove's own spaCy English tokenizer for every language (as FineWeb does)."""
    from datatrove.utils.word_tokenizers import SpaCyTokenizer, WordTokenizer

    if kind == "spacy":
        return SpaCyTokenizer("en")

    class RegexWordTokenizer(WordTokenizer):
        _words = re.compile(r"\w+(?:[-'’]\w+)*|[^\w\s]")
        _sents = re.compile(r"[^.!?…]+[.!?…]*")

        def word_tokenize(self, text: str) -> list[str]:
            return self._words.findall(text)

        def sent_tokenize(self, text: str) -> list[str]:
            return [m.group().strip() for m in self._sents.finditer(text) if m.group().strip()]

        def span_tokenize(self, text: str) -> list[tuple[int, int]]:
            return [m.span() for m in self._sents.finditer(text)]

    return RegexWordTokenizer("xx")


class _FastTextNumpy2:
    """``fasttext``'s ``predict`` for one line, returning a numpy array without ``copy=False``.

    The installed ``fasttext`` wrapper calls ``np.array(probs, copy=False)``, which numpy 2
    rejects; datatrove asks for the ``fasttext-numpy2-wheel`` build, whose only change is this
    call. Same C++ model, same arguments."""

    def __init__(self, path: str):
        from fasttext.FastText import _FastText

        self._ft = _FastText(path)

    def predict(self, text: str, k: int = 1, threshold: float = 0.0, on_unicode_error: str = "strict"):
        preds = self._ft.f.predict(text + "\n", k, threshold, on_unicode_error)
        probs, labels = zip(*preds) if preds else ((), ())
        return labels, np.asarray(probs)


def _without_dependency_check(cls: type, *args: Any, **kwargs: Any) -> Any:
    """Build a datatrove step without ``PipelineStep.__new__``'s dependency check.

    ``LanguageFilter`` demands ``fasteners`` (only used to lock the model download, which we
    skip by handing it our local model) and the ``fasttext-numpy2-wheel`` distribution (we have
    ``fasttext``, adapted by :class:`_FastTextNumpy2`)."""
    step = object.__new__(cls)
    step.__init__(*args, **kwargs)
    return step


class DatatroveClean:
    """datatrove's filters and MinHash signature step with our thresholds, in one process."""

    def __init__(self, cfg: CleanConfig, model_path: str, workdir: str, words: str = "regex", minhash: bool = True):
        from loguru import logger

        from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupSignature
        from datatrove.pipeline.filters import GopherQualityFilter, GopherRepetitionFilter, LanguageFilter
        from datatrove.utils.hashing import HashConfig

        logger.disable("datatrove")
        tok = _datatrove_word_tokenizer(words)
        rep = cfg.repetition
        length = cfg.length
        lid_threshold = min([cfg.langid.default_min_score, *cfg.langid.min_score.values()])
        self.lang = _without_dependency_check(
            LanguageFilter, languages=list(cfg.langid.languages), language_threshold=lid_threshold
        )
        self.lang.model._model = _FastTextNumpy2(model_path)  # offline: never downloads lid.176.bin
        self.quality = GopherQualityFilter(
            min_doc_words=length.min_words,
            max_doc_words=length.max_words,
            min_avg_word_length=length.min_mean_word_length,
            max_avg_word_length=length.max_mean_word_length,
            # checks without a counterpart in our filters: off
            max_symbol_word_ratio=None,
            max_bullet_lines_ratio=None,
            max_ellipsis_lines_ratio=None,
            max_non_alpha_words_ratio=None,
            min_stop_words=None,
            language=tok,
        )
        self.repetition = GopherRepetitionFilter(
            dup_line_frac=rep.max_dup_line_frac,
            dup_para_frac=rep.max_dup_para_frac,
            dup_line_char_frac=rep.max_dup_line_char_frac,
            dup_para_char_frac=rep.max_dup_para_char_frac,
            top_n_grams=tuple(sorted(rep.max_top_ngram_frac.items())),
            dup_n_grams=tuple(sorted(rep.max_dup_ngram_frac.items())),
            language=tok,
        )
        self.filters = [self.lang, self.quality, self.repetition]  # our order: langid, length, repetition
        self.minhash = None
        if minhash:
            num_perm = cfg.dedup.num_perm
            per_bucket = 8 if num_perm % 8 == 0 else 1
            mh_cfg = MinhashConfig(
                n_grams=cfg.dedup.shingle_words,
                num_buckets=num_perm // per_bucket,
                hashes_per_bucket=per_bucket,
                seed=cfg.dedup.seed,
                hash_config=HashConfig(precision=32),
            )
            self.minhash = MinhashDedupSignature(os.path.join(workdir, "minhash"), config=mh_cfg, language=tok)
        self.config = {
            "order": [s.name for s in self.filters] + ([self.minhash.name] if self.minhash else []),
            "word_tokenizer": words,
            "language_threshold": lid_threshold,
            "minhash": f"{num_perm} perm, {cfg.dedup.shingle_words}-word shingles, 32-bit xxhash" if minhash else None,
        }

    @staticmethod
    def documents(texts: list[str], hints: list[str | None]) -> list[Any]:
        from datatrove.data import Document

        return [Document(text=t, id=str(i), metadata={"lang_hint": h}) for i, (t, h) in enumerate(zip(texts, hints))]

    def run(self, docs: list[Any], dedup: bool = True) -> dict[str, Any]:
        counts = {"documents": 0, "kept": 0}

        def count(it: Iterable[Any], key: str) -> Iterator[Any]:
            for doc in it:
                counts[key] += 1
                yield doc

        data: Iterable[Any] = count(iter(docs), "documents")
        for step in self.filters:
            data = step(data, rank=0, world_size=1)
        data = count(data, "kept")
        if dedup and self.minhash is not None:
            for _ in self.minhash(data, rank=0, world_size=1) or ():
                pass
        else:
            for _ in data:
                pass
        return counts


# ---------------------------------------------------------------------------- clean: bench


def default_model_path() -> str:
    from pipeline.data.langid import default_model_path as ours

    return str(ours())


def bench_clean(
    texts: list[str],
    hints: list[str | None],
    cfg: CleanConfig | None = None,
    *,
    model_path: str | None = None,
    repeat: int = 3,
    warmup_docs: int = 300,
    words: str = "regex",
    filters_only: bool = True,
    log: Callable[[str], None] = lambda _msg: None,
) -> dict[str, Any]:
    """Ours vs datatrove on the same documents: full per-document work, and filters only."""
    cfg = cfg or CleanConfig()
    model_path = model_path or cfg.langid.model_path or default_model_path()
    n_bytes = utf8_bytes(texts)
    with tempfile.TemporaryDirectory(prefix="bench-dt-") as workdir:
        ours = OursClean(cfg)
        dt = DatatroveClean(cfg, model_path, workdir, words=words)
        docs = dt.documents(texts, hints)
        # warm-up: model loads, regex compilation, first-call costs
        ours.run(texts[:warmup_docs], hints[:warmup_docs])
        dt.run(dt.documents(texts[:warmup_docs], hints[:warmup_docs]))
        cases: dict[str, Callable[[], Any]] = {
            "ours": lambda: ours.run(texts, hints),
            "datatrove": lambda: dt.run(docs),
        }
        if filters_only:
            cases["ours_filters"] = lambda: ours.run(texts, hints, dedup=False)
            cases["datatrove_filters"] = lambda: dt.run(docs, dedup=False)
        log(f"clean: timing {', '.join(cases)} on {len(texts):,} documents, {n_bytes / MB:.1f} MB, best of {repeat}")
        timings = alternate(cases, repeat)
    out: dict[str, Any] = {"documents": len(texts), "bytes": n_bytes, "datatrove_config": dt.config, "cases": {}}
    for name, t in timings.items():
        res = t.result
        out["cases"][name] = {
            "documents": res["documents"],
            "kept": res["kept"],
            "best_s": t.best_s,
            "runs_s": t.runs_s,
            "docs_per_s": res["documents"] / t.best_s,
            "mb_per_s": n_bytes / MB / t.best_s,
        }
    c = out["cases"]
    out["ratio"] = c["ours"]["docs_per_s"] / c["datatrove"]["docs_per_s"]
    if filters_only:
        out["ratio_filters"] = c["ours_filters"]["docs_per_s"] / c["datatrove_filters"]["docs_per_s"]
    out["kept_texts"] = timings["ours"].result["kept_texts"]
    out["kept_langs"] = timings["ours"].result["kept_langs"]
    return out


def bench_clean_e2e(texts: list[str], hints: list[str | None], workdir: str, timeout: float = 3600) -> dict[str, Any]:
    """Wall time of ``llmpipe run clean`` (default config, 1 worker) on the same documents."""
    src = Path(workdir) / "input"
    src.mkdir(parents=True, exist_ok=True)
    by_lang: dict[str, list[str]] = {}
    for i, (text, lang) in enumerate(zip(texts, hints)):
        by_lang.setdefault(lang or "unknown", []).append(json.dumps({"id": f"d{i:08d}", "text": text}, ensure_ascii=False))
    sources = []
    for lang, lines in sorted(by_lang.items()):
        path = src / f"{lang}.jsonl"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        entry = {"name": f"bench-{lang}", "paths": [str(path)], "id_field": "id"}
        if lang != "unknown":
            entry["language"] = lang
        sources.append(entry)
    collect_cfg = Path(workdir) / "collect.yaml"
    collect_cfg.write_text(json.dumps({"sources": sources}), encoding="utf-8")  # JSON is YAML
    root = Path(workdir) / "run"
    exe = Path(sys.executable).parent / "llmpipe"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "pipeline.cli"]
    env = dict(os.environ, TOKENIZERS_PARALLELISM=os.environ.get("TOKENIZERS_PARALLELISM", "false"))
    collect = subprocess.run(
        [*cmd, "run", "collect", "--config", str(collect_cfg), "--root", str(root), "--no-progress"],
        capture_output=True, text=True, env=env, timeout=timeout,
    )
    if collect.returncode != 0:
        return {"error": "collect failed: " + (collect.stderr.strip().splitlines() or ["?"])[-1]}
    t0 = time.perf_counter()
    subprocess.run([*cmd, "--version"], capture_output=True, text=True, env=env, timeout=timeout)
    startup = time.perf_counter() - t0
    t0 = time.perf_counter()
    clean = subprocess.run(
        [*cmd, "run", "clean", "--root", str(root), "--no-progress"], capture_output=True, text=True, env=env, timeout=timeout
    )
    wall = time.perf_counter() - t0
    if clean.returncode != 0:
        return {"error": "clean failed: " + (clean.stderr.strip().splitlines() or ["?"])[-1]}
    manifest = json.loads((root / "clean" / "manifest.json").read_text())
    metrics = manifest.get("metrics", {})
    n_bytes = utf8_bytes(texts)
    return {
        "documents": metrics.get("documents_in"),
        "kept": metrics.get("kept"),
        "wall_s": wall,
        "merge_s": manifest.get("duration_s"),  # the committed clean/ manifest times the merge step
        "startup_s": startup,  # `llmpipe --version`: interpreter + CLI import
        "docs_per_s": len(texts) / wall,
        "mb_per_s": n_bytes / MB / wall,
        "command": " ".join([Path(cmd[0]).name, "run", "clean", "--root", "<tmp>", "--no-progress"]),
    }


# -------------------------------------------------------------------------------- tokenizer


def load_tokenizer_dir(folder: str | Path) -> tuple[Any, dict[str, Any]]:
    """A tokenizer folder (HF layout or a bare tokenizer.json) and its BOS/EOS ids."""
    from tokenizers import Tokenizer

    folder = Path(folder)
    path = folder / "tokenizer.json" if folder.is_dir() else folder
    tokenizer = Tokenizer.from_file(str(path))
    special = TokenizerConfig().special_tokens
    names = {"bos_token": special.bos, "eos_token": special.eos}
    cfg_path = path.parent / "tokenizer_config.json"
    if cfg_path.exists():
        tok_cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        for key in names:
            value = tok_cfg.get(key)
            if isinstance(value, dict):
                value = value.get("content")
            if value:
                names[key] = value
    return tokenizer, {
        "bos_id": tokenizer.token_to_id(names["bos_token"]),
        "eos_id": tokenizer.token_to_id(names["eos_token"]),
        "vocab_size": tokenizer.get_vocab_size(),
    }


def train_tokenizer(texts: list[str], hints: list[str | None], vocab_size: int = 32000, train_chars: int = 10_000_000,
                    cache_dir: Path | None = None) -> tuple[Any, dict[str, Any]]:
    """Our BPE (``pipeline.data.tokenization.train_bpe``) on the clean texts; cached by input."""
    from tokenizers import Tokenizer

    from pipeline.data.tokenization import train_bpe

    by_lang: dict[str, list[str]] = {}
    used = 0
    for text, lang in zip(texts, hints):
        if used >= train_chars:
            break
        by_lang.setdefault(lang or "unknown", []).append(text)
        used += len(text)
    mix = {lang: float(sum(map(len, v))) for lang, v in by_lang.items()}
    cfg = TokenizerConfig(vocab_size=vocab_size, train_chars=max(1000, used), mix=mix)
    cached = None
    if cache_dir is not None:
        digest = hashlib.sha256()
        digest.update(json.dumps(cfg.model_dump(mode="json"), sort_keys=True).encode())
        for lang in sorted(by_lang):
            for text in by_lang[lang]:
                digest.update(text.encode("utf-8"))
        cached = cache_dir / f"bpe-{vocab_size}-{digest.hexdigest()[:16]}.json"
        if cached.exists():
            tokenizer = Tokenizer.from_file(str(cached))
            return tokenizer, _special_ids(tokenizer, cfg)
    tokenizer = train_bpe(by_lang, cfg)
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tokenizer.save(str(cached))
    return tokenizer, _special_ids(tokenizer, cfg)


def _special_ids(tokenizer: Any, cfg: TokenizerConfig) -> dict[str, Any]:
    return {
        "bos_id": tokenizer.token_to_id(cfg.special_tokens.bos),
        "eos_id": tokenizer.token_to_id(cfg.special_tokens.eos),
        "vocab_size": tokenizer.get_vocab_size(),
    }


# ------------------------------------------------------------------------------------- pack


def bench_pack(
    texts: list[str],
    tokenizer: Any,
    special: dict[str, Any],
    cfg: PackConfig | None = None,
    *,
    repeat: int = 3,
    warmup_docs: int = 300,
    log: Callable[[str], None] = lambda _msg: None,
) -> dict[str, Any]:
    """Our Packer (tokenize, cut blocks, write shards) vs bare ``encode_batch`` on the same batches.

    tokens/s counts the texts' own tokens (no BOS/EOS) for both sides, so the ratio is the
    inverse ratio of the times."""
    import fsspec

    from pipeline.data.packing import Packer

    cfg = cfg or PackConfig()
    ids = [f"bench/{i:08d}" for i in range(len(texts))]
    bs = cfg.batch_size
    batches = [(ids[i : i + bs], texts[i : i + bs]) for i in range(0, len(texts), bs)]
    fs = fsspec.filesystem("file")
    n_bytes = utf8_bytes(texts)

    with tempfile.TemporaryDirectory(prefix="bench-pack-") as workdir:
        runs = [0]

        def ours(batches: list[tuple[list[str], list[str]]] = batches) -> dict[str, Any]:
            runs[0] += 1
            out = os.path.join(workdir, f"run-{runs[0]}")
            os.makedirs(out)
            packer = Packer(tokenizer, cfg, fs, out, 0, **special)
            n = 0
            for batch_ids, batch_texts in batches:
                packer.add(batch_ids, batch_texts)
                n += len(batch_ids)
            stats = packer.close()
            shutil.rmtree(out, ignore_errors=True)
            return {"documents": n, "stats": stats}

        def bare_with(encode: Callable[..., Any]) -> Callable[..., dict[str, Any]]:
            def bare(batches: list[tuple[list[str], list[str]]] = batches) -> dict[str, Any]:
                tokens = n = 0
                for _, batch_texts in batches:
                    encs = encode(batch_texts, add_special_tokens=False)
                    tokens += sum(len(e.ids) for e in encs)
                    n += len(batch_texts)
                return {"documents": n, "tokens": tokens}

            return bare

        cases: dict[str, Callable[..., Any]] = {"ours": ours, "bare": bare_with(tokenizer.encode_batch)}
        if hasattr(tokenizer, "encode_batch_fast"):  # no offsets: what Packer calls when it exists
            cases["bare_fast"] = bare_with(tokenizer.encode_batch_fast)
        warm = [(ids[:warmup_docs], texts[:warmup_docs])]
        for fn in cases.values():
            fn(warm)
        log(f"pack: timing {', '.join(cases)} on {len(texts):,} documents, {n_bytes / MB:.1f} MB, best of {repeat}")
        timings = alternate(cases, repeat)
    tokens = timings["bare"].result["tokens"]
    out: dict[str, Any] = {"documents": len(texts), "bytes": n_bytes, "tokens": tokens, "batch_size": bs,
                           "seq_len": cfg.seq_len, "cases": {}}
    for name, t in timings.items():
        out["cases"][name] = {
            "documents": t.result["documents"],
            "best_s": t.best_s,
            "runs_s": t.runs_s,
            "tokens_per_s": tokens / t.best_s,
            "mb_per_s": n_bytes / MB / t.best_s,
        }
    stats = timings["ours"].result["stats"]
    out["packer_stats"] = {k: v for k, v in stats.items() if k != "shards"}
    out["packer_document_tokens"] = sum(stats.get("document_tokens", {}).values())  # should equal "tokens"
    out["ratio"] = out["cases"]["ours"]["tokens_per_s"] / out["cases"]["bare"]["tokens_per_s"]
    if "bare_fast" in out["cases"]:
        out["ratio_fast"] = out["cases"]["ours"]["tokens_per_s"] / out["cases"]["bare_fast"]["tokens_per_s"]
    return out


# ------------------------------------------------------------------------------------ report


def _fmt(x: float, digits: int = 1) -> str:
    return f"{x:,.{digits}f}"


def format_report(res: dict[str, Any]) -> str:
    lines = []
    env = res["environment"]
    lines.append(f"== bench-data: {env['input_mb']:.1f} MB input, {env['documents']:,} documents "
                 f"({', '.join(f'{k} {v:,}' for k, v in env['documents_by_lang'].items())})")
    lines.append(f"   python {env['python']}, {env['cpus']} CPU(s), best of {env['repeat']}, single process")
    clean = res.get("clean")
    if clean:
        lines.append("")
        lines.append("clean (per-document work, single process = per core)")
        head = f"  {'':<34}{'docs':>8}{'kept':>8}{'best s':>9}{'docs/s':>10}{'MB/s':>8}"
        lines.append(head)
        labels = {
            "ours": "ours  filters+langid+key+minhash",
            "datatrove": "datatrove  filters+lid+minhash",
            "ours_filters": "ours  filters+langid only",
            "datatrove_filters": "datatrove  filters+lid only",
        }
        for name, c in clean["cases"].items():
            lines.append(f"  {labels.get(name, name):<34}{c['documents']:>8,}{c['kept']:>8,}{c['best_s']:>9.2f}"
                         f"{_fmt(c['docs_per_s'], 0):>10}{c['mb_per_s']:>8.2f}")
        lines.append(f"  ratio ours/datatrove: {clean['ratio']:.2f}x"
                     + (f"   (filters only: {clean['ratio_filters']:.2f}x)" if "ratio_filters" in clean else ""))
        c = clean["cases"]
        if "ours_filters" in c and "datatrove_filters" in c:
            ours_d = c["ours"]["best_s"] - c["ours_filters"]["best_s"]
            dt_d = c["datatrove"]["best_s"] - c["datatrove_filters"]["best_s"]
            lines.append(f"  dedup part (full - filters): ours {ours_d:.2f}s for {c['ours']['kept']:,} kept docs, "
                         f"datatrove {dt_d:.2f}s for {c['datatrove']['kept']:,}")
        e2e = res.get("clean_e2e")
        if e2e:
            if "error" in e2e:
                lines.append(f"  llmpipe run clean: not measured ({e2e['error']})")
            else:
                lines.append(f"  llmpipe run clean (end to end, 1 worker): {e2e['wall_s']:.1f}s wall "
                             f"(of which CLI startup {e2e['startup_s']:.1f}s, dedup merge {e2e['merge_s']:.1f}s) = {e2e['docs_per_s']:,.0f} docs/s, {e2e['mb_per_s']:.2f} MB/s; "
                             f"kept {e2e['kept']:,} of {e2e['documents']:,} after dedup")
    pack = res.get("pack")
    if pack:
        lines.append("")
        lines.append(f"pack ({pack['documents']:,} clean documents, {pack['tokens']:,} tokens, "
                     f"batches of {pack['batch_size']}, seq_len {pack['seq_len']}, tokenizer {res.get('tokenizer', '?')})")
        lines.append(f"  {'':<38}{'best s':>9}{'Mtok/s':>10}{'MB/s':>8}")
        labels = {"ours": "ours  Packer (tokenize+pack+write)", "bare": "bare  tokenizers encode_batch",
                  "bare_fast": "bare  encode_batch_fast (no offsets)"}
        for name, c in pack["cases"].items():
            lines.append(f"  {labels[name]:<38}{c['best_s']:>9.2f}{c['tokens_per_s'] / 1e6:>10.3f}{c['mb_per_s']:>8.2f}")
        lines.append(f"  ratio ours/bare: {pack['ratio']:.2f}x (goal >= 0.90)"
                     + (f"   vs encode_batch_fast: {pack['ratio_fast']:.2f}x" if "ratio_fast" in pack else ""))
        if pack["packer_document_tokens"] != pack["tokens"]:
            lines.append(f"  WARNING: Packer counted {pack['packer_document_tokens']:,} document tokens, bare {pack['tokens']:,}")
    if res.get("notes"):
        lines.append("")
        lines.append("notes")
        lines += [f"  - {n}" for n in res["notes"]]
    return "\n".join(lines)


NOTES = [
    "both clean sides read the same in-memory documents; datatrove's steps are chained as generators "
    "in this process (what one LocalPipelineExecutor task runs), without the executor",
    "datatrove, in our order: LanguageFilter(ft176 = our lid.176.ftz loaded offline, k=-1 as its default) -> "
    "GopherQuality(min/max words, mean word length from our config; its symbol/bullet/ellipsis/alpha/stop-word "
    "checks, which we do not have, off) -> GopherRepetition(our thresholds) -> MinhashDedupSignature(128 perm, "
    "32-bit; writes and sorts its bucket files in a temp folder, as it always does)",
    "ours additionally does Unicode normalisation, the script check and the exact-dedup key, which datatrove's "
    "side does not",
    "datatrove keeps fewer documents mostly because its top-n-gram check also fires when the most frequent "
    "n-gram occurs only once (short documents); its MinHash step then hashes fewer documents, which favours it",
    "the machine may be shared: compare the per-run times in --json (runs_s) before trusting a small difference",
]


# -------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", default=os.environ.get("LLMPIPE_CACHE", ".cache"), help="folder holding corpus/ (make corpus)")
    p.add_argument("--mb", type=float, default=20.0, help="input size in MB of UTF-8 text (corpus sliced or replicated)")
    p.add_argument("--tokenizer", metavar="DIR", help="tokenizer folder (tokenizer.json); default: train our BPE at --vocab")
    p.add_argument("--vocab", type=int, default=32000, help="vocab size of the tokenizer trained when --tokenizer is not given")
    p.add_argument("--repeat", type=int, default=3, help="timed runs per measurement (best is reported)")
    p.add_argument("--words", choices=["regex", "spacy"], default="regex", help="datatrove's word tokenizer (see notes)")
    p.add_argument("--skip", action="append", default=[], choices=["clean", "e2e", "pack", "filters-only"],
                   help="leave a measurement out (repeatable)")
    p.add_argument("--json", metavar="FILE", help="also write every number as JSON here")
    args = p.parse_args(argv)

    def log(msg: str) -> None:
        print(f"[bench-data] {msg}", file=sys.stderr, flush=True)

    cache = Path(args.cache)
    try:
        corpus = load_corpus(cache)
    except CorpusMissing as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    texts, hints = build_input(corpus, args.mb)
    by_lang: dict[str, int] = {}
    for h in hints:
        by_lang[h or "unknown"] = by_lang.get(h or "unknown", 0) + 1
    res: dict[str, Any] = {
        "environment": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "repeat": args.repeat,
            "input_mb": utf8_bytes(texts) / MB,
            "documents": len(texts),
            "documents_by_lang": by_lang,
            "corpus_documents": len(corpus),
            "replicated": len(texts) > len(corpus),
        },
        "notes": list(NOTES),
    }
    try:
        import datatrove

        res["environment"]["datatrove"] = datatrove.__version__ if hasattr(datatrove, "__version__") else "?"
    except ImportError:
        datatrove = None
    log(f"input: {len(texts):,} documents, {res['environment']['input_mb']:.1f} MB from {len(corpus):,} corpus documents")

    cfg = CleanConfig()
    kept_texts: list[str] | None = None
    kept_hints: list[str | None] | None = None
    if "clean" not in args.skip:
        if datatrove is None:
            print("error: datatrove is not installed (pip install -e '.[bench]'); use --skip clean", file=sys.stderr)
            return 2
        clean = bench_clean(texts, hints, cfg, repeat=args.repeat, words=args.words,
                            filters_only="filters-only" not in args.skip, log=log)
        kept_texts = clean.pop("kept_texts")
        kept_hints = clean.pop("kept_langs")
        res["clean"] = clean
        if "e2e" not in args.skip:
            log("clean: end-to-end llmpipe run clean")
            with tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp:
                res["clean_e2e"] = bench_clean_e2e(texts, hints, tmp)
    if "pack" not in args.skip:
        if kept_texts is None:
            kept = OursClean(cfg).run(texts, hints, dedup=False)
            kept_texts, kept_hints = kept["kept_texts"], kept["kept_langs"]
        if args.tokenizer:
            tokenizer, special = load_tokenizer_dir(args.tokenizer)
            res["tokenizer"] = str(args.tokenizer)
        else:
            log(f"pack: training our BPE at {args.vocab:,} (cached under {cache / 'bench'})")
            tokenizer, special = train_tokenizer(kept_texts, kept_hints, args.vocab, cache_dir=cache / "bench")
            res["tokenizer"] = f"ours, trained BPE {tokenizer.get_vocab_size():,}"
        res["pack"] = bench_pack(kept_texts, tokenizer, special, PackConfig(), repeat=args.repeat, log=log)
        res["environment"]["tokenizers_parallelism"] = os.environ.get("TOKENIZERS_PARALLELISM", "(unset: on)")

    print(format_report(res))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
