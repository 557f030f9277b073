"""Input readers of the collect stage: formats, compression, globs, problems, ids, hf, s3."""

from __future__ import annotations

import gzip
import json
import os
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from pipeline.data.readers import Document, Problem, Source, expand_paths, iter_source, source_name
from pipeline.errors import InputError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

FORTUNES = "First fortune,\ntwo lines.\n%\nSecond fortune.\n%\n%\n  \n%\nThird\n\nwith a blank line.\n%\n"
PARAGRAPHS = "\n\nPara one\nline two\n\n\n\nPara two\n  \t\nPara three\n"


def docs(items):
    return [i for i in items if isinstance(i, Document)]


def problems(items):
    return [i for i in items if isinstance(i, Problem)]


def reasons(items):
    return Counter(p.reason for p in problems(items))


def read(**kw):
    return list(iter_source(Source(**kw)))


def write_jsonl(path: Path, rows, opener=open) -> Path:
    with opener(path, "wt", encoding="utf-8") as fh:
        for row in rows:
            fh.write((row if isinstance(row, str) else json.dumps(row, ensure_ascii=False)) + "\n")
    return path


# ------------------------------------------------------------------------------ txt modes


def test_txt_file_mode(tmp_path):
    (tmp_path / "a.txt").write_text("\ufeff  Hello world.\n\nSecond paragraph.\n", encoding="utf-8")
    items = read(paths=[str(tmp_path / "a.txt")], name="s", language="en")
    assert docs(items) == [Document("s/a.txt#0", "Hello world.\n\nSecond paragraph.", "s", "en")]
    assert problems(items) == []


def test_txt_paragraph_mode(tmp_path):
    (tmp_path / "p.txt").write_text(PARAGRAPHS, encoding="utf-8")
    items = read(paths=[str(tmp_path / "p.txt")], name="s", split_mode="paragraph")
    assert [(d.id, d.text) for d in docs(items)] == [
        ("s/p.txt#0", "Para one\nline two"),
        ("s/p.txt#1", "Para two"),
        ("s/p.txt#2", "Para three"),
    ]
    assert problems(items) == []


def test_txt_line_mode_counts_blank_lines(tmp_path):
    (tmp_path / "l.txt").write_bytes(b"one\r\n\r\n  two  \n   \nthree")
    items = read(paths=[str(tmp_path / "l.txt")], name="s", split_mode="line")
    assert [(d.id, d.text) for d in docs(items)] == [("s/l.txt#0", "one"), ("s/l.txt#2", "two"), ("s/l.txt#4", "three")]
    assert reasons(items) == {"empty_document": 2}
    assert [p.detail.split(":")[0] for p in problems(items)] == ["line 2 (#1)", "line 4 (#3)"]


def test_txt_regex_mode_fortunes(tmp_path):
    (tmp_path / "fortunes").write_text("%\n" + FORTUNES, encoding="utf-8")
    items = read(paths=[str(tmp_path / "fortunes")], name="f", split_mode="regex", separator="^%$")
    assert [(d.id, d.text) for d in docs(items)] == [
        ("f/fortunes#0", "First fortune,\ntwo lines."),
        ("f/fortunes#1", "Second fortune."),
        ("f/fortunes#4", "Third\n\nwith a blank line."),
    ]
    # '%\n%' (no lines) and '%\n  \n%' (whitespace) are empty entries; leading/trailing '%' are framing
    assert reasons(items) == {"empty_document": 2}


def test_regex_separator_must_match_whole_line(tmp_path):
    (tmp_path / "f.txt").write_text("100% sure\n%\nnext\n", encoding="utf-8")
    items = read(paths=[str(tmp_path / "f.txt")], name="f", split_mode="regex", separator="%")
    assert [d.text for d in docs(items)] == ["100% sure", "next"]


def test_txt_gz_and_zst(tmp_path):
    with gzip.open(tmp_path / "a.txt.gz", "wt", encoding="utf-8") as fh:
        fh.write(PARAGRAPHS)
    (tmp_path / "b.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(PARAGRAPHS.encode()))
    items = read(paths=[str(tmp_path / "*.txt.*")], name="c", split_mode="paragraph")
    assert [d.id for d in docs(items)] == [f"c/{n}.txt.{z}#{i}" for n, z in (("a", "gz"), ("b", "zst")) for i in range(3)]
    assert problems(items) == []


# ------------------------------------------------------------------------------ jsonl / parquet

ROWS = [{"id": f"r{i}", "text": f"document number {i}", "meta": i} for i in range(5)]


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".jsonl.gz", ".jsonl.zst"])
def test_jsonl_formats(tmp_path, suffix):
    path = tmp_path / f"data{suffix}"
    payload = "".join(json.dumps(r) + "\n" for r in ROWS).encode()
    if suffix.endswith(".gz"):
        payload = gzip.compress(payload)
    elif suffix.endswith(".zst"):
        # two frames: readers must read across frames (as zstd -c a b > c produces)
        half = len(ROWS) // 2
        first = "".join(json.dumps(r) + "\n" for r in ROWS[:half]).encode()
        rest = "".join(json.dumps(r) + "\n" for r in ROWS[half:]).encode()
        payload = zstandard.ZstdCompressor().compress(first) + zstandard.ZstdCompressor().compress(rest)
    path.write_bytes(payload)
    items = read(paths=[str(path)], name="j", language="kk")
    assert [(d.id, d.text, d.source, d.lang_hint) for d in docs(items)] == [
        (f"j/data{suffix}#{i}", f"document number {i}", "j", "kk") for i in range(5)
    ]
    items = read(paths=[str(path)], name="j", id_field="id")
    assert [d.id for d in docs(items)] == [f"j/r{i}" for i in range(5)]


def test_json_array_file(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(ROWS[:2], indent=2), encoding="utf-8")
    items = read(paths=[str(tmp_path / "a.json")], name="j")
    assert [d.text for d in docs(items)] == ["document number 0", "document number 1"]


def test_jsonl_bad_lines_are_counted_per_row(tmp_path):
    lines = [
        json.dumps({"text": "good one"}),
        '{"text": "broken',  # invalid JSON
        json.dumps({"body": "no text field"}),
        "",  # blank line: not a record
        json.dumps({"text": None}),
        json.dumps({"text": 42}),
        json.dumps(["not", "an", "object"]),
        json.dumps({"text": "   "}),  # empty document
        json.dumps({"text": "good two"}),
    ]
    write_jsonl(tmp_path / "d.jsonl", lines)
    items = read(paths=[str(tmp_path / "d.jsonl")], name="j")
    assert [(d.id, d.text) for d in docs(items)] == [("j/d.jsonl#0", "good one"), ("j/d.jsonl#8", "good two")]
    assert reasons(items) == {"bad_record": 5, "empty_document": 1}
    details = [p.detail for p in problems(items) if p.reason == "bad_record"]
    assert details[0].startswith("line 2: invalid JSON")
    assert details[1] == "line 3: no field 'text' (fields: body)"
    assert all(p.path == str(tmp_path / "d.jsonl") for p in problems(items))


def test_parquet(tmp_path):
    table = pa.table({"id": ["a", "b", "c", "d"], "content": ["alpha", None, "  ", "delta"]})
    pq.write_table(table, tmp_path / "t.parquet", row_group_size=2)
    items = read(paths=[str(tmp_path / "t.parquet")], name="p", text_field="content", id_field="id")
    assert [(d.id, d.text) for d in docs(items)] == [("p/a", "alpha"), ("p/d", "delta")]
    assert reasons(items) == {"bad_record": 1, "empty_document": 1}
    items = read(paths=[str(tmp_path / "t.parquet")], name="p", text_field="content")
    assert [d.id for d in docs(items)] == ["p/t.parquet#0", "p/t.parquet#3"]


def test_parquet_gz_and_missing_column(tmp_path):
    pq.write_table(pa.table({"text": ["x y z"]}), tmp_path / "a.parquet")
    (tmp_path / "b.parquet.gz").write_bytes(gzip.compress((tmp_path / "a.parquet").read_bytes()))
    items = read(paths=[str(tmp_path / "b.parquet.gz")], name="p")
    assert [d.text for d in docs(items)] == ["x y z"]
    items = read(paths=[str(tmp_path)], name="p", text_field="body")
    assert docs(items) == []
    assert reasons(items) == {"unreadable": 2}
    assert "no column 'body' (columns: text); 1 rows skipped" in problems(items)[0].detail


# ------------------------------------------------------------------------------ problems


def test_invalid_utf8_binary_and_empty_files_do_not_stop_the_others(tmp_path):
    (tmp_path / "a-good.txt").write_text("fine text", encoding="utf-8")
    (tmp_path / "b-latin1.txt").write_bytes("Grüße aus Köln".encode("latin-1"))
    (tmp_path / "c-binary.dat").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    (tmp_path / "d-empty.txt").write_bytes(b"")
    (tmp_path / "e-empty.jsonl.gz").write_bytes(gzip.compress(b""))
    (tmp_path / "f-corrupt.jsonl.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    (tmp_path / "g-good.jsonl").write_text('{"text": "also fine"}\n', encoding="utf-8")
    items = read(paths=[str(tmp_path)], name="mix")
    assert [d.text for d in docs(items)] == ["fine text", "also fine"]
    by_file = {Path(p.path).name: p for p in problems(items)}
    assert {k: v.reason for k, v in by_file.items()} == {
        "b-latin1.txt": "invalid_utf8",
        "c-binary.dat": "binary",
        "d-empty.txt": "empty_file",
        "e-empty.jsonl.gz": "empty_file",
        "f-corrupt.jsonl.gz": "unreadable",
    }
    assert by_file["b-latin1.txt"].detail.startswith("invalid UTF-8 at byte offset 2 ")
    assert by_file["b-latin1.txt"].path == str(tmp_path / "b-latin1.txt")


def test_invalid_utf8_late_in_file_keeps_earlier_documents(tmp_path):
    good = "".join(f"line {i}\n" for i in range(2000)).encode()
    (tmp_path / "late.txt").write_bytes(good + b"bad \xff byte\nmore\n")
    items = read(paths=[str(tmp_path / "late.txt")], name="s", split_mode="line")
    assert len(docs(items)) == 2000
    [prob] = problems(items)
    assert prob.reason == "invalid_utf8"
    assert f"byte offset {len(good) + 4} " in prob.detail
    assert "the 2000 documents before it were kept" in prob.detail


def test_invalid_utf8_in_compressed_jsonl(tmp_path):
    payload = b'{"text": "ok"}\n{"text": "bad \xc3\x28"}\n'
    (tmp_path / "x.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(payload))
    items = read(paths=[str(tmp_path / "x.jsonl.zst")], name="s")
    assert [d.text for d in docs(items)] == ["ok"]
    assert problems(items)[0].reason == "invalid_utf8"
    assert "byte offset 29 " in problems(items)[0].detail


# ------------------------------------------------------------------------------ paths, caps, ids


def make_tree(root: Path) -> None:
    for rel in ["a/x.txt", "a/b/y.txt", "a/b/c/z.txt", "a/b/skip.md", "top.txt", "a/.hidden/h.txt"]:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(f"text of {rel}", encoding="utf-8")


def test_recursive_globs_folders_and_order(tmp_path):
    make_tree(tmp_path)
    src = Source(paths=[f"{tmp_path}/a/**/*.txt"], name="g")
    assert expand_paths(src) == [str(tmp_path / r) for r in ["a/b/c/z.txt", "a/b/y.txt", "a/x.txt"]]
    assert [d.id for d in docs(iter_source(src))] == ["g/b/c/z.txt#0", "g/b/y.txt#0", "g/x.txt#0"]
    assert expand_paths(Source(paths=[f"{tmp_path}/a/.*/*.txt"])) == [str(tmp_path / "a/.hidden/h.txt")]
    # a folder recurses (hidden entries skipped); a file matched twice is read once; entry order kept
    src = Source(paths=[str(tmp_path / "top.txt"), str(tmp_path / "a"), f"{tmp_path}/a/x.txt"], name="f")
    assert expand_paths(src) == [str(tmp_path / r) for r in ["top.txt", "a/b/c/z.txt", "a/b/skip.md", "a/b/y.txt", "a/x.txt"]]


def test_path_matching_nothing_is_an_input_error(tmp_path):
    make_tree(tmp_path)
    with pytest.raises(InputError, match=r"nothing\*\.jsonl"):
        expand_paths(Source(paths=[str(tmp_path / "a"), f"{tmp_path}/nothing*.jsonl"]))
    with pytest.raises(InputError, match="missing.txt"):
        list(iter_source(Source(paths=[str(tmp_path / "missing.txt")])))


def test_max_documents_and_deterministic_ids(tmp_path):
    for i in range(3):
        write_jsonl(tmp_path / f"part-{i}.jsonl", [{"text": f"doc {i}-{j}"} for j in range(4)])
    src = Source(paths=[str(tmp_path / "*.jsonl")], max_documents=6)
    first = docs(iter_source(src))
    assert len(first) == 6
    assert [d.id for d in first] == [f"{tmp_path.name}/part-0.jsonl#{j}" for j in range(4)] + [
        f"{tmp_path.name}/part-1.jsonl#{j}" for j in range(2)
    ]
    assert first == docs(iter_source(src))
    all_ids = [d.id for d in docs(iter_source(Source(paths=[str(tmp_path)])))]
    assert len(all_ids) == len(set(all_ids)) == 12


def test_same_relative_path_from_two_patterns_gets_distinct_ids(tmp_path):
    for sub in ("x", "y"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "a.txt").write_text(f"from {sub}", encoding="utf-8")
    ids = [d.id for d in docs(iter_source(Source(paths=[str(tmp_path / "x"), str(tmp_path / "y")], name="s")))]
    assert len(set(ids)) == 2


def test_derived_source_names():
    assert source_name(Source(paths=["/data/en/*.txt"])) == "en"
    assert source_name(Source(paths=["/data/en/books.jsonl.gz"])) == "books"
    assert source_name(Source(paths=["s3://bucket/corpus/kk/"])) == "kk"
    assert source_name(Source(kind="hf", dataset="wikimedia/wikipedia", dataset_config="20231101.kk")) == "wikipedia-20231101.kk"
    assert source_name(Source(paths=["/x"], name="given")) == "given"


# ------------------------------------------------------------------------------ hf


def test_hf_save_to_disk_folder(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"text": ["first doc", "", "third doc"], "uid": ["u1", "u2", "u3"]})
    ds.save_to_disk(str(tmp_path / "saved"))
    items = read(kind="hf", dataset=str(tmp_path / "saved"), name="h", language="ru")
    assert [(d.id, d.text, d.lang_hint) for d in docs(items)] == [("h/train#0", "first doc", "ru"), ("h/train#2", "third doc", "ru")]
    assert reasons(items) == {"empty_document": 1}
    items = read(kind="hf", dataset=str(tmp_path / "saved"), name="h", id_field="uid", max_documents=1)
    assert [d.id for d in docs(items)] == ["h/u1"]

    datasets.DatasetDict({"train": ds, "validation": ds.select([0])}).save_to_disk(str(tmp_path / "dd"))
    items = read(kind="hf", dataset=str(tmp_path / "dd"), split="validation", name="h")
    assert [d.text for d in docs(items)] == ["first doc"]
    with pytest.raises(InputError, match="no split 'test'"):
        read(kind="hf", dataset=str(tmp_path / "dd"), split="test")
    with pytest.raises(InputError, match="no column 'body'"):
        read(kind="hf", dataset=str(tmp_path / "saved"), text_field="body")


@pytest.mark.parametrize("streaming", [True, False])
def test_hf_folder_of_jsonl(tmp_path, streaming):
    folder = tmp_path / "jsonl-ds"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", [{"text": f"a{i}"} for i in range(3)])
    with gzip.open(folder / "b.jsonl.gz", "wt", encoding="utf-8") as fh:
        fh.write(json.dumps({"text": "b0"}) + "\n")
    items = read(kind="hf", dataset=str(folder), streaming=streaming)
    assert sorted(d.text for d in docs(items)) == ["a0", "a1", "a2", "b0"]
    assert [d.id for d in docs(items)] == [f"jsonl-ds/train#{i}" for i in range(4)]


def test_hf_folder_of_parquet(tmp_path):
    folder = tmp_path / "pq-ds"
    folder.mkdir()
    pq.write_table(pa.table({"text": ["p0", "p1"]}), folder / "train-0.parquet")
    assert [d.text for d in docs(read(kind="hf", dataset=str(folder)))] == ["p0", "p1"]


def test_hf_errors_become_input_errors(tmp_path):
    with pytest.raises(InputError, match=r"hf dataset 'no-such-org/no-such-dataset'.*check the dataset name"):
        read(kind="hf", dataset="no-such-org/no-such-dataset")


# ------------------------------------------------------------------------------ s3


def test_s3_prefix_and_glob(s3_env, s3_server):
    import boto3

    bucket = s3_env
    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.put_object(Bucket=bucket, Key="corpus/kk/a.jsonl", Body=b'{"text": "s3 one"}\n{"text": "s3 two"}\n')
    s3.put_object(Bucket=bucket, Key="corpus/kk/deep/b.txt.gz", Body=gzip.compress("s3 three".encode()))
    s3.put_object(Bucket=bucket, Key="corpus/kk/bad.txt", Body=b"\xff\xfe latin")
    s3.put_object(Bucket=bucket, Key="other/c.txt", Body=b"not read")
    opts = {"client_kwargs": {"endpoint_url": s3_server}}

    src = Source(paths=[f"s3://{bucket}/corpus/kk/"], name="s3")
    assert expand_paths(src, storage_options=opts) == [
        f"s3://{bucket}/corpus/kk/{k}" for k in ("a.jsonl", "bad.txt", "deep/b.txt.gz")
    ]
    items = list(iter_source(src, storage_options=opts))
    assert [(d.id, d.text) for d in docs(items)] == [
        ("s3/a.jsonl#0", "s3 one"),
        ("s3/a.jsonl#1", "s3 two"),
        ("s3/deep/b.txt.gz#0", "s3 three"),
    ]
    [prob] = problems(items)
    assert (prob.path, prob.reason) == (f"s3://{bucket}/corpus/kk/bad.txt", "invalid_utf8")

    # a recursive glob, with the endpoint taken from AWS_ENDPOINT_URL only
    src = Source(paths=[f"s3://{bucket}/**/*.txt*"], name="g")
    assert [d.text for d in docs(iter_source(src))] == ["s3 three", "not read"]
    with pytest.raises(InputError, match="nope"):
        expand_paths(Source(paths=[f"s3://{bucket}/nope/"]), storage_options=opts)


def test_errors_raise_at_call_not_at_first_next(tmp_path):
    with pytest.raises(InputError, match="matched no files"):
        iter_source(Source(paths=[f"{tmp_path}/nothing/*.txt"]))
    with pytest.raises(InputError, match="could not be read"):
        iter_source(Source(kind="hf", dataset="no-such-org/no-such-dataset"))


def test_compression_is_inferred_as_fsspec_does():
    from pipeline.data.readers import compression_of, split_ext

    assert [compression_of(n) for n in ("a.txt.gz", "a.TXT.GZ", "a.bz2", "a.xz", "a.lzma", "a.zst")] == [
        "gzip", "gzip", "bz2", "xz", "lzma", "zstd"]
    assert compression_of("a.gzip") == "gzip" and compression_of("a.zstd") == "zstd"  # spellings fsspec does not know
    assert compression_of("a.zip") is None and compression_of("a.jsonl") is None  # an archive is not a compression
    assert split_ext("dir/x.JSONL.gz") == (".jsonl", "gzip") and split_ext("x.parquet") == (".parquet", None)
