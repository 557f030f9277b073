"""Answers to a prompt set: greedy, and sampled with a fixed seed (the same seed for every model)."""

from __future__ import annotations

from typing import Any, Callable, Iterable


def render(tok: Any, prompt: str, chat: bool, system: str | None) -> list[int]:
    """Prompt ids: the chat template with a generation prompt, or BOS + the raw text."""
    if chat:
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return tok(text, add_special_tokens=False)["input_ids"]
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    return ([tok.bos_token_id] if tok.bos_token_id is not None else []) + ids


def generate(model: Any, tok: Any, prompts: list[str], *, chat: bool, system: str | None, max_new_tokens: int,
             modes: dict[str, dict[str, Any]], seed: int, device: str, max_positions: int,
             bar: Callable[..., Any] | None = None) -> list[dict[str, Any]]:
    """One record per prompt: ``{"prompt", "chat", "<mode>": {"text", "new_tokens", "stopped"}}``.

    ``modes`` maps a name (``greedy``, ``sampled``) to ``generate`` keyword arguments. Sampling is
    seeded per prompt, so a model's sampled answer does not depend on which prompts came before.
    """
    import torch
    from transformers import set_seed

    from pipeline.training.posttrain.templates import stop_token_ids

    stops = stop_token_ids(tok)
    records: list[dict[str, Any]] = []
    it: Iterable[tuple[int, str]] = enumerate(prompts)
    if bar:
        it = bar(list(it), desc="generate", unit=" prompt")
    for n, prompt in it:
        ids = render(tok, prompt, chat, system)
        room = max(1, min(max_new_tokens, max_positions - len(ids)))
        ids = ids[-(max_positions - room):] if len(ids) + room > max_positions else ids
        inp = torch.tensor([ids], device=device)
        rec: dict[str, Any] = {"prompt": prompt, "chat": chat}
        for mode, kwargs in modes.items():
            set_seed(seed + n)
            with torch.no_grad():
                out = model.generate(input_ids=inp, attention_mask=torch.ones_like(inp), max_new_tokens=room,
                                     eos_token_id=stops, pad_token_id=tok.pad_token_id, **kwargs)
            new = out[0, inp.shape[1]:].tolist()
            rec[mode] = {"text": tok.decode(new, skip_special_tokens=True).strip(), "new_tokens": len(new),
                         "stopped": bool(new) and new[-1] in stops}
        records.append(rec)
    return records
