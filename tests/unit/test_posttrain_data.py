"""Post-training data: formats, clear errors with file:line, the held-out split, the ChatML template with
loss markers, and the assistant-only label mask that SFT trains with."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.errors import InputError
from pipeline.training.config import DataSource, SFTConfig
from pipeline.training import posttrain as pt

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "posttrain"


def _write(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_fixtures_load_in_every_format(tmp_path):
    alpaca = pt.load_examples([DataSource(path=str(FIX / "alpaca.jsonl"))], "sft")
    chat = pt.load_examples([DataSource(path=str(FIX / "chat.jsonl"))], "sft")
    prefs = pt.load_examples([DataSource(path=str(FIX / "preferences.jsonl"))], "preference")
    assert len(alpaca) == 72 and len(chat) == 84 and len(prefs) == 60
    assert alpaca[0]["messages"][-1]["role"] == "assistant"
    assert all(p["prompt"][-1]["role"] == "user" and p["chosen"][0]["role"] == "assistant" for p in prefs)
    assert len(pt.load_examples([DataSource(path=str(FIX / "alpaca.json"))], "sft")) == 12
    # parquet and a datasets save_to_disk folder (DatasetDict with a split)
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(x) for x in (FIX / "alpaca.jsonl").read_text(encoding="utf-8").splitlines()]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    assert len(pt.load_examples([DataSource(path=str(tmp_path / "a.parquet"))], "sft")) == 72
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:10])}).save_to_disk(str(tmp_path / "hf"))
    assert len(pt.load_examples([DataSource(path=str(tmp_path / "hf"), split="train")], "sft")) == 10
    assert len(pt.load_examples([DataSource(path=str(FIX / "alpaca.jsonl"), max_examples=5)], "sft")) == 5


def test_alpaca_input_goes_after_the_instruction():
    msgs = pt.alpaca_to_messages({"instruction": "Repeat the word.", "input": "apple", "output": "apple"}, "x")
    assert msgs == [{"role": "user", "content": "Repeat the word.\napple"}, {"role": "assistant", "content": "apple"}]
    assert pt.alpaca_to_messages({"instruction": "Hi", "output": "Hello"}, "x")[0]["content"] == "Hi"


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
        pt.load_examples([DataSource(path=str(path))], kind)


def test_empty_and_missing_data(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n", encoding="utf-8")
    with pytest.raises(InputError, match="holds no records"):
        pt.load_examples([DataSource(path=str(tmp_path / "empty.jsonl"))], "sft")
    with pytest.raises(InputError, match="does not exist"):
        pt.load_examples([DataSource(path=str(tmp_path / "nope.jsonl"))], "sft")
    (tmp_path / "broken.jsonl").write_text('{"instruction": "a", "output": "b"}\n{oops\n', encoding="utf-8")
    with pytest.raises(InputError, match=r"broken\.jsonl:2: not valid JSON"):
        pt.load_examples([DataSource(path=str(tmp_path / "broken.jsonl"))], "sft")


def test_split_is_seeded_and_disjoint():
    ex = [{"i": i} for i in range(50)]
    tr, ev = pt.split_examples(ex, 0.1, seed=3)
    assert len(ev) == 5 and len(tr) == 45 and {e["i"] for e in tr}.isdisjoint({e["i"] for e in ev})
    assert pt.split_examples(ex, 0.1, seed=3) == (tr, ev)
    with pytest.raises(InputError, match="too few"):
        pt.split_examples([{"i": 0}], 0.5, seed=0)


def test_config_rejects_lora_with_zero3_and_needs_data():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="lora with zero_stage 3"):
        SFTConfig(data=[{"path": "x"}], lora={}, zero_stage=3)
    with pytest.raises(ValidationError):
        SFTConfig()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tests.fixtures.posttrain.tiny import save_model, save_tokenizer
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("tiny")
    save_tokenizer(folder)
    save_model(folder, len(AutoTokenizer.from_pretrained(folder)))
    return folder


def test_training_template_renders_like_the_tokenizer_stage_chatml(tiny):
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(tiny)
    tok = pt.prepare_tokenizer(str(tiny))
    assert tok.chat_template == pt.CHATML_TRAIN_TEMPLATE
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
        pt.prepare_tokenizer(str(tmp_path))


def test_sft_labels_cover_only_assistant_turns(tiny, tmp_path):
    """The SFTTrainer's labels: every token of system/user turns and role headers is -100; each assistant
    turn's content and its <|im_end|> are learned."""
    import torch
    from transformers import AutoModelForCausalLM

    tok = pt.prepare_tokenizer(str(tiny))
    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    convo = {"messages": [{"role": "system", "content": "You are a helpful assistant."},
                          {"role": "user", "content": "Repeat the word.\napple"}, {"role": "assistant", "content": "apple"},
                          {"role": "user", "content": "Назови столицу страны.\nФранция"},
                          {"role": "assistant", "content": "Париж"}]}
    alpaca = {"messages": pt.alpaca_to_messages({"instruction": "Санды цифрмен жаз.", "input": "жеті", "output": "7"}, "x")}
    cfg = SFTConfig(data=[{"path": "unused"}], max_length=128)
    ctx = type("Ctx", (), {"progress": False})()
    kw = pt.trainer_kwargs(cfg, ctx, str(tmp_path / "t"), "fp32", None, False)
    trainer = pt.sft_trainer(cfg, model, tok, [convo, alpaca], [], kw)
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
