"""Config loading: YAML + --set overrides, env expansion, clear errors, the config hash."""

from pathlib import Path

import pytest

from pipeline.config import config_hash
from pipeline.stages import load_config
from pipeline.stages.clean import CleanConfig
from pipeline.errors import ConfigError


def write(tmp_path, text, name="c.yaml"):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def test_defaults_and_overrides(tmp_path):
    p = write(tmp_path, "dedup:\n  threshold: 0.7\n")
    cfg = load_config("clean", p, ["dedup.num_perm=64", "langid.languages=[kk, ru]", "workers=2"])
    assert cfg.dedup.threshold == 0.7 and cfg.dedup.num_perm == 64
    assert cfg.langid.languages == ["kk", "ru"] and cfg.workers == 2


def test_unknown_key_names_path_and_suggests(tmp_path):
    p = write(tmp_path, "dedup:\n  treshold: 0.7\n")
    with pytest.raises(ConfigError) as err:
        load_config("clean", p)
    msg = str(err.value)
    assert str(p) in msg and "dedup.treshold: unknown key" in msg and "did you mean 'threshold'" in msg


def test_wrong_type_shows_value(tmp_path):
    with pytest.raises(ConfigError, match=r"seq_len: .*got 'long'"):
        load_config("pack", None, ["seq_len=long"])
    with pytest.raises(ConfigError, match=r"seq_len: Input should be less than or equal to 8192"):
        load_config("pack", None, ["seq_len=100000"])


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML at line 2"):
        load_config("clean", write(tmp_path, "a: 1\n b: [\n"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("clean", tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config("clean", write(tmp_path, "- 1\n- 2\n"))
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config("clean", None, ["dedup.threshold"])


def test_env_expansion(tmp_path, monkeypatch):
    p = write(tmp_path, "sources:\n  - paths: ['${CORPUS}/*.txt', '${NOPE:-/default}/x']\n")
    monkeypatch.setenv("CORPUS", "/data")
    cfg = load_config("collect", p)
    assert cfg.sources[0].paths == ["/data/*.txt", "/default/x"]
    monkeypatch.delenv("CORPUS")
    with pytest.raises(ConfigError, match=r"\$\{CORPUS\} is not set"):
        load_config("collect", p)


def test_source_validation(tmp_path):
    with pytest.raises(ConfigError, match="needs `paths`"):
        load_config("collect", write(tmp_path, "sources:\n  - kind: files\n"))
    with pytest.raises(ConfigError, match="needs `separator`"):
        load_config("collect", write(tmp_path, "sources:\n  - paths: [a]\n    split_mode: regex\n"))
    with pytest.raises(ConfigError, match="sources: List should have at least 1 item"):
        load_config("collect", write(tmp_path, "sources: []\n"))


def test_per_language_overrides_validated_and_merged():
    cfg = CleanConfig(per_language={"kk": {"length": {"min_mean_word_length": 3.5}}})
    assert cfg.length_for("kk").min_mean_word_length == 3.5
    assert cfg.length_for("en").min_mean_word_length == cfg.length.min_mean_word_length
    with pytest.raises(ValueError, match="per_language.kk: min_chars"):
        CleanConfig(per_language={"kk": {"length": {"min_chars": -1}}})


def test_hash_ignores_exec_fields():
    a, b = CleanConfig(workers=1), CleanConfig(workers=8)
    assert config_hash(a) == config_hash(b)
    assert config_hash(a) != config_hash(CleanConfig(samples_per_reason=3))


JOBS = sorted((Path(__file__).resolve().parents[2] / "jobs").glob("*/*.yaml"))


@pytest.mark.parametrize("path", JOBS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_job_configs_validate(path):
    """Every config under jobs/ loads against its stage's schema (the file name is the stage, or stage-variant);
    nccl-check.yaml is no stage's: `llmpipe fabric-check --config` reads it, with its own checks."""
    if path.stem == "nccl-check":
        import argparse

        from pipeline import fabric

        parser = argparse.ArgumentParser()
        fabric.add_arguments(parser)
        assert fabric.settings(parser.parse_args(["--config", str(path)]))["nominal_gbps"]
        return
    load_config(path.stem.split("-")[0], path)


def test_every_stage_has_demo_and_cluster_configs():
    from pipeline.stages import ORDER

    for folder in ("demo", "cluster"):
        assert {p.stem for p in JOBS if p.parent.name == folder and "-" not in p.stem} == set(ORDER), folder


def test_cluster_second_phase_data_is_produced_by_the_shipped_variants():
    """pretrain's phases name artifacts that the shipped clean/pack configs (and their variants) write."""
    folder = JOBS[0].parents[1] / "cluster"
    pre = load_config("pretrain", folder / "pretrain.yaml")
    writes = {"shards"}
    cleans = {"clean"}
    for path in sorted(folder.glob("clean-*.yaml")):
        cleans.add(load_config("clean", path).output)
    for path in sorted(folder.glob("pack-*.yaml")):
        cfg = load_config("pack", path)
        assert cfg.input in cleans, path
        writes.add(cfg.output)
    assert {p.shards for p in pre.phases} <= writes and len(pre.phases) == 2


def test_dataloader_workers_default_follows_the_device(monkeypatch):
    """None: a background loader on CUDA (loading overlaps the step), none on CPU; a set value is kept; more than
    one is refused (each worker would replay the rank's one resumable stream)."""
    import torch
    from pydantic import ValidationError

    from pipeline.training.config import PretrainConfig
    from pipeline.training.pretrain import dataloader_workers

    cfg = PretrainConfig(max_steps=1)
    assert cfg.dataloader_workers is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert dataloader_workers(cfg) == 1
    assert dataloader_workers(PretrainConfig(max_steps=1, dataloader_workers=0)) == 0
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert dataloader_workers(cfg) == 0
    assert dataloader_workers(PretrainConfig(max_steps=1, dataloader_workers=1)) == 1
    with pytest.raises(ValidationError):
        PretrainConfig(max_steps=1, dataloader_workers=2)
