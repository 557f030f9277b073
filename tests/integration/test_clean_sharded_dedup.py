"""clean's deduplication over ranks: 1, 3 and 4 local processes (each running every step, with barriers) keep
exactly the documents that one process running ``find_duplicates`` over the whole corpus keeps."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from pipeline.cli import main
from pipeline.data.dedup import EXACT, NEAR, DedupConfig, MinHasher, exact_key, find_duplicates
from pipeline.data.documents import DocumentSet
from pipeline.storage import Artifact, Storage
from tests.conftest import CORPUS


def _base_documents() -> list[tuple[str, str]]:
    """Distinct documents of 40-120 words from the committed kk/ru/en fixtures: (language, text)."""
    docs = []
    for lang in ("en", "ru"):
        pieces = [p.strip() for p in (CORPUS / lang / "fortunes.txt").read_text(encoding="utf-8").split("\n%\n") if p.strip()]
        docs += [(lang, t) for t in _joined(pieces)]
    kk = [json.loads(line)["text"] for line in (CORPUS / "kk" / "catalogs.jsonl").read_text(encoding="utf-8").splitlines()]
    docs += [("kk", t) for t in _joined(kk)]
    return docs


def _joined(pieces: list[str], lo: int = 40, hi: int = 120) -> list[str]:
    out, buf = [], []
    for p in pieces:
        buf.append(p)
        words = sum(len(b.split()) for b in buf)
        if words >= lo:
            if words <= hi:
                out.append("\n\n".join(buf))
            buf = []
    return out


def _edit(text: str, k: int, rng: random.Random) -> str:
    ws = text.split(" ")
    for i in rng.sample(range(len(ws)), min(k, len(ws))):
        ws[i] = rng.choice(["өзгерді", "изменено", "changed"])
    return " ".join(ws)


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Path:
    rng = random.Random(5)
    base = _base_documents()
    docs = [(lang, t, "base") for lang, t in base]
    for _ in range(160):  # exact copies (case, spacing), near copies (1-2 words), copies of copies
        lang, src, _kind = rng.choice(docs)
        kind = rng.choice(["exact", "near", "near"])
        text = rng.choice([src.upper(), src.replace(" ", "  ")]) if kind == "exact" else _edit(src, rng.randint(1, 2), rng)
        docs.insert(rng.randrange(len(docs) + 1), (lang, text, kind))
    folder = tmp_path_factory.mktemp("planted")
    with open(folder / "docs.jsonl", "w", encoding="utf-8") as fh:
        for i, (lang, text, _kind) in enumerate(docs):
            fh.write(json.dumps({"id": f"d{i:04d}", "text": text, "lang": lang}, ensure_ascii=False) + "\n")
    (folder / "collect.yaml").write_text(f"sources:\n  - name: planted\n    paths: [\"{folder}/docs.jsonl\"]\n"
                                         "    id_field: id\n", encoding="utf-8")
    # samples_per_reason: every dedup drop is written out, so the test sees every decision
    (folder / "clean.yaml").write_text("samples_per_reason: 100000\n", encoding="utf-8")
    return folder


def _clean(folder: Path, root: Path, workers: int) -> tuple[list[str], dict]:
    assert main(["run", "collect", "--config", str(folder / "collect.yaml"), "--root", str(root), "--no-progress"]) == 0
    assert main(["run", "clean", "--config", str(folder / "clean.yaml"), "--root", str(root), "--no-progress",
                 "--set", f"workers={workers}"]) == 0
    storage = Storage(str(root))
    docs = DocumentSet(Artifact(storage, "clean", storage.manifest("clean")))
    ids = [i for batch in docs.iter_batches(columns=["id"]) for i in batch["id"]]
    return ids, json.loads((root / "clean" / "manifest.json").read_text())["metrics"]


def test_ranks_keep_what_one_process_keeps(planted, tmp_path):
    results = {w: _clean(planted, tmp_path / f"w{w}", w) for w in (1, 3, 4)}
    ids1, m1 = results[1]
    for w in (3, 4):
        ids, m = results[w]
        assert ids == ids1, w
        assert m["dropped_by_reason"] == m1["dropped_by_reason"] and m["workers"] == w
    assert m1["dropped_by_reason"]["dedup.exact"] >= 30 and m1["dropped_by_reason"]["dedup.near"] >= 30

    # the reference: find_duplicates in one process over the documents that passed the filters
    root = tmp_path / "w3"
    drops = {}
    for reason in ("dedup.exact", "dedup.near"):
        for line in (root / "clean" / "drops" / f"{reason}.jsonl").read_text(encoding="utf-8").splitlines():
            rec = json.loads(line)
            drops[rec["id"]] = rec
    storage = Storage(str(root))
    kept = {i: t for b in DocumentSet(Artifact(storage, "clean", storage.manifest("clean"))).iter_batches(columns=["id", "text"])
            for i, t in zip(b["id"], b["text"])}
    order = sorted([*kept, *drops])  # ids are d0000.. in input order
    texts = [kept[i] if i in kept else drops[i]["text"] for i in order]
    cfg = DedupConfig()
    dup_of, kind = find_duplicates([exact_key(t) for t in texts], MinHasher(cfg).signatures(texts), cfg)
    assert {order[i] for i in np.flatnonzero(kind == 0)} == set(kept)
    for i in np.flatnonzero(kind > 0):
        rec = drops[order[i]]
        assert rec["reason"] == {EXACT: "dedup.exact", NEAR: "dedup.near"}[int(kind[i])]
        assert rec["duplicate_of"] == order[dup_of[i]]


@pytest.mark.parametrize("only", ["exact", "near"])
def test_one_kind_of_dedup_alone_over_ranks(planted, tmp_path, only):
    """Exact dedup alone buckets documents by their key; near dedup alone pairs exact copies too (as near)."""
    other = "near" if only == "exact" else "exact"
    folder = tmp_path / "cfg"
    folder.mkdir()
    (folder / "collect.yaml").write_text((planted / "collect.yaml").read_text())
    (folder / "clean.yaml").write_text(f"samples_per_reason: 5\ndedup: {{{other}: false}}\n")
    ids1, m1 = _clean(folder, tmp_path / "one", 1)
    ids2, m2 = _clean(folder, tmp_path / "two", 2)
    assert ids1 == ids2 and m1["dropped_by_reason"] == m2["dropped_by_reason"]
    assert m1["dropped_by_reason"].get(f"dedup.{only}", 0) >= 30 and f"dedup.{other}" not in m1["dropped_by_reason"]
