"""Post-training data: formats, clear errors with file:line, the held-out split, the ChatML template with
loss markers, and the assistant-only label mask that SFT trains with."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.errors import InputError
from pipeline.training.config import DataSource, SFTConfig
from pipeline.training.posttrain import data as ptd
from pipeline.training.posttrain import templates, trainers

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "posttrain"


def _write(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_fixtures_load_in_every_format(tmp_path):
    alpaca = ptd.load_examples([DataSource(path=str(FIX / "alpaca.jsonl"))], "sft")
    chat = ptd.load_examples([DataSource(path=str(FIX / "chat.jsonl"))], "sft")
    prefs = ptd.load_examples([DataSource(path=str(FIX / "preferences.jsonl"))], "preference")
    assert len(alpaca) == 72 and len(chat) == 84 and len(prefs) == 60
    assert alpaca[0]["messages"][-1]["role"] == "assistant"
    assert all(p["prompt"][-1]["role"] == "user" and p["chosen"][0]["role"] == "assistant" for p in prefs)
    assert len(ptd.load_examples([DataSource(path=str(FIX / "alpaca.json"))], "sft")) == 12
    # parquet and a datasets save_to_disk folder (DatasetDict with a split)
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(x) for x in (FIX / "alpaca.jsonl").read_text(encoding="utf-8").splitlines()]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    assert len(ptd.load_examples([DataSource(path=str(tmp_path / "a.parquet"))], "sft")) == 72
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:10])}).save_to_disk(str(tmp_path / "hf"))
    assert len(ptd.load_examples([DataSource(path=str(tmp_path / "hf"), split="train")], "sft")) == 10
    assert len(ptd.load_examples([DataSource(path=str(FIX / "alpaca.jsonl"), max_examples=5)], "sft")) == 5


def test_alpaca_input_goes_after_the_instruction():
    msgs = ptd.alpaca_to_messages({"instruction": "Repeat the word.", "input": "apple", "output": "apple"}, "x")
    assert msgs == [{"role": "user", "content": "Repeat the word.\napple"}, {"role": "assistant", "content": "apple"}]
    assert ptd.alpaca_to_messages({"instruction": "Hi", "output": "Hello"}, "x")[0]["content"] == "Hi"


@pytest.mark.parametrize("rows, kind, match", [
    ([{"instruction": "a", "output": "b"}, {"instruction": "c"}], "sft", r"bad\.jsonl:2: record has no 'output'"),
    ([{"messages": [{"role": "user", "content": "hi"}]}], "sft", r"bad\.jsonl:1: .*no assistant turn"),
    ([{"messages": [{"role": "bot", "content": "hi"}]}], "sft", r"bad\.jsonl:1: messages\[0\] has role 'bot'"),
    ([{"text": "just text"}], "sft", r"bad\.jsonl:1: not an instruction record"),
    ([{"prompt": "p", "chosen": "c"}], "preference", r"bad\.jsonl:1: preference record has no 'rejected'"),
])
def test_bad_records_name_file_and_line(tmp_path, rows, kind, match):
    path = _write(tmp_path / "bad.jsonl", rows)
    with pytest.raises(InputError, match=match):
        ptd.load_examples([DataSource(path=str(path))], kind)


def test_empty_and_missing_data(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n", encoding="utf-8")
    with pytest.raises(InputError, match="holds no records"):
        ptd.load_examples([DataSource(path=str(tmp_path / "empty.jsonl"))], "sft")
    with pytest.raises(InputError, match="does not exist"):
        ptd.load_examples([DataSource(path=str(tmp_path / "nope.jsonl"))], "sft")
    (tmp_path / "broken.jsonl").write_text('{"instruction": "a", "output": "b"}\n{oops\n', encoding="utf-8")
    with pytest.raises(InputError, match=r"broken\.jsonl:2: not valid JSON"):
        ptd.load_examples([DataSource(path=str(tmp_path / "broken.jsonl"))], "sft")


def test_split_is_seeded_and_disjoint():
    ex = [{"i": i} for i in range(50)]
    tr, ev = ptd.split_examples(ex, 0.1, seed=3)
    assert len(ev) == 5 and len(tr) == 45 and {e["i"] for e in tr}.isdisjoint({e["i"] for e in ev})
    assert ptd.split_examples(ex, 0.1, seed=3) == (tr, ev)
    with pytest.raises(InputError, match="too few"):
        ptd.split_examples([{"i": 0}], 0.5, seed=0)


def test_config_rejects_lora_with_zero3_and_needs_data():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="lora with zero_stage 3"):
        SFTConfig(data=[{"path": "x"}], lora={}, zero_stage=3)
    with pytest.raises(ValidationError):
        SFTConfig()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoTokenizer

    from tests.fixtures.posttrain.tiny import save_model, save_tokenizer

    folder = tmp_path_factory.mktemp("tiny")
    save_tokenizer(folder)
    save_model(folder, len(AutoTokenizer.from_pretrained(folder)))
    return folder


def test_training_template_renders_like_the_tokenizer_stage_chatml(tiny):
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(tiny)
    tok = templates.prepare_tokenizer(str(tiny))
    assert tok.chat_template == templates.CHATML_TRAIN_TEMPLATE
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "Сөзді қайтала.\nалма"},
            {"role": "assistant", "content": "алма"}, {"role": "user", "content": "u2"}]
    for gen in (False, True):
        assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen) == \
            plain.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
    assert tok.apply_chat_template(msgs[:2], tokenize=False, add_generation_prompt=True).endswith("<|im_start|>assistant\n")


def test_tokenizer_without_chat_tokens_or_template_is_an_input_error(tmp_path):
    from tests.fixtures.posttrain.tiny import save_tokenizer

    save_tokenizer(tmp_path, chat=False)
    with pytest.raises(InputError, match="no chat template and no <\\|im_start\\|>"):
        templates.prepare_tokenizer(str(tmp_path))


def test_sft_labels_cover_only_assistant_turns(tiny, tmp_path):
    """The SFTTrainer's labels: every token of system/user turns and role headers is -100; each assistant
    turn's content and its <|im_end|> are learned."""
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.training.checkpoint import CheckpointManager

    tok = templates.prepare_tokenizer(str(tiny))
    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    convo = {"messages": [{"role": "system", "content": "You are a helpful assistant."},
                          {"role": "user", "content": "Repeat the word.\napple"}, {"role": "assistant", "content": "apple"},
                          {"role": "user", "content": "Назови столицу страны.\nФранция"},
                          {"role": "assistant", "content": "Париж"}]}
    alpaca = {"messages": ptd.alpaca_to_messages({"instruction": "Санды цифрмен жаз.", "input": "жеті", "output": "7"}, "x")}
    cfg = SFTConfig(data=[{"path": "unused"}], max_length=128)
    ctx = type("Ctx", (), {"progress": False})()
    checkpoints = CheckpointManager(tmp_path / "t", every=0, keep=1, config_hash="", main=True)
    kw = trainers.trainer_kwargs(cfg, ctx, checkpoints, "fp32", None, False)
    trainer = trainers.sft_trainer(cfg, model, tok, [convo, alpaca], [], kw, checkpoints)
    rows = list(trainer.train_dataset)
    for row, expected in zip(rows, (["apple<|im_end|>", "Париж<|im_end|>"], ["7<|im_end|>"])):
        ids, labels = row["input_ids"], row["labels"]
        assert len(ids) == len(labels)
        spans, cur = [], []
        for i, lab in zip(ids, labels):
            if lab == -100:
                if cur:
                    spans.append(cur)
                cur = []
            else:
                assert lab == i
                cur.append(i)
        if cur:
            spans.append(cur)
        assert [tok.decode(s) for s in spans] == expected
        masked = tok.decode([i for i, lab in zip(ids, labels) if lab == -100])
        assert "<|im_start|>assistant\n" in masked and "<|im_start|>user" in masked
    # the collator keeps the mask
    batch = trainer.data_collator(rows)
    assert (batch["labels"] != -100).sum().item() == sum(sum(lab != -100 for lab in r["labels"]) for r in rows)


def test_edited_data_file_makes_a_posttraining_stage_stale(tmp_path):
    """Data files outside the run root are inputs too: their sha256 goes into the manifest's inputs."""
    from pipeline import runner
    from pipeline.config import config_hash
    from pipeline.stages import get_stage, load_config

    sft, dpo = get_stage("sft"), get_stage("dpo")

    data = tmp_path / "alpaca.jsonl"
    data.write_text('{"instruction": "Say hi", "output": "hi"}\n', encoding="utf-8")
    cfg = load_config("sft", None, [f"data=[{{path: {data}}}]"])
    refs = runner.input_refs({}, sft, cfg)
    assert refs == {f"external:{data}": {"fingerprint": refs[f"external:{data}"]["fingerprint"], "uri": str(data)}}
    manifest = {"config_hash": config_hash(cfg), "inputs": refs}
    assert runner.is_current(manifest, config_hash(cfg), runner.input_refs({}, sft, cfg))
    data.write_text('{"instruction": "Say hi", "output": "hello"}\n', encoding="utf-8")
    assert not runner.is_current(manifest, config_hash(cfg), runner.input_refs({}, sft, cfg))
    # a hub dataset is identified by its name and split
    hub = load_config("dpo", None, ["data=[{path: org/prefs, split: train_prefs}]"])
    assert runner.input_refs({}, dpo, hub) == {"external:org/prefs": {"fingerprint": "hub:org/prefs:train_prefs", "uri": "org/prefs"}}


def test_files_are_found_and_opened_as_the_collect_readers_do(tmp_path):
    """A data folder is expanded by pipeline.data.readers (recursive, sorted, hidden names skipped, non-data files
    ignored) and compressed files are read through it; messages name the file as the config spells it."""
    import gzip

    import zstandard

    folder = tmp_path / "data"
    (folder / "b").mkdir(parents=True)
    rec = {"instruction": "Say hi", "output": "hi"}
    (folder / "a.jsonl.gz").write_bytes(gzip.compress((json.dumps(rec) + "\n").encode()))
    two_frames = zstandard.ZstdCompressor().compress((json.dumps(rec) + "\n").encode()) * 2
    (folder / "b" / "c.jsonl.zst").write_bytes(two_frames)
    (folder / "b" / "d.json").write_text(json.dumps({"data": [rec, rec, rec]}), encoding="utf-8")
    (folder / ".hidden.jsonl").write_text("not json\n", encoding="utf-8")
    (folder / "notes.txt").write_text("not data\n", encoding="utf-8")
    where = [w for w, _ in ptd.read_records(str(folder))]
    assert where == [f"{folder}/a.jsonl.gz:1", f"{folder}/b/c.jsonl.zst:1", f"{folder}/b/c.jsonl.zst:2",
                     f"{folder}/b/d.json[0]", f"{folder}/b/d.json[1]", f"{folder}/b/d.json[2]"]
    assert len(ptd.load_examples([DataSource(path=str(folder))], "sft")) == 6
    prints = ptd.data_fingerprints([DataSource(path=str(folder) + "/")])
    assert sorted(prints) == [f"{folder}/{n}" for n in ("a.jsonl.gz", "b/c.jsonl.zst", "b/d.json", "notes.txt")]
    (folder / "b" / "e.jsonl").write_text(json.dumps(rec) + "\n{broken\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"data/b/e\.jsonl:2: not valid JSON"):
        ptd.load_examples([DataSource(path=str(folder))], "sft")
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "x.txt").write_text("x", encoding="utf-8")
    with pytest.raises(InputError, match="data folder .*empty holds no .jsonl/.json/.parquet files"):
        ptd.load_examples([DataSource(path=str(empty))], "sft")
    odd = tmp_path / "odd[1].jsonl"  # glob characters in a file name are just characters
    odd.write_text(json.dumps(rec) + "\n", encoding="utf-8")
    assert len(ptd.load_examples([DataSource(path=str(odd))], "sft")) == 1
