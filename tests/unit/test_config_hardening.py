"""Config loading is bounded and strict whatever the YAML: an alias bomb, a key given twice, bytes that are not
UTF-8, inf/nan, and random or adversarial input all end in one ConfigError line, quickly."""

from __future__ import annotations

import random
import time

import pytest

from pipeline.config import MAX_CONFIG_VALUES, load_config
from pipeline.errors import ConfigError
from pipeline.stages import get_stage, load_config as load_stage_config


def _bomb(levels: int = 9, width: int = 9) -> str:
    lines = ["a: &a [" + ", ".join(["x"] * width) + "]"]
    prev = "a"
    for name in "bcdefghijk"[: levels - 1]:
        lines.append(f"{name}: &{name} [" + ", ".join([f"*{prev}"] * width) + "]")
        prev = name
    return "\n".join(lines) + f"\nseed: *{prev}\n"


def test_an_alias_bomb_is_refused_at_once(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(_bomb(), encoding="utf-8")
    assert len(path.read_bytes()) < 400  # 9 levels x 9 aliases: 387 million values once expanded
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=f"expands to more than {MAX_CONFIG_VALUES:,} values"):
        load_stage_config("pack", str(path))
    assert time.perf_counter() - t0 < 5
    flow, prev = ["&a [" + ", ".join(["1"] * 10) + "]"], "a"
    for name in "bcdef":
        flow.append(f"&{name} [" + ", ".join([f"*{prev}"] * 10) + "]")
        prev = name
    with pytest.raises(ConfigError, match="the value expands to more than"):  # 10^6 values from a 200-byte --set
        load_stage_config("pack", None, ["seed=[" + ", ".join(flow) + "]"])
    # aliases that stay small are fine
    small = tmp_path / "small.yaml"
    small.write_text("seq_len: &n 128\nblocks_per_shard: *n\n", encoding="utf-8")
    assert load_stage_config("pack", str(small)).blocks_per_shard == 128


def test_duplicate_keys_non_utf8_and_non_finite_values(tmp_path):
    dup = tmp_path / "dup.yaml"
    dup.write_text("seq_len: 128\nval_fraction: 0.1\nseq_len: 256\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"line 3: key 'seq_len' is given twice in one mapping \(first at line 1\)"):
        load_stage_config("pack", str(dup))
    nested = tmp_path / "nested.yaml"
    nested.write_text("max_steps: 1\ngeneration:\n  every: 1\n  every: 2\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="'every' is given twice"):
        load_stage_config("pretrain", str(nested))
    raw = tmp_path / "latin1.yaml"
    raw.write_bytes("seq_len: 128\n# café\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        load_stage_config("pack", str(raw))
    for value in (".inf", "-.inf", ".nan"):
        with pytest.raises(ConfigError, match="finite number"):
            load_stage_config("pretrain", None, ["max_steps=1", f"lr={value}"])


def _random_yaml(rng: random.Random) -> str:
    pieces = ["{", "}", "[", "]", ":", "- ", "&a ", "*a", "!!python/object:os.system ", "'", '"', "\n", "  ", "#",
              "seq_len", "workers", "1e309", ".nan", "~", "\t", "%YAML 1.2\n", "---\n", "? ", "|\n", ">\n", "\\x00",
              "\u2028", "\ufeff", "0x1F", "true", "=", ",", "<<: *a\n"]
    return "".join(rng.choice(pieces) for _ in range(rng.randint(1, 40)))


@pytest.mark.parametrize("stage", ["clean", "pack", "pretrain", "sft", "evaluate"])
def test_random_and_adversarial_yaml_gives_only_one_line_config_errors(tmp_path, stage):
    rng = random.Random(f"fuzz-{stage}")
    model = get_stage(stage).config
    path = tmp_path / "fuzz.yaml"
    t0 = time.perf_counter()
    for i in range(150):
        if i % 3 == 0:
            path.write_bytes(bytes(rng.randrange(256) for _ in range(rng.randint(0, 200))))
        else:
            path.write_text(_random_yaml(rng), encoding="utf-8")
        try:
            load_config(model, str(path))
        except ConfigError as exc:
            assert str(exc).strip() and "Traceback" not in str(exc)
    assert time.perf_counter() - t0 < 60


def _random_json(rng: random.Random, depth: int = 0):
    kinds = ["str", "int", "neg", "float", "bool", "null", "list", "dict"] if depth < 3 else ["str", "int", "null"]
    k = rng.choice(kinds)
    if k == "str":
        return rng.choice(["", "clean", "x" * 50, "../../etc", "\u2028", "part-00000.parquet"])
    if k == "int":
        return rng.randint(0, 10**12)
    if k == "neg":
        return -rng.randint(1, 100)
    if k == "float":
        return rng.random()
    if k == "bool":
        return rng.random() < 0.5
    if k == "null":
        return None
    if k == "list":
        return [_random_json(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    keys = ["stage", "files", "metrics", "inputs", "config", "fingerprint", "path", "size", "sha256", "parts", "rows"]
    return {rng.choice(keys): _random_json(rng, depth + 1) for _ in range(rng.randint(0, 5))}


def test_random_and_adversarial_manifests_give_only_one_line_input_errors(tmp_path):
    """An input whose manifest.json is random JSON, odd shapes of the real fields, or not JSON at all: the stage
    that reads it (clean, which reads raw/) ends in one InputError line -- never a traceback -- or runs."""
    import json

    from pipeline import runner
    from pipeline.errors import PipelineError
    from pipeline.storage import Storage

    storage = Storage(str(tmp_path / "root"))
    out = storage.begin("raw")
    out.write_text("part-00000.parquet", "not parquet")
    out.commit({"stage": "collect", "config_hash": "x", "inputs": {}, "metrics": {"parts": []}})
    manifest = tmp_path / "root" / "raw" / "manifest.json"
    real = json.loads(manifest.read_text())
    rng = random.Random("manifests")
    shapes = [["a"], "x", 3, None, {"files": "x"}, {"files": [1]}, {"files": [{"path": "a", "size": "1"}]},
              {"stage": 5}, {"metrics": []}, {**real, "files": [{"path": "part-00000.parquet", "size": -1}]},
              {**real, "metrics": {"parts": "x"}}, {**real, "metrics": {"parts": [{"file": 3, "rows": "x"}]}}]
    cfg = load_stage_config("clean", None, ["workers=1"])
    for i in range(120):
        extra = _random_json(rng)
        value = shapes[i] if i < len(shapes) else (extra if i % 2 else {**real, **(extra if isinstance(extra, dict) else {})})
        manifest.write_text(json.dumps(value) if i % 17 else "{not json", encoding="utf-8")
        try:
            runner.run_stage("clean", cfg, storage, progress=False)
        except PipelineError as exc:
            assert str(exc).strip() and "\n" not in str(exc).strip(), (value, exc)
