"""clean: ``raw/`` -> ``clean/``: normalise, filter, identify the language, deduplicate.

Sharded. Each rank owns a contiguous slice of the global document order (``run_part``): it
normalises and filters its documents and stores, for the ones it keeps, an exact-dedup key
and a MinHash signature. One ``merge`` then deduplicates across the *whole* corpus in global
order (the first copy wins), so the result is the same whatever the number of ranks.

Every dropped document is counted by reason and the first ``samples_per_reason`` of each
reason (in global order) are written to ``drops/<reason>.jsonl``. The stage checks
``documents in == kept + dropped`` before it commits.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from typing import Any

import numpy as np
from pydantic import Field, model_validator

from pipeline.config import ArtifactName, ExecField, distinct_io
from pipeline.data.dedup import DedupConfig, MinHasher, exact_key, find_duplicates, load_dedup_state, save_dedup_state
from pipeline.data.documents import CLEAN_SCHEMA, DocumentSet, DocumentWriter, split_range
from pipeline.data.filters import DocumentFilter, FilterConfig
from pipeline.errors import PipelineError
from pipeline.stage import ShardedStage, StageContext
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
DEDUP_STATE = "dedup.npz"
DEDUP_REASONS = {1: "dedup.exact", 2: "dedup.near"}


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

    def inputs(self, cfg: CleanConfig) -> list[str]:
        return [cfg.input]

    def run_part(self, cfg: CleanConfig, ctx: StageContext, out: OutputDir) -> dict[str, Any]:
        raw = DocumentSet(ctx.inputs[cfg.input])
        start, stop = split_range(len(raw), ctx.rank, ctx.world)
        doc_filter = DocumentFilter(cfg)
        hasher = MinHasher(cfg.dedup) if cfg.dedup.near else None
        writer = DocumentWriter(out, CLEAN_SCHEMA, cfg.docs_per_part)
        samples = _Samples(cfg.samples_per_reason)
        dropped: Counter[str] = Counter()
        keys: list[bytes] = []
        signatures: list[np.ndarray] = []
        chars_in = 0
        with ctx.bar(total=stop - start, desc="clean", unit=" doc") as bar:
            for batch in raw.iter_batches(start, stop, batch_size=512):
                texts, hints = batch["text"], batch["lang_hint"]
                chars_in += sum(map(len, texts))
                results = doc_filter.batch(texts, hints)
                kept_texts = []
                for i, res in enumerate(results):
                    if res.reason is not None:
                        dropped[res.reason] += 1
                        samples.add(res.reason, {"id": batch["id"][i], "reason": res.reason, "lang": res.lang,
                                                 "lang_score": res.lang_score, "text": texts[i]})
                        continue
                    writer.write({"id": batch["id"][i], "text": res.text, "source": batch["source"][i],
                                  "lang_hint": hints[i], "lang": res.lang, "lang_score": res.lang_score})
                    kept_texts.append(res.text)
                if cfg.dedup.exact:
                    keys.extend(exact_key(t) for t in kept_texts)
                if hasher is not None and kept_texts:
                    signatures.append(hasher.signatures(kept_texts))
                bar.update(len(texts))
        parts = writer.close()
        sig_array = np.concatenate(signatures) if signatures else None
        with out.open(DEDUP_STATE, "wb") as fh:
            save_dedup_state(fh, keys if cfg.dedup.exact else None, sig_array)
        return {
            "range": [start, stop],
            "documents_in": stop - start,
            "kept": writer.rows,
            "dropped_by_reason": dict(dropped),
            "characters_in": chars_in,
            "parts": parts,
            "sample_files": samples.write(out),
        }

    def merge(self, cfg: CleanConfig, ctx: StageContext, out: OutputDir, parts: list[Artifact]) -> dict[str, Any]:
        raw = ctx.inputs[cfg.input]
        total_in = sum(p["rows"] for p in DocumentSet(raw).parts)
        covered = sum(p.metrics["documents_in"] for p in parts)
        if covered != total_in:
            raise PipelineError(f"clean parts cover {covered} documents but raw/ holds {total_in}; rerun with --force")

        # whole-corpus dedup, in global order (ranks own contiguous slices, in rank order)
        n_kept_pre = sum(p.metrics["kept"] for p in parts)
        kind = np.zeros(n_kept_pre, dtype=np.int8)
        dup_of = np.full(n_kept_pre, -1, dtype=np.int64)
        if n_kept_pre and (cfg.dedup.exact or cfg.dedup.near):
            keys: list[bytes] = []
            sigs: list[np.ndarray] = []
            for p in parts:
                with p.open(DEDUP_STATE, "rb") as fh:
                    k, s = load_dedup_state(fh)
                if k is not None:
                    keys.extend(k)
                if s is not None and len(s):
                    sigs.append(s)
            ctx.log(f"clean: deduplicating {n_kept_pre:,} documents across the corpus")
            dup_of, kind = find_duplicates(keys if cfg.dedup.exact else None, np.concatenate(sigs) if sigs else None, cfg.dedup)

        samples = _Samples(cfg.samples_per_reason)
        dropped: Counter[str] = Counter()
        for p in parts:  # filter drops: counts add up; samples are the first N in global order
            dropped.update(p.metrics["dropped_by_reason"])
            for rel in p.metrics["sample_files"]:
                with p.open(rel, "rb") as fh:
                    for line in fh:
                        record = json.loads(line)
                        samples.add(record["reason"], record)

        writer = DocumentWriter(out, CLEAN_SCHEMA, cfg.docs_per_part)
        kept_by_lang: Counter[str] = Counter()
        ids: list[str] = []
        chars_out = 0
        pos = 0
        with ctx.bar(total=n_kept_pre, desc="clean merge", unit=" doc") as bar:
            for p in parts:
                for batch in DocumentSet(p).iter_batches(batch_size=1024):
                    rows = len(batch["id"])
                    for i in range(rows):
                        ids.append(batch["id"][i])
                        k = int(kind[pos])
                        if k:
                            reason = DEDUP_REASONS[k]
                            dropped[reason] += 1
                            samples.add(reason, {"id": batch["id"][i], "reason": reason, "duplicate_of": ids[int(dup_of[pos])],
                                                 "lang": batch["lang"][i], "text": batch["text"][i]})
                        else:
                            writer.write({name: batch[name][i] for name in CLEAN_SCHEMA.names})
                            kept_by_lang[batch["lang"][i] or "unknown"] += 1
                            chars_out += len(batch["text"][i])
                        pos += 1
                    bar.update(rows)
        out_parts = writer.close()
        n_dropped = sum(dropped.values())
        if total_in != writer.rows + n_dropped:
            raise PipelineError(f"clean accounting failed: {total_in} in != {writer.rows} kept + {n_dropped} dropped")
        if writer.rows == 0:
            raise PipelineError(
                f"clean kept none of {total_in} documents ({_top(dropped)}); check langid.languages and the thresholds"
            )
        sample_files = samples.write(out)
        return {
            "documents_in": total_in,
            "kept": writer.rows,
            "dropped": n_dropped,
            "dropped_by_reason": dict(sorted(dropped.items(), key=lambda kv: -kv[1])),
            "kept_by_language": dict(kept_by_lang),
            "characters_in": sum(p.metrics["characters_in"] for p in parts),
            "characters_out": chars_out,
            "parts": out_parts,
            "sample_files": sample_files,
            "workers": len(parts),
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
        return rows


STAGE = CleanStage()
