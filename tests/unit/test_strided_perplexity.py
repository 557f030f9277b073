"""Strided (sliding-window) perplexity of long documents: every id after the first is scored once,
later windows give each scored id at least ``max_length - stride`` ids of context, and
``stride = max_length - 1`` is exactly the older one-token overlap."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from pipeline.evaluation.perplexity import _windows, default_stride, text_perplexity


def _old_windows(seq: list[int], width: int) -> list[list[int]]:
    """The windows evaluation used before strides (one-token overlap), kept here as the reference."""
    if len(seq) <= width:
        return [seq]
    out, start = [], 0
    while start < len(seq) - 1:
        out.append(seq[start:start + width])
        start += width - 1
    return out


@pytest.mark.parametrize("width", [2, 3, 4, 5, 8, 16, 31])
def test_every_id_after_the_first_is_scored_exactly_once_with_enough_context(width):
    for n in range(0, 70):
        seq = list(range(n))
        for stride in range(1, width):
            wins = _windows(seq, width, stride)
            targets: list[int] = []
            for k, (w, first) in enumerate(wins):
                assert 1 <= first and len(w) <= width, (n, width, stride)
                assert w == seq[w[0]:w[0] + len(w)] if w else True  # contiguous slices of the document
                if k:
                    assert first >= width - stride, (n, width, stride, k)  # the documented context
                    assert len(w) > first  # no window without a target
                # the id at window position p is predicted from the p ids before it
                targets += [(t, p) for p, t in enumerate(w[first:], first)]
            assert [t for t, _ in targets] == seq[1:], (n, width, stride)
            # everything outside the first window sees at least width - stride ids
            assert all(ctx >= min(t, width - stride) for t, ctx in targets), (n, width, stride)


@pytest.mark.parametrize("width", [2, 3, 5, 8, 17])
def test_stride_of_width_minus_one_is_the_old_one_token_overlap(width):
    for n in range(0, 60):
        seq = list(range(n))
        new = _windows(seq, width, width - 1)
        assert [w for w, _ in new] == _old_windows(seq, width), (n, width)
        assert all(first == 1 for _, first in new)  # as before: every id but the window's first is a target


def test_stride_bounds_and_default():
    assert default_stride(256) == 128 and default_stride(2) == 1 and default_stride(3) == 1
    for bad in (0, 8, 9):
        with pytest.raises(ValueError, match="stride"):
            _windows(list(range(20)), 8, bad)


# ------------------------------------------------------------------ a model whose loss is its context


V = 50


class CharTok:
    """Character ids 3..V-1 (BOS 1, pad 0)."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [3 + (ord(c) % (V - 3)) for c in text]}


class ContextModel(torch.nn.Module):
    """Predicts the next id perfectly once it has seen ``need`` ids, uniformly (loss ln V) before.

    Its summed loss is ln V times the number of targets scored with less than ``need`` ids of
    context, so the windowing shows in the result."""

    def __init__(self, need: int):
        super().__init__()
        self.need = need

    def forward(self, input_ids, attention_mask):
        b, t = input_ids.shape
        logits = torch.zeros(b, t, V)
        nxt = torch.cat([input_ids[:, 1:], input_ids[:, -1:]], dim=1)
        seen = torch.arange(1, t + 1).expand(b, t)  # position i has seen i + 1 ids
        logits.scatter_(2, nxt.unsqueeze(-1), torch.where(seen >= self.need, 1e4, 0.0).unsqueeze(-1))
        return SimpleNamespace(logits=logits)


def _short_context_targets(n_ids: int, width: int, stride: int, need: int) -> int:
    """Targets scored with fewer than ``need`` ids of context."""
    return sum(1 for w, first in _windows(list(range(n_ids)), width, stride) for p in range(first, len(w)) if p < need)


def test_later_windows_score_with_max_length_minus_stride_context():
    tok, width = CharTok(), 32
    texts = ["абвгдежзийклмнопрстуфхцчшщъыьэюя" * 7, "The quick brown fox jumps over the lazy dog. " * 3, "short"]
    n_bytes = sum(len(t.encode()) for t in texts)
    need = 16
    model = ContextModel(need)
    old = text_perplexity(model, tok, texts, max_length=width, stride=width - 1, batch_size=3, device="cpu")
    new = text_perplexity(model, tok, texts, max_length=width, batch_size=3, device="cpu")  # stride 16
    assert new["stride"] == 16 and old["stride"] == 31 and new["window"] == 32
    for res in (old, new):  # exact-once: the counts and bytes do not depend on the stride
        assert res["predicted_tokens"] == res["tokens"] == sum(len(t) for t in texts)
        assert res["bytes"] == n_bytes
    # old: each later window starts with 1 id of context; new: with 32 - 16 = 16 (>= need)
    assert old["later_min_context"] == 1 and new["later_min_context"] == 16
    # new: only the first window's first need - 1 targets of each document are uncertain ("short": all 5)
    assert new["loss"] * new["predicted_tokens"] == pytest.approx((15 + 15 + 5) * math.log(V), rel=1e-5)
    assert sum(_short_context_targets(len(t) + 1, width, 16, need) for t in texts) == 35
    expect_old = sum(_short_context_targets(len(t) + 1, width, width - 1, need) for t in texts)
    assert expect_old > 35  # the one-token overlap loses context in every later window
    assert old["loss"] * old["predicted_tokens"] == pytest.approx(expect_old * math.log(V), rel=1e-5)
    for res in (old, new):  # bits per byte = summed loss in bits over UTF-8 bytes
        assert res["bits_per_byte"] == pytest.approx(res["loss"] * res["predicted_tokens"] / math.log(2) / n_bytes)
    assert new["bits_per_byte"] < old["bits_per_byte"]
    # a stride whose context is below need loses some again; a smaller one keeps all
    assert text_perplexity(model, tok, texts, max_length=width, stride=24, batch_size=2,
                           device="cpu")["loss"] > new["loss"]
    assert text_perplexity(model, tok, texts, max_length=width, stride=5, batch_size=2,
                           device="cpu")["loss"] == pytest.approx(new["loss"], rel=1e-6)
    # a stride beyond the window is capped at the one-token overlap
    assert text_perplexity(model, tok, texts, max_length=width, stride=500, batch_size=3,
                           device="cpu")["loss"] == pytest.approx(old["loss"], rel=1e-6)


def test_real_model_strided_matches_a_per_window_reference(tiny):
    """A transformers model: the batched, padded, masked result equals scoring each window alone,
    and stride max_length - 1 reproduces the one-token overlap's numbers."""
    import torch.nn.functional as F

    model, tok = tiny
    texts = ["Алма — жеміс. Ол қызыл немесе жасыл болады. " * 4, "Москва — столица России. " * 5, "The cat."]
    width = 12
    seqs = [[tok.bos_token_id, *tok(t, add_special_tokens=False)["input_ids"]] for t in texts]
    assert max(map(len, seqs)) > 3 * width

    def by_hand(stride=None, old=False):
        nll, n = 0.0, 0
        for seq in seqs:
            wins = [(w, 1) for w in _old_windows(seq, width)] if old else _windows(seq, width, stride)
            for w, first in wins:
                x = torch.tensor([w])
                with torch.no_grad():
                    logits = model(input_ids=x).logits[0, :-1]
                losses = F.cross_entropy(logits, x[0, 1:], reduction="none")[first - 1:]
                nll, n = nll + float(losses.sum()), n + len(losses)
        return nll, n

    for stride, old in [(None, False), (3, False), (width - 1, True)]:
        res = text_perplexity(model, tok, texts, max_length=width, stride=stride, batch_size=4, device="cpu")
        nll, n = by_hand(stride, old)
        assert n == res["predicted_tokens"] == res["tokens"]
        assert res["loss"] == pytest.approx(nll / n, rel=1e-4)
        assert res["bits_per_byte"] == pytest.approx(nll / math.log(2) / res["bytes"], rel=1e-4)


def test_config_stride_key():
    from pydantic import ValidationError

    from pipeline.stages.evaluate import EvaluateConfig

    assert EvaluateConfig(models=[{"path": "m"}]).stride is None  # max_length // 2 at run time
    assert EvaluateConfig(models=[{"path": "m"}], max_length=256, stride=255).stride == 255
    for bad in ({"stride": 0}, {"max_length": 256, "stride": 256}):
        with pytest.raises(ValidationError, match="stride|greater than or equal"):
            EvaluateConfig.model_validate({"models": [{"path": "m"}], **bad})
