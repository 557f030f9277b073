"""collect: local files and globs, s3:// prefixes and HF datasets -> ``raw/`` documents.

Every file that cannot be read as text (invalid UTF-8, binary, empty) and every bad record is
counted by reason and listed in ``raw/problems.jsonl`` with its path; nothing is dropped silently.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from pydantic import Field

from pipeline.config import StrictModel
from pipeline.data.documents import RAW_SCHEMA, DocumentWriter
from pipeline.data.readers import Problem, Source, iter_source, source_name
from pipeline.errors import InputError
from pipeline.stage import Stage, StageContext
from pipeline.storage import OutputDir


class CollectConfig(StrictModel):
    sources: list[Source] = Field(..., min_length=1)
    docs_per_part: int = Field(20000, ge=1, description="documents per output parquet file")


class CollectStage(Stage):
    name = "collect"
    config = CollectConfig
    OUTPUT = "raw"

    def run(self, cfg: CollectConfig, ctx: StageContext, out: OutputDir) -> dict[str, Any]:
        writer = DocumentWriter(out, RAW_SCHEMA, cfg.docs_per_part)
        problems: Counter[str] = Counter()
        by_source: dict[str, int] = {}
        by_hint: Counter[str] = Counter()
        chars = 0
        with out.open("problems.jsonl", "wb") as log:
            for source in cfg.sources:
                label = source_name(source)
                kept = 0
                items = iter_source(source, storage_options=ctx.storage.storage_options)  # bad paths fail here
                with ctx.bar(desc=f"collect {label}"[:40], unit=" doc") as bar:
                    for item in items:
                        if isinstance(item, Problem):
                            problems[item.reason] += 1
                            record = {"source": label, "path": item.path, "reason": item.reason, "detail": item.detail}
                            log.write((json.dumps(record, ensure_ascii=False) + "\n").encode())
                            continue
                        writer.write({"id": item.id, "text": item.text, "source": item.source, "lang_hint": item.lang_hint})
                        kept += 1
                        chars += len(item.text)
                        by_hint[item.lang_hint or "unknown"] += 1
                        bar.update()
                by_source[label] = kept
        parts = writer.close()
        if writer.rows == 0:
            detail = ", ".join(f"{k}: {v}" for k, v in problems.items()) or "no files matched"
            raise InputError(f"collect found no documents in any source ({detail}); see the sources in the config")
        for reason, count in sorted(problems.items()):
            ctx.log(f"collect: skipped {count} x {reason} (listed in {out.name}/problems.jsonl)")
        return {
            "documents": writer.rows,
            "characters": chars,
            "parts": parts,
            "by_source": by_source,
            "by_language_hint": dict(by_hint),
            "problems": dict(problems),
        }

    def summary(self, m: dict[str, Any]) -> list[tuple[str, Any]]:
        rows: list[tuple[str, Any]] = [("documents", m["documents"]), ("characters", m["characters"])]
        rows += [(f"  from {k}", v) for k, v in m["by_source"].items()]
        rows += [(f"  hint {k}", v) for k, v in sorted(m["by_language_hint"].items())]
        rows += [(f"skipped: {k}", v) for k, v in sorted(m["problems"].items())]
        return rows


STAGE = CollectStage()
