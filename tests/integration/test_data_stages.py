"""collect -> clean -> tokenizer -> pack on real kk/ru/en fixtures with planted problems."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.data.documents import DocumentSet
from pipeline.storage import Artifact, Storage
from tests.conftest import CORPUS, REPO, write_configs

PLANTED = {json.loads(line)["id"]: json.loads(line) for line in (CORPUS / "planted.jsonl").read_text().splitlines()}


def _bad_files(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "latin1.txt").write_bytes("Qazaqstan - caf\xe9 au lait, tr\xe8s bien.".encode("latin-1"))
    (folder / "image.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    (folder / "empty.txt").write_bytes(b"")
    return folder


def _ids(storage: Storage, name: str) -> list[str]:
    docs = DocumentSet(Artifact(storage, name, storage.manifest(name)))
    return [i for batch in docs.iter_batches(columns=["id"]) for i in batch["id"]]


def _drops(root: Path) -> dict[str, dict]:
    found = {}
    for f in (root / "clean" / "drops").glob("*.jsonl"):
        for line in f.read_text(encoding="utf-8").splitlines():
            rec = json.loads(line)
            found[rec["id"]] = rec
    return found


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("data")
    cfg = write_configs(base / "jobs")
    bad = _bad_files(base / "bad")
    with open(cfg / "collect.yaml", "a", encoding="utf-8") as fh:
        fh.write(f'  - name: bad\n    paths: ["{bad}/*.txt"]\n')
    root = base / "run"
    assert main(["pipeline", "--config-dir", str(cfg), "--root", str(root), "--until", "pack", "--no-progress"]) == 0
    return cfg, root


def test_collect_counts_every_problem_file(pipeline_run):
    _, root = pipeline_run
    m = json.loads((root / "raw" / "manifest.json").read_text())
    assert m["metrics"]["documents"] == 45 * 3 + len(PLANTED)
    assert m["metrics"]["problems"] == {"invalid_utf8": 1, "binary": 1, "empty_file": 1}
    problems = [json.loads(l) for l in (root / "raw" / "problems.jsonl").read_text().splitlines()]
    assert sorted(Path(p["path"]).name for p in problems) == ["empty.txt", "image.txt", "latin1.txt"]


def test_clean_keeps_and_drops_the_planted_documents_for_the_right_reason(pipeline_run):
    _, root = pipeline_run
    kept = set(_ids(Storage(str(root)), "clean"))
    drops = _drops(root)
    m = json.loads((root / "clean" / "manifest.json").read_text())["metrics"]
    assert m["documents_in"] == m["kept"] + m["dropped"] == 45 * 3 + len(PLANTED)
    for doc_id, row in PLANTED.items():
        expect = row["expect"]
        full = f"planted/{doc_id}"
        if expect == "kept":
            assert full in kept, doc_id
            continue
        assert full not in kept, doc_id
        if expect == "dropped":
            continue
        assert full in drops, f"{doc_id} dropped but not sampled"
        assert drops[full]["reason"].startswith(expect), (doc_id, drops[full]["reason"])
    assert drops["planted/exact-en"]["duplicate_of"].startswith("en-fortunes/")
    assert drops["planted/near-ru"]["duplicate_of"] == "planted/near-ru-orig"
    assert drops["planted/exact-kk"]["duplicate_of"] == "kk-catalogs/kk-004"


def test_clean_labels_languages_of_real_text(pipeline_run):
    _, root = pipeline_run
    storage = Storage(str(root))
    docs = DocumentSet(Artifact(storage, "clean", storage.manifest("clean")))
    agree = total = 0
    for batch in docs.iter_batches(columns=["source", "lang", "lang_score"]):
        for source, lang, score in zip(batch["source"], batch["lang"], batch["lang_score"]):
            assert 0 < score <= 1.0001
            if source == "planted":
                continue
            total += 1
            agree += lang == source[:2]
    assert total >= 120 and agree / total >= 0.95


def test_tokenizer_loads_with_autotokenizer_and_reports_fertility(pipeline_run):
    from transformers import AutoTokenizer

    _, root = pipeline_run
    tok = AutoTokenizer.from_pretrained(str(root / "tokenizer"))
    for text in ["Қазақстан Республикасы", "Съешь же ещё этих мягких французских булок.", "The quick brown fox."]:
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    report = json.loads((root / "tokenizer" / "fertility.json").read_text())
    assert report  # per-language figures on held-out text
    m = json.loads((root / "tokenizer" / "manifest.json").read_text())["metrics"]
    assert set(m["train_characters"]) == {"kk", "ru", "en"}


def test_pack_shards_read_back_through_the_training_dataset(pipeline_run):
    from pipeline.data.packed import PackedDataset
    from pipeline.data.shards import verify_shards

    _, root = pipeline_run
    m = json.loads((root / "shards" / "manifest.json").read_text())
    storage = Storage(str(root))
    verify_shards(storage.fs, storage.path("shards"))
    ds = PackedDataset(str(root / "shards"), split="train")
    assert len(ds) == m["metrics"]["blocks"]["train"] > 0
    item = ds[0]
    assert item["input_ids"].shape[0] == 64
    assert m["metrics"]["tokens"]["train"] == len(ds) * 64
    assert all(f["sha256"] for f in m["files"])
    # the training blocks come per stream (language / source, the default stream_by): what pretrain's mix weights
    streams = m["metrics"]["streams"]
    assert {s.name for s in ds.streams} == set(streams) and sum(s.blocks for s in ds.streams) == len(ds)
    assert {"kk/kk-catalogs", "ru/ru-fortunes", "en/en-fortunes"} <= set(streams)
    assert all(name == f"{v['lang']}/{v['source']}" for name, v in streams.items())
    assert sum(v["documents"] for v in streams.values()) == m["metrics"]["documents"]["train"]


def test_second_run_is_up_to_date(pipeline_run, capsys):
    cfg, root = pipeline_run
    before = {p: (root / p / "manifest.json").stat().st_mtime_ns for p in ("raw", "clean", "tokenizer", "shards")}
    assert main(["pipeline", "--config-dir", str(cfg), "--root", str(root), "--until", "pack", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert out.count(": up to date ==") == 4
    after = {p: (root / p / "manifest.json").stat().st_mtime_ns for p in before}
    assert before == after


def test_lineage_links_each_manifest_to_its_inputs(pipeline_run):
    _, root = pipeline_run
    man = {p: json.loads((root / p / "manifest.json").read_text()) for p in ("raw", "clean", "tokenizer", "shards")}
    assert man["clean"]["inputs"]["raw"]["fingerprint"] == man["raw"]["fingerprint"]
    assert man["shards"]["inputs"]["clean"]["fingerprint"] == man["clean"]["fingerprint"]
    assert man["shards"]["inputs"]["tokenizer"]["fingerprint"] == man["tokenizer"]["fingerprint"]
    for m in man.values():
        assert {"config", "config_hash", "files", "metrics", "versions", "started_at", "ended_at"} <= set(m)


def test_clean_with_two_workers_keeps_the_same_documents(pipeline_run, tmp_path):
    cfg, root = pipeline_run
    storage = Storage(str(root))
    one = _ids(storage, "clean")
    m1 = json.loads((root / "clean" / "manifest.json").read_text())["metrics"]
    assert main(["run", "clean", "--config", str(cfg / "clean.yaml"), "--root", str(root),
                 "--set", "workers=2", "--force", "--no-progress"]) == 0
    two = _ids(storage, "clean")
    m2 = json.loads((root / "clean" / "manifest.json").read_text())["metrics"]
    assert one == two
    assert m1["dropped_by_reason"] == m2["dropped_by_reason"] and m2["workers"] == 2
    assert not any(p.name.startswith("clean.parts") and any(p.iterdir()) for p in root.iterdir())


def test_indexed_job_ranks_then_merge_match_local_workers(pipeline_run):
    """What the chart runs: one `--world-size 3 --wait` pod per JOB_COMPLETION_INDEX, all at once (clean's ranks
    exchange data between its steps), then `--merge`. Three separate processes, like three pods."""
    cfg, root = pipeline_run
    storage = Storage(str(root))
    before = _ids(storage, "clean")
    dropped_before = json.loads((root / "clean" / "manifest.json").read_text())["metrics"]["dropped_by_reason"]
    common = [sys.executable, "-m", "pipeline.cli", "run", "clean", "--config", str(cfg / "clean.yaml"),
              "--root", str(root), "--no-progress"]
    pods = [subprocess.Popen([*common, "--world-size", "3", "--wait", "300", "--force"],
                             env={**os.environ, "JOB_COMPLETION_INDEX": str(rank)}, cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for rank in (2, 0, 1)]
    for pod in pods:
        out, _ = pod.communicate(timeout=600)
        assert pod.returncode == 0, out
    steps = sorted(p.name for p in (root / "clean.parts" / "w003").iterdir())
    assert steps == ["buckets", "confirm", "exchange", "filter", "resolve", "signatures"]
    assert len(list((root / "clean.parts" / "w003" / "resolve").iterdir())) == 1  # rank 0 alone
    assert main(["run", "clean", "--config", str(cfg / "clean.yaml"), "--root", str(root), "--no-progress",
                 "--merge", "--world-size", "3", "--force"]) == 0
    assert _ids(storage, "clean") == before
    m = json.loads((root / "clean" / "manifest.json").read_text())["metrics"]
    assert m["dropped_by_reason"] == dropped_before and m["workers"] == 3
    assert set(m["steps"]) == set(steps) and all(s["peak_rss_mb"] > 0 for s in m["steps"].values())
    assert not (root / "clean.parts").exists()
    assert main(["run", "clean", "--config", str(cfg / "clean.yaml"), "--root", str(root), "--no-progress",
                 "--merge", "--world-size", "3"]) == 0  # a retried merge Job: up to date, not an error


def test_a_rank_alone_says_the_others_must_run_at_once(pipeline_run, monkeypatch, capsys):
    cfg, root = pipeline_run
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "0")
    assert main(["run", "clean", "--config", str(cfg / "clean.yaml"), "--root", str(root), "--no-progress",
                 "--world-size", "2", "--force"]) == 1
    err = capsys.readouterr().err
    assert "rank(s) 1 of 2 have not committed it" in err and "at the same time" in err
    assert (root / "clean.parts" / "w002" / "signatures" / "rank-00000" / "manifest.json").exists()


def test_merge_refuses_missing_ranks(pipeline_run, capsys):
    cfg, root = pipeline_run
    assert main(["run", "clean", "--config", str(cfg / "clean.yaml"), "--root", str(root), "--no-progress",
                 "--merge", "--world-size", "4"]) == 1
    assert "rank(s) 0, 1, 2, 3 of 4" in capsys.readouterr().err


def test_tokenizer_extension_mode_adds_corpus_tokens(pipeline_run, tmp_path):
    """`extend`: our corpus tokens appended to an existing tokenizer, fertility reported before/after."""
    import shutil

    from transformers import AutoTokenizer

    cfg, root = pipeline_run
    copy = tmp_path / "run"
    shutil.copytree(root / "raw", copy / "raw")
    shutil.copytree(root / "clean", copy / "clean")
    base = root / "tokenizer" / "tokenizer.json"
    assert main(["run", "tokenizer", "--config", str(cfg / "tokenizer.yaml"), "--root", str(copy), "--no-progress",
                 "--set", f"extend.base={base}", "--set", "extend.new_tokens=40"]) == 0
    m = json.loads((copy / "tokenizer" / "manifest.json").read_text())["metrics"]
    assert 0 < m["added_tokens"] <= 40
    added = json.loads((copy / "tokenizer" / "new_tokens.json").read_text(encoding="utf-8"))
    assert len(added) == m["added_tokens"]
    old = AutoTokenizer.from_pretrained(str(root / "tokenizer"))
    new = AutoTokenizer.from_pretrained(str(copy / "tokenizer"))
    assert len(new) >= len(old) + m["added_tokens"] - 5  # special tokens already present are not added twice
    for lang, per_tok in m["fertility"].items():
        assert per_tok["ours"] <= per_tok["base"] + 1e-9, lang  # extension never makes fertility worse
    text = "Қазақстан Республикасы"
    assert new.decode(new.encode(text, add_special_tokens=False)) == text
    # the extension report: base vs expanded per language on the held-out documents, and what was added
    ext = json.loads((copy / "tokenizer" / "extension.json").read_text(encoding="utf-8"))
    assert ext["requested"] == 40 and ext["added"] == m["added_tokens"] and ext["size"] == m["vocab_size"]
    assert sum(ext["by_script"].values()) == ext["added"] and m["extension"]["languages"] == ext["languages"]
    for lang, row in ext["languages"].items():
        assert row["base_fertility"] == m["fertility"][lang]["base"] and row["expanded_tokens"] <= row["base_tokens"]
    assert "expanded / base" in (copy / "tokenizer" / "extension.md").read_text(encoding="utf-8")
    # up to a size instead of a count
    size = len(old) + 12
    assert main(["run", "tokenizer", "--config", str(cfg / "tokenizer.yaml"), "--root", str(copy), "--no-progress",
                 "--set", f"extend.base={base}", "--set", f"extend.target_size={size}"]) == 0
    m = json.loads((copy / "tokenizer" / "manifest.json").read_text())["metrics"]
    assert m["vocab_size"] == size and m["extension"]["requested"] == 12


def test_clean_and_pack_variants_make_second_phase_data(tmp_path, monkeypatch, capsys):
    """clean-strict.yaml / pack-clean.yaml beside clean.yaml / pack.yaml: `llmpipe pipeline` runs them after their stage,
    into their own outputs (clean-strict/, shards-clean/) with their own inputs, sharded runs included."""
    from pipeline.data.packed import PackedDataset

    jobs = write_configs(tmp_path / "jobs")
    (jobs / "clean-strict.yaml").write_text("output: clean-strict\nsamples_per_reason: 5\nlength:\n  min_words: 60\n",
                                            encoding="utf-8")
    (jobs / "pack-clean.yaml").write_text("input: clean-strict\noutput: shards-clean\nseq_len: 64\nval_fraction: 0.1\n"
                                          "blocks_per_shard: 40\n", encoding="utf-8")
    root = tmp_path / "run"
    assert main(["pipeline", "--config-dir", str(jobs), "--root", str(root), "--until", "pack", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "clean-strict" in out and "pack-clean" in out
    storage = Storage(str(root))
    clean, strict = _ids(storage, "clean"), _ids(storage, "clean-strict")
    assert strict and set(strict) < set(clean)
    m = storage.manifest("clean-strict")
    assert m["stage"] == "clean" and set(m["inputs"]) == {"raw"}
    m = storage.manifest("shards-clean")
    assert m["stage"] == "pack" and set(m["inputs"]) == {"clean-strict", "tokenizer"}
    assert m["inputs"]["clean-strict"]["fingerprint"] == storage.manifest("clean-strict")["fingerprint"]
    assert 0 < len(PackedDataset(str(root / "shards-clean"), "train")) < len(PackedDataset(str(root / "shards"), "train"))
    # the shipped stage outputs are untouched by the variants
    assert storage.manifest("shards")["inputs"].keys() == {"clean", "tokenizer"}

    # a variant as an Indexed Job: ranks, then the merge, into shards-clean.parts/ and shards-clean/
    before = [b["sample_id"] for b in PackedDataset(str(root / "shards-clean"), "train")]
    common = ["run", "pack", "--config", str(jobs / "pack-clean.yaml"), "--root", str(root), "--no-progress"]
    for rank in (0, 1):
        monkeypatch.setenv("JOB_COMPLETION_INDEX", str(rank))
        assert main([*common, "--world-size", "2", "--force"]) == 0
        assert (root / "shards-clean.parts" / "w002" / f"rank-{rank:05d}" / "manifest.json").exists()
    assert main([*common, "--merge", "--world-size", "2", "--force"]) == 0
    assert not (root / "shards-clean.parts").exists() and not (root / "shards.parts").exists()
    # the same documents and split; each rank drops its own partial last block
    assert len(before) - 1 <= len(PackedDataset(str(root / "shards-clean"), "train")) <= len(before)
    m2 = storage.manifest("shards-clean")
    assert m2["world_size"] == 2 and set(m2["inputs"]) == {"clean-strict", "tokenizer"}
    monkeypatch.delenv("JOB_COMPLETION_INDEX")

    # again: every output up to date; `show --output` reads a variant's manifest
    assert main(["pipeline", "--config-dir", str(jobs), "--root", str(root), "--until", "pack", "--no-progress"]) == 0
    assert main(["show", "pack", "--root", str(root), "--output", "shards-clean"]) == 0
    capsys.readouterr()
    # bad variants: a name no stage has written, and two configs writing one output
    assert main(["run", "pack", "--config", str(jobs / "pack-clean.yaml"), "--set", "input=clean-other", "--root",
                 str(root), "--no-progress"]) == 1
    assert "run the stage whose config has `output: clean-other` first" in capsys.readouterr().err
    (jobs / "clean-again.yaml").write_text("output: clean-strict\n", encoding="utf-8")
    assert main(["pipeline", "--config-dir", str(jobs), "--root", str(root), "--until", "pack", "--no-progress"]) == 1
    assert "clean-again.yaml and clean-strict.yaml in" in (err := capsys.readouterr().err)
    assert "both write 'clean-strict/'" in err
