"""The training reader of token shards (:mod:`pipeline.data.shards` is the format and its writer):
:class:`PackedDataset` (one split's blocks, memory-mapped or read by byte ranges, checked on open, and its
streams), :class:`ResumableDistributedSampler` (a seeded order, split over ranks, that resumes mid-epoch),
:class:`MixtureSampler` (the same over a weighted mix of the split's streams: languages, sources),
:func:`stream_counts` (how many samples of each stream a stretch of either took) and :func:`document_positions`
(position ids that restart at every document of a block, for document masking)."""

from __future__ import annotations

import bisect
import math
import os
import posixpath
import threading
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import fsspec
import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from pipeline.data.shards import DTYPES, check_shards, display_path, is_local_fs, read_index
from pipeline.errors import CorruptShardError, InputError
from pipeline.storage import storage_options_from_env

# ------------------------------------------------------------------------------------ reader


@dataclass(frozen=True)
class Stream:
    """One stream of a split (index version 2): blocks ``[start, start + blocks)`` hold documents of one language
    and/or source (``None``: the split was not packed by it)."""

    name: str
    lang: str | None
    source: str | None
    start: int
    blocks: int


class PackedDataset(Dataset):
    """Fixed-length token blocks of one split, for training: ``{"input_ids", "sample_id"}``.

    ``sample_id`` is the block's position in the split (stable: it follows from the shard order
    of ``index.json``). Local folders are read through one ``np.memmap`` per shard; remote ones
    (``s3://``) by byte-range reads of ``chunk_bytes`` through fsspec with a small per-process
    LRU cache of chunks. On open, every shard's size is checked against the index, and with
    ``verify=True`` its sha256 too (a truncated or modified shard is a clear
    :class:`CorruptShardError`, not garbage tokens).

    The dataset pickles without its open memmaps and cache, so DataLoader workers (fork or
    spawn) reopen them lazily.
    """

    def __init__(
        self,
        uri_or_path: str,
        split: str = "train",
        *,
        storage_options: dict | None = None,
        verify: bool = True,
        chunk_bytes: int = 1 << 20,
        cache_chunks: int = 32,
    ):

        protocol = uri_or_path.split("://", 1)[0] if "://" in uri_or_path else "file"
        env = storage_options_from_env() if protocol not in ("file", "local") else {}
        self.uri = uri_or_path
        self.storage_options = {**env, **(storage_options or {})}
        self.fs, path = fsspec.core.url_to_fs(uri_or_path, **self.storage_options)
        self._pid = os.getpid()
        self.local = is_local_fs(self.fs)
        self.dirpath = os.path.abspath(path) if self.local else path.rstrip("/")
        self.index = read_index(self.fs, self.dirpath)
        if split not in self.index["splits"]:
            raise InputError(f"{uri_or_path} has no split {split!r} (splits: {', '.join(self.index['splits']) or 'none'})")
        self.split = split
        self.seq_len: int = self.index["seq_len"]
        self.dtype = DTYPES[self.index["dtype"]]
        self.vocab_size: int = self.index["vocab_size"]
        self.bos_id, self.eos_id = self.index.get("bos_id"), self.index.get("eos_id")
        self.framing: list[str] | None = self.index.get("framing")
        self.shards: list[dict[str, Any]] = self.index["splits"][split]["shards"]
        self._starts = [0]
        for s in self.shards:
            self._starts.append(self._starts[-1] + int(s["blocks"]))
        self._paths = [posixpath.join(self.dirpath, s["file"]) for s in self.shards]
        self.block_bytes = self.seq_len * self.dtype.itemsize
        self.chunk_blocks = max(1, int(chunk_bytes) // self.block_bytes)
        self.cache_chunks = max(1, int(cache_chunks))
        check_shards(self.fs, self.dirpath, self.index, [split], checksums=verify)
        self._reset_handles()

    @property
    def streams(self) -> list[Stream]:
        """The split's streams in block order; ``[]`` when its blocks mix every language and source."""
        table = self.index["splits"][self.split].get("streams") or {}
        return sorted((Stream(name, st.get("lang"), st.get("source"), int(st["start"]), int(st["blocks"]))
                       for name, st in table.items()), key=lambda st: st.start)

    def document_boundaries(self) -> tuple[int | None, int | None]:
        """(the id that starts a document, the id that ends one) in these blocks, from the index's ``framing``
        (an index without it: both of its ids); ``(None, None)`` when documents are not framed at all."""
        framing = self.framing if self.framing is not None else ["bos", "eos"]
        return (self.bos_id if "bos" in framing else None, self.eos_id if "eos" in framing else None)

    def _reset_handles(self) -> None:
        self._maps: dict[int, np.memmap] = {}
        self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for key in ("_maps", "_cache", "_lock"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset_handles()

    def __len__(self) -> int:
        return self._starts[-1]

    def locate(self, i: int) -> tuple[int, int]:
        """(shard number, block within that shard) of global block ``i``."""
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"block {i} out of range for {self.split} split of {n} blocks")
        s = bisect.bisect_right(self._starts, i) - 1
        return s, i - self._starts[s]

    def block(self, i: int) -> np.ndarray:
        """Block ``i`` as a read-only numpy array of the shard dtype."""
        s, j = self.locate(i)
        if self.local:
            mm = self._maps.get(s)
            if mm is None:
                mm = np.memmap(self._paths[s], dtype=self.dtype, mode="r", shape=(self.shards[s]["blocks"], self.seq_len))
                self._maps[s] = mm
            return mm[j]
        c, k = divmod(j, self.chunk_blocks)
        return self._chunk(s, c)[k]

    def _chunk(self, s: int, c: int) -> np.ndarray:
        key = (s, c)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        first = c * self.chunk_blocks
        last = min(first + self.chunk_blocks, int(self.shards[s]["blocks"]))
        start, end = first * self.block_bytes, last * self.block_bytes
        if self._pid != os.getpid():
            # a forked DataLoader worker: async filesystems (s3fs) are not fork-safe, get this process its own
            self.fs = fsspec.core.url_to_fs(self.uri, **self.storage_options)[0]
            self._pid = os.getpid()
        data = self.fs.cat_file(self._paths[s], start=start, end=end)
        if len(data) != end - start:
            raise CorruptShardError(f"shard {display_path(self.fs, self._paths[s])}: read {len(data)} bytes at offset {start}, "
                                    f"expected {end - start} (file changed since it was opened?)")
        arr = np.frombuffer(data, dtype=self.dtype).reshape(last - first, self.seq_len)
        with self._lock:
            self._cache[key] = arr
            self._cache.move_to_end(key)
            while len(self._cache) > self.cache_chunks:
                self._cache.popitem(last=False)
        return arr

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = int(i)
        if i < 0:
            i += len(self)
        ids = torch.from_numpy(self.block(i).astype(np.int64))
        return {"input_ids": ids, "sample_id": i}


# ----------------------------------------------------------------------------------- sampler


def _to_length(order: np.ndarray, length: int) -> np.ndarray:
    """One epoch's order cut to ``length`` samples, or wrapped around its start to reach it."""
    n = len(order)
    if length < n:
        return order[:length]
    if length > n:
        return np.concatenate([order, order[: length - n]])
    return order


class ResumableDistributedSampler(Sampler[int]):
    """Deterministic, resumable, data-parallel order over ``num_samples`` blocks.

    The *global stream* is epoch after epoch; epoch ``e`` is a permutation of
    ``range(num_samples)`` drawn with seed ``seed + e`` (identity when ``shuffle=False``),
    cut to ``epoch_length`` samples: a multiple of ``world_size``, dropping the last
    ``num_samples % world_size`` samples of the permutation (``drop_last=True``) or padding with
    the permutation's first ones (``drop_last=False``), so every rank gets the same count.

    Rank ``r`` takes global positions ``start + r, start + r + W, ...``: the ``W`` samples
    of one "round" go to ranks ``0 .. W-1``. Hence with any local batch size ``B``, local batch
    ``k`` of every rank together is exactly the global stream's ``[start + kBW, start + (k+1)BW)``,
    a contiguous global batch. ``start_index`` is the number of global samples already
    consumed (``steps * B * W`` summed over the run, gradient accumulation included); a run
    resumed with it continues with exactly the next samples, none repeated or skipped. It
    should be a multiple of ``world_size`` (it is, at any step boundary); otherwise ranks may
    differ by one sample in the partial epoch.

    ``__iter__`` yields this rank's share from ``start_index`` to the end of that epoch and then
    moves ``start_index`` to the start of the next epoch, so ``for epoch ...: for batch in
    loader`` continues naturally; ``set_epoch(e)`` jumps to the start of epoch ``e``.
    """

    def __init__(
        self,
        num_samples: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        start_index: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
    ):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
        if num_samples < 0 or start_index < 0:
            raise ValueError("num_samples and start_index must be >= 0")
        self.num_samples, self.rank, self.world_size = int(num_samples), int(rank), int(world_size)
        self.seed, self.shuffle, self.drop_last = int(seed), bool(shuffle), bool(drop_last)
        if self.drop_last:
            self.epoch_length = (self.num_samples // self.world_size) * self.world_size
        else:
            self.epoch_length = -(-self.num_samples // self.world_size) * self.world_size
        if self.epoch_length == 0:
            raise ValueError(f"{num_samples} samples are too few for world_size {world_size}"
                             + (" with drop_last" if drop_last else ""))
        self.start_index = int(start_index)
        self._perm: tuple[int, np.ndarray] | None = None

    # -- the global stream
    @property
    def epoch(self) -> int:
        return self.start_index // self.epoch_length

    def permutation(self, epoch: int) -> np.ndarray:
        """The sample order of ``epoch`` (``epoch_length`` ids)."""
        if self._perm is not None and self._perm[0] == epoch:
            return self._perm[1]
        n = self.num_samples
        if self.shuffle:
            # int32 ids when they fit (half the memory); same order as Generator.permutation(n)
            order = np.arange(n, dtype=np.int32 if n < 2**31 else np.int64)
            np.random.default_rng((self.seed + epoch) % 2**63).shuffle(order)
        else:
            order = np.arange(n, dtype=np.int32 if n < 2**31 else np.int64)
        order = _to_length(order, self.epoch_length)
        self._perm = (epoch, order)
        return order

    def global_stream(self, start: int, stop: int) -> np.ndarray:
        """Global positions ``[start, stop)`` of the stream (across epochs), as sample ids."""
        out = []
        pos = start
        while pos < stop:
            epoch, off = divmod(pos, self.epoch_length)
            take = min(stop - pos, self.epoch_length - off)
            out.append(self.permutation(epoch)[off : off + take])
            pos += take
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)

    # -- torch Sampler
    def _local(self) -> np.ndarray:
        epoch, off = divmod(self.start_index, self.epoch_length)
        return self.permutation(epoch)[off + self.rank :: self.world_size]

    def __iter__(self) -> Iterator[int]:
        local = self._local()
        epoch = self.epoch
        for start in range(0, len(local), 1 << 16):  # no Python list of a whole epoch
            yield from local[start : start + (1 << 16)].tolist()
        self.start_index = (epoch + 1) * self.epoch_length

    def __len__(self) -> int:
        return len(self._local())

    def set_epoch(self, epoch: int) -> None:
        """Start the next iteration at the beginning of ``epoch``."""
        self.start_index = int(epoch) * self.epoch_length

    def advance(self, global_samples: int) -> None:
        """Record that ``global_samples`` more samples (all ranks together) were consumed."""
        self.start_index += int(global_samples)

    # -- checkpointing
    def state_dict(self, consumed_samples: int | None = None) -> dict[str, Any]:
        """What a checkpoint needs. ``consumed_samples`` (global, e.g. ``step * global_batch``)
        overrides ``start_index``; pass it, since a DataLoader prefetches ahead of training."""
        return {
            "num_samples": self.num_samples,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
            "world_size": self.world_size,
            "epoch_length": self.epoch_length,
            "start_index": int(self.start_index if consumed_samples is None else consumed_samples),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["num_samples"]) != self.num_samples:
            raise ValueError(f"sampler state is for {state['num_samples']} samples, this dataset has {self.num_samples}")
        self.seed = int(state["seed"])
        self.shuffle = bool(state.get("shuffle", self.shuffle))
        self._perm = None
        start = int(state["start_index"])
        old_len = int(state.get("epoch_length", self.epoch_length))
        if old_len != self.epoch_length:  # world size changed: keep (epoch, offset in the permutation)
            epoch, off = divmod(start, old_len)
            start = epoch * self.epoch_length + min(off, self.epoch_length)
        self.start_index = start


# ------------------------------------------------------------------------------- the mixture

_MIX_TAG = 0x6D6978  # "mix": keeps the mixture's draws apart from any other use of the seed


def mixture_counts(blocks: Sequence[int], weights: Sequence[float]) -> np.ndarray:
    """Samples each stream gives one pass of a mixture: ``weight x blocks``, rounded half up."""
    return np.array([int(math.floor(float(w) * int(b) + 0.5)) for w, b in zip(weights, blocks)], dtype=np.int64)


class MixtureSampler(ResumableDistributedSampler):
    """:class:`ResumableDistributedSampler` over a weighted mix of a split's streams (languages, sources).

    ``weights[s]`` is stream ``s``'s epochs per *pass* of the mixture: a pass holds ``round(weights[s] x
    blocks[s])`` samples of it (3.0: each of its blocks three times, 0.5: half of them, 0: none), placed among the
    other streams' at random (``shuffle``; else evenly interleaved). Each stream runs through its own sequence of
    epochs, each a permutation of its blocks drawn from (seed, the stream's name, that epoch), and consecutive passes
    continue it: with weight 0.5 two passes see every block once; with weight 3 the copies of a block lie about a
    third of a pass apart. A stream's share of the samples is ``weights[s] x blocks[s]`` over the pass length.

    Passes are the base class's epochs for everything it does (``epoch_length``: the pass cut to a multiple of
    ``world_size``; the global stream, pass after pass; each rank's share; ``start_index``; state and resume), so a
    run resumed at a sample count continues with exactly the samples an uninterrupted run would have drawn. The
    epochs a stretch took of each stream are :func:`stream_counts` over its blocks.

    Memory: one pass as an array of sample ids (int32 below 2**31 blocks) plus a label per sample and each stream's
    current permutation, the order of the base class's permutation of the whole split: a phase of 20B tokens in
    4096-token blocks is ~5M samples, 20-40 MB."""

    def __init__(self, streams: Sequence[Stream], weights: Sequence[float], *, rank: int = 0, world_size: int = 1,
                 seed: int = 0, start_index: int = 0, shuffle: bool = True, drop_last: bool = True):
        if not streams or len(streams) != len(weights):
            raise ValueError(f"{len(weights)} weights for {len(streams)} streams")
        for w in weights:
            if not (isinstance(w, (int, float)) and math.isfinite(w) and w >= 0):
                raise ValueError(f"a stream weight must be a finite number >= 0, got {w!r}")
        self.streams = list(streams)
        self.weights = [float(w) for w in weights]
        self.per_pass = mixture_counts([st.blocks for st in self.streams], self.weights)
        if not self.per_pass.sum():
            raise ValueError("the mix draws no sample: every stream has weight 0 or no blocks")
        n_ids = max(st.start + st.blocks for st in self.streams)
        self._ids = np.int32 if n_ids < 2**31 else np.int64
        self._stream_perm: dict[int, tuple[int, np.ndarray]] = {}
        super().__init__(int(self.per_pass.sum()), rank=rank, world_size=world_size, seed=seed,
                         start_index=start_index, shuffle=shuffle, drop_last=drop_last)

    def labels(self, epoch: int) -> np.ndarray:
        """The stream of each position of pass ``epoch`` (before the cut to ``epoch_length``)."""
        k = len(self.streams)
        labels = np.repeat(np.arange(k, dtype=np.int32), self.per_pass)
        if self.shuffle:
            np.random.default_rng([self.seed % 2**63, epoch, _MIX_TAG]).shuffle(labels)
        else:  # evenly: the j-th sample of stream s at (j + 1/2) / its count of the pass
            keys = np.concatenate([(np.arange(c) + 0.5) / c for c in self.per_pass if c])
            labels = labels[np.argsort(keys, kind="stable")]
        return labels

    def _stream_epoch(self, s: int, e: int) -> np.ndarray:
        hit = self._stream_perm.get(s)
        if hit is not None and hit[0] == e:
            return hit[1]
        st = self.streams[s]
        order = np.arange(st.blocks, dtype=self._ids)
        if self.shuffle:
            np.random.default_rng([self.seed % 2**63, zlib.crc32(st.name.encode("utf-8")), e, _MIX_TAG]).shuffle(order)
        self._stream_perm[s] = (e, order)
        return order

    def _stream_slice(self, s: int, a: int, b: int) -> np.ndarray:
        """Positions ``[a, b)`` of stream ``s``'s own sequence (epoch after epoch of its blocks), as block ids."""
        n, out, pos = self.streams[s].blocks, [], a
        while pos < b:
            e, off = divmod(pos, n)
            take = min(b - pos, n - off)
            out.append(self._stream_epoch(s, e)[off : off + take])
            pos += take
        return self.streams[s].start + np.concatenate(out).astype(self._ids)

    def permutation(self, epoch: int) -> np.ndarray:
        """The sample order of pass ``epoch`` (``epoch_length`` ids)."""
        if self._perm is not None and self._perm[0] == epoch:
            return self._perm[1]
        labels = self.labels(epoch)
        order = np.empty(len(labels), dtype=self._ids)
        for s, c in enumerate(self.per_pass.tolist()):
            if c:
                order[labels == s] = self._stream_slice(s, epoch * c, (epoch + 1) * c)
        order = _to_length(order, self.epoch_length)
        self._perm = (epoch, order)
        return order

    def state_dict(self, consumed_samples: int | None = None) -> dict[str, Any]:
        return {**super().state_dict(consumed_samples),
                "mix": {st.name: w for st, w in zip(self.streams, self.weights)}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mix = {st.name: w for st, w in zip(self.streams, self.weights)}
        if "mix" in state and state["mix"] != mix:
            raise ValueError(f"sampler state is for the mix {state['mix']}, this sampler draws {mix}")
        super().load_state_dict(state)
        self._stream_perm = {}


def stream_counts(sampler: ResumableDistributedSampler, streams: Sequence[Stream], start: int, stop: int) -> np.ndarray:
    """How many of the global stream's positions ``[start, stop)`` fall in each of ``streams`` (a split's, in block
    order), for either sampler: one epoch (pass) at a time, so memory stays one permutation."""
    ends = np.array([st.start + st.blocks for st in streams], dtype=np.int64)
    counts = np.zeros(len(streams), dtype=np.int64)
    pos = max(0, int(start))
    while pos < stop:
        epoch, off = divmod(pos, sampler.epoch_length)
        take = min(int(stop) - pos, sampler.epoch_length - off)
        ids = sampler.permutation(epoch)[off : off + take]
        counts += np.bincount(np.searchsorted(ends, ids, side="right"), minlength=len(streams))[: len(streams)]
        pos += take
    return counts


# --------------------------------------------------------------------------- document masking


def document_positions(ids: torch.Tensor, *, bos_id: int | None, eos_id: int | None) -> torch.Tensor:
    """Position ids of packed blocks ``ids`` (``[batch, seq]``) that restart at 0 where a document starts: at a
    ``bos_id`` token, and right after an ``eos_id`` token (each may be None); every row starts at 0 (its first
    document is usually the tail of one cut by the block boundary).

    Given to a Hugging Face model with no attention mask, these positions are what makes attention stay inside
    each document: transformers' masking_utils.find_packed_sequence_indices turns every restart into a new
    sequence of a block-diagonal causal mask (sdpa, eager, flex), and the flash-attention path calls the varlen
    kernel with the sequence lengths read off them (modeling_flash_attention_utils._is_packed_sequence, which
    needs the rows flattened into one: :func:`flatten_rows`). RoPE then sees each document from position 0, as
    at inference."""
    if ids.ndim != 2:
        raise ValueError(f"expected [batch, seq] token ids, got shape {tuple(ids.shape)}")
    start = torch.zeros_like(ids, dtype=torch.bool)
    if bos_id is not None:
        start |= ids == bos_id
    if eos_id is not None:
        start[:, 1:] |= ids[:, :-1] == eos_id
    start[:, 0] = True
    arange = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    last_start = torch.where(start, arange, torch.zeros_like(arange)).cummax(dim=1).values
    return arange - last_start


def flatten_rows(batch: dict[str, torch.Tensor], ignore_index: int = -100) -> dict[str, torch.Tensor]:
    """``input_ids`` / ``labels`` / ``position_ids`` of ``[batch, seq]`` as one ``[1, batch * seq]`` row, the form
    transformers' flash-attention varlen path reads packed sequences from. The first label of every row but the
    first becomes ``ignore_index``, so no token is trained to predict the next row's first token: the loss is over
    the same ``batch * (seq - 1)`` targets as the unflattened batch. Other keys are left as they are."""
    out = dict(batch)
    rows, seq = batch["input_ids"].shape
    for key in ("input_ids", "labels", "position_ids"):
        if key in batch:
            out[key] = batch[key].reshape(1, rows * seq)
    if "labels" in batch:
        labels = out["labels"].clone()
        labels[0, seq::seq] = ignore_index
        out["labels"] = labels
    return out
