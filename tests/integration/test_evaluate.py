"""The evaluate stage end to end on CPU: the data stages on the committed kk/ru/en fixtures, a tiny
random Llama (``models/init``), the same model pretrained for a few steps (``models/pretrain``) and
fine-tuned (``models/sft``), all through ``llmpipe pipeline`` / ``llmpipe run``; then evaluate
compares them: validation and held-out perplexity, the shipped lm_eval tasks, generations, report.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import yaml

from pipeline.cli import main
from tests.conftest import write_configs

REPO = Path(__file__).resolve().parents[2]
POSTTRAIN = REPO / "tests" / "fixtures" / "posttrain"
PROMPTS = ["Қазақстанның астанасы", "Москва — столица", "The capital of France is"]


def _training_configs(jobs: Path) -> None:
    (jobs / "init.yaml").write_text(
        "source: random\npreset: tiny\nmax_position_embeddings: 128\npad_vocab_multiple: 64\nseed: 0\n", encoding="utf-8")
    (jobs / "pretrain.yaml").write_text(yaml.safe_dump({
        "micro_batch_size": 8, "global_batch_tokens": 512, "max_steps": 30, "lr": 3e-3, "warmup_steps": 3,
        "zero_stage": 0, "checkpoint_every": 0, "eval_every": 15, "eval_max_blocks": 16, "log_every": 5,
        "generation": {"every": 0, "prompts": ["The"], "max_new_tokens": 4},
    }), encoding="utf-8")
    (jobs / "sft.yaml").write_text(yaml.safe_dump({
        "data": [{"path": str(POSTTRAIN / "alpaca.jsonl")}], "max_length": 96, "micro_batch_size": 8,
        "max_steps": 6, "lr": 1e-3, "warmup_ratio": 0.0, "log_every": 2,
        "generation": {"prompts": ["Hi"], "max_new_tokens": 4},
    }), encoding="utf-8")


def _eval_config(path: Path, **over) -> Path:
    cfg = {
        "models": [{"path": "models/init", "label": "random"}, {"path": "models/pretrain", "label": "pretrain"},
                   {"path": "models/sft", "label": "sft"}],
        "perplexity": {"max_blocks": 24},
        "heldout": {"max_documents": 12},
        "generation": {"prompts": PROMPTS, "max_new_tokens": 6},
        "lm_eval": {"tasks": ["llmpipe_mc"], "limit": 6, "batch_size": 16},
        "continuation": {"items_per_language": 30, "context_chars": 120, "continuation_chars": 60},
        "max_length": 128,
    }
    cfg.update(over)
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run root with clean/, shards/, models/init (random), models/pretrain and models/sft."""
    base = tmp_path_factory.mktemp("evaluate")
    jobs = write_configs(base / "jobs")
    _training_configs(jobs)
    root = base / "run"
    assert main(["pipeline", "--config-dir", str(jobs), "--root", str(root), "--until", "pretrain", "--no-progress"]) == 0
    assert main(["run", "sft", "-c", str(jobs / "sft.yaml"), "--root", str(root), "--no-progress"]) == 0
    return base, root


@pytest.fixture(scope="module")
def evaluated(trained):
    base, root = trained
    cfg = _eval_config(base / "evaluate.yaml")
    assert main(["run", "evaluate", "-c", str(cfg), "--root", str(root), "--no-progress"]) == 0
    manifest = json.loads((root / "eval" / "manifest.json").read_text(encoding="utf-8"))
    return root, cfg, manifest


def test_trained_model_beats_random_init_on_the_same_data(evaluated):
    root, _, manifest = evaluated
    models = manifest["metrics"]["models"]
    assert set(models) == {"random", "pretrain", "sft"}
    rand, pre = models["random"], models["pretrain"]
    assert pre["val_loss"] < rand["val_loss"] - 0.5, (pre["val_loss"], rand["val_loss"])
    assert pre["val_perplexity"] == pytest.approx(math.exp(pre["val_loss"]), rel=1e-6)
    for lang in ("kk", "ru", "en"):
        assert pre[f"tokens_{lang}"] > 0 and pre[f"tokens_{lang}"] == rand[f"tokens_{lang}"]  # same tokenizer, same text
        assert 0 < pre[f"bits_per_byte_{lang}"] < rand[f"bits_per_byte_{lang}"], lang
        assert pre[f"perplexity_{lang}"] < rand[f"perplexity_{lang}"], lang
    # a random model over V tokens sits near log(V) nats per token
    vocab = json.loads((root / "models" / "init" / "config.json").read_text())["vocab_size"]
    assert abs(rand["val_loss"] - math.log(vocab)) < 1.0
    assert manifest["metrics"]["best_val_loss_model"] in ("pretrain", "sft")


def test_pretraining_tracked_validation_per_language(trained):
    """pack wrote each language's validation documents as val_<lang>; pretraining evaluated them every eval
    interval: loss and bits per byte per language in metrics.jsonl (hence MLflow) and the manifest."""
    import math

    _, root = trained
    index = json.loads((root / "shards" / "index.json").read_text(encoding="utf-8"))
    langs = sorted(s[4:] for s in index["splits"] if s.startswith("val_"))
    assert langs and set(langs) <= {"kk", "ru", "en"}
    assert sum(index["splits"][f"val_{g}"]["documents"] for g in langs) == index["splits"]["val"]["documents"]
    m = json.loads((root / "models" / "pretrain" / "manifest.json").read_text(encoding="utf-8"))["metrics"]
    per_byte = index["splits"]["val"]["stream_tokens"] / index["splits"]["val"]["document_bytes"]
    assert m["val_bpb"] == pytest.approx(m["val_loss"] / math.log(2) * per_byte)
    evals = [json.loads(line) for line in (root / "models" / "pretrain" / "train_metrics.jsonl").read_text(
        encoding="utf-8").splitlines() if '"kind": "eval"' in line]
    for lang in langs:
        if index["splits"][f"val_{lang}"]["blocks"]:
            assert 0 < m[f"val_loss_{lang}"] < 20 and m[f"val_bpb_{lang}"] > 0
            assert {r["step"] for r in evals if f"val_loss_{lang}" in r} == {15, 30}


def test_continuation_task_is_generated_from_validation_documents_and_run_whole(evaluated):
    """The generated continuation-choice task runs every item (lm_eval's limit of 6 is for the shipped tasks), per
    language, with the 95% interval beside each accuracy in the report."""
    root, _, manifest = evaluated
    res = json.loads((root / "eval" / "pretrain" / "lm_eval.json").read_text(encoding="utf-8"))
    n = res["n_samples"]
    langs = [k for k in n if k.startswith("llmpipe_cont_")]
    assert langs and all(n[k]["effective"] > 6 for k in langs), n
    for label in ("random", "pretrain", "sft"):
        m = manifest["metrics"]["models"][label]
        assert 0 <= m["lm_eval_llmpipe_cont_acc"] <= 1, m
    print({lb: round(manifest["metrics"]["models"][lb]["lm_eval_llmpipe_cont_acc_norm"], 3)
           for lb in ("random", "pretrain", "sft")})
    report = (root / "eval" / "report.md").read_text(encoding="utf-8")
    assert "llmpipe_cont_" in report and re.search(r"\| 0\.\d{3} \[0\.\d\d, [01]\.\d\d\] \|", report)


def test_lm_eval_runs_the_shipped_tasks_with_the_limit(evaluated):
    root, _, manifest = evaluated
    for label, m in manifest["metrics"]["models"].items():
        for task in ("llmpipe_mc_kk", "llmpipe_mc_ru", "llmpipe_mc_en", "llmpipe_mc"):
            for metric in ("acc", "acc_norm"):
                assert 0.0 <= m[f"lm_eval_{task}_{metric}"] <= 1.0, (label, task, metric)
        raw = json.loads((root / "eval" / label / "lm_eval.json").read_text(encoding="utf-8"))
        assert {t: n["effective"] for t, n in raw["n_samples"].items() if not t.startswith("llmpipe_cont")} == {
            "llmpipe_mc_kk": 6, "llmpipe_mc_ru": 6, "llmpipe_mc_en": 6}
        # accuracy is a share of 6 answers
        assert round(m["lm_eval_llmpipe_mc_kk_acc"] * 6, 6) == int(round(m["lm_eval_llmpipe_mc_kk_acc"] * 6))


def test_report_has_a_side_by_side_row_per_prompt_and_plots(evaluated):
    root, _, _ = evaluated
    out = root / "eval"
    md = (out / "report.md").read_text(encoding="utf-8")
    for mode in ("greedy", "sampled"):
        section = md.split(f"## Generations ({mode})", 1)[1].split("\n## ", 1)[0]
        lines = [ln for ln in section.splitlines() if ln.startswith("|")]
        assert lines[0] == "| # | prompt | random | pretrain | sft |"
        rows = lines[2:]
        assert len(rows) == len(PROMPTS)
        for i, (row, prompt) in enumerate(zip(rows, PROMPTS), 1):
            cells = re.split(r"(?<!\\)\|", row)[1:-1]
            assert len(cells) == 5 and cells[0].strip() == str(i) and cells[1].strip() == prompt
    for png in ("loss_curves.png", "bits_per_byte.png", "lm_eval.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, png
        assert f"]({png})" in md
    page = (out / "report.html").read_text(encoding="utf-8")
    assert page.count("data:image/png;base64,") == 3
    assert not re.search(r'src="(?!data:)', page)  # self-contained
    for label in ("random", "pretrain", "sft"):
        gens = json.loads((out / label / "generations.json").read_text(encoding="utf-8"))
        assert [g["prompt"] for g in gens] == PROMPTS
        assert all(g["greedy"]["new_tokens"] >= 1 and "text" in g["sampled"] for g in gens)
    # the sft model was prompted through its chat template, the base models with raw text
    assert [json.loads((out / lb / "generations.json").read_text())[0]["chat"] for lb in ("random", "pretrain", "sft")] \
        == [False, False, True]


def test_results_json_matches_the_manifest_metrics_and_second_run_is_up_to_date(evaluated, capsys):
    root, cfg, manifest = evaluated
    results = json.loads((root / "eval" / "results.json").read_text(encoding="utf-8"))
    metrics = manifest["metrics"]
    assert {k: results[k] for k in metrics} == metrics
    assert metrics["report"] == "report.md" and metrics["model_count"] == 3
    for label in ("random", "pretrain", "sft"):
        assert set(results["details"][label]["heldout"]) == {"kk", "ru", "en"}
    from pipeline.stages.evaluate import STAGE as stage

    assert list(stage.ARTIFACTS) == ["report.md", "report.html", "results.json", "*.png"]
    capsys.readouterr()
    assert main(["run", "evaluate", "-c", str(cfg), "--root", str(root), "--no-progress"]) == 0
    assert "up to date" in capsys.readouterr().out


def test_same_seed_same_sampled_generations(evaluated, tmp_path):
    """Sampling is seeded per prompt: a rerun (--force) samples the same text."""
    root, cfg, _ = evaluated
    before = json.loads((root / "eval" / "pretrain" / "generations.json").read_text(encoding="utf-8"))
    copy = tmp_path / "run"
    shutil.copytree(root, copy)
    small = _eval_config(tmp_path / "e.yaml", models=[{"path": "models/pretrain", "label": "pretrain"}],
                         perplexity=None, heldout=None, lm_eval=None, continuation=None)
    assert main(["run", "evaluate", "-c", str(small), "--root", str(copy), "--no-progress"]) == 0
    after = json.loads((copy / "eval" / "pretrain" / "generations.json").read_text(encoding="utf-8"))
    assert [g["sampled"]["text"] for g in after] == [g["sampled"]["text"] for g in before]
    assert [g["greedy"]["text"] for g in after] == [g["greedy"]["text"] for g in before]


# ----------------------------------------------------------------------------- clear errors


def _one_line_error(capsys, args) -> str:
    code = main(args)
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert "Traceback" not in err
    return err.splitlines()[-1]


def test_missing_model_artifact_says_which_stage_to_run(trained, tmp_path, capsys):
    _, root = trained
    cfg = _eval_config(tmp_path / "e.yaml", models=[{"path": "models/dpo"}])
    err = _one_line_error(capsys, ["run", "evaluate", "-c", str(cfg), "--root", str(root), "--no-progress"])
    assert "models/dpo" in err and "llmpipe run dpo" in err


def test_model_with_another_tokenizer_is_refused_before_compute(trained, tmp_path, capsys):
    from pipeline.storage import Storage
    from tests.fixtures.posttrain.tiny import commit_model

    _, root = trained
    copy = tmp_path / "run"
    shutil.copytree(root, copy, ignore=shutil.ignore_patterns("eval", "checkpoints"))
    commit_model(Storage(str(copy)), "models/other")  # a model over the post-training fixtures' 600-token BPE
    cfg = _eval_config(tmp_path / "e.yaml", models=[{"path": "models/other"}])
    err = _one_line_error(capsys, ["run", "evaluate", "-c", str(cfg), "--root", str(copy), "--no-progress"])
    assert "model/tokenizer mismatch" in err and "models/other" in err
    assert not (copy / "eval").exists()


@pytest.mark.slow  # indexes lm_eval's ~15k built-in tasks once (tens of seconds) unless their names are cached
def test_unknown_lm_eval_task_lists_close_names(trained, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LLMPIPE_CACHE_DIR", str(tmp_path / "cache"))
    _, root = trained
    cfg = _eval_config(tmp_path / "e.yaml", models=[{"path": "models/pretrain"}], generation=None,
                       lm_eval={"tasks": ["llmpipe_mc_kz"]})
    err = _one_line_error(capsys, ["run", "evaluate", "-c", str(cfg), "--root", str(root), "--no-progress"])
    assert "unknown lm_eval task 'llmpipe_mc_kz'" in err and "llmpipe_mc_kk" in err
    names = json.loads(next((tmp_path / "cache").glob("lm_eval-*-tasks.json")).read_text())
    assert "hellaswag" in names and "arc_easy" in names and "llmpipe_mc" not in names


def test_bad_configs_fail_with_one_line(trained, tmp_path, capsys):
    _, root = trained
    cases = [
        ({"generation": {"prompts": []}}, "prompt set is empty"),
        ({"models": [{"path": "models/pretrain"}, {"path": "models/pretrain"}]}, "unique"),
        ({"models": []}, "models"),
        ({"heldout": {"from_run": False}}, "nothing to measure"),
        ({"lm_eval": {"tasks": ["llmpipe_mc"], "limitt": 3}}, "limitt"),
    ]
    for over, needle in cases:
        cfg = _eval_config(tmp_path / "e.yaml", **over)
        err = _one_line_error(capsys, ["run", "evaluate", "-c", str(cfg), "--root", str(root), "--no-progress"])
        assert needle in err, (over, err)
