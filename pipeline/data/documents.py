"""Document folders (``raw/``, ``clean/``): parquet parts in global document order.

Columns: ``id``, ``text``, ``source``, ``lang_hint``; ``clean/`` adds ``lang`` and
``lang_score``. Parts are written with row groups of ``ROW_GROUP`` rows so that a rank can
read its slice of the global order without scanning the rest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import InputError
from pipeline.storage import Artifact, OutputDir

ROW_GROUP = 2048

RAW_SCHEMA = pa.schema(
    [("id", pa.string()), ("text", pa.string()), ("source", pa.string()), ("lang_hint", pa.string())]
)
CLEAN_SCHEMA = RAW_SCHEMA.append(pa.field("lang", pa.string())).append(pa.field("lang_score", pa.float32()))


class DocumentWriter:
    """Writes rows into ``{prefix}-NNNNN.parquet`` files of at most ``docs_per_part`` rows."""

    def __init__(self, out: OutputDir, schema: pa.Schema, docs_per_part: int, prefix: str = "part"):
        self.out, self.schema, self.docs_per_part, self.prefix = out, schema, docs_per_part, prefix
        self.parts: list[dict[str, Any]] = []
        self._buf: dict[str, list[Any]] = {name: [] for name in schema.names}
        self._writer: pq.ParquetWriter | None = None
        self._fh = None
        self._rows_in_part = 0
        self.rows = 0

    def write(self, row: dict[str, Any]) -> None:
        for name in self.schema.names:
            self._buf[name].append(row.get(name))
        if len(self._buf["id"]) >= ROW_GROUP:
            self._flush()

    def _flush(self) -> None:
        n = len(self._buf["id"])
        while n:
            if self._writer is None:
                rel = f"{self.prefix}-{len(self.parts):05d}.parquet"
                self._fh = self.out.open(rel, "wb")
                self._writer = pq.ParquetWriter(self._fh, self.schema, compression="zstd")
                self.parts.append({"file": rel, "rows": 0})
                self._rows_in_part = 0
            take = min(n, self.docs_per_part - self._rows_in_part)
            table = pa.table({k: v[:take] for k, v in self._buf.items()}, schema=self.schema)
            self._writer.write_table(table, row_group_size=ROW_GROUP)
            self._buf = {k: v[take:] for k, v in self._buf.items()}
            self._rows_in_part += take
            self.parts[-1]["rows"] += take
            self.rows += take
            n -= take
            if self._rows_in_part >= self.docs_per_part:
                self._close_part()

    def _close_part(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._fh.close()
            self._writer = self._fh = None

    def close(self) -> list[dict[str, Any]]:
        self._flush()
        self._close_part()
        return self.parts


@dataclass
class DocumentSet:
    """Reads a committed document artifact in global order, whole or by [start, stop) slices."""

    artifact: Artifact

    @property
    def parts(self) -> list[dict[str, Any]]:
        parts = self.artifact.metrics.get("parts")
        if parts is None:
            raise InputError(f"{self.artifact.url()} has no part list in its manifest; rerun its stage with --force")
        if not isinstance(parts, list) or not all(
                isinstance(p, dict) and isinstance(p.get("file"), str) and isinstance(p.get("rows"), int)
                and not isinstance(p.get("rows"), bool) and p["rows"] >= 0 for p in parts):
            raise InputError(f"{self.artifact.url()}: the manifest's part list is malformed (expected [{{file, rows}}]); "
                             "rerun its stage with --force")
        return parts

    def __len__(self) -> int:
        return sum(p["rows"] for p in self.parts)

    @property
    def columns(self) -> list[str]:
        """The column names of the parts (read from the first part's schema; [] when there are no parts)."""
        if not self.parts:
            return []
        try:
            with self.artifact.open(self.parts[0]["file"], "rb") as fh:
                return list(pq.ParquetFile(fh).schema_arrow.names)
        except (OSError, pa.ArrowException) as exc:
            raise InputError(f"cannot read {self.artifact.url(self.parts[0]['file'])}: {exc}") from None

    def iter_batches(
        self, start: int = 0, stop: int | None = None, columns: list[str] | None = None, batch_size: int = 1024
    ) -> Iterator[dict[str, list[Any]]]:
        """Yield column dicts covering global rows [start, stop)."""
        stop = len(self) if stop is None else stop
        offset = 0
        for part in self.parts:
            p_start, p_stop = offset, offset + part["rows"]
            offset = p_stop
            if p_stop <= start or p_start >= stop:
                continue
            lo, hi = max(start, p_start) - p_start, min(stop, p_stop) - p_start
            try:
                with self.artifact.open(part["file"], "rb") as fh:
                    pf = pq.ParquetFile(fh)
                    yield from _read_slice(pf, lo, hi, columns, batch_size)
            except (OSError, pa.ArrowException) as exc:
                raise InputError(f"cannot read {self.artifact.url(part['file'])}: {exc}") from None


def _read_slice(pf: pq.ParquetFile, lo: int, hi: int, columns: list[str] | None, batch_size: int) -> Iterator[dict[str, list[Any]]]:
    row = 0
    for g in range(pf.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        g_lo, g_hi = row, row + n
        row = g_hi
        if g_hi <= lo or g_lo >= hi:
            continue
        table = pf.read_row_group(g, columns=columns)
        table = table.slice(max(lo, g_lo) - g_lo, min(hi, g_hi) - max(lo, g_lo))
        for batch in table.to_batches(max_chunksize=batch_size):
            yield batch.to_pydict()


def split_range(total: int, rank: int, world: int) -> tuple[int, int]:
    """The contiguous [start, stop) slice of ``total`` rows that ``rank`` of ``world`` owns."""
    return total * rank // world, total * (rank + 1) // world
