"""Committed inputs are checked against their producer's manifest before a stage reads them (issue: a clean part
rewritten with a quarter of its rows was packed without a word, and `pack` even said "up to date"), and
`llmpipe verify` checks a whole run root."""

from __future__ import annotations

import pyarrow.parquet as pq

from pipeline.cli import main
from tests.conftest import write_configs


def test_a_damaged_input_is_refused_and_verify_names_it(tmp_path, capsys):
    jobs = write_configs(tmp_path / "jobs")
    root = tmp_path / "root"
    for stage in ("collect", "clean", "tokenizer", "pack"):
        assert main(["run", stage, "-c", str(jobs / f"{stage}.yaml"), "--root", str(root), "--no-progress"]) == 0
    assert main(["verify", "--root", str(root)]) == 0
    part = sorted((root / "clean").glob("*.parquet"))[0]
    table = pq.read_table(part)
    pq.write_table(table.slice(0, max(1, table.num_rows // 4)), part)  # a quarter of the rows, a valid parquet
    capsys.readouterr()
    for argv in (["run", "pack", "-c", str(jobs / "pack.yaml"), "--root", str(root), "--no-progress"],
                 ["run", "pack", "-c", str(jobs / "pack.yaml"), "--root", str(root), "--no-progress", "--force"]):
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 1 and "input 'clean/' does not match its manifest" in err and part.name in err, err
        assert "bytes, the manifest says" in err and len(err.strip().splitlines()) == 1
    assert main(["verify", "--root", str(root)]) == 1
    out = capsys.readouterr().out
    assert f"DAMAGED  clean/" in out and part.name in out and "1 damaged file(s)" in out
    # same size, other bytes: caught by the sha256 (small inputs are hashed on every read)
    assert main(["run", "clean", "-c", str(jobs / "clean.yaml"), "--root", str(root), "--no-progress", "--force"]) == 0
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0xFF
    part.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["run", "pack", "-c", str(jobs / "pack.yaml"), "--root", str(root), "--no-progress", "--force"]) == 1
    assert "sha256 differs from the manifest's" in capsys.readouterr().err
