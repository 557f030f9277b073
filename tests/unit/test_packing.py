"""Packer: routing, BOS/EOS framing, block cutting, dropped tails, multi-rank merge."""

from __future__ import annotations

import fsspec
import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from pipeline.data.packed import PackedDataset
from pipeline.data.packing import Packer, merge_indexes, route_to_val
from pipeline.data.shards import read_index, verify_shards, write_index
from pipeline.stages.pack import PackConfig

LOCAL = fsspec.filesystem("file")
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Съешь же ещё этих мягких французских булок, да выпей чаю.",
    "Қазақстан Республикасы — Орталық Азиядағы мемлекет.",
    "Packing documents into fixed length blocks for language model training.",
    "Әр құжаттың басы мен соңы арнайы белгілермен белгіленеді.",
    "Токенизатор обучается на небольшом корпусе текста.",
]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<bos>", "<eos>", "<pad>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(SENTENCES * 5, trainer)
    return tok


def corpus(n: int = 120) -> tuple[list[str], list[str]]:
    rng = np.random.default_rng(0)
    ids = [f"doc/{i:04d}" for i in range(n)]
    texts = [" ".join(SENTENCES[j] for j in rng.integers(0, len(SENTENCES), size=int(rng.integers(1, 5)))) for _ in ids]
    return ids, texts


def special(tok: Tokenizer) -> dict:
    return {"bos_id": tok.token_to_id("<bos>"), "eos_id": tok.token_to_id("<eos>"), "vocab_size": tok.get_vocab_size()}


def pack(tok, folder, ids, texts, *, batch=16, rank=0, vocab_size=None, **cfg_kw):
    cfg = PackConfig(**{"seq_len": 32, "val_fraction": 0.2, "blocks_per_shard": 5, **cfg_kw})
    sp = special(tok)
    if vocab_size:
        sp["vocab_size"] = vocab_size
    p = Packer(tok, cfg, LOCAL, str(folder), rank, **sp)
    for i in range(0, len(ids), batch):
        p.add(ids[i : i + batch], texts[i : i + batch])
    return p.close(), cfg


def expected_stream(tok, ids, texts, cfg, split, *, bos=True, eos=True):
    """The reference: bos + doc + eos of every document of ``split``, in order, one at a time."""
    sp = special(tok)
    out: list[int] = []
    for d, t in zip(ids, texts):
        if (split == "val") != route_to_val(d, cfg.val_fraction, cfg.seed):
            continue
        out += ([sp["bos_id"]] if bos else []) + tok.encode(t, add_special_tokens=False).ids + ([sp["eos_id"]] if eos else [])
    return out


def finish(folder, stats, tok, cfg):
    index = merge_indexes([stats], seq_len=cfg.seq_len, **special(tok))
    write_index(LOCAL, str(folder), index)
    return index


def read_split(folder, split):
    ds = PackedDataset(str(folder), split=split)
    return [x for i in range(len(ds)) for x in ds[i]["input_ids"].tolist()], ds


@pytest.mark.parametrize("bos,eos", [(True, True), (True, False), (False, False)])
def test_blocks_are_the_framed_document_stream(tmp_path, tokenizer, bos, eos):
    ids, texts = corpus()
    stats, cfg = pack(tokenizer, tmp_path, ids, texts, add_bos=bos, add_eos=eos)
    index = finish(tmp_path, stats, tokenizer, cfg)
    verify_shards(LOCAL, str(tmp_path))
    assert index["dtype"] == "uint16" and index["seq_len"] == 32
    for split in ("train", "val"):
        ref = expected_stream(tokenizer, ids, texts, cfg, split, bos=bos, eos=eos)
        got, ds = read_split(tmp_path, split)
        nblocks = len(ref) // 32
        assert len(ds) == nblocks == stats["blocks"][split] == index["splits"][split]["blocks"] > 0
        assert got == ref[: nblocks * 32]
        assert stats["dropped_tail_tokens"][split] == len(ref) - nblocks * 32  # the tail is counted
        assert stats["stream_tokens"][split] == len(ref)
        assert index["splits"][split]["dropped_tail_tokens"] == stats["dropped_tail_tokens"][split]
        assert stats["documents"][split] == sum((split == "val") == route_to_val(d, 0.2, 0) for d in ids)
    assert stats["document_tokens"]["train"] + stats["document_tokens"]["val"] == sum(
        len(tokenizer.encode(t, add_special_tokens=False).ids) for t in texts
    )
    # blocks_per_shard 5: full shards then one partial, named by split / rank / number
    shards = stats["shards"]["train"]
    assert [s["file"] for s in shards] == [f"train-00000-{n:05d}.bin" for n in range(len(shards))]
    assert all(s["blocks"] == 5 for s in shards[:-1]) and 1 <= shards[-1]["blocks"] <= 5


def test_batching_does_not_change_the_output(tmp_path, tokenizer):
    ids, texts = corpus()
    a, _ = pack(tokenizer, tmp_path / "a", ids, texts, batch=1)
    b, _ = pack(tokenizer, tmp_path / "b", ids, texts, batch=1000)
    assert a == b


def test_routing_is_stable_and_disjoint(tmp_path, tokenizer):
    ids = [f"doc-{i}" for i in range(5000)]
    val = {d for d in ids if route_to_val(d, 0.1, seed=0)}
    assert 400 < len(val) < 600
    assert val == {d for d in ids if route_to_val(d, 0.1, seed=0)}  # stable
    assert val != {d for d in ids if route_to_val(d, 0.1, seed=1)}  # the seed reshuffles
    assert val <= {d for d in ids if route_to_val(d, 0.2, seed=0)}  # growing the fraction only adds
    assert not any(route_to_val(d, 0.0) for d in ids)

    # routing depends on the id only: each document lands in exactly one split, whichever rank packs it
    docs_ids, texts = corpus(60)
    one, cfg = pack(tokenizer, tmp_path / "one", docs_ids, texts, val_fraction=0.3)
    total = {s: one["documents"][s] for s in ("train", "val")}
    assert total["train"] + total["val"] == 60 and total["val"] > 0
    parts = [pack(tokenizer, tmp_path / "two", docs_ids[r::2], texts[r::2], rank=r, val_fraction=0.3)[0] for r in (0, 1)]
    assert {s: parts[0]["documents"][s] + parts[1]["documents"][s] for s in total} == total
    # every document's tokens went to exactly one split (the framed-stream test checks which)
    framed = sum(len(tokenizer.encode(t, add_special_tokens=False).ids) + 2 for t in texts)
    assert one["stream_tokens"]["train"] + one["stream_tokens"]["val"] == framed
    assert one["stream_tokens"]["val"] == len(expected_stream(tokenizer, docs_ids, texts, cfg, "val"))


def test_val_fraction_zero_writes_no_val_shards(tmp_path, tokenizer):
    ids, texts = corpus(40)
    stats, cfg = pack(tokenizer, tmp_path, ids, texts, val_fraction=0.0)
    assert stats["documents"]["val"] == 0 and stats["shards"]["val"] == []
    index = finish(tmp_path, stats, tokenizer, cfg)
    assert index["splits"]["val"]["blocks"] == 0 and len(PackedDataset(str(tmp_path), split="val")) == 0
    assert not list(tmp_path.glob("val-*"))


def test_large_vocab_uses_uint32(tmp_path, tokenizer):
    ids, texts = corpus(40)
    stats, cfg = pack(tokenizer, tmp_path, ids, texts, vocab_size=100_000)
    assert stats["dtype"] == "uint32"
    index = merge_indexes([stats], seq_len=32, bos_id=0, eos_id=1, vocab_size=100_000)
    write_index(LOCAL, str(tmp_path), index)
    got, _ = read_split(tmp_path, "train")
    ref = expected_stream(tokenizer, ids, texts, cfg, "train")
    assert index["dtype"] == "uint32" and got == ref[: len(got)] and got


def test_merge_of_ranks_in_rank_order(tmp_path, tokenizer):
    ids, texts = corpus(90)
    out = tmp_path / "shards"
    parts = []
    for r in range(3):
        lo, hi = 30 * r, 30 * (r + 1)
        stats, cfg = pack(tokenizer, out, ids[lo:hi], texts[lo:hi], rank=r)
        parts.append(stats)
    # each rank's part index, then the merge step combining them (what the pack stage does)
    part_indexes = [merge_indexes([p], seq_len=32, **special(tokenizer)) for p in parts]
    index = merge_indexes(part_indexes, seq_len=32, **special(tokenizer), from_indexes=True)
    assert index == merge_indexes(parts, seq_len=32, **special(tokenizer))
    write_index(LOCAL, str(out), index)
    files = [s["file"] for s in index["splits"]["train"]["shards"]]
    assert files == sorted(files) and {f.split("-")[1] for f in files} == {"00000", "00001", "00002"}
    assert index["splits"]["train"]["blocks"] == sum(p["blocks"]["train"] for p in parts)
    assert index["splits"]["train"]["documents"] == sum(p["documents"]["train"] for p in parts)
    got, ds = read_split(out, "train")
    ref = []
    for r in range(3):
        s = expected_stream(tokenizer, ids[30 * r : 30 * (r + 1)], texts[30 * r : 30 * (r + 1)], cfg, "train")
        ref += s[: len(s) // 32 * 32]  # each rank drops its own tail
    assert got == ref
    assert read_index(LOCAL, str(out)) == index
    with pytest.raises(ValueError, match="repeat"):
        merge_indexes([parts[0], parts[0]], seq_len=32, **special(tokenizer))
    # the framing of the documents travels into the index (document masking finds document starts with it)
    assert index["framing"] == ["bos", "eos"] and ds.document_boundaries() == (special(tokenizer)["bos_id"],
                                                                               special(tokenizer)["eos_id"])
    with pytest.raises(ValueError, match="framed differently"):
        merge_indexes([parts[0], {**parts[1], "framing": ["eos"]}], seq_len=32, **special(tokenizer))


def test_packer_errors(tmp_path, tokenizer):
    cfg = PackConfig(seq_len=32)
    with pytest.raises(ValueError, match="bos"):
        Packer(tokenizer, cfg, LOCAL, str(tmp_path), 0, bos_id=None, eos_id=1, vocab_size=400)
    p = Packer(tokenizer, cfg, LOCAL, str(tmp_path), 0, **special(tokenizer))
    with pytest.raises(ValueError, match="2 ids for 1 texts"):
        p.add(["a", "b"], ["text"])
    p.add(["empty"], [""])
    stats = p.close()
    assert stats["empty_documents"]["train"] + stats["empty_documents"]["val"] == 1
    assert stats["stream_tokens"] == {"train": 0, "val": 0}
    small = Packer(tokenizer, cfg, LOCAL, str(tmp_path / "s"), 0, bos_id=0, eos_id=1, vocab_size=5)
    with pytest.raises(ValueError, match="vocab_size 5"):
        small.add(["x"], ["The quick brown fox"])
