"""Function calling: the public formats read into one conversation shape (bad records counted by reason), the chat
template renders it with the loss on the assistant's calls and answers, and model answers are parsed and scored."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from pipeline.errors import InputError
from pipeline.evaluation.report import wilson
from pipeline.evaluation.tool_use import aggregate, flat_metrics, load_items
from pipeline.training.config import DataSource
from pipeline.training.posttrain.data import detect_format, load_examples, to_sft_example
from pipeline.training.posttrain.tools import BadToolRecord, parse_tool_calls, score_calls

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "posttrain"
WEATHER = {"name": "get_weather", "description": "Weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
    "required": ["city"], "additionalProperties": False}}

XLAM = {"id": 1, "query": "Weather in Oslo?", "tools": json.dumps([WEATHER]),
        "answers": json.dumps([{"name": "get_weather", "arguments": {"city": "Oslo"}}])}
GLAIVE = {"system": "SYSTEM: You are a helpful assistant with access to the following functions. Use them if required -\n"
                    + json.dumps(WEATHER, indent=4),
          "chat": "USER: Weather in Oslo? ASSISTANT: <functioncall> {\"name\": \"get_weather\", \"arguments\": "
                  "'{\"city\": \"Oslo\"}'} <|endoftext|> FUNCTION RESPONSE: {\"temp\": 3} ASSISTANT: It is 3 degrees. "
                  "<|endoftext|>"}
HERMES = {"conversations": [
    {"from": "system", "value": "You are a function calling AI model. <tools> " + json.dumps([WEATHER]) + " </tools>"},
    {"from": "human", "value": "Weather in Oslo?"},
    {"from": "gpt", "value": "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}\n</tool_call>"},
    {"from": "tool", "value": "<tool_response>\n{\"temp\": 3}\n</tool_response>"},
    {"from": "gpt", "value": "It is 3 degrees."}]}


@pytest.mark.parametrize("rec,fmt", [(XLAM, "xlam"), (GLAIVE, "glaive"), (HERMES, "hermes")])
def test_public_formats_read_into_one_shape(rec, fmt):
    assert detect_format(rec) == fmt
    ex = to_sft_example(rec, "x:1")
    tools = json.loads(ex["tools"])
    assert [t["function"]["name"] for t in tools] == ["get_weather"] and tools[0]["type"] == "function"
    call_turn = next(m for m in ex["messages"] if m.get("tool_calls"))
    assert call_turn["role"] == "assistant" and call_turn["content"] == ""
    assert call_turn["tool_calls"] == [{"type": "function",
                                        "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]
    if fmt != "xlam":
        roles = [m["role"] for m in ex["messages"] if m["role"] != "system"]
        assert roles == ["user", "assistant", "tool", "assistant"]
        assert ex["messages"][-2]["content"] == '{"temp": 3}' and ex["messages"][-1]["content"] == "It is 3 degrees."


def test_bad_public_records_are_counted_by_reason_and_skipped(tmp_path):
    rows = [XLAM, {**XLAM, "tools": "[{"}, {**XLAM, "answers": json.dumps([{"name": "nope", "arguments": {}}])},
            {**XLAM, "answers": "[]"}, {**XLAM, "tools": "[{"}]
    path = tmp_path / "xlam.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    skipped: Counter = Counter()
    got = load_examples([DataSource(path=str(path))], "sft", skipped)
    assert len(got) == 1
    assert skipped == {"xlam: tools is not valid JSON": 2, "xlam: a call names a tool that is not given": 1,
                       "xlam: no answers": 1}
    # our own chat format still stops at the first bad record, naming it
    bad = tmp_path / "chat.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "x"},
                                            {"role": "assistant", "content": None, "tool_calls": "{"}]}) + "\n")
    with pytest.raises(BadToolRecord, match="chat.jsonl:1"):
        load_examples([DataSource(path=str(bad))], "sft", Counter())
    with pytest.raises(InputError, match="only assistant turns call tools"):
        to_sft_example({"messages": [{"role": "user", "content": "x", "tool_calls": []},
                                     {"role": "assistant", "content": "y"}]}, "w")


def test_the_fixture_loads_and_renders_with_the_loss_on_calls_and_answers():
    from transformers import AutoTokenizer

    from pipeline.training.posttrain.templates import assistant_alignment, prepare_tokenizer
    from tests.fixtures.posttrain.tiny import save_tokenizer

    ex = load_examples([DataSource(path=str(FIXTURES / "tools.jsonl"))], "sft")
    assert len(ex) == 108 and all(e.get("tools") for e in ex)
    langs = Counter(json.loads(line)["lang"] for line in (FIXTURES / "tools.jsonl").read_text(encoding="utf-8").splitlines())
    assert langs == {"kk": 36, "ru": 36, "en": 36}
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        save_tokenizer(tmp)
        tok = prepare_tokenizer(tmp)
        assert AutoTokenizer.from_pretrained(tmp).chat_template  # the saved template (no markers) renders tools too
        for e in ex:
            tools = json.loads(e["tools"])
            assert assistant_alignment(tok, e["messages"], tools) is None
        e = ex[0]
        enc = tok.apply_chat_template(e["messages"], tools=json.loads(e["tools"]), tokenize=True, return_dict=True,
                                      return_assistant_tokens_mask=True)
        trained = tok.decode([i for i, m in zip(enc["input_ids"], enc["assistant_masks"]) if m])
        assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Алматы"}}\n</tool_call><|im_end|>' in trained
        assert "Алматы қаласында" in trained and "<tools>" not in trained and '"temp"' not in trained


def test_parse_and_score_calls():
    tools = json.dumps([{"type": "function", "function": WEATHER}])
    ref = [{"name": "get_weather", "arguments": {"city": "Oslo"}}]
    good = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    assert parse_tool_calls(good) == ([{"name": "get_weather", "arguments": {"city": "Oslo"}}], 0)
    assert score_calls(good, ref, tools) == {"valid": True, "name": True, "arguments": True, "abstained": False,
                                             "expected_call": True}
    wrong_arg = good.replace("Oslo", "Bergen")
    assert score_calls(wrong_arg, ref, tools)["arguments"] is False and score_calls(wrong_arg, ref, tools)["valid"]
    schema_bad = '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "k"}}</tool_call>'
    assert score_calls(schema_bad, ref, tools)["valid"] is False
    assert score_calls("<tool_call>{not json</tool_call>", ref, tools)["valid"] is False
    assert score_calls("<tool_call>\n{\"name\": \"get_weather\"", ref, tools)["valid"] is False  # unclosed
    assert score_calls("It is cold.", [], tools) == {"valid": False, "name": False, "arguments": False,
                                                     "abstained": True, "expected_call": False}
    two = good + "\n" + good.replace("Oslo", "Rome")
    both = [ref[0], {"name": "get_weather", "arguments": {"city": "Rome"}}]
    assert score_calls(two, list(reversed(both)), tools)["arguments"] is True  # call order ignored


def test_aggregate_shares_and_intervals():
    rows = ([{"lang": "kk", "expected_call": True, "valid": True, "name": True, "arguments": i < 3, "abstained": False}
             for i in range(4)]
            + [{"lang": "kk", "expected_call": False, "valid": False, "name": False, "arguments": False,
                "abstained": i == 0} for i in range(2)])
    sc = aggregate(rows)
    assert sc["kk"]["arguments"]["share"] == 0.75 and sc["kk"]["arguments"]["n"] == 4
    assert (sc["kk"]["arguments"]["low"], sc["kk"]["arguments"]["high"]) == wilson(3, 4)
    assert sc["kk"]["abstain"]["share"] == 0.5 and sc["overall"]["valid"]["share"] == 1.0
    assert flat_metrics(sc)["tool_arguments_kk"] == 0.75 and flat_metrics(sc)["tool_abstain"] == 0.5


def test_eval_items_from_the_held_out_fixture():
    items = load_items([str(FIXTURES / "tools_eval.jsonl")], None)
    assert len(items) == 54 and {i["lang"] for i in items} == {"kk", "ru", "en"}
    assert sum(1 for i in items if not i["reference"]) == 9  # the no-tool requests
    assert all(i["messages"][-1]["role"] == "user" for i in items)
    assert load_items(["llmpipe:tools_eval"], None) == [{**i, "where": i["where"].replace(
        str(FIXTURES / "tools_eval.jsonl"), str(Path(__file__).resolve().parents[2] / "pipeline" / "evaluation" /
                                                "tasks" / "tools_eval.jsonl"))} for i in items]
