"""The data stages with an s3:// run root, against a real S3 server process on loopback."""

from __future__ import annotations

import json

import fsspec
import pytest

from pipeline.cli import main
from tests.conftest import write_configs


def test_pipeline_on_s3_root(tmp_path, s3_env, capsys):
    bucket = s3_env
    cfg = write_configs(tmp_path / "jobs", pack="workers: 2\n", clean="workers: 2\n")  # clean: steps meet on S3
    root = f"s3://{bucket}/runs/one"
    assert main(["pipeline", "--config-dir", str(cfg), "--root", root, "--until", "pack", "--no-progress"]) == 0
    fs = fsspec.filesystem("s3", **json.loads(__import__("os").environ["LLMPIPE_STORAGE_OPTIONS"]))
    for name in ("raw", "clean", "tokenizer", "shards"):
        manifest = json.loads(fs.cat_file(f"{bucket}/runs/one/{name}/manifest.json"))
        for entry in manifest["files"]:
            assert fs.size(f"{bucket}/runs/one/{name}/{entry['path']}") == entry["size"]
    leftovers = [p for p in fs.find(f"{bucket}/runs/one") if ".tmp-" in p or ".parts/" in p]
    assert leftovers == []

    from pipeline.data.packed import PackedDataset

    ds = PackedDataset(f"{root}/shards", split="train",
                       storage_options=json.loads(__import__("os").environ["LLMPIPE_STORAGE_OPTIONS"]))
    assert len(ds) > 0 and ds[len(ds) - 1]["input_ids"].shape[0] == 64

    capsys.readouterr()
    assert main(["pipeline", "--config-dir", str(cfg), "--root", root, "--until", "pack", "--no-progress"]) == 0
    assert capsys.readouterr().out.count(": up to date ==") == 4
