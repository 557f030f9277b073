"""clean: ``raw/`` -> ``clean/``: normalise, filter, identify the language, deduplicate.

Sharded, in steps (``STEPS``), so that no process ever holds the whole corpus: every rank runs every
step on its share and waits, between steps, for the other ranks' parts of the step before (a barrier
on committed parts in the run root). Rank ``r`` of ``W`` owns the contiguous slice
``split_range(len(raw), r, W)`` of the input; a document is named by its position in the input, so the
decisions depend only on the corpus and the config, never on ``W``.

1. ``signatures`` (every rank): normalise and filter its documents, keep the survivors (``pre-*.parquet``),
   their positions (``ids.i64``) and MinHash signatures (``sigs.u32``), and send one bucket record per
   LSH band (with the exact key) to bucket task ``task_of(band hash)`` (``bands/<task>.rec``).
2. ``buckets`` (task ``r`` = rank ``r``): sort the records of its slice of the hash range: exact copies
   (``exact/<owner>.pair``) and candidate pairs (``pairs/<owner of the later>.pair``), and ask the owner
   of each earlier document for its signature (``requests/<owner>.req``).
3. ``exchange`` (every rank): send the requested signatures to the ranks that need them (``rows/<rank>.row``).
4. ``confirm`` (every rank): keep the candidate pairs of its documents whose signatures agree on
   ``threshold * num_perm`` positions (``confirmed.pair``).
5. ``resolve`` (rank 0 alone): the greedy rule over all confirmed pairs, in global order
   (``near/<owner>.pair``). Its memory follows the number of near-duplicate pairs, not the corpus.
6. ``filter`` (every rank): write its documents that are no duplicate (``part-*.parquet``).

The merge hard-links (or, on S3, copies) the filter parts into ``clean/`` and adds up the counts.
``pipeline/data/dedup.py`` holds the decisions (``band_records``, ``bucket_step``, ``confirm``,
``greedy``); ``find_duplicates`` there runs them in one process and is what the tests compare with.

Every dropped document is counted by reason and the first ``samples_per_reason`` of each reason (in
global order) are written to ``drops/<reason>.jsonl``. The stage checks ``documents in == kept +
dropped`` before it commits.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from typing import IO, Any, Iterator

import numpy as np
from pydantic import Field, model_validator

from pipeline.config import ArtifactName, ExecField, distinct_io
from pipeline.data import dedup
from pipeline.data.dedup import DedupConfig, MinHasher, exact_key
from pipeline.data.documents import CLEAN_SCHEMA, DocumentSet, DocumentWriter, split_range
from pipeline.data.filters import DocumentFilter, FilterConfig
from pipeline.errors import PipelineError
from pipeline.stage import ShardedStage, StageContext, Step
from pipeline.storage import Artifact, OutputDir


class CleanConfig(FilterConfig):
    input: ArtifactName = Field("raw", description="the collected documents to read (an artifact under the run root)")
    output: ArtifactName = Field("clean", description="where the kept documents go; a second, stricter clean config "
                                                      "can write e.g. clean-strict for a second pretraining phase")
    workers: int = ExecField(1, ge=1, le=256, description="local processes sharing the map step (a cluster uses Indexed Job pods)")
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    samples_per_reason: int = Field(20, ge=0, description="dropped documents kept per reason for inspection")
    docs_per_part: int = Field(20000, ge=1)

    @model_validator(mode="after")
    def _check_io(self) -> "CleanConfig":
        return distinct_io(self)


SAMPLE_CHARS = 2000
DEDUP_REASONS = {1: "dedup.exact", 2: "dedup.near"}
REQUEST = np.dtype([("d", "<i8"), ("to", "<i8")])  # send the signature of document d to rank `to`
_S3_BLOCK = 8 * 2**20  # write buffer per open file on an object store (a rank has one per bucket task open)


def _row_dtype(num_perm: int) -> np.dtype:
    return np.dtype([("d", "<i8"), ("s", "<u4", (num_perm,))])


def _owners(starts: np.ndarray, docs: np.ndarray) -> np.ndarray:
    """The rank that owns each document position (``starts``: every rank's first position)."""
    return np.searchsorted(starts, docs, side="right") - 1


def _write(out: OutputDir, rel: str, arr: np.ndarray) -> None:
    if len(arr):
        with out.open(rel, "wb") as fh:
            fh.write(np.ascontiguousarray(arr).tobytes())


def _by_destination(arr: np.ndarray, dest: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """``arr``'s rows grouped by ``dest`` (each row's rank or task), in the rows' order within each group."""
    order = np.argsort(dest, kind="stable")
    arr, dest = arr[order], dest[order]
    cuts = np.flatnonzero(np.diff(dest)) + 1
    for lo, hi in zip(np.concatenate(([0], cuts)), np.concatenate((cuts, [len(arr)]))):
        if hi > lo:
            yield int(dest[lo]), arr[lo:hi]


def _by_owner(out: OutputDir, folder: str, arr: np.ndarray, owner: np.ndarray, suffix: str) -> None:
    """Write ``arr``'s rows into ``folder/<owner>.<suffix>``, one file per owner that has rows."""
    for who, rows in _by_destination(arr, owner):
        _write(out, f"{folder}/{who:05d}.{suffix}", rows)


def _read(part: Artifact, rel: str, dtype: np.dtype) -> np.ndarray:
    """A binary array file of a committed part; empty when the part did not write it (nothing to send)."""
    if rel not in _file_set(part):
        return np.zeros(0, dtype=dtype)
    if part.storage.is_local:
        return np.fromfile(part.path(rel), dtype=dtype)
    with part.open(rel, "rb") as fh:
        return np.frombuffer(fh.read(), dtype=dtype)


def _read_all(parts: list[Artifact], rel: str, dtype: np.dtype) -> np.ndarray:
    arrays = [_read(p, rel, dtype) for p in parts]
    return np.concatenate(arrays) if arrays else np.zeros(0, dtype=dtype)


_FILE_SETS: dict[str, frozenset[str]] = {}


def _file_set(part: Artifact) -> frozenset[str]:
    key = part.fingerprint
    if key not in _FILE_SETS:
        _FILE_SETS[key] = frozenset(f["path"] for f in part.manifest.get("files", []))
    return _FILE_SETS[key]


def _signatures(part: Artifact, num_perm: int) -> np.ndarray:
    """A rank's signatures, ``(documents, num_perm)`` uint32: memory-mapped on a local or shared filesystem."""
    if "sigs.u32" not in _file_set(part):
        return np.zeros((0, num_perm), dtype=np.uint32)
    if part.storage.is_local:
        return np.memmap(part.path("sigs.u32"), dtype=np.uint32, mode="r").reshape(-1, num_perm)
    return _read(part, "sigs.u32", np.dtype(np.uint32)).reshape(-1, num_perm)


def _starts(n: int, world: int) -> np.ndarray:
    return np.array([split_range(n, r, world)[0] for r in range(world)], dtype=np.int64)


class _Samples:
    """The first N dropped documents per reason, in the order they were seen."""

    def __init__(self, limit: int):
        self.limit = limit
        self.by_reason: dict[str, list[dict[str, Any]]] = defaultdict(list)

    def add(self, reason: str, record: dict[str, Any]) -> None:
        bucket = self.by_reason[reason]
        if len(bucket) < self.limit:
            record = dict(record, text=record["text"][:SAMPLE_CHARS])
            bucket.append(record)

    def write(self, out: OutputDir) -> list[str]:
        files = []
        for reason, records in sorted(self.by_reason.items()):
            rel = f"drops/{reason}.jsonl"
            out.write_text(rel, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
            files.append(rel)
        return files


def _top(counter: Counter[str], n: int = 3) -> str:
    return ", ".join(f"{k}: {v}" for k, v in counter.most_common(n)) or "nothing dropped"


class CleanStage(ShardedStage):
    name = "clean"
    config = CleanConfig
    OUTPUT = "clean"
    INPUTS = ("raw",)  # the defaults; `inputs(cfg)` and the output follow cfg.input / cfg.output

    STEPS = (Step("signatures"), Step("buckets"), Step("exchange"), Step("confirm"), Step("resolve", single=True),
             Step("filter"))

    def inputs(self, cfg: CleanConfig) -> list[str]:
        return [cfg.input]

    # -------------------------------------------------------------------------------- 1. signatures

    def step_signatures(self, cfg: CleanConfig, ctx: StageContext, out: OutputDir) -> dict[str, Any]:
        raw = DocumentSet(ctx.inputs[cfg.input])
        n_raw = len(raw)
        start, stop = split_range(n_raw, ctx.rank, ctx.world)
        doc_filter = DocumentFilter(cfg)
        use_exact, use_near = cfg.dedup.exact, cfg.dedup.near
        hasher = MinHasher(cfg.dedup) if use_near else None
        writer = DocumentWriter(out, CLEAN_SCHEMA, cfg.docs_per_part, prefix="pre")
        samples = _Samples(cfg.samples_per_reason)
        dropped: Counter[str] = Counter()
        chars_in = records = 0
        opts = {} if out.storage.is_local else {"block_size": _S3_BLOCK}
        files: dict[str, IO[bytes]] = {}

        def send(rel: str, arr: np.ndarray) -> None:
            if len(arr):
                if rel not in files:
                    files[rel] = out.open(rel, "wb", **opts)
                files[rel].write(np.ascontiguousarray(arr).tobytes())

        try:
            with ctx.bar(total=stop - start, desc="clean", unit=" doc") as bar:
                pos = start
                for batch in raw.iter_batches(start, stop, batch_size=512):
                    texts, hints = batch["text"], batch["lang_hint"]
                    chars_in += sum(map(len, texts))
                    results = doc_filter.batch(texts, hints, batch["source"])
                    kept_texts, kept_pos = [], []
                    for i, res in enumerate(results):
                        if res.reason is not None:
                            dropped[res.reason] += 1
                            samples.add(res.reason, {"id": batch["id"][i], "reason": res.reason, "lang": res.lang,
                                                     "lang_score": res.lang_score, "text": texts[i]})
                            continue
                        writer.write({"id": batch["id"][i], "text": res.text, "source": batch["source"][i],
                                      "lang_hint": hints[i], "lang": res.lang, "lang_score": res.lang_score})
                        kept_texts.append(res.text)
                        kept_pos.append(pos + i)
                    pos += len(texts)
                    bar.update(len(texts))
                    if not kept_texts or not (use_exact or use_near):
                        continue
                    docs = np.asarray(kept_pos, dtype=np.int64)
                    sigs = hasher.signatures(kept_texts) if hasher is not None else None
                    keys = dedup.key_matrix([exact_key(t) for t in kept_texts]) if use_exact else None
                    send("ids.i64", docs)
                    if sigs is not None:
                        send("sigs.u32", sigs)
                    recs = dedup.band_records(sigs, keys, docs, cfg.dedup)
                    records += len(recs)
                    for task, rows in _by_destination(recs, dedup.task_of(recs["h"], ctx.world)):
                        send(f"bands/{task:05d}.rec", rows)
        finally:
            for fh in files.values():
                fh.close()
        return {
            "range": [start, stop],
            "documents_in": stop - start,
            "kept": writer.rows,
            "dropped_by_reason": dict(dropped),
            "characters_in": chars_in,
            "parts": writer.close(),
            "sample_files": samples.write(out),
            "bucket_records": records,
            "pii_replaced": dict(doc_filter.pii_counts),
            "pii_documents": dict(doc_filter.pii_documents),
            "per_source_documents": dict(doc_filter.per_source_documents),
        }

    # ----------------------------------------------------------------------------------- 2. buckets

    def step_buckets(self, cfg: CleanConfig, ctx: StageContext, out: OutputDir) -> dict[str, Any]:
        sig_parts = ctx.steps["signatures"]
        dtype = dedup.KEYED_RECORD if cfg.dedup.exact else dedup.RECORD
        records = _read_all(sig_parts, f"bands/{ctx.rank:05d}.rec", dtype)
        exact, pairs = dedup.bucket_step(records, cfg.dedup.near)
        del records
        starts = _starts(len(DocumentSet(ctx.inputs[cfg.input])), ctx.world)
        _by_owner(out, "exact", exact, _owners(starts, exact["l"]), "pair")
        _by_owner(out, "pairs", pairs, _owners(starts, pairs["l"]), "pair")
        requests = np.empty(len(pairs), dtype=REQUEST)
        requests["d"], requests["to"] = pairs["e"], _owners(starts, pairs["l"])
        requests = np.unique(requests)
        _by_owner(out, "requests", requests, _owners(starts, requests["d"]), "req")
        return {"exact_duplicates": len(exact), "candidate_pairs": len(pairs)}

    # ---------------------------------------------------------------------------------- 3. exchange

    def step_exchange(self, cfg: CleanConfig, ctx: StageContext, out: OutputDir) -> dict[str, Any]:
        num_perm = cfg.dedup.num_perm
        requests = np.unique(_read_all(ctx.steps["buckets"], f"requests/{ctx.rank:05d}.req", REQUEST))
        own = ctx.steps["signatures"][ctx.rank]
        ids, sigs = _read(own, "ids.i64", np.dtype(np.int64)), _signatures(own, num_perm)
        row_dtype = _row_dtype(num_perm)
        for to in np.unique(requests["to"]):
            docs = requests["d"][requests["to"] == to]  # sorted: requests are unique-sorted by (d, to)
            rows = np.empty(len(docs), dtype=row_dtype)
            rows["d"], rows["s"] = docs, sigs[np.searchsorted(ids, docs)]
            _write(out, f"rows/{int(to):05d}.row", rows)
        return {"signatures_sent": len(requests)}

    # ----------------------------------------------------------------------------------- 4. confirm

    def step_confirm(self, cfg: CleanConfig, ctx: StageContext, out: OutputDir) -> dict[str, Any]:
        num_perm = cfg.dedup.num_perm
        pairs = np.unique(_read_all(ctx.steps["buckets"], f"pairs/{ctx.rank:05d}.pair", dedup.PAIR))
        confirmed = np.zeros(0, dtype=dedup.PAIR)
        if len(pairs):
            rows = _read_all(ctx.steps["exchange"], f"rows/{ctx.rank:05d}.row", _row_dtype(num_perm))
            rows = rows[np.argsort(rows["d"], kind="stable")]
            own = ctx.steps["signatures"][ctx.rank]
            ids, sigs = _read(own, "ids.i64", np.dtype(np.int64)), _signatures(own, num_perm)
            needed = dedup.min_agree(cfg.dedup, num_perm)
            ok = np.empty(len(pairs), dtype=bool)
            chunk = 1 << 16
            for lo in range(0, len(pairs), chunk):
                p = pairs[lo : lo + chunk]
                later = sigs[np.searchsorted(ids, p["l"])]
                earlier = rows["s"][np.searchsorted(rows["d"], p["e"])]
                ok[lo : lo + chunk] = dedup.confirm(later, earlier, needed)
            confirmed = pairs[ok]
        _write(out, "confirmed.pair", confirmed)
        return {"candidate_pairs": len(pairs), "confirmed_pairs": len(confirmed)}

    # ----------------------------------------------------------------------------------- 5. resolve

    def step_resolve(self, cfg: CleanConfig, ctx: StageContext, out: OutputDir) -> dict[str, Any]:
        # the ranks own increasing slices and each file is sorted: the concatenation is in global order
        confirmed = _read_all(ctx.steps["confirm"], "confirmed.pair", dedup.PAIR)
        near = dedup.greedy(confirmed)
        starts = _starts(len(DocumentSet(ctx.inputs[cfg.input])), ctx.world)
        _by_owner(out, "near", near, _owners(starts, near["l"]), "pair")
        return {"confirmed_pairs": len(confirmed), "near_duplicates": len(near)}

    # ------------------------------------------------------------------------------------ 6. filter

    def step_filter(self, cfg: CleanConfig, ctx: StageContext, out: OutputDir) -> dict[str, Any]:
        own = ctx.steps["signatures"][ctx.rank]
        rel = f"{ctx.rank:05d}.pair"
        exact = _read_all(ctx.steps["buckets"], f"exact/{rel}", dedup.PAIR)
        near = _read(ctx.steps["resolve"][0], f"near/{rel}", dedup.PAIR)
        drops = np.concatenate((exact, near))
        kinds = np.concatenate((np.full(len(exact), dedup.EXACT, np.int8), np.full(len(near), dedup.NEAR, np.int8)))
        order = np.argsort(drops["l"], kind="stable")
        drops, kinds = drops[order], kinds[order]
        if len(np.unique(drops["l"])) != len(drops):
            raise PipelineError("clean: a document was decided a duplicate twice; rerun clean with --force")
        has_dedup = cfg.dedup.exact or cfg.dedup.near
        ids = _read(own, "ids.i64", np.dtype(np.int64)) if has_dedup else None
        writer = DocumentWriter(out, CLEAN_SCHEMA, cfg.docs_per_part)
        samples = _Samples(cfg.samples_per_reason)
        dropped: Counter[str] = Counter()
        kept_by_lang: Counter[str] = Counter()
        chars_out = row = 0
        pre = DocumentSet(own)
        with ctx.bar(total=len(pre), desc="clean filter", unit=" doc") as bar:
            for batch in pre.iter_batches(batch_size=1024):
                n = len(batch["id"])
                if ids is not None:
                    pos = ids[row : row + n]
                    at = np.minimum(np.searchsorted(drops["l"], pos), max(len(drops) - 1, 0))
                    hit = (drops["l"][at] == pos) if len(drops) else np.zeros(n, dtype=bool)
                else:
                    hit = np.zeros(n, dtype=bool)
                for i in range(n):
                    if hit[i]:
                        reason = DEDUP_REASONS[int(kinds[at[i]])]
                        dropped[reason] += 1
                        samples.add(reason, {"id": batch["id"][i], "reason": reason,
                                             "duplicate_of_position": int(drops["e"][at[i]]),
                                             "lang": batch["lang"][i], "text": batch["text"][i]})
                    else:
                        writer.write({name: batch[name][i] for name in CLEAN_SCHEMA.names})
                        kept_by_lang[batch["lang"][i] or "unknown"] += 1
                        chars_out += len(batch["text"][i])
                row += n
                bar.update(n)
        if ids is not None and row != len(ids):
            raise PipelineError(f"clean: rank {ctx.rank} kept {row} documents but signed {len(ids)}; rerun with --force")
        if sum(dropped.values()) != len(drops):
            raise PipelineError(f"clean: rank {ctx.rank} was sent {len(drops)} duplicates but found "
                                f"{sum(dropped.values())} of them; rerun with --force")
        return {
            "kept": writer.rows,
            "dropped_by_reason": dict(dropped),
            "kept_by_language": dict(kept_by_lang),
            "characters_out": chars_out,
            "parts": writer.close(),
            "sample_files": samples.write(out),
        }

    # ------------------------------------------------------------------------------------- merge

    def merge(self, cfg: CleanConfig, ctx: StageContext, out: OutputDir, parts: list[Artifact]) -> dict[str, Any]:
        raw = DocumentSet(ctx.inputs[cfg.input])
        total_in = len(raw)
        signed = ctx.steps["signatures"]
        covered = sum(p.metrics["documents_in"] for p in signed)
        if covered != total_in:
            raise PipelineError(f"clean parts cover {covered} documents but {cfg.input}/ holds {total_in}; rerun with --force")

        samples = _Samples(cfg.samples_per_reason)
        dropped: Counter[str] = Counter()
        for p in [*signed, *parts]:  # counts add up; samples are the first N in global order (reasons are disjoint)
            dropped.update(p.metrics["dropped_by_reason"])
            for rel in p.metrics["sample_files"]:
                with p.open(rel, "rb") as fh:
                    for line in fh:
                        record = json.loads(line)
                        samples.add(record["reason"], record)
        _name_duplicate_targets(samples, raw)

        out_parts = []
        kept_by_lang: Counter[str] = Counter()
        for p in parts:
            kept_by_lang.update(p.metrics["kept_by_language"])
            sha = {f["path"]: (f["size"], f["sha256"]) for f in p.manifest.get("files", [])}
            for part in p.metrics["parts"]:
                rel = f"part-{len(out_parts):05d}.parquet"
                out.take_from(p, part["file"], rel)
                size, digest = sha[part["file"]]
                out.record(rel, size, digest)
                out_parts.append({"file": rel, "rows": part["rows"]})
        kept = sum(p["rows"] for p in out_parts)
        n_dropped = sum(dropped.values())
        if total_in != kept + n_dropped:
            raise PipelineError(f"clean accounting failed: {total_in} in != {kept} kept + {n_dropped} dropped")
        if kept == 0:
            raise PipelineError(
                f"clean kept none of {total_in} documents ({_top(dropped)}); check langid.languages and the thresholds"
            )
        steps = {name: _step_stats(ps) for name, ps in [*ctx.steps.items(), ("filter", parts)]}
        return {
            "documents_in": total_in,
            "kept": kept,
            "dropped": n_dropped,
            "dropped_by_reason": dict(sorted(dropped.items(), key=lambda kv: -kv[1])),
            "kept_by_language": dict(kept_by_lang),
            "characters_in": sum(p.metrics["characters_in"] for p in signed),
            "characters_out": sum(p.metrics["characters_out"] for p in parts),
            "parts": out_parts,
            "sample_files": samples.write(out),
            "workers": len(parts),
            "dedup": {
                "bucket_records": sum(p.metrics["bucket_records"] for p in signed),
                "candidate_pairs": sum(p.metrics["candidate_pairs"] for p in ctx.steps["confirm"]),
                "confirmed_pairs": ctx.steps["resolve"][0].metrics["confirmed_pairs"],
            },
            "steps": steps,
            "pii_replaced": _add(p.metrics.get("pii_replaced", {}) for p in signed),
            "pii_documents": _add(p.metrics.get("pii_documents", {}) for p in signed),
            "per_source_documents": _add(p.metrics.get("per_source_documents", {}) for p in signed),
        }

    def summary(self, m: dict[str, Any]) -> list[tuple[str, Any]]:
        rows: list[tuple[str, Any]] = [
            ("documents in", m["documents_in"]),
            ("kept", m["kept"]),
            ("dropped", m["dropped"]),
        ]
        by_count = sorted(m["dropped_by_reason"].items(), key=lambda kv: (-kv[1], kv[0]))
        rows += [(f"  {reason}", n) for reason, n in by_count]
        rows += [(f"kept {lang}", n) for lang, n in sorted(m["kept_by_language"].items())]
        rows.append(("characters kept", f"{m['characters_out']:,} of {m['characters_in']:,}"))
        rows.append(("drop samples", "drops/<reason>.jsonl in the output folder"))
        if m.get("pii_replaced"):
            rows.append(("PII replaced", ", ".join(f"{k} {v:,}" for k, v in m["pii_replaced"].items())
                         + f" (in {m.get('pii_documents', {}).get('any', 0):,} documents)"))
        unmatched = [k for k, v in (m.get("per_source_documents") or {}).items() if not v]
        if unmatched:
            rows.append(("per_source unmatched", ", ".join(unmatched) + " (no document has that source name)"))
        if m.get("dedup"):
            d = m["dedup"]
            rows.append(("dedup pairs", f"{d['candidate_pairs']:,} candidates, {d['confirmed_pairs']:,} confirmed"))
        steps = m.get("steps") or {}
        for name in [st.name for st in self.STEPS if st.name in steps]:
            st = steps[name]
            rows.append((f"step {name}", f"{st['seconds']:.1f}s, peak {st['peak_rss_mb']:.0f} MB per rank"))
        return rows


def _add(counts: Any) -> dict[str, int]:
    total: Counter[str] = Counter()
    for c in counts:
        total.update(c)
    return dict(sorted(total.items()))


def _step_stats(parts: list[Artifact]) -> dict[str, Any]:
    """Wall time (the slowest rank) and peak resident memory (the largest rank) of one step."""
    secs = [float(p.manifest.get("duration_s") or 0) for p in parts]
    rss = [float(p.manifest.get("peak_rss_mb") or 0) for p in parts]
    return {"seconds": round(max(secs, default=0.0), 3), "peak_rss_mb": round(max(rss, default=0.0), 1)}


def _name_duplicate_targets(samples: _Samples, raw: DocumentSet) -> None:
    """Give each dedup sample the id of the document it duplicates (a few lookups by position in the input)."""
    for reason in DEDUP_REASONS.values():
        for record in samples.by_reason.get(reason, []):
            pos = record.pop("duplicate_of_position", None)
            if pos is not None:
                batch = next(raw.iter_batches(pos, pos + 1, columns=["id"], batch_size=1))
                record["duplicate_of"] = batch["id"][0]


STAGE = CleanStage()
