"""Chat templates whose training tokens are the tokens inference must produce.

For every conversation of the demo's SFT data (and the tool-use fixture), the tokens under the assistant mask (what
TRL trains on) must be exactly the continuation of the ids of the prompt rendered with the generation prompt. A
tokenizer trained with the default, llama.cpp-compatible pre-tokenizer passes on every conversation; round 1's
``cyrillic-aware`` regex, which lets the header's newline merge with the answer's first word, fails on most -- the
check catches the bug it is about."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.data.tokenization import TokenizerConfig, save_hf, train_bpe
from pipeline.training.config import DataSource
from pipeline.training.posttrain.data import load_examples
from pipeline.training.posttrain.templates import assistant_alignment, prepare_tokenizer

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "posttrain"
SOURCES = [FIXTURES / "alpaca.jsonl", FIXTURES / "chat.jsonl"]


@pytest.fixture(scope="module")
def conversations() -> list[dict]:
    return load_examples([DataSource(path=str(p)) for p in SOURCES], "sft")


def _tokenizer(tmp: Path, conversations: list[dict], pretokenizer: str):
    """A BPE trained on the conversations' own text, rendered as ChatML lines (so that merges of a newline with the
    answer's first word are learned wherever the pre-tokenizer allows them)."""
    text = ["\n".join(f"{m['role']}\n{m['content']}" for m in c["messages"]) for c in conversations]
    cfg = TokenizerConfig(vocab_size=1500, min_frequency=2, train_chars=200_000, mix={"xx": 1.0},
                          pretokenizer=pretokenizer)
    save_hf(train_bpe({"xx": text * 5}, cfg), cfg, str(tmp))
    return prepare_tokenizer(str(tmp))


def test_every_demo_conversation_trains_the_tokens_generation_produces(tmp_path, conversations):
    tok = _tokenizer(tmp_path, conversations, "llama3")
    assert len(conversations) == 156
    failures = {i: why for i, c in enumerate(conversations) if (why := assistant_alignment(tok, c["messages"]))}
    assert not failures, list(failures.items())[:3]
    # and the BOS that pack puts before every document starts every rendered conversation
    ids = tok.apply_chat_template(conversations[0]["messages"], tokenize=True, return_dict=True)["input_ids"]
    assert ids[0] == tok.bos_token_id and list(ids).count(tok.bos_token_id) == 1


def test_the_check_catches_a_header_newline_merged_into_the_answer(tmp_path, conversations):
    tok = _tokenizer(tmp_path, conversations, "cyrillic-aware")
    failures = [why for c in conversations if (why := assistant_alignment(tok, c["messages"]))]
    assert len(failures) > len(conversations) // 2, len(failures)
    assert "not a prefix" in failures[0]
