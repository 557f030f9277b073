"""A generated held-out task per language with the power to separate models: continuation choice.

From documents the models never trained on (the run's validation documents), each item is a passage's opening
(``context_chars`` characters, cut at a word boundary) and four endings: the passage's true next words
(``continuation_chars``) and three endings of the same length taken from *other* held-out documents of the same
language. A model that has learned the language and follows the text picks the true one by log-likelihood; chance
is 1 / choices. A long document gives several items (consecutive passages), so a few hundred kilobytes of held-out
text per language give 500+ items -- a 95% interval of about +-4 points instead of the +-17 of a 32-question set.

The items are written as lm-evaluation-harness multiple-choice tasks (``llmpipe_cont_<lang>``, group
``llmpipe_cont``) in a scratch folder, so they run with the other lm-eval tasks and report ``acc`` (sum of the
ending's log-probabilities) and ``acc_norm`` (per byte).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import yaml

GROUP = "llmpipe_cont"


MIN_WORDS = 8  # a document shorter than one passage still gives one item when it has this many words


def _passages(text: str, context_chars: int, continuation_chars: int) -> list[tuple[str, str]]:
    """Consecutive (opening, next words) pairs of a document; a short document (a proverb, a UI string) gives one
    pair: its first two thirds of words and the rest."""
    words = text.split()
    if len(" ".join(words)) < context_chars + continuation_chars // 2:
        if len(words) < MIN_WORDS:
            return []
        cut = (2 * len(words)) // 3
        return [(" ".join(words[:cut]), " ".join(words[cut:]))]
    out, i = [], 0
    while i < len(words):
        ctx, j = [], i
        while j < len(words) and len(" ".join(ctx)) < context_chars:
            ctx.append(words[j])
            j += 1
        cont: list[str] = []
        while j < len(words) and len(" ".join(cont)) < continuation_chars:
            cont.append(words[j])
            j += 1
        if len(" ".join(cont)) < continuation_chars // 2 or not ctx:
            break
        out.append((" ".join(ctx), " ".join(cont)))
        i = j
    return out


def build_items(texts: dict[str, list[str]], *, per_language: int, context_chars: int, continuation_chars: int,
                choices: int = 4, seed: int = 0) -> dict[str, list[dict[str, Any]]]:
    """``{lang: [{"context", "choices", "answer", "doc"}]}``: at most ``per_language`` items per language, each
    with ``choices`` endings of which one (``answer``) is true and the rest come from other documents."""
    out: dict[str, list[dict[str, Any]]] = {}
    for lang, docs in texts.items():
        rng = random.Random(f"{seed}:{lang}")
        passages = [(d, ctx, cont) for d, doc in enumerate(docs) for ctx, cont in _passages(doc, context_chars,
                                                                                          continuation_chars)]
        if len({d for d, _, _ in passages}) < choices:  # distractors must come from other documents
            out[lang] = []
            continue
        order = list(range(len(passages)))
        rng.shuffle(order)
        items = []
        for k in order[:per_language]:
            d, ctx, cont = passages[k]
            pool = [p for p in passages if p[0] != d and p[2] != cont]
            others = rng.sample(pool, choices - 1)
            endings = [cont] + [o[2] for o in others]
            rng.shuffle(endings)
            items.append({"context": ctx, "choices": [" " + e for e in endings], "answer": endings.index(cont),
                          "doc": d})
        out[lang] = items
    return out


def write_tasks(items: dict[str, list[dict[str, Any]]], dest: str) -> list[str]:
    """lm-eval task YAMLs + JSONL data under ``dest`` (one task per language with items, and the group); returns
    the names to run (the group)."""
    folder = Path(dest)
    folder.mkdir(parents=True, exist_ok=True)
    tasks = []
    for lang, rows in items.items():
        if not rows:
            continue
        name = f"{GROUP}_{lang}"
        data = folder / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        doc = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
               "output_type": "multiple_choice", "test_split": "test", "doc_to_text": "{{context}}",
               "doc_to_target": "answer", "doc_to_choice": "{{choices}}", "target_delimiter": "",
               "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True}
                               for m in ("acc", "acc_norm")],
               "metadata": {"version": 1.0}}
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(doc, allow_unicode=True, sort_keys=False), encoding="utf-8")
        tasks.append(name)
    if not tasks:
        return []
    group = {"group": GROUP, "task": tasks,
             "aggregate_metric_list": [{"metric": m, "aggregation": "mean", "weight_by_size": True}
                                       for m in ("acc", "acc_norm")],
             "metadata": {"version": 1.0}}
    (folder / f"_{GROUP}.yaml").write_text(yaml.safe_dump(group, sort_keys=False), encoding="utf-8")
    return [GROUP]
