"""The generated continuation-choice task: items from held-out documents, the true ending among endings of other
documents, enough items from a few long documents, and task files lm-eval loads."""

from __future__ import annotations

import json

from pipeline.evaluation.continuation import GROUP, build_items, write_tasks


def _docs(n: int, words: int, prefix: str) -> list[str]:
    return [" ".join(f"{prefix}{d}w{i}" for i in range(words)) for d in range(n)]


def test_items_hold_the_true_ending_among_other_documents_endings():
    texts = {"kk": _docs(6, 400, "k"), "ru": _docs(3, 400, "r")}
    items = build_items(texts, per_language=50, context_chars=60, continuation_chars=30, choices=4, seed=1)
    assert items["ru"] == []  # 3 documents cannot give 3 distractors from other documents
    kk = items["kk"]
    assert len(kk) == 50
    for it in kk:
        true = it["choices"][it["answer"]]
        doc = f"k{it['doc']}w"
        assert it["context"].startswith(doc) and true.startswith(" " + doc)
        # the true ending continues the context in its document, word for word
        last = int(it["context"].split()[-1].split("w")[1])
        assert true.split()[0] == f"{doc}{last + 1}"
        others = [c for i, c in enumerate(it["choices"]) if i != it["answer"]]
        assert len(others) == 3 and all(not c.startswith(" " + doc) for c in others)
    # deterministic, and the answer position is not always the same
    assert build_items(texts, per_language=50, context_chars=60, continuation_chars=30, seed=1)["kk"] == kk
    assert len({it["answer"] for it in kk}) > 1
    # long documents give many items: 6 documents of 400 words -> hundreds of passages
    many = build_items({"kk": _docs(6, 400, "k")}, per_language=10_000, context_chars=60, continuation_chars=30)
    assert len(many["kk"]) > 100


def test_task_files_load_in_lm_eval(tmp_path):
    from lm_eval.tasks import TaskManager

    items = build_items({"kk": _docs(6, 200, "k"), "en": _docs(5, 200, "e")}, per_language=20, context_chars=60,
                        continuation_chars=30)
    names = write_tasks(items, str(tmp_path))
    assert names == [GROUP]
    tm = TaskManager(include_path=[str(tmp_path)], include_defaults=False)
    assert {GROUP, f"{GROUP}_kk", f"{GROUP}_en"} <= set(tm.all_tasks)
    rows = [json.loads(line) for line in (tmp_path / f"{GROUP}_kk.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 20 and set(rows[0]) == {"context", "choices", "answer", "doc"}


def test_short_documents_give_one_item_each():
    """A document shorter than one passage (a proverb) still gives an item: its first two thirds and the rest;
    one of fewer than 8 words gives none."""
    docs = [" ".join(f"r{d}w{i}" for i in range(9)) for d in range(5)] + ["too short"]
    items = build_items({"ru": docs}, per_language=100, context_chars=200, continuation_chars=100)["ru"]
    assert len(items) == 5
    it = items[0]
    assert len(it["context"].split()) == 6 and len(it["choices"][it["answer"]].split()) == 3

