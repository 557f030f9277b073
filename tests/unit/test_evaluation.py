"""pipeline.evaluation pieces: raw-text perplexity / bits per byte, the lm_eval task folders and name
checks, loss curves, the report tables, and the evaluate config's validation."""

from __future__ import annotations

import json
import math
import os

import pytest

from pipeline.errors import InputError


def test_windows_predict_every_token_once():
    from pipeline.evaluation.perplexity import _windows

    seq = list(range(23))
    for width in (2, 5, 8, 23, 40):
        wins = _windows(seq, width)  # the default stride, half the window
        assert all(len(w) <= width for w, _ in wins)
        targets = [t for w, first in wins for t in w[first:]]
        assert targets == seq[1:], width


def test_text_perplexity_counts_and_bits_per_byte(tiny):
    import torch
    import torch.nn.functional as F

    from pipeline.evaluation.perplexity import text_perplexity

    model, tok = tiny
    texts = ["Алма — жеміс. Ол қызыл немесе жасыл болады.", "Москва — столица России.", "The cat sat on the mat."]
    res = text_perplexity(model, tok, texts, max_length=256, batch_size=2, device="cpu")
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert res["tokens"] == res["predicted_tokens"] == sum(map(len, ids))
    assert res["bytes"] == sum(len(t.encode()) for t in texts)
    # the same numbers by hand, one document at a time
    nll = 0.0
    for seq in ids:
        x = torch.tensor([[tok.bos_token_id, *seq]])
        with torch.no_grad():
            logits = model(input_ids=x).logits[0, :-1]
        nll += float(F.cross_entropy(logits, x[0, 1:], reduction="sum"))
    assert res["bits_per_byte"] == pytest.approx(nll / math.log(2) / res["bytes"], rel=1e-4)
    assert res["perplexity"] == pytest.approx(math.exp(nll / res["tokens"]), rel=1e-4)
    # short windows: every token is still predicted exactly once (with less context)
    short = text_perplexity(model, tok, texts, max_length=4, batch_size=3, device="cpu")
    assert short["predicted_tokens"] == res["tokens"]
    with pytest.raises(InputError):
        text_perplexity(model, tok, ["  ", ""], max_length=8, batch_size=1, device="cpu")


def test_read_text_files(tmp_path):
    from pipeline.evaluation.perplexity import read_text_files

    (tmp_path / "a.txt").write_text("first doc\nline two\n\nsecond doc\n", encoding="utf-8")
    (tmp_path / "b.jsonl").write_text('{"text": "third"}\n\n{"text": "fourth"}\n', encoding="utf-8")
    assert read_text_files([str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")]) == [
        "first doc\nline two", "second doc", "third", "fourth"]
    (tmp_path / "bad.jsonl").write_text('{"body": 1}\n', encoding="utf-8")
    with pytest.raises(InputError, match="bad.jsonl:1"):
        read_text_files([str(tmp_path / "bad.jsonl")])
    with pytest.raises(InputError, match="does not exist"):
        read_text_files([str(tmp_path / "missing.txt")])


def test_shipped_tasks_are_real_four_way_questions():
    from pipeline.evaluation.harness import TASKS_DIR, shipped_tasks

    assert shipped_tasks() == ["llmpipe_mc", "llmpipe_mc_en", "llmpipe_mc_kk", "llmpipe_mc_ru"]
    for lang in ("kk", "ru", "en"):
        rows = [json.loads(line) for line in (TASKS_DIR / f"mc_{lang}.jsonl").read_text(encoding="utf-8").splitlines()]
        assert 25 <= len(rows) <= 40
        for r in rows:
            assert len(r["choices"]) == 4 == len(set(r["choices"])) and 0 <= r["answer"] < 4
        assert len({r["answer"] for r in rows}) == 4  # the right answer is not always in one place


def test_materialized_tasks_load_from_any_cwd(tmp_path, monkeypatch):
    import yaml

    from pipeline.evaluation.harness import TASKS_DIR, materialize

    folders = materialize([], str(tmp_path / "tasks"))
    doc = yaml.safe_load((tmp_path / "tasks" / os.path.basename(folders[0]) / "llmpipe_mc_kk.yaml").read_text())
    path = doc["dataset_kwargs"]["data_files"]["test"]
    assert os.path.isabs(path) and os.path.samefile(path, TASKS_DIR / "mc_kk.jsonl")
    monkeypatch.chdir(tmp_path)
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=folders, include_defaults=False)
    task = tm.load(["llmpipe_mc_ru"])["tasks"]["llmpipe_mc_ru"]
    docs = list(task.test_docs())
    assert len(docs) == 32 and task.doc_to_text(docs[0]).startswith("Вопрос: ")


def test_unknown_task_names_get_close_matches(tmp_path, monkeypatch):
    """The built-in names come from the per-version cache (written on the first full index)."""
    import importlib.metadata

    from pipeline.evaluation.harness import materialize, task_manager

    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / f"lm_eval-{importlib.metadata.version('lm_eval')}-tasks.json").write_text(
        json.dumps(["hellaswag", "arc_easy", "arc_challenge"]))
    monkeypatch.setenv("LLMPIPE_CACHE_DIR", str(cache))
    folders = materialize([], str(tmp_path / "tasks"))
    assert "llmpipe_mc" in task_manager(["llmpipe_mc", "llmpipe_mc_kk"], folders).all_tasks
    with pytest.raises(InputError) as err:
        task_manager(["llmpipe_mc", "helaswag", "llmpipe_mc_kz"], folders)
    msg = str(err.value)
    assert "'helaswag' (close: hellaswag" in msg and "'llmpipe_mc_kz' (close: llmpipe_mc_kk" in msg
    assert "\n" not in msg


def test_flat_metrics_names():
    from pipeline.evaluation.harness import flat_metrics

    flat = flat_metrics({"t": {"alias": "t", "sample_len": 9, "acc,none": 0.5, "acc_stderr,none": "N/A",
                               "acc_norm,none": 0.25, "exact_match,strict": 1.0}})
    assert flat == {"lm_eval_t_acc": 0.5, "lm_eval_t_acc_norm": 0.25, "lm_eval_t_exact_match_strict": 1.0}


def test_loss_curves_from_pretrain_and_posttrain_logs(tmp_path):
    from pipeline.evaluation.report import read_curves

    pre = tmp_path / "pre"
    pre.mkdir()
    (pre / "train_metrics.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"kind": "start", "step": 0}, {"kind": "train", "step": 1, "loss": 5.0}, {"kind": "samples", "step": 1},
        {"kind": "eval", "step": 2, "val_loss": 4.5}, {"kind": "train", "step": 2, "loss": 4.0},
        {"kind": "summary", "step": 2, "train_loss": 4.5}]))
    assert read_curves(str(pre)) == {"train": [(1, 5.0), (2, 4.0)], "val": [(2, 4.5)]}
    sft = tmp_path / "sft"
    sft.mkdir()
    (sft / "train_metrics.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"loss": 3.0, "step": 1}, {"loss": 2.0, "step": 10}, {"train_runtime": 9.0, "train_loss": 2.5, "step": 10}]))
    assert read_curves(str(sft), {"eval_loss_before": 3.5, "eval_loss_after": 2.2, "steps": 10}) == {
        "train": [(1, 3.0), (10, 2.0)], "val": [(0, 3.5), (10, 2.2)]}
    assert read_curves(str(tmp_path / "none")) == {"train": [], "val": []}


def test_markdown_cells_stay_on_one_line_and_html_is_escaped(tmp_path):
    from pipeline.evaluation.report import Section, Table, to_html, to_markdown

    sec = Section("S", tables=[Table(["a", "b"], [["x | y\nz\u2028w", 1234.5678], ["<b>", None]])])
    md = to_markdown("T", "intro", [sec])
    rows = [ln for ln in md.splitlines() if ln.startswith("|")]
    assert rows[2] == "| x \\| y<br>z<br>w | 1,235 |" and rows[3] == "| <b> | – |"
    page = to_html("T", "intro", [sec], str(tmp_path))
    assert "&lt;b&gt;" in page and "<b>" not in page


def test_config_validation():
    from pydantic import ValidationError

    from pipeline.stages.evaluate import STAGE, EvaluateConfig

    inputs = STAGE.inputs

    cfg = EvaluateConfig(models=[{"path": "models/pretrain"}, {"path": "models/sft", "label": "chat"}])
    assert [m.name for m in cfg.models] == ["pretrain", "chat"]
    assert inputs(cfg) == ["models/pretrain", "models/sft", "shards", "clean"]
    assert inputs(EvaluateConfig(models=[{"path": "models/dpo"}], heldout=None)) == ["models/dpo", "shards"]
    for bad, needle in [
        ({"models": []}, "at least 1"),
        ({"models": [{"path": "a/m"}, {"path": "b/m"}]}, "unique"),
        ({"models": [{"path": "m"}], "generation": {"prompts": []}}, "prompt set is empty"),
        ({"models": [{"path": "m"}], "generation": {"greedy": False, "sampled": False}}, "both false"),
        ({"models": [{"path": "m"}], "lm_eval": {"tasks": []}}, "at least 1"),
        ({"models": [{"path": "m"}], "perplexity": None, "heldout": None, "generation": None, "lm_eval": None}, "nothing"),
    ]:
        with pytest.raises(ValidationError, match=needle):
            EvaluateConfig.model_validate(bad)


def test_model_folder_checks_share_the_training_stages_rules(tmp_path):
    """evaluate refuses a folder that is not a causal LM with a tokenizer, from config.json alone."""
    from transformers import LlamaConfig

    from pipeline.errors import InputError
    from pipeline.evaluation.loading import check_model_folder

    with pytest.raises(InputError, match=r"/x/ holds no HF model \(config.json is missing\)"):
        check_model_folder(str(tmp_path), "/x/")
    LlamaConfig(vocab_size=16, architectures=["LlamaForSequenceClassification"]).save_pretrained(tmp_path)
    with pytest.raises(InputError, match="saved as LlamaForSequenceClassification, not as a causal LM"):
        check_model_folder(str(tmp_path), "/x/")
    LlamaConfig(vocab_size=16, architectures=["LlamaForCausalLM"]).save_pretrained(tmp_path)
    with pytest.raises(InputError, match="has no tokenizer"):
        check_model_folder(str(tmp_path), "/x/")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_text("{}")
    assert check_model_folder(str(tmp_path), "/x/")["vocab_size"] == 16
