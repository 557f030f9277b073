"""Language / source mixes: pack's training streams (index version 2), the MixtureSampler (weights, determinism,
resume, epochs), resolving a phase's mix against the shards' streams, and the per-phase accounting."""

from __future__ import annotations

import json

import fsspec
import numpy as np
import pytest
from pydantic import ValidationError
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from pipeline.data.packed import MixtureSampler, PackedDataset, ResumableDistributedSampler, Stream, stream_counts
from pipeline.data.packing import Packer, merge_indexes, route_to_val
from pipeline.data.shards import read_index, verify_shards, write_index
from pipeline.errors import ConfigError, InputError
from pipeline.stages.pack import PackConfig
from pipeline.training.config import DataPhase, PretrainConfig
from pipeline.training.pretrain import TrainStream, phase_data, plan_phases, resolve_mix

LOCAL = fsspec.filesystem("file")
STREAMS = [Stream("en/web", "en", "web", 0, 1000), Stream("kk/web", "kk", "web", 1000, 100),
           Stream("ru/news", "ru", "news", 1100, 500)]
WEIGHTS = [0.5, 3.0, 1.0]  # a pass: 500 en + 300 kk + 500 ru


def rank_streams(sampler_kw: dict, world: int, start: int, n: int) -> list[list[int]]:
    """Each rank's next ``n`` samples from global position ``start`` (the rank's sampler, epoch after epoch)."""
    out = []
    for r in range(world):
        s = MixtureSampler(STREAMS, WEIGHTS, rank=r, world_size=world, start_index=start, **sampler_kw)
        got: list[int] = []
        while len(got) < n:
            got += list(s)
        out.append(got[:n])
    return out


def interleave(streams: list[list[int]]) -> list[int]:
    return [s[k] for k in range(len(streams[0])) for s in streams]


# --------------------------------------------------------------------------------- the sampler


def test_weights_are_epochs_per_pass_and_streams_continue_across_passes():
    m = MixtureSampler(STREAMS, WEIGHTS, seed=1)
    assert m.per_pass.tolist() == [500, 300, 500] and m.num_samples == m.epoch_length == 1300
    p0, p1 = m.permutation(0), m.permutation(1)
    en0, en1 = set(p0[p0 < 1000].tolist()), set(p1[p1 < 1000].tolist())
    assert len(en0) == len(en1) == 500 and not en0 & en1  # 0.5: two passes see every en block once
    kk = p0[(p0 >= 1000) & (p0 < 1100)] - 1000
    assert np.bincount(kk, minlength=100).tolist() == [3] * 100  # 3.0: every kk block three times per pass
    ru = p0[p0 >= 1100]
    assert sorted(ru.tolist()) == list(range(1100, 1600))  # 1.0: one epoch per pass
    # the copies of a kk block are spread over the pass (its own epochs follow each other), not side by side
    first = [np.flatnonzero(p0 == 1000 + b) for b in range(100)]
    assert np.mean([f[1] - f[0] for f in first]) > 1300 / 3 * 0.5


def test_weights_are_respected_over_a_long_stream():
    m = MixtureSampler(STREAMS, WEIGHTS, seed=7)
    n = 20 * 1300 + 650  # twenty passes and a half
    counts = stream_counts(m, STREAMS, 0, n)
    share = counts / n
    assert share == pytest.approx([500 / 1300, 300 / 1300, 500 / 1300], abs=0.01)
    # and locally: every window of 1000 samples is within a few binomial standard deviations
    ids = m.global_stream(0, n)
    lab = np.searchsorted([1000, 1100, 1600], ids, side="right")
    for w in range(0, n - 1000, 1000):
        frac = np.bincount(lab[w : w + 1000], minlength=3) / 1000
        assert np.all(np.abs(frac - np.array([5, 3, 5]) / 13) < 5 * np.sqrt(0.25 / 1000)), (w, frac)


def test_deterministic_per_seed_and_without_shuffle_evenly_interleaved():
    a = MixtureSampler(STREAMS, WEIGHTS, seed=3).global_stream(0, 3000)
    assert np.array_equal(a, MixtureSampler(STREAMS, WEIGHTS, seed=3).global_stream(0, 3000))
    assert not np.array_equal(a, MixtureSampler(STREAMS, WEIGHTS, seed=4).global_stream(0, 3000))
    # the plain sampler over the same blocks draws another order (the mixture's draws are its own)
    assert not np.array_equal(a[:1000], ResumableDistributedSampler(1600, seed=3).global_stream(0, 1000))
    even = MixtureSampler(STREAMS, WEIGHTS, seed=3, shuffle=False).permutation(0)
    lab = np.searchsorted([1000, 1100, 1600], even, side="right")
    for w in range(0, 1300, 130):  # every tenth of the pass has the pass's proportions, to a sample or two
        assert np.abs(np.bincount(lab[w : w + 130], minlength=3) - [50, 30, 50]).max() <= 2
    assert even[lab == 1][:5].tolist() == [1000, 1001, 1002, 1003, 1004]  # each stream in block order


def test_resume_mid_phase_gives_the_identical_continuation():
    world, kw = 4, {"seed": 11}
    total = 3 * 1300
    full = rank_streams(kw, world, 0, total // world)
    g_full = interleave(full)
    assert g_full == MixtureSampler(STREAMS, WEIGHTS, world_size=world, **kw).global_stream(0, total).tolist()
    for consumed in (0, 8, 652, 1296, 1300, 2000, 2604):  # step boundaries (multiples of world), across passes
        resumed = rank_streams(kw, world, consumed, (total - consumed) // world)
        for r in range(world):
            assert resumed[r] == full[r][consumed // world :], (consumed, r)
    # through the state a checkpoint stores (JSON), into a fresh sampler with another seed
    s = MixtureSampler(STREAMS, WEIGHTS, rank=1, world_size=world, **kw)
    state = json.loads(json.dumps(s.state_dict(consumed_samples=1296)))
    assert state["mix"] == {"en/web": 0.5, "kk/web": 3.0, "ru/news": 1.0}
    t = MixtureSampler(STREAMS, WEIGHTS, rank=1, world_size=world, seed=99)
    t.load_state_dict(state)
    assert (list(t) + list(t))[:50] == full[1][1296 // world : 1296 // world + 50]  # to the pass's end, then on
    with pytest.raises(ValueError, match="for the mix"):
        MixtureSampler(STREAMS, [1.0, 1.0, 1.0], rank=1, world_size=world).load_state_dict(state)


def test_train_stream_resumes_a_mixed_phase_exactly():
    """The pretraining stream (phase after phase, per rank) with a mixed first phase: a stream restarted from a
    checkpoint's data position yields the same samples as the uninterrupted one, on every rank."""

    class Fake:
        def __init__(self, streams):
            self.streams = streams

        def __len__(self):
            return max(s.start + s.blocks for s in self.streams)

        def __getitem__(self, i):
            return {"sample_id": int(i)}

    plan = plan_phases([DataPhase(name="a", shards="s1", until_step=7, mix={"kk": 3.0, "en": 0.5}),
                        DataPhase(name="b", shards="s2")], 12)
    data = [Fake(STREAMS[:2] + [Stream("ru/news", "ru", "news", 1100, 20)]), Fake([Stream("x", "en", None, 0, 90)])]
    weights = [resolve_mix(data[0].streams, plan[0].mix, "lang", "a"), None]
    assert weights == [[0.5, 3.0, 1.0], None]
    kw = dict(world=2, micro=3, accum=2, seed=5, shuffle=True, weights=weights)

    def take(stream, steps):
        it = iter(stream)
        return [next(it)["sample_id"] for _ in range(steps * stream.micro * stream.accum)]

    for rank in (0, 1):
        full = take(TrainStream(data, plan, rank=rank, start_step=0, start_index=0, **kw), 12)
        for at in (3, 7, 9):
            pos = TrainStream(data, plan, rank=rank, start_step=0, start_index=0, **kw).position(at)
            index = pos["phase_start_index"] if pos["phase"] == (0 if at < 7 else 1) else 0
            again = take(TrainStream(data, plan, rank=rank, start_step=at, start_index=index, **kw), 12 - at)
            assert again == full[at * 6 :], (rank, at)
    assert "mix" in TrainStream(data, plan, rank=0, start_step=0, start_index=0, **kw).position(3)["sampler"]


def test_phase_data_counts_tokens_and_epochs():
    m = MixtureSampler(STREAMS, WEIGHTS, seed=2)
    got = phase_data(m, STREAMS, 2600, 64, 1600)  # exactly two passes
    assert got["samples"] == 2600 and got["tokens"] == 2600 * 64 and got["epochs"] == pytest.approx(2600 / 1600)
    s = got["streams"]
    assert [s[n]["samples"] for n in ("en/web", "kk/web", "ru/news")] == [1000, 600, 1000]
    assert [s[n]["epochs"] for n in ("en/web", "kk/web", "ru/news")] == [1.0, 6.0, 2.0]  # weight x passes
    assert got["languages"]["kk"] == {"tokens": 600 * 64, "samples": 600, "blocks": 100, "epochs": 6.0}
    assert got["sources"]["web"]["samples"] == 1600 and got["sources"]["web"]["epochs"] == pytest.approx(1600 / 1100)
    half = phase_data(m, STREAMS, 650, 64, 1600)["streams"]
    assert sum(v["samples"] for v in half.values()) == 650
    assert half["kk/web"]["epochs"] == pytest.approx(1.5, abs=0.25)  # fractional, as drawn
    # a uniform phase over streamed shards: the streams' natural shares; without streams only the totals
    plain = ResumableDistributedSampler(1600, seed=0)
    nat = phase_data(plain, STREAMS, 3200, 64, 1600)
    assert [v["epochs"] for v in nat["streams"].values()] == [2.0, 2.0, 2.0]
    assert set(phase_data(plain, [], 100, 64, 1600)) == {"samples", "tokens", "epochs"}


def test_stream_counts_of_the_plain_sampler_is_its_blocks_per_epoch():
    plain = ResumableDistributedSampler(1600, seed=0, world_size=3)  # epoch_length 1599: one block dropped
    c = stream_counts(plain, STREAMS, 0, plain.epoch_length)
    assert c.sum() == 1599 and (np.array([1000, 100, 500]) - c).sum() == 1
    zero = [Stream("a", "a", None, 0, 5), Stream("b", "b", None, 5, 0), Stream("c", "c", None, 5, 5)]
    assert stream_counts(ResumableDistributedSampler(10), zero, 0, 10).tolist() == [5, 0, 5]


# ----------------------------------------------------------------------------- config and keys


def test_mix_keys_are_checked_against_the_shards_in_one_line():
    assert resolve_mix(STREAMS, None, "lang", "w") is None
    assert resolve_mix(STREAMS, {"kk": 3, "en": 0.5}, "lang", "w") == [0.5, 3.0, 1.0]  # ru unnamed: 1.0
    assert resolve_mix(STREAMS, {"kk": 3, "*": 0}, "lang", "w") == [0.0, 3.0, 0.0]
    assert resolve_mix(STREAMS, {"web": 2}, "source", "w") == [2.0, 2.0, 1.0]
    assert resolve_mix(STREAMS, {"kk/web": 2}, "stream", "w") == [1.0, 2.0, 1.0]
    cases = [
        (STREAMS, {"kz": 3.0}, "lang", "phases[0] (web, shards/): mix key 'kz' names no language of the shards "
                                       "(languages: en, kk, ru)"),
        (STREAMS, {"kz": 1, "uz": 1}, "lang", "mix keys 'kz', 'uz' name no language"),
        (STREAMS, {"kk": 1}, "source", "mix key 'kk' names no source of the shards (sources: news, web)"),
        (STREAMS, {"kk": 1}, "stream", "(streams: en/web, kk/web, ru/news)"),
        ([], {"kk": 1}, "lang", "mix needs shards packed per language / source (pack's stream_by)"),
        ([Stream("web", None, "web", 0, 4)], {"kk": 1}, "lang",
         "mix_by lang, but the shards' streams carry no language (packed with stream_by ['source'])"),
    ]
    for streams, mix, by, message in cases:
        with pytest.raises(ConfigError) as err:
            resolve_mix(streams, mix, by, "phases[0] (web, shards/)")
        assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_phase_config_validation():
    ph = DataPhase(mix={"kk": 3, "ru": 1, "en": 0.5})
    assert ph.mix_by == "lang" and plan_phases([ph], 10)[0].mix == {"kk": 3.0, "ru": 1.0, "en": 0.5}
    for bad, msg in [({"mix": {"kk": -1}}, "greater than or equal to 0"), ({"mix": {}}, "mix is empty"),
                     ({"mix": {"kk": 0, "*": 0}}, "every mix weight is 0"), ({"mix_by": "country"}, "mix_by"),
                     ({"mix": {"kk": float("inf")}}, "finite")]:
        with pytest.raises(ValidationError, match=msg):
            DataPhase(**bad)
    assert PretrainConfig(max_steps=4, phases=[{"mix": {"kk": 0}}]).phases[0].mix == {"kk": 0.0}  # drop one stream
    assert "epochs per pass" in PretrainConfig.model_json_schema()["$defs"]["DataPhase"]["properties"]["mix"]["description"]
    with pytest.raises(ValueError, match="no sample"):
        MixtureSampler(STREAMS, [0, 0, 0])
    with pytest.raises(ValueError, match="too few"):
        MixtureSampler([Stream("a", "a", None, 0, 10)], [0.1], world_size=2)


# ----------------------------------------------------------------------------------- packing


SENTENCES = {
    "en": "The quick brown fox jumps over the lazy dog and packs blocks.",
    "ru": "Съешь же ещё этих мягких французских булок, да выпей чаю.",
    "kk": "Қазақстан Республикасы — Орталық Азиядағы мемлекет.",
}


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<bos>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(SENTENCES.values()) * 5, trainer)
    return tok


def docs(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    langs = [["en", "ru", "kk"][i] for i in rng.integers(0, 3, size=n)]
    sources = [f"{g}-web" if rng.random() < 0.8 else "mixed" for g in langs]
    texts = [" ".join([SENTENCES[g]] * int(rng.integers(1, 4))) for g in langs]
    return [f"d/{i}" for i in range(n)], texts, langs, sources


def special(tok):
    return {"bos_id": tok.token_to_id("<bos>"), "eos_id": tok.token_to_id("<eos>"), "vocab_size": tok.get_vocab_size()}


def pack(tok, folder, ids, texts, langs, sources, rank=0, **kw):
    cfg = PackConfig(seq_len=32, val_fraction=0.2, blocks_per_shard=4, **kw)
    p = Packer(tok, cfg, LOCAL, str(folder), rank, **special(tok))
    for i in range(0, len(ids), 16):
        p.add(ids[i : i + 16], texts[i : i + 16], langs[i : i + 16], sources[i : i + 16])
    return p.close()


def test_pack_writes_one_stream_per_language_and_source(tmp_path, tokenizer):
    ids, texts, langs, sources = docs(150)
    parts = [pack(tokenizer, tmp_path, ids[r::2], texts[r::2], langs[r::2], sources[r::2], rank=r) for r in (0, 1)]
    index = merge_indexes(parts, seq_len=32, **special(tokenizer))
    part_indexes = [merge_indexes([p], seq_len=32, **special(tokenizer)) for p in parts]
    assert merge_indexes(part_indexes, seq_len=32, **special(tokenizer), from_indexes=True) == index
    write_index(LOCAL, str(tmp_path), index)
    verify_shards(LOCAL, str(tmp_path))
    assert read_index(LOCAL, str(tmp_path)) == index and index["version"] == 2
    train = index["splits"]["train"]
    names = sorted({f"{g}/{s}" for d, g, s in zip(ids, langs, sources) if not route_to_val(d, 0.2)})
    assert list(train["streams"]) == names and "streams" not in index["splits"]["val"]
    ds = PackedDataset(str(tmp_path), "train")
    assert [s.name for s in ds.streams] == names and sum(s.blocks for s in ds.streams) == len(ds)
    bos, eos = special(tokenizer)["bos_id"], special(tokenizer)["eos_id"]
    for st in ds.streams:
        entry = train["streams"][st.name]
        assert (entry["lang"], entry["source"]) == tuple(st.name.split("/"))
        assert entry["documents"] == sum(1 for d, g, s in zip(ids, langs, sources)
                                         if f"{g}/{s}" == st.name and not route_to_val(d, 0.2))
        # every block of the stream decodes to text of its language only
        for b in range(st.start, st.start + st.blocks):
            text = tokenizer.decode([t for t in ds.block(b).tolist() if t not in (bos, eos)])
            chars = set(text) - {"\ufffd"}  # a block may cut a character's bytes at either end
            assert chars <= set(SENTENCES[st.lang]), (st.name, text)  # en has no Cyrillic, ru no Kazakh letter
    assert {s["stream"] for s in train["shards"]} == set(names)
    assert all(s["file"].startswith("train.") for s in train["shards"])
    assert train["documents"] == sum(v["documents"] for v in train["streams"].values())
    assert train["dropped_tail_tokens"] == sum(v["dropped_tail_tokens"] for v in train["streams"].values())


def test_pack_by_language_only_and_without_streams(tmp_path, tokenizer):
    ids, texts, langs, sources = docs(90)
    by_lang = merge_indexes([pack(tokenizer, tmp_path / "a", ids, texts, langs, sources, stream_by=["lang"])],
                            seq_len=32, **special(tokenizer))
    assert sorted(by_lang["splits"]["train"]["streams"]) == ["en", "kk", "ru"]
    assert {v["source"] for v in by_lang["splits"]["train"]["streams"].values()} == {None}
    mixed = merge_indexes([pack(tokenizer, tmp_path / "b", ids, texts, langs, sources, stream_by=[])],
                          seq_len=32, **special(tokenizer))
    assert mixed["version"] == 1 and "streams" not in mixed["splits"]["train"]  # as before streams
    write_index(LOCAL, str(tmp_path / "b"), mixed)
    assert PackedDataset(str(tmp_path / "b"), "train").streams == []
    with pytest.raises(ValidationError, match="twice"):
        PackConfig(stream_by=["lang", "lang"])
    assert PackConfig(stream_by=["source", "lang"]).stream_by == ["lang", "source"]
    p = Packer(tokenizer, PackConfig(seq_len=32), LOCAL, str(tmp_path / "c"), 0, **special(tokenizer))
    p.add(ids[:5], texts[:5], langs[:5], sources[:5])
    with pytest.raises(ValueError, match="give the same columns with every batch"):
        p.add(ids[5:9], texts[5:9], langs[5:9])


def test_index_streams_are_validated(tmp_path, tokenizer):
    ids, texts, langs, sources = docs(120)
    index = merge_indexes([pack(tokenizer, tmp_path, ids, texts, langs, sources)], seq_len=32, **special(tokenizer))
    write_index(LOCAL, str(tmp_path), index)
    first = next(iter(index["splits"]["train"]["streams"]))
    cases = [
        (lambda i: i.update(version=1), "split 'train' has streams, which need format version 2"),
        (lambda i: i.update(version=3), "format version 3 is not supported (this code reads versions 1, 2)"),
        (lambda i: i["splits"]["train"]["streams"][first].update(start=1), f"stream {first!r} lists blocks [1,"),
        (lambda i: i["splits"]["train"]["shards"][0].update(stream="xx/yy"), "names stream 'xx/yy', which is not in"),
        (lambda i: i["splits"]["train"]["shards"].append(i["splits"]["train"]["shards"].pop(0)), "not contiguous"),
        (lambda i: i["splits"]["val"]["shards"][0].update(stream=first), "but the split lists no streams"),
    ]
    for change, message in cases:
        bad = json.loads(json.dumps(index))
        change(bad)
        (tmp_path / "index.json").write_text(json.dumps(bad))
        with pytest.raises(InputError) as err:
            read_index(LOCAL, str(tmp_path))
        assert message in str(err.value) and "\n" not in str(err.value), str(err.value)
