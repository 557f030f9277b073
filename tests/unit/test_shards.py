"""Shard format, writer, index, verification, the training reader (local and S3) and the sampler."""

from __future__ import annotations

import hashlib
import json
import os
import pickle

import fsspec
import numpy as np
import pytest
import torch

from pipeline.data.packed import PackedDataset, ResumableDistributedSampler
from pipeline.data.shards import (
    ShardWriter,
    dtype_for_vocab,
    new_index,
    read_index,
    verify_shards,
    write_index,
)
from pipeline.errors import CorruptShardError, InputError

LOCAL = fsspec.filesystem("file")


def write_split(fs, dirpath, split, blocks, *, vocab_size, seq_len, per_shard=3, rank=0, chunks=(1, 2, 4)):
    """Write ``blocks`` through a ShardWriter in uneven pieces; returns the shard infos."""
    w = ShardWriter(fs, dirpath, split, rank, seq_len, dtype_for_vocab(vocab_size), per_shard)
    i = c = 0
    while i < len(blocks):
        k = chunks[c % len(chunks)]
        w.write_blocks(blocks[i : i + k])
        i, c = i + k, c + 1
    return w.close()


def make_folder(fs, dirpath, *, vocab_size=1000, seq_len=8, n_train=10, n_val=4, per_shard=3, seed=0):
    rng = np.random.default_rng(seed)
    data = {
        "train": rng.integers(0, vocab_size, size=(n_train, seq_len), dtype=np.int64),
        "val": rng.integers(0, vocab_size, size=(n_val, seq_len), dtype=np.int64),
    }
    splits = {}
    for split, blocks in data.items():
        infos = write_split(fs, dirpath, split, blocks, vocab_size=vocab_size, seq_len=seq_len, per_shard=per_shard)
        splits[split] = {"shards": [i.to_dict() for i in infos]}
    index = new_index(seq_len=seq_len, vocab_size=vocab_size, bos_id=1, eos_id=2, splits=splits)
    write_index(fs, dirpath, index)
    return data, index


# ------------------------------------------------------------------------------ format


def test_dtype_for_vocab():
    assert dtype_for_vocab(256) == np.dtype("<u2")
    assert dtype_for_vocab(65535) == np.dtype("<u2")
    assert dtype_for_vocab(65536) == np.dtype("<u4")
    assert dtype_for_vocab(200_000) == np.dtype("<u4")
    with pytest.raises(ValueError):
        dtype_for_vocab(0)


@pytest.mark.parametrize("vocab_size", [1000, 65535, 70_000, 150_000])
def test_writer_reader_round_trip_local(tmp_path, vocab_size):
    data, index = make_folder(LOCAL, str(tmp_path), vocab_size=vocab_size, seq_len=8, n_train=10, n_val=4)
    dtype = dtype_for_vocab(vocab_size)
    assert index["dtype"] == ("uint16" if vocab_size <= 65535 else "uint32")
    train = index["splits"]["train"]
    # 10 blocks at 3 per shard: 3 + 3 + 3 + 1, consecutive names carrying split and rank
    assert [s["file"] for s in train["shards"]] == [f"train-00000-{n:05d}.bin" for n in range(4)]
    assert [s["blocks"] for s in train["shards"]] == [3, 3, 3, 1]
    assert train["blocks"] == 10 and train["tokens"] == 80
    for s in train["shards"]:
        raw = (tmp_path / s["file"]).read_bytes()
        assert len(raw) == s["bytes"] == s["blocks"] * 8 * dtype.itemsize
        assert hashlib.sha256(raw).hexdigest() == s["sha256"]  # checksum computed while writing
    # the raw file is a little-endian (blocks, seq_len) array
    first = np.frombuffer((tmp_path / "train-00000-00000.bin").read_bytes(), dtype=dtype).reshape(3, 8)
    assert np.array_equal(first, data["train"][:3])

    assert read_index(LOCAL, str(tmp_path)) == index
    verify_shards(LOCAL, str(tmp_path))
    for split in ("train", "val"):
        ds = PackedDataset(str(tmp_path), split=split)
        assert len(ds) == len(data[split])
        for i in range(len(ds)):
            item = ds[i]
            assert item["sample_id"] == i
            assert item["input_ids"].dtype == torch.long and item["input_ids"].shape == (8,)
            assert item["input_ids"].tolist() == data[split][i].tolist()
        assert ds[-1]["input_ids"].tolist() == data[split][-1].tolist()
        with pytest.raises(IndexError):
            ds[len(ds)]


def test_dataset_pickles_for_dataloader_workers(tmp_path):
    data, _ = make_folder(LOCAL, str(tmp_path))
    ds = PackedDataset(str(tmp_path))
    ds[0]  # opens a memmap, which must not travel
    clone = pickle.loads(pickle.dumps(ds))
    assert [clone[i]["input_ids"].tolist() for i in range(len(ds))] == data["train"].tolist()
    loader = torch.utils.data.DataLoader(ds, batch_size=4, shuffle=False)
    batch = next(iter(loader))
    assert batch["input_ids"].shape == (4, 8) and batch["sample_id"].tolist() == [0, 1, 2, 3]


def test_writer_rejects_bad_blocks(tmp_path):
    w = ShardWriter(LOCAL, str(tmp_path), "train", 0, 4, dtype_for_vocab(1000), 2)
    with pytest.raises(ValueError, match="shape"):
        w.write_blocks(np.zeros((2, 5), dtype=np.int64))
    with pytest.raises(ValueError, match="does not fit"):
        w.write_blocks(np.full((1, 4), 70_000, dtype=np.int64))
    with pytest.raises(ValueError, match="does not fit"):
        w.write_blocks(np.full((1, 4), -1, dtype=np.int64))
    assert w.close() == []  # nothing valid was written: no shard files
    assert not list(tmp_path.iterdir())


def test_read_index_errors_name_the_path(tmp_path):
    with pytest.raises(InputError, match=str(tmp_path / "index.json")):
        read_index(LOCAL, str(tmp_path))
    (tmp_path / "index.json").write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        read_index(LOCAL, str(tmp_path))
    (tmp_path / "index.json").write_text(json.dumps({"format": "llmpipe-token-shards", "version": 99}))
    with pytest.raises(InputError, match="version 99"):
        read_index(LOCAL, str(tmp_path))
    _, index = make_folder(LOCAL, str(tmp_path / "ok"))
    index["splits"]["train"]["shards"][0]["bytes"] += 1
    (tmp_path / "index.json").write_text(json.dumps(index))
    with pytest.raises(InputError, match="train-00000-00000.bin lists"):
        read_index(LOCAL, str(tmp_path))
    with pytest.raises(InputError, match="no split 'test'"):
        PackedDataset(str(tmp_path / "ok"), split="test")


# ------------------------------------------------------------------------------ verification


def test_verify_catches_a_flipped_byte(tmp_path):
    _, index = make_folder(LOCAL, str(tmp_path))
    shard = index["splits"]["train"]["shards"][1]
    path = tmp_path / shard["file"]
    raw = bytearray(path.read_bytes())
    raw[5] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptShardError) as err:
        verify_shards(LOCAL, str(tmp_path))
    msg = str(err.value)
    assert shard["file"] in msg and shard["sha256"] in msg and hashlib.sha256(raw).hexdigest() in msg
    verify_shards(LOCAL, str(tmp_path), split="val")  # the other split is fine
    with pytest.raises(CorruptShardError, match=shard["file"]):
        PackedDataset(str(tmp_path), split="train")
    # without verify the open only checks sizes (cheap); the flip goes unnoticed
    assert len(PackedDataset(str(tmp_path), split="train", verify=False)) == 10


def test_verify_catches_a_truncated_or_missing_shard(tmp_path):
    _, index = make_folder(LOCAL, str(tmp_path))
    shard = index["splits"]["val"]["shards"][0]
    path = tmp_path / shard["file"]
    path.write_bytes(path.read_bytes()[:-3])
    expected = f"expected {shard['bytes']} bytes, found {shard['bytes'] - 3} bytes"
    with pytest.raises(CorruptShardError, match="truncated") as err:
        verify_shards(LOCAL, str(tmp_path))
    assert shard["file"] in str(err.value) and expected in str(err.value)
    for verify in (True, False):  # the size check runs on every open
        with pytest.raises(CorruptShardError, match=expected):
            PackedDataset(str(tmp_path), split="val", verify=verify)
    path.unlink()
    with pytest.raises(CorruptShardError, match="missing"):
        verify_shards(LOCAL, str(tmp_path), split="val")


# ------------------------------------------------------------------------------ S3


def test_packed_dataset_over_s3(s3_env):
    """Writer, index, verification and byte-range reads against a real S3 API on loopback."""
    bucket = s3_env
    opts = {"client_kwargs": {"endpoint_url": os.environ["AWS_ENDPOINT_URL"]}}
    fs = fsspec.filesystem("s3", **opts)
    folder = f"{bucket}/run/shards"
    data, index = make_folder(fs, folder, vocab_size=70_000, seq_len=16, n_train=11, n_val=2, per_shard=4)
    assert index["dtype"] == "uint32"
    assert read_index(fs, folder) == index
    verify_shards(fs, folder)

    # chunks of 3 blocks: reads cross chunk and shard boundaries, and the LRU evicts
    ds = PackedDataset(f"s3://{folder}", split="train", storage_options=opts, chunk_bytes=3 * 16 * 4, cache_chunks=2)
    assert len(ds) == 11 and ds.chunk_blocks == 3 and not ds.local
    order = [10, 0, 5, 4, 3, 9, 1, 8, 2, 7, 6, 0]
    for i in order:
        assert ds[i]["input_ids"].tolist() == data["train"][i].tolist()
        assert ds[i]["sample_id"] == i
    assert len(ds._cache) <= 2
    clone = pickle.loads(pickle.dumps(ds))
    assert clone[3]["input_ids"].tolist() == data["train"][3].tolist()
    # forked DataLoader workers (s3fs itself is not fork-safe) read the same blocks
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2, multiprocessing_context="fork")
    got = torch.cat([b["input_ids"] for b in loader])
    assert got.tolist() == data["train"].tolist()

    # options from $LLMPIPE_STORAGE_OPTIONS (set by the fixture) are enough
    assert len(PackedDataset(f"s3://{folder}", split="val")) == 2

    shard = index["splits"]["train"]["shards"][2]
    raw = bytearray(fs.cat_file(f"{folder}/{shard['file']}"))
    raw[0] ^= 0xFF
    fs.pipe_file(f"{folder}/{shard['file']}", bytes(raw))
    with pytest.raises(CorruptShardError, match=f"s3://{folder}/{shard['file']}.*expected sha256 {shard['sha256']}"):
        PackedDataset(f"s3://{folder}", split="train", storage_options=opts)
    fs.pipe_file(f"{folder}/{shard['file']}", bytes(raw[:-1]))
    with pytest.raises(CorruptShardError, match="truncated"):
        verify_shards(fs, folder, split="train")
    with pytest.raises(InputError, match=f"s3://{bucket}/nothing/index.json"):
        PackedDataset(f"s3://{bucket}/nothing", storage_options=opts)


# ------------------------------------------------------------------------------ sampler


def rank_streams(n, world, *, seed=0, start=0, epochs=1, **kw):
    """What each rank's sampler yields over ``epochs`` successive iterations."""
    out = []
    for r in range(world):
        s = ResumableDistributedSampler(n, rank=r, world_size=world, seed=seed, start_index=start, **kw)
        seq = []
        for _ in range(epochs):
            seq += list(s)
        out.append(seq)
    return out


def interleave(streams):
    """Global stream order from per-rank streams (round r: rank 0, 1, ... W-1)."""
    out = []
    for k in range(max(map(len, streams))):
        out += [s[k] for s in streams if k < len(s)]
    return out


def test_sampler_deterministic_and_a_permutation():
    a = list(ResumableDistributedSampler(100, seed=3))
    assert a == list(ResumableDistributedSampler(100, seed=3))
    assert sorted(a) == list(range(100)) and a != list(range(100))
    assert a != list(ResumableDistributedSampler(100, seed=4))
    assert list(ResumableDistributedSampler(10, shuffle=False)) == list(range(10))


def test_sampler_ranks_are_disjoint_and_cover_each_global_step():
    n, world, batch = 103, 4, 5
    streams = rank_streams(n, world, seed=1)
    assert len({len(s) for s in streams}) == 1 and len(streams[0]) == n // world  # drop_last: equal shares
    flat = [x for s in streams for x in s]
    assert len(flat) == len(set(flat)) == (n // world) * world
    glob = ResumableDistributedSampler(n, world_size=world, seed=1).global_stream(0, (n // world) * world).tolist()
    for step in range(len(streams[0]) // batch):
        got = sorted(x for s in streams for x in s[step * batch : (step + 1) * batch])
        assert got == sorted(glob[step * batch * world : (step + 1) * batch * world])
    assert interleave(streams) == glob


def test_sampler_resume_gives_exactly_the_tail():
    n, world, seed = 50, 4, 7  # epoch_length 48
    full = rank_streams(n, world, seed=seed, epochs=3)  # 3 epochs, uninterrupted
    g_full = interleave(full)
    for consumed in (0, 4, 20, 44, 48, 60, 96, 140):  # multiples of world: step boundaries, across epochs
        s0 = ResumableDistributedSampler(n, world_size=world, seed=seed, start_index=consumed)
        epochs_left = 3 - s0.epoch
        resumed = rank_streams(n, world, seed=seed, start=consumed, epochs=epochs_left)
        for r in range(world):
            assert resumed[r] == full[r][consumed // world :], (consumed, r)
        assert interleave(resumed) == g_full[consumed:]
    # a start that is not a step boundary still continues the global stream exactly (ranks 0, 1
    # get one sample more in that epoch)
    resumed = rank_streams(n, world, seed=seed, start=22, epochs=1)
    assert [len(s) for s in resumed] == [7, 7, 6, 6]
    assert interleave(resumed) == g_full[22:48]


def test_sampler_epoch_crossing_reshuffles():
    n = 20
    s = ResumableDistributedSampler(n, seed=5, start_index=15)
    assert len(s) == 5
    tail0 = list(s)  # rest of epoch 0
    assert s.start_index == 20 and s.epoch == 1
    e1 = list(s)
    assert sorted(e1) == list(range(n))
    e0 = ResumableDistributedSampler(n, seed=5).permutation(0).tolist()
    assert tail0 == e0[15:] and e1 != e0
    fresh = ResumableDistributedSampler(n, seed=5)
    fresh.set_epoch(1)
    assert list(fresh) == e1
    assert ResumableDistributedSampler(n, seed=5).global_stream(15, 25).tolist() == e0[15:] + e1[:5]


def test_sampler_padding_and_state_dict():
    streams = rank_streams(10, 4, seed=0, drop_last=False)
    assert [len(s) for s in streams] == [3, 3, 3, 3]
    assert set(x for s in streams for x in s) == set(range(10))

    s = ResumableDistributedSampler(50, rank=1, world_size=4, seed=2)
    it = iter(s)
    [next(it) for _ in range(3)]
    state = s.state_dict(consumed_samples=12)
    assert state["start_index"] == 12
    t = ResumableDistributedSampler(50, rank=1, world_size=4, seed=99)
    t.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON checkpoint
    assert list(t) == list(ResumableDistributedSampler(50, rank=1, world_size=4, seed=2))[3:]
    with pytest.raises(ValueError, match="51 samples"):
        t.load_state_dict({**state, "num_samples": 51})
    # a different world size keeps the place in the global stream
    u = ResumableDistributedSampler(50, rank=0, world_size=2, seed=0)
    u.load_state_dict(state)
    g4 = ResumableDistributedSampler(50, world_size=4, seed=2).global_stream(12, 48).tolist()
    got = interleave([list(u), list(ResumableDistributedSampler(50, rank=1, world_size=2, seed=2, start_index=12))])
    assert got[:36] == g4 and len(got) == 38  # world 2 drops nothing of 50, world 4 dropped the last 2
    with pytest.raises(ValueError, match="too few"):
        ResumableDistributedSampler(3, world_size=4)


def test_index_model_errors_are_one_line_naming_file_and_field(tmp_path):
    _, index = make_folder(LOCAL, str(tmp_path / "ok"))
    where = str(tmp_path / "index.json")
    cases = [
        (lambda i: i.update(seq_len=0), "seq_len must be a positive integer, got 0"),
        (lambda i: i.update(dtype="int8"), "dtype: input should be 'uint16' or 'uint32', got 'int8'"),
        (lambda i: i.update(vocab_size=70_000), "dtype uint16 cannot hold vocab_size 70000"),
        (lambda i: i.update(extra=1), "unknown key 'extra'"),
        (lambda i: i["splits"]["train"].pop("shards"), "split 'train': shards is missing"),
        (lambda i: i["splits"]["train"].update(blocks=11), "split 'train': blocks 11 != sum over its shards 10"),
        (lambda i: i["splits"]["val"]["shards"][0].pop("sha256"), "split 'val': shards[0].sha256 is missing"),
        (lambda i: i["splits"]["val"]["shards"][0].update(file="../x.bin"), "'../x.bin' must be a plain file name"),
        (lambda i: i["splits"]["val"]["shards"][0].update(blocks="3"), "shards[0].blocks: input should be a valid integer"),
    ]
    for change, message in cases:
        bad = json.loads(json.dumps(index))
        change(bad)
        (tmp_path / "index.json").write_text(json.dumps(bad))
        with pytest.raises(InputError) as err:
            read_index(LOCAL, str(tmp_path))
        text = str(err.value)
        assert text.startswith(f"{where}: ") and message in text and "\n" not in text, text
        with pytest.raises(InputError, match="index.json: "):  # the writer refuses the same index
            write_index(LOCAL, str(tmp_path / "w"), bad)
    with pytest.raises(InputError, match="shards\\[0\\].file 'a/b.bin' must be a plain file name"):
        new_index(seq_len=8, vocab_size=1000, bos_id=1, eos_id=2,
                  splits={"train": {"shards": [{"file": "a/b.bin", "blocks": 1, "bytes": 16, "sha256": "0"}]}})


def test_index_json_keeps_its_bytes(tmp_path):
    """An index.json as this format has always been written (sorted keys, indent 2, null ids, packer
    counters) reads back to the same values and is rewritten byte for byte."""
    _, index = make_folder(LOCAL, str(tmp_path))
    old = json.loads((tmp_path / "index.json").read_text())
    old["bos_id"] = None
    old["splits"]["train"].update(documents=7, empty_documents=1, document_tokens=70, stream_tokens=80,
                                  dropped_tail_tokens=3)
    raw = json.dumps(old, indent=2, sort_keys=True) + "\n"
    (tmp_path / "index.json").write_text(raw)
    assert read_index(LOCAL, str(tmp_path)) == old
    write_index(LOCAL, str(tmp_path / "again"), read_index(LOCAL, str(tmp_path)))
    assert (tmp_path / "again" / "index.json").read_text() == raw
    assert sorted(old) == ["bos_id", "byteorder", "dtype", "eos_id", "format", "seq_len", "splits", "version", "vocab_size"]
