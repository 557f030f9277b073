"""Measurements of a post-training model that do not depend on a trainer: held-out token loss, completion
log-probs of preference pairs, reward-model scores, greedy generations that stop at ``<|im_end|>``/EOS."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

from pipeline.errors import InputError
from pipeline.training.posttrain.templates import stop_token_ids


def _device(model: Any) -> Any:
    return next(model.parameters()).device


def heldout_loss(model: Any, rows: list[dict[str, Any]], batch: int = 8) -> float | None:
    """Mean token cross-entropy over the label tokens (!= -100) of tokenized rows (input_ids, labels)."""
    if not rows:
        return None
    was = model.training
    model.eval()
    total, count = 0.0, 0
    dev = _device(model)
    try:
        with torch.no_grad():
            for i in range(0, len(rows), batch):
                chunk = rows[i:i + batch]
                n = max(len(r["input_ids"]) for r in chunk)
                ids = torch.zeros((len(chunk), n), dtype=torch.long)
                labels = torch.full((len(chunk), n), -100, dtype=torch.long)
                mask = torch.zeros((len(chunk), n), dtype=torch.long)
                for j, r in enumerate(chunk):
                    k = len(r["input_ids"])
                    ids[j, :k] = torch.tensor(r["input_ids"])
                    labels[j, :k] = torch.tensor(r["labels"])
                    mask[j, :k] = 1
                logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits.float()
                tgt = labels[:, 1:].to(dev)
                lp = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), tgt, ignore_index=-100, reduction="sum")
                total += float(lp)
                count += int((tgt != -100).sum())
    finally:
        model.train(was)
    return total / count if count else None


def render_pair(tok: Any, ex: dict[str, Any]) -> tuple[str, str, str]:
    """(prompt text ending with the assistant header, chosen text, rejected text) through the chat template."""
    prompt = tok.apply_chat_template(ex["prompt"], tokenize=False, add_generation_prompt=True)
    full_c = tok.apply_chat_template(ex["prompt"] + ex["chosen"], tokenize=False)
    full_r = tok.apply_chat_template(ex["prompt"] + ex["rejected"], tokenize=False)
    if not (full_c.startswith(prompt) and full_r.startswith(prompt)):
        raise InputError("the chat template does not render the prompt as a prefix of the full conversation")
    return prompt, full_c[len(prompt):], full_r[len(prompt):]


@contextlib.contextmanager
def _evaluating(model: Any) -> Iterator[None]:
    """Eval mode without gradients, restoring the model's training flag afterwards."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was)


def completion_logps(model: Any, tok: Any, examples: list[dict[str, Any]], max_length: int) -> list[tuple[float, float]]:
    """Summed log-probability of the chosen and of the rejected completion given the prompt, per pair."""
    out = []
    dev = _device(model)
    with _evaluating(model):
        for ex in examples:
            prompt, chosen, rejected = render_pair(tok, ex)
            p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
            pair = []
            for completion in (chosen, rejected):
                c_ids = tok(completion, add_special_tokens=False)["input_ids"]
                ids = (p_ids + c_ids)[:max_length]
                n_p = min(len(p_ids), len(ids) - 1)
                x = torch.tensor([ids], device=dev)
                logits = model(input_ids=x).logits.float()[0, :-1]
                lp = torch.log_softmax(logits, -1).gather(1, x[0, 1:, None])[:, 0]
                pair.append(float(lp[n_p - 1:].sum()))
            out.append((pair[0], pair[1]))
    return out


def reward_scores(model: Any, tok: Any, examples: list[dict[str, Any]], max_length: int) -> list[tuple[float, float]]:
    """Scalar rewards (chosen, rejected) of a sequence-classification model, per pair."""
    out = []
    dev = _device(model)
    with _evaluating(model):
        for ex in examples:
            pair = []
            for key in ("chosen", "rejected"):
                text = tok.apply_chat_template(ex["prompt"] + ex[key], tokenize=False)
                ids = tok(text, add_special_tokens=False, truncation=True, max_length=max_length, return_tensors="pt")
                pair.append(float(model(input_ids=ids["input_ids"].to(dev)).logits[0, 0]))
            out.append((pair[0], pair[1]))
    return out


def pair_stats(pairs: list[tuple[float, float]]) -> tuple[float | None, float | None]:
    """(accuracy: share with chosen > rejected, mean margin chosen - rejected)."""
    if not pairs:
        return None, None
    return (sum(c > r for c, r in pairs) / len(pairs), sum(c - r for c, r in pairs) / len(pairs))


def generate_samples(model: Any, tok: Any, gen: Any, *, synced: bool = False) -> list[dict[str, Any]]:
    """Greedy answers to ``gen.prompts`` rendered with the chat template; stops at <|im_end|> / EOS."""
    records = []
    was = model.training
    model.eval()
    dev = _device(model)
    stops = stop_token_ids(tok)
    try:
        for prompt in gen.prompts:
            msgs = ([{"role": "system", "content": gen.system}] if gen.system else []) + [{"role": "user", "content": prompt}]
            text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            enc = tok(text, add_special_tokens=False, return_tensors="pt")
            with torch.no_grad():
                ids = model.generate(input_ids=enc["input_ids"].to(dev), attention_mask=enc["attention_mask"].to(dev),
                                     max_new_tokens=gen.max_new_tokens, do_sample=False, eos_token_id=stops,
                                     pad_token_id=tok.pad_token_id, synced_gpus=synced)
            new = ids[0, enc["input_ids"].shape[1]:].tolist()
            stopped = bool(new) and new[-1] in stops
            records.append({"prompt": prompt, "rendered": text, "completion": tok.decode(new, skip_special_tokens=True),
                            "stopped": stopped, "new_tokens": len(new)})
    finally:
        model.train(was)
    return records
