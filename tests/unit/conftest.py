"""Fixtures of the unit tests."""

from tests.fixtures.posttrain.tiny import tiny  # noqa: F401 (a fixture: the tiny Llama and its tokenizer)
