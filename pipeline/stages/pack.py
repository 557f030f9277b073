"""pack: ``clean/`` + ``tokenizer/`` -> ``shards/``: fixed-length token blocks, train / val.

Sharded. Each rank tokenizes its contiguous slice of the clean documents (BOS/EOS around each
document), concatenates them (per training stream: language and source, ``stream_by``) and cuts ``seq_len``
blocks into memory-mappable shard files with sha256 checksums. The merge gathers every rank's shards into ``shards/`` (hard links on a
local filesystem, server-side copies on S3) and writes one ``index.json`` that the training
reader (:class:`pipeline.data.packed.PackedDataset`) uses.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

from pydantic import Field, model_validator
from tokenizers import Tokenizer

from pipeline.config import ArtifactName, ExecField, distinct_io
from pipeline.data.documents import DocumentSet, split_range
from pipeline.data.packing import Packer, PackingConfig, merge_indexes
from pipeline.data.shards import write_index
from pipeline.errors import InputError
from pipeline.stage import ShardedStage, StageContext
from pipeline.storage import Artifact, OutputDir


class PackConfig(PackingConfig):
    input: ArtifactName = Field("clean", description="the cleaned documents to pack (e.g. clean-strict)")
    output: ArtifactName = Field("shards", description="where the shards go (e.g. shards-clean: pretrain phases name it)")
    batch_size: int = ExecField(1000, ge=1, description="documents per tokenizer batch")
    workers: int = ExecField(1, ge=1, le=256, description="local processes sharing the work (a cluster uses Indexed Job pods)")

    @model_validator(mode="after")
    def _check_io(self) -> "PackConfig":
        return distinct_io(self)


PART_INDEX = "index.json"


def load_tokenizer(art: Artifact) -> tuple[Tokenizer, dict[str, Any]]:
    """The fast tokenizer and its special-token ids from a ``tokenizer/`` artifact."""
    with tempfile.TemporaryDirectory() as tmp:
        local = art.download(tmp)
        path = os.path.join(local, "tokenizer.json")
        if not os.path.exists(path):
            raise InputError(f"{art.url()} has no tokenizer.json; rerun the tokenizer stage")
        tokenizer = Tokenizer.from_file(path)
        with open(os.path.join(local, "tokenizer_config.json"), encoding="utf-8") as fh:
            tok_cfg = json.load(fh)

    def token_id(key: str) -> int | None:
        value = tok_cfg.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        return tokenizer.token_to_id(value) if value else None

    return tokenizer, {"bos_id": token_id("bos_token"), "eos_id": token_id("eos_token"), "vocab_size": tokenizer.get_vocab_size()}


class PackStage(ShardedStage):
    name = "pack"
    config = PackConfig
    OUTPUT = "shards"
    INPUTS = ("clean", "tokenizer")  # the defaults; `inputs(cfg)` and the output follow cfg.input / cfg.output

    def inputs(self, cfg: PackConfig) -> list[str]:
        return [cfg.input, "tokenizer"]

    def run_part(self, cfg: PackConfig, ctx: StageContext, out: OutputDir) -> dict[str, Any]:
        clean = DocumentSet(ctx.inputs[cfg.input])
        start, stop = split_range(len(clean), ctx.rank, ctx.world)
        tokenizer, special = load_tokenizer(ctx.inputs["tokenizer"])
        for key in ("bos_id", "eos_id"):
            if special[key] is None and getattr(cfg, f"add_{key[:3]}"):
                raise InputError(f"the tokenizer has no {key[:3]} token but pack.add_{key[:3]} is true")
        packer = Packer(tokenizer, cfg, out.fs, out.path(), ctx.rank, **special)
        with ctx.bar(total=stop - start, desc="pack", unit=" doc") as bar:
            with_lang = (cfg.val_by_language or "lang" in cfg.stream_by) and "lang" in clean.columns
            with_source = "source" in cfg.stream_by and "source" in clean.columns
            columns = ["id", "text", *(["lang"] if with_lang else []), *(["source"] if with_source else [])]
            for batch in clean.iter_batches(start, stop, columns=columns, batch_size=cfg.batch_size):
                packer.add(batch["id"], batch["text"], batch["lang"] if with_lang else None,
                           batch["source"] if with_source else None)
                bar.update(len(batch["id"]))
        stats = packer.close()
        for split in stats["shards"].values():
            for info in split:
                out.record(info["file"], info["bytes"], info["sha256"])
        index = merge_indexes([stats], seq_len=cfg.seq_len, **special)
        out.write_json(PART_INDEX, index)
        return {"range": [start, stop], **{k: v for k, v in stats.items() if k != "shards"}, "index": PART_INDEX}

    def merge(self, cfg: PackConfig, ctx: StageContext, out: OutputDir, parts: list[Artifact]) -> dict[str, Any]:
        indexes = [p.read_json(PART_INDEX) for p in parts]
        _, special = load_tokenizer(ctx.inputs["tokenizer"])
        index = merge_indexes(indexes, seq_len=cfg.seq_len, **special, from_indexes=True)
        for part, part_index in zip(parts, indexes):
            for split in part_index["splits"].values():
                for shard in split["shards"]:
                    out.take_from(part, shard["file"])
                    out.record(shard["file"], shard["bytes"], shard["sha256"])
        write_index(out.fs, out.path(), index)
        splits = index["splits"]
        if not splits.get("train", {}).get("blocks"):
            raise InputError(
                f"pack produced no training block of {cfg.seq_len} tokens from {len(DocumentSet(ctx.inputs[cfg.input])):,} "
                "documents; lower seq_len or add data"
            )
        return {
            "seq_len": cfg.seq_len,
            "dtype": index["dtype"],
            "blocks": {k: v["blocks"] for k, v in splits.items()},
            "tokens": {k: v["tokens"] for k, v in splits.items()},
            "documents": {k: sum(p.metrics.get("documents", {}).get(k, 0) for p in parts) for k in splits},
            "dropped_tail_tokens": {k: sum(p.metrics.get("dropped_tail_tokens", {}).get(k, 0) for p in parts) for k in splits},
            "shards": sum(len(v["shards"]) for v in splits.values()),
            "workers": len(parts),
            # the training streams (stream_by): what pretrain's mix weights, and the arithmetic of a recipe
            "streams": {name: {"lang": st.get("lang"), "source": st.get("source"), "blocks": st["blocks"],
                               "tokens": st["tokens"], "documents": st.get("documents", 0)}
                        for name, st in (splits.get("train", {}).get("streams") or {}).items()},
        }

    def summary(self, m: dict[str, Any]) -> list[tuple[str, Any]]:
        rows: list[tuple[str, Any]] = [("block length", m["seq_len"]), ("dtype", m["dtype"])]
        for split in m["blocks"]:
            rows.append((f"{split}", f"{m['blocks'][split]:,} blocks, {m['tokens'][split]:,} tokens, "
                                     f"{m['documents'][split]:,} docs, {m['dropped_tail_tokens'][split]:,} tail tokens dropped"))
        for name, st in (m.get("streams") or {}).items():
            rows.append((f"train stream {name}", f"{st['blocks']:,} blocks, {st['tokens']:,} tokens, "
                                                 f"{st['documents']:,} docs"))
        rows.append(("shards", m["shards"]))
        return rows


STAGE = PackStage()
