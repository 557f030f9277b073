"""Function-calling evaluation: on held-out tool-use conversations, does the model call the right tool with the
right arguments, in a form a client can parse, and does it refrain when no offered tool fits?

Each conversation (any format :func:`pipeline.training.posttrain.data.to_sft_example` reads: chat with ``tools``,
xlam, glaive, hermes) gives one item: the messages before its first assistant turn, rendered with the model's chat
template, its tools and the generation prompt; the reference is that assistant turn's ``tool_calls`` (none: the
model should answer without a call). The model answers greedily; :func:`pipeline.training.posttrain.tools.score_calls`
scores the answer. Per language (the record's ``lang``, else ``all``) and overall:

* ``valid``: share of items that expect a call whose answer holds only parseable calls to offered tools with
  schema-valid arguments;
* ``name`` / ``arguments``: share of items that expect a call where the called names / names and argument values
  equal the reference's;
* ``abstain``: share of items that expect no call where the model made none.

Each share comes with its 95% Wilson interval (:func:`pipeline.evaluation.report.wilson`).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterable

from pipeline.errors import InputError
from pipeline.evaluation.report import wilson

MEASURES = ("valid", "name", "arguments", "abstain")


BUILTIN = {"llmpipe:tools_eval": Path(__file__).parent / "tasks" / "tools_eval.jsonl"}  # shipped in the package


def load_items(paths: list[str], max_items: int | None) -> list[dict[str, Any]]:
    """``{"lang", "messages" (the prompt), "tools" (JSON text or None), "reference" [{name, arguments}]}`` items;
    ``llmpipe:tools_eval`` names the held-out kk/ru/en set shipped in the package."""
    from pipeline.training.posttrain.data import read_records, to_sft_example

    items: list[dict[str, Any]] = []
    for path in (str(BUILTIN.get(p, p)) for p in paths):
        n = 0
        for where, rec in read_records(path):
            ex = to_sft_example(rec, where)
            msgs = ex["messages"]
            k = next((i for i, m in enumerate(msgs) if m["role"] == "assistant"), None)
            if k is None or not any(m["role"] == "user" for m in msgs[:k]):
                raise InputError(f"{where}: a tool-use item needs a user turn before its first assistant turn")
            ref = [{"name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"])}
                   for c in msgs[k].get("tool_calls") or []]
            lang = rec.get("lang") if isinstance(rec, dict) and isinstance(rec.get("lang"), str) else "all"
            items.append({"lang": lang, "messages": msgs[:k], "tools": ex.get("tools"), "reference": ref,
                          "where": where})
            n += 1
            if max_items is not None and n >= max_items:
                break
        if n == 0:
            raise InputError(f"tool_use file {path} holds no conversations")
    return items


def evaluate(model: Any, tok: Any, items: list[dict[str, Any]], *, max_new_tokens: int, device: str,
             max_positions: int, bar: Callable[..., Any] | None = None) -> dict[str, Any]:
    """Greedy answers and scores: ``{"items": [...], "scores": {lang|"overall": {measure: {share, n, low, high}}}}``."""
    import torch

    from pipeline.training.posttrain.templates import stop_token_ids
    from pipeline.training.posttrain.tools import score_calls

    stops = stop_token_ids(tok)
    out = []
    it: Iterable[dict[str, Any]] = bar(items, desc="tool use", unit=" item") if bar else items
    model.eval()
    for item in it:
        tools = json.loads(item["tools"]) if item["tools"] else None
        ids = tok.apply_chat_template(item["messages"], tools=tools, add_generation_prompt=True, tokenize=True,
                                      return_dict=True)["input_ids"]
        ids = list(ids)[-(max_positions - max_new_tokens):] if len(ids) + max_new_tokens > max_positions else list(ids)
        with torch.no_grad():
            gen = model.generate(input_ids=torch.tensor([ids], device=device),
                                 attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
                                 max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops,
                                 pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else stops[0])
        answer = tok.decode(gen[0, len(ids):], skip_special_tokens=True)
        s = score_calls(answer, item["reference"], item["tools"])
        out.append({"lang": item["lang"], "where": item["where"], "answer": answer, "reference": item["reference"],
                    **s})
    return {"items": out, "scores": aggregate(out)}


def aggregate(scored: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for s in scored:
        groups[s["lang"]].append(s)
        groups["overall"].append(s)
    res: dict[str, dict[str, dict[str, Any]]] = {}
    for lang, rows in groups.items():
        calls = [r for r in rows if r["expected_call"]]
        none = [r for r in rows if not r["expected_call"]]
        res[lang] = {}
        for measure, pool, key in (("valid", calls, "valid"), ("name", calls, "name"), ("arguments", calls, "arguments"),
                                   ("abstain", none, "abstained")):
            hits = sum(bool(r[key]) for r in pool)
            low, high = wilson(hits, len(pool))
            res[lang][measure] = {"share": hits / len(pool) if pool else None, "n": len(pool), "low": low, "high": high}
    return res


def flat_metrics(scores: dict[str, dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """``tool_<measure>`` (overall) and ``tool_<measure>_<lang>``: what the manifest carries and promote gates read."""
    out: dict[str, Any] = {}
    for lang, per in scores.items():
        for measure, v in per.items():
            out[f"tool_{measure}" if lang == "overall" else f"tool_{measure}_{lang}"] = v["share"]
    return out
