"""Pretraining on CPU: a tiny Llama on a learnable synthetic corpus, in-process and through the launcher.

The run root is built by hand in the real artifact layout: ``shards/`` (and ``shards-clean/``)
written with the shards writer, ``models/init/`` a 2-layer Llama with hidden size 64 and its
tokenizer, each committed with a manifest. Subprocess runs go through
``python -m pipeline.training.launcher`` (torchrun, gloo); a ``sitecustomize`` on their
PYTHONPATH can make one rank fail on purpose (``TEST_FAIL_RANK``).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
VOCAB = 48  # ids 0..2 special, 3..47 "words"
SEQ = 32

SITECUSTOMIZE = """\
import os
if os.environ.get("TEST_FAIL_RANK") and os.environ.get("RANK") == os.environ["TEST_FAIL_RANK"]:
    import pipeline.training.pretrain as _p

    def _boom(cfg, ctx, out):
        raise RuntimeError(f"injected failure on rank {ctx.rank}")

    _p.train = _boom
"""


# ------------------------------------------------------------------------------- fixtures


def _patterns(n_blocks: int, seed: int) -> np.ndarray:
    """Blocks of arithmetic progressions over the word ids: learnable from the context."""
    rng = np.random.default_rng(seed)
    words = VOCAB - 3
    out = np.empty((n_blocks, SEQ), dtype=np.int64)
    for b in range(n_blocks):
        start, stride = rng.integers(0, words), rng.choice([1, 2, 3])
        out[b] = 3 + (start + stride * np.arange(SEQ)) % words
    return out


def _write_shards(storage, name: str, seed: int, n_train: int = 192, n_val: int = 32) -> None:
    from pipeline.data.shards import ShardWriter, dtype_for_vocab, new_index, write_index

    out = storage.begin(name)
    splits = {}
    for split, n, s in (("train", n_train, seed), ("val", n_val, seed + 1000)):
        with ShardWriter(out.fs, out.path(), split, 0, SEQ, dtype_for_vocab(VOCAB), 64) as w:
            w.write_blocks(_patterns(n, s))
        infos = w.close()
        for i in infos:
            out.record(i.file, i.bytes, i.sha256)
        splits[split] = {"documents": n, "dropped_tail_tokens": 0, "shards": [i.to_dict() for i in infos]}
    write_index(out.fs, out.path(), new_index(seq_len=SEQ, vocab_size=VOCAB, bos_id=1, eos_id=2, splits=splits))
    out.commit({"stage": "pack", "config_hash": f"test-{name}", "inputs": {}, "metrics": {}})


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def _write_model(storage) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ * 2,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    tok = _tokenizer()
    for name in ("models/init", "tokenizer"):
        out = storage.begin(name)
        if name == "models/init":
            LlamaForCausalLM(cfg).save_pretrained(out.path())
        tok.save_pretrained(out.path())
        out.commit({"stage": name.split("/")[-1], "config_hash": "test", "inputs": {}, "metrics": {}})


@pytest.fixture(scope="module")
def template_root(tmp_path_factory) -> Path:
    """A run root with shards, shards-clean, models/init and tokenizer, copied per test."""
    from pipeline.storage import Storage

    root = tmp_path_factory.mktemp("pretrain-template")
    storage = Storage(str(root))
    _write_shards(storage, "shards", seed=1)
    _write_shards(storage, "shards-clean", seed=2)
    _write_model(storage)
    return root


def _config(path: Path, **over) -> Path:
    import yaml

    cfg = {
        "micro_batch_size": 4,
        "global_batch_tokens": SEQ * 8,  # 8 sequences per step
        "max_steps": 12,
        "lr": 3e-3,
        "warmup_steps": 2,
        "weight_decay": 0.0,
        "zero_stage": 0,
        "checkpoint_every": 4,
        "keep_checkpoints": 2,
        "eval_every": 6,
        "eval_max_blocks": 16,
        "log_every": 1,
        "generation": {"every": 6, "prompts": ["w3 w4 w5", "w10 w12"], "max_new_tokens": 6},
        "cpu_peak_flops": 1e11,
        "verify_shards": True,
    }
    for k, v in over.items():
        cfg[k] = v
    path.write_text(yaml.safe_dump(cfg))
    return path


def _sitecustomize(tmp_path: Path) -> Path:
    folder = tmp_path / "site"
    folder.mkdir(exist_ok=True)
    (folder / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return folder


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK") and not k.startswith("PET_")}
    env["PYTHONPATH"] = os.pathsep.join([str(_sitecustomize(tmp_path)), str(REPO), env.get("PYTHONPATH", "")])
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
               DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    return env


def _launch(tmp_path: Path, root: Path, config: Path, *flags: str, timeout: int = 600, via_cli: bool = False,
            **env: str) -> subprocess.CompletedProcess:
    entry = [str(Path(sys.executable).parent / "llmpipe"), "run"] if via_cli else [sys.executable, "-m", "pipeline.training.launcher"]
    cmd = [*entry, "pretrain", "-c", str(config), "--root", str(root), "--no-progress", *flags]
    return subprocess.run(cmd, cwd=REPO, env={**_env(tmp_path), **env}, capture_output=True, text=True, timeout=timeout)


def _records(root: Path, kind: str) -> list[dict]:
    from pipeline.training.pretrain import read_metrics

    return [r for r in read_metrics(root / "checkpoints" / "pretrain" / "metrics.jsonl") if r["kind"] == kind]


def _last_per_step(records: list[dict]) -> dict[int, dict]:
    return {r["step"]: r for r in records}  # a rerun appends: the last record of a step wins


def _assert_loads(model_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
    assert tok.convert_tokens_to_ids("w5") == 5
    assert (model_dir / "manifest.json").is_file()


# ---------------------------------------------------------------------------------- tests


def test_pretrain_in_process_learns_and_exports(run_root, tmp_path):
    """Two data phases, no DeepSpeed, one process: val loss falls far below its random-init value."""
    from pipeline import runner
    from pipeline.stages import load_config
    from pipeline.storage import Storage

    cfg = load_config("pretrain", _config(tmp_path / "p.yaml", max_steps=40, checkpoint_every=20, eval_every=20,
                                          phases=[{"name": "dirty", "shards": "shards", "until_step": 24},
                                                  {"name": "clean", "shards": "shards-clean"}]))
    storage = Storage(str(run_root))
    t0 = time.time()
    outcome = runner.run_stage("pretrain", cfg, storage, progress=False)
    print(f"in-process pretrain: {time.time() - t0:.1f}s")
    m = outcome.manifest["metrics"]
    assert m["steps"] == 40
    evals = _records(run_root, "eval")
    assert evals, "no validation records"
    assert m["optimizer"] == "AdamW" and m["offload"] is False
    assert m["dataloader_workers"] == 0 and m["document_masking"] is True  # the defaults on CPU
    from pipeline.stages import get_stage

    rows = dict(get_stage("pretrain").summary(m))
    assert rows["waiting for data"].endswith(f"of the step time ({m['data_wait_s']:.1f} s; dataloader workers 0)")
    random_init = math.log(VOCAB)  # ~3.87 nats
    assert m["val_loss"] < 0.5 * random_init, m
    assert m["val_perplexity"] == pytest.approx(math.exp(m["val_loss"]))
    train = _records(run_root, "train")
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "tokens_per_s_per_device", "mfu", "peak_mem_gb"):
        assert train[-1][key] is not None, key
    samples = _last_per_step(_records(run_root, "samples"))
    assert sorted(samples) == list(range(1, 41))
    assert all(len(r["sample_ids"]) == 8 for r in samples.values())
    assert {r["phase"] for s, r in samples.items() if s <= 24} == {0}
    assert {r["phase"] for s, r in samples.items() if s > 24} == {1}
    gens = (run_root / "checkpoints" / "pretrain" / "generations.jsonl").read_text().splitlines()
    assert gens and {"greedy", "sampled", "prompt", "step"} <= set(json.loads(gens[0]))
    ckpts = sorted(p.name for p in (run_root / "checkpoints" / "pretrain").glob("step-*"))
    assert ckpts == ["step-20", "step-40"]
    assert all((run_root / "checkpoints" / "pretrain" / c / "COMPLETE").is_file() for c in ckpts)
    _assert_loads(run_root / "models" / "pretrain")
    # a second run with the same config is up to date
    assert runner.run_stage("pretrain", cfg, storage, progress=False).status == "up to date"
    # killed after the last checkpoint but before the export: the rerun exports that checkpoint, trains nothing
    shutil.rmtree(run_root / "models" / "pretrain")
    again = runner.run_stage("pretrain", cfg, storage, progress=False).manifest["metrics"]
    assert again["resumed_from_step"] == 40 and again["steps"] == 40
    assert again["val_loss"] == pytest.approx(m["val_loss"], rel=1e-5)
    _assert_loads(run_root / "models" / "pretrain")


def _commit_hf(storage, name: str, model) -> None:
    out = storage.begin(name)
    model.save_pretrained(out.path())
    _tokenizer().save_pretrained(out.path())
    out.commit({"stage": "init", "config_hash": f"test-{name}", "inputs": {}, "metrics": {}})


def test_bad_inputs_fail_before_any_weights_load(run_root, tmp_path, monkeypatch):
    """An incompatible checkpoint (vocab, positions, architecture, not a decoder), empty data, a missing input and
    GPU-only options on this CPU: each is one clear error raised before a single weight is loaded; nothing commits."""
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    from pipeline import runner
    from pipeline.errors import ConfigError, InputError, PipelineError
    from pipeline.stages import load_config
    from pipeline.storage import Storage

    storage = Storage(str(run_root))
    small = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                 bos_token_id=1, eos_token_id=2, pad_token_id=0)
    _commit_hf(storage, "models/small-vocab", LlamaForCausalLM(LlamaConfig(vocab_size=16, max_position_embeddings=SEQ, **small)))
    _commit_hf(storage, "models/short", LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, max_position_embeddings=SEQ // 2, **small)))
    _commit_hf(storage, "models/reward", LlamaForSequenceClassification(LlamaConfig(vocab_size=VOCAB, num_labels=1, **small)))
    out = storage.begin("models/vision")
    (Path(out.path()) / "config.json").write_text(json.dumps({"model_type": "vit", "architectures": ["ViTModel"]}))
    out.commit({"stage": "init", "config_hash": "test-vision", "inputs": {}, "metrics": {}})
    _write_shards(storage, "shards-empty", seed=3, n_train=0)

    def _no_weights(*a, **k):
        raise AssertionError("weights were loaded before the input checks")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", _no_weights)
    cases = [
        ({"model": "models/small-vocab"}, InputError, "tokenized with a 48-token vocabulary but models/small-vocab/ has "
                                                      "vocab_size 16"),
        ({"model": "models/short"}, InputError, "32-token blocks, longer than models/short/'s max_position_embeddings 16"),
        ({"model": "models/reward"}, InputError, "saved as LlamaForSequenceClassification, not as a causal LM"),
        ({"model": "models/vision"}, InputError, "is a 'vit' model, which has no causal-LM head"),
        ({"phases": [{"name": "web", "shards": "shards-empty"}]}, InputError, "shards-empty/ has no training blocks"),
        ({"model": "models/missing"}, PipelineError, "models/missing"),
        ({"precision": "bf16"}, ConfigError, "precision bf16 needs a CUDA device"),
        ({"attention": "flash_attention_2"}, ConfigError, "flash_attention_2 needs a CUDA device"),
        ({"liger_kernels": True}, ConfigError, "liger_kernels needs a CUDA device"),
    ]
    for over, exc, match in cases:
        cfg = load_config("pretrain", _config(tmp_path / "p.yaml", checkpoint_dir=str(tmp_path / "ck"), **over))
        with pytest.raises(exc, match=match) as info:
            runner.run_stage("pretrain", cfg, storage, progress=False)
        print(f"{over}: {info.value}")
        assert not (run_root / "models" / "pretrain").exists(), over
        assert not list((tmp_path / "ck").glob("step-*")), over

def test_compile_and_attention_kernels_in_process(run_root, tmp_path):
    """compile: true (inductor on CPU) and attention: eager train the same steps on the same samples as the default
    sdpa run from the same weights, with losses within float tolerance, resume from a checkpoint written by another
    kernel choice (the config hash ignores kernels), and export a plain HF model (no ``_orig_mod.`` keys)."""
    from safetensors import safe_open

    from pipeline import runner
    from pipeline.stages import load_config
    from pipeline.storage import Storage

    storage = Storage(str(run_root))
    losses = {}
    for kernels in ({}, {"compile": True}, {"attention": "eager"}):
        label = ",".join(f"{k}={v}" for k, v in kernels.items()) or "sdpa"
        cfg = load_config("pretrain", _config(tmp_path / "p.yaml", max_steps=4, checkpoint_every=2, eval_every=0,
                                              log_every=1, generation={"every": 0, "prompts": []},
                                              checkpoint_dir=str(tmp_path / f"ck-{label}"), **kernels))
        shutil.rmtree(run_root / "models" / "pretrain", ignore_errors=True)
        t0 = time.time()
        m = runner.run_stage("pretrain", cfg, storage, progress=False).manifest["metrics"]
        print(f"{label}: {time.time() - t0:.1f}s")
        assert m["steps"] == 4 and m["compile"] == kernels.get("compile", False)
        assert m["attention"] == kernels.get("attention", "sdpa")
        records = [json.loads(line) for line in (tmp_path / f"ck-{label}" / "metrics.jsonl").read_text().splitlines()]
        losses[label] = [r["loss"] for r in records if r["kind"] == "train"]
        with safe_open(str(run_root / "models" / "pretrain" / "model.safetensors"), "pt") as fh:
            assert not [k for k in fh.keys() if "_orig_mod" in k]
        _assert_loads(run_root / "models" / "pretrain")
    assert len(losses["sdpa"]) == 4
    for label, curve in losses.items():
        assert curve == pytest.approx(losses["sdpa"], rel=1e-3, abs=1e-4), (label, curve, losses["sdpa"])
    # a checkpoint written with sdpa is resumed by a compiled run of the same config (step 2 -> 4)
    shutil.rmtree(tmp_path / "ck-sdpa" / "step-4")
    shutil.rmtree(run_root / "models" / "pretrain")
    cfg = load_config("pretrain", _config(tmp_path / "p.yaml", max_steps=4, checkpoint_every=2, eval_every=0, log_every=1,
                                          generation={"every": 0, "prompts": []}, checkpoint_dir=str(tmp_path / "ck-sdpa"),
                                          compile=True))
    m = runner.run_stage("pretrain", cfg, storage, progress=False).manifest["metrics"]
    assert m["resumed_from_step"] == 2 and m["steps"] == 4

def _write_documents(storage, name: str, framing: list[str], seed: int = 5, n_blocks: int = 32) -> None:
    """Blocks cut from a stream of framed documents (bos, 3-12 words in a progression, eos), as pack writes them."""
    from pipeline.data.shards import ShardWriter, dtype_for_vocab, new_index, write_index

    rng = np.random.default_rng(seed)
    stream: list[int] = []
    while len(stream) < n_blocks * SEQ:
        start, n = int(rng.integers(0, VOCAB - 3)), int(rng.integers(3, 13))
        words = [3 + (start + 2 * k) % (VOCAB - 3) for k in range(n)]
        stream += ([1] if "bos" in framing else []) + words + ([2] if "eos" in framing else [])
    out = storage.begin(name)
    with ShardWriter(out.fs, out.path(), "train", 0, SEQ, dtype_for_vocab(VOCAB), 64) as w:
        w.write_blocks(np.array(stream[:n_blocks * SEQ], dtype=np.int64).reshape(n_blocks, SEQ))
    infos = w.close()
    for i in infos:
        out.record(i.file, i.bytes, i.sha256)
    splits = {"train": {"documents": 0, "dropped_tail_tokens": 0, "shards": [i.to_dict() for i in infos]}}
    write_index(out.fs, out.path(), new_index(seq_len=SEQ, vocab_size=VOCAB, bos_id=1, eos_id=2, splits=splits,
                                              framing=framing))
    out.commit({"stage": "pack", "config_hash": f"test-{name}", "inputs": {}, "metrics": {}})


def test_document_masking_reaches_the_model(run_root, tmp_path):
    """document_masking: true trains on position ids that restart per document: the first step's logged loss is the
    loss of the initial weights on that step's blocks with :func:`document_positions`, and not the loss of the
    same blocks attended whole. Shards whose documents are not framed are refused before training."""
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline import runner
    from pipeline.data.packed import PackedDataset, document_positions
    from pipeline.errors import InputError
    from pipeline.stages import load_config
    from pipeline.storage import Storage

    storage = Storage(str(run_root))
    _write_documents(storage, "shards-docs", ["bos", "eos"])
    _write_documents(storage, "shards-unframed", [])
    common = dict(max_steps=2, checkpoint_every=0, eval_every=0, log_every=1, generation={"every": 0, "prompts": []},
                  weight_decay=0.0, document_masking=True)
    cfg = load_config("pretrain", _config(tmp_path / "p.yaml", phases=[{"name": "docs", "shards": "shards-docs"}],
                                          checkpoint_dir=str(tmp_path / "ck"), **common))
    m = runner.run_stage("pretrain", cfg, storage, progress=False).manifest["metrics"]
    assert m["document_masking"] is True and m["steps"] == 2
    records = [json.loads(line) for line in (tmp_path / "ck" / "metrics.jsonl").read_text().splitlines()]
    logged = next(r["loss"] for r in records if r["kind"] == "train" and r["step"] == 1)
    ids_step1 = next(r["sample_ids"] for r in records if r["kind"] == "samples" and r["step"] == 1)
    ds = PackedDataset(str(run_root / "shards-docs"), "train")
    assert ds.document_boundaries() == (1, 2)
    blocks = torch.stack([ds[i]["input_ids"] for i in ids_step1])
    model = AutoModelForCausalLM.from_pretrained(run_root / "models" / "init", dtype=torch.float32)
    model.config.use_cache = False
    with torch.no_grad():
        masked = model(input_ids=blocks, labels=blocks, position_ids=document_positions(blocks, bos_id=1, eos_id=2)).loss
        whole = model(input_ids=blocks, labels=blocks).loss
    assert logged == pytest.approx(float(masked), rel=1e-4)
    assert abs(float(whole) - float(masked)) > 1e-3, (float(whole), float(masked))
    # unframed documents: no document starts to mask at
    cfg = load_config("pretrain", _config(tmp_path / "p.yaml", phases=[{"name": "x", "shards": "shards-unframed"}],
                                          checkpoint_dir=str(tmp_path / "ck2"), **common))
    with pytest.raises(InputError, match="document_masking needs documents framed by bos or eos"):
        runner.run_stage("pretrain", cfg, storage, progress=False)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_two_processes_through_launcher(run_root, tmp_path, stage):
    cfg = _config(tmp_path / "p.yaml", zero_stage=stage, max_steps=6, checkpoint_every=3, eval_every=3,
                  generation={"every": 3, "prompts": ["w3 w4"], "max_new_tokens": 4},
                  # cover the options too: WSD with ZeRO-2, gradient checkpointing with ZeRO-3
                  schedule="wsd" if stage == 2 else "cosine", decay_fraction=0.5, gradient_checkpointing=stage == 3)
    t0 = time.time()
    proc = _launch(tmp_path, run_root, cfg, "--nproc-per-node", "2")
    print(f"ZeRO-{stage} x2 through the launcher: {time.time() - t0:.1f}s")
    assert proc.returncode == 0, proc.stderr[-4000:]
    manifest = json.loads((run_root / "models" / "pretrain" / "manifest.json").read_text())
    assert manifest["metrics"]["world_size"] == 2 and manifest["metrics"]["zero_stage"] == stage
    assert manifest["metrics"]["grad_accum"] == 1  # 8 sequences = 2 ranks x micro 4
    samples = _last_per_step(_records(run_root, "samples"))
    assert sorted(samples) == list(range(1, 7)) and all(len(set(r["sample_ids"])) == 8 for r in samples.values())
    lrs = [r["lr"] for r in _last_per_step(_records(run_root, "train")).values()]
    if stage == 2:  # WSD: warmup (2 steps), stable at the peak, decay over the last 3
        assert lrs[1] == lrs[2] == pytest.approx(3e-3) and lrs[-1] < lrs[3]
    gens = [json.loads(line) for line in (run_root / "checkpoints" / "pretrain" / "generations.jsonl").read_text().splitlines()]
    assert [g["step"] for g in gens] == [3, 6] and all(g["greedy"] for g in gens)
    _assert_loads(run_root / "models" / "pretrain")


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_offload_two_processes_resumes(run_root, tmp_path, stage):
    """The shipped CPU-offload variants (optimizer state, and with ZeRO-3 the parameters, in host memory; DeepSpeed
    builds its CPU Adam the first time, ~1-2 min): 2 ranks train 6 steps and export a model that loads; then, with the
    step-6 checkpoint and the export removed, the same config resumes from step 4 (offloaded optimizer state loaded
    back) and redoes steps 5-6 on the same samples, ending within a small tolerance of the first run."""
    cfg = _config(tmp_path / "p.yaml", zero_stage=stage, offload=True, max_steps=6, checkpoint_every=2, eval_every=2,
                  keep_checkpoints=3, generation={"every": 0, "prompts": []})
    t0 = time.time()
    proc = _launch(tmp_path, run_root, cfg, "--nproc-per-node", "2")
    print(f"ZeRO-{stage}-offload x2: {time.time() - t0:.1f}s")
    assert proc.returncode == 0, proc.stderr[-4000:]
    first = json.loads((run_root / "models" / "pretrain" / "manifest.json").read_text())["metrics"]
    assert first["world_size"] == 2 and first["zero_stage"] == stage and first["offload"] is True
    assert first["steps"] == 6 and first["resumed_from_step"] is None
    assert first["optimizer"] == "DeepSpeedCPUAdam"  # the update runs on the host
    _assert_loads(run_root / "models" / "pretrain")
    ref = {s: r["sample_ids"] for s, r in _last_per_step(_records(run_root, "samples")).items()}

    shutil.rmtree(run_root / "models" / "pretrain")
    shutil.rmtree(run_root / "checkpoints" / "pretrain" / "step-6")
    proc = _launch(tmp_path, run_root, cfg, "--nproc-per-node", "2")
    assert proc.returncode == 0, proc.stderr[-4000:]
    again = json.loads((run_root / "models" / "pretrain" / "manifest.json").read_text())["metrics"]
    assert again["resumed_from_step"] == 4 and again["steps"] == 6
    redo = {s: r["sample_ids"] for s, r in _last_per_step(_records(run_root, "samples")).items()}
    assert redo == ref
    assert again["val_loss"] == pytest.approx(first["val_loss"], rel=1e-3)
    _assert_loads(run_root / "models" / "pretrain")

def test_two_simulated_nodes(run_root, tmp_path):
    """`llmpipe run pretrain --nnodes 2 --nproc-per-node 1`: two torchrun agents on localhost."""
    cfg = _config(tmp_path / "p.yaml", zero_stage=2, max_steps=4, checkpoint_every=2, eval_every=2,
                  generation={"every": 0, "prompts": []})
    t0 = time.time()
    proc = _launch(tmp_path, run_root, cfg, "--nnodes", "2", "--nproc-per-node", "1", via_cli=True)
    print(f"2 simulated nodes: {time.time() - t0:.1f}s")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "[node 1]" in proc.stderr
    manifest = json.loads((run_root / "models" / "pretrain" / "manifest.json").read_text())
    assert manifest["metrics"]["world_size"] == 2
    _assert_loads(run_root / "models" / "pretrain")


def test_failing_rank_fails_the_launch(run_root, tmp_path):
    """Rank 1 raises while rank 0 waits for it: the launch exits non-zero, its last line is rank 1's error,
    and nothing is committed."""
    cfg = _config(tmp_path / "p.yaml", max_steps=4, zero_stage=2)
    t0 = time.time()
    proc = _launch(tmp_path, run_root, cfg, "--nproc-per-node", "2", timeout=300, TEST_FAIL_RANK="1")
    print(f"failing rank: {time.time() - t0:.1f}s")
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: distributed launch failed"), last
    assert "rank 1/2: RuntimeError: injected failure on rank 1" in last, last
    assert not (run_root / "models" / "pretrain").exists()


def test_bad_batch_budget_is_one_clear_line(run_root, tmp_path):
    cfg = _config(tmp_path / "p.yaml", max_steps=4, global_batch_tokens=SEQ * 12)  # 12 sequences, 8 per pass
    proc = _launch(tmp_path, run_root, cfg, "--nproc-per-node", "2", timeout=300)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "global_batch_tokens 384 is not a whole multiple" in last and "use e.g. 256 or 512" in last, last


def _kill_one_rank(proc: subprocess.Popen, metrics: Path, after_step: int, timeout: float = 400) -> None:
    """SIGKILL one worker process once the metrics file shows ``after_step``."""
    import psutil

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError("the run ended before it could be killed")
        if metrics.exists():
            steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()
                     if '"kind": "samples"' in line]
            if steps and max(steps) >= after_step:
                break
        time.sleep(0.2)
    else:
        raise AssertionError("the run never reached the step to kill at")
    workers = [p for p in psutil.Process(proc.pid).children(recursive=True)
               if "LOCAL_RANK" in (p.environ() if p.is_running() else {})]
    victim = next(p for p in workers if p.environ().get("RANK") == "1")
    os.kill(victim.pid, signal.SIGKILL)


@pytest.mark.slow
def test_killed_rank_resumes_exactly(template_root, tmp_path):
    """Kill rank 1 with SIGKILL mid-run (after step 6, so at least the step-4 checkpoint is complete); the rerun
    resumes from the newest complete checkpoint and matches an uninterrupted run: same final step, same sample
    ids at every step, final loss within tolerance."""
    import shutil

    steps = 16
    over = dict(zero_stage=2, max_steps=steps, checkpoint_every=4, eval_every=0, keep_checkpoints=3,
                generation={"every": 0, "prompts": []})
    ref_root, run_root = tmp_path / "ref", tmp_path / "killed"
    shutil.copytree(template_root, ref_root)
    shutil.copytree(template_root, run_root)
    cfg = _config(tmp_path / "p.yaml", **over)

    t0 = time.time()
    ref = _launch(tmp_path, ref_root, cfg, "--nproc-per-node", "2")
    assert ref.returncode == 0, ref.stderr[-4000:]

    cmd = [sys.executable, "-m", "pipeline.training.launcher", "pretrain", "-c", str(cfg), "--root", str(run_root),
           "--no-progress", "--nproc-per-node", "2"]
    log = open(tmp_path / "killed.log", "w")
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(tmp_path), stdout=log, stderr=subprocess.STDOUT)
    _kill_one_rank(proc, run_root / "checkpoints" / "pretrain" / "metrics.jsonl", after_step=6)
    assert proc.wait(timeout=300) != 0
    log.close()
    last = (tmp_path / "killed.log").read_text().strip().splitlines()[-1]
    assert last.startswith("error: distributed launch failed") and "rank 1" in last and "Signal 9" in last, last
    assert not (run_root / "models" / "pretrain").exists()
    from pipeline.training.checkpoint import latest_checkpoint

    resume_step = latest_checkpoint(run_root / "checkpoints" / "pretrain")[0]
    assert resume_step in (4, 8, 12)

    again = _launch(tmp_path, run_root, cfg, "--nproc-per-node", "2")
    print(f"kill + resume test: {time.time() - t0:.1f}s")
    assert again.returncode == 0, again.stderr[-4000:]
    manifest = json.loads((run_root / "models" / "pretrain" / "manifest.json").read_text())
    assert manifest["metrics"]["resumed_from_step"] == resume_step
    assert manifest["metrics"]["steps"] == steps
    starts = _records(run_root, "start")
    assert [s["step"] for s in starts] == [0, resume_step]

    ref_ids = {s: r["sample_ids"] for s, r in _last_per_step(_records(ref_root, "samples")).items()}
    got_ids = {s: r["sample_ids"] for s, r in _last_per_step(_records(run_root, "samples")).items()}
    assert sorted(ref_ids) == sorted(got_ids) == list(range(1, steps + 1))
    assert got_ids == ref_ids
    ref_loss = _last_per_step(_records(ref_root, "train"))[steps]["loss"]
    got_loss = _last_per_step(_records(run_root, "train"))[steps]["loss"]
    print(f"final loss: uninterrupted {ref_loss}, killed + resumed {got_loss}")
    assert got_loss == pytest.approx(ref_loss, rel=1e-3, abs=1e-3)


def test_metrics_after_a_resume_continue_from_the_checkpoint(run_root, tmp_path):
    """A run killed after step 6 with its last checkpoint at 4 resumes from 4: metrics.jsonl then holds every step
    once, in order (before, the killed run's steps 5-6 stayed and were logged again), and so does the exported
    train_metrics.jsonl that evaluate's plots read."""
    from pipeline import runner
    from pipeline.stages import load_config
    from pipeline.storage import Storage

    ck = tmp_path / "ck"
    cfg = load_config("pretrain", _config(tmp_path / "p.yaml", max_steps=8, checkpoint_every=4, eval_every=4,
                                          log_every=1, generation={"every": 4, "prompts": ["w3"], "max_new_tokens": 2},
                                          checkpoint_dir=str(ck)))
    storage = Storage(str(run_root))
    runner.run_stage("pretrain", cfg, storage, progress=False)
    # as if killed after step 6: the step-8 checkpoint and the export never happened, steps 5-6 were logged
    shutil.rmtree(ck / "step-8")
    shutil.rmtree(run_root / "models" / "pretrain")
    lines = (ck / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    kept = [ln for ln in lines if json.loads(ln).get("step", 0) <= 6] + ['{"kind": "train", "step": 7, "lo']  # a cut line
    (ck / "metrics.jsonl").write_text("\n".join(kept) + "\n", encoding="utf-8")
    m = runner.run_stage("pretrain", cfg, storage, progress=False).manifest["metrics"]
    assert m["resumed_from_step"] == 4
    for path in (ck / "metrics.jsonl", run_root / "models" / "pretrain" / "train_metrics.jsonl"):
        records = [json.loads(ln) for ln in path.read_text(encoding="utf-8").splitlines()]
        for kind in ("train", "samples"):
            steps = [r["step"] for r in records if r["kind"] == kind]
            assert steps == list(range(1, 9)), (path.name, kind, steps)
        assert [r["step"] for r in records if r["kind"] == "eval"] == [4, 8]
        assert [r["step"] for r in records if r["kind"] == "start"] == [0, 4]
    gens = [json.loads(ln)["step"] for ln in (ck / "generations.jsonl").read_text(encoding="utf-8").splitlines()]
    assert gens == sorted(gens) and len(gens) == len(set(gens))


def test_damaged_validation_shards_are_refused_not_trained_past(run_root, tmp_path, monkeypatch):
    """The val split is checked like the train split (a rewritten val shard: the sha256 mismatch, before any
    weights load), and an id beyond the model's rows is one named error, not an IndexError at the final evaluation
    after every training step (checksums off). LLMPIPE_VERIFY=size: the runner's input check looks at sizes only,
    as for shards too large to hash on every start, so pretrain's own checks are what is tested."""
    import numpy as np

    monkeypatch.setenv("LLMPIPE_VERIFY", "size")
    from pipeline import runner
    from pipeline.errors import CorruptShardError
    from pipeline.stages import load_config
    from pipeline.storage import Storage

    storage = Storage(str(run_root))
    val = sorted((run_root / "shards").glob("val-*.bin"))[0]
    data = np.fromfile(val, dtype=np.uint16)
    data[:SEQ] = VOCAB + 5  # out of the vocabulary, same size
    data.tofile(val)
    cfg = load_config("pretrain", _config(tmp_path / "p.yaml", max_steps=4, checkpoint_every=0, eval_every=2,
                                          generation={"every": 0, "prompts": []}, checkpoint_dir=str(tmp_path / "ck")))
    with pytest.raises(CorruptShardError, match=f"{val.name}"):
        runner.run_stage("pretrain", cfg, storage, progress=False)
    assert not list((tmp_path / "ck").glob("step-*"))
    unchecked = load_config("pretrain", _config(tmp_path / "p2.yaml", max_steps=4, checkpoint_every=0, eval_every=2,
                                                generation={"every": 0, "prompts": []}, verify_shards=False,
                                                checkpoint_dir=str(tmp_path / "ck2")))
    with pytest.raises(CorruptShardError, match=f"token id {VOCAB + 5} in block\\(s\\) \\[0\\] is outside the model's "
                                                f"{VOCAB} embedding rows"):
        runner.run_stage("pretrain", unchecked, storage, progress=False)
    assert not (run_root / "models" / "pretrain").exists()


# ------------------------------------------------------------------------- language / source mix

MIX_STREAMS = {"en/en-web": ("en", "en-web", 64), "kk/kk-web": ("kk", "kk-web", 16), "ru/ru-web": ("ru", "ru-web", 48)}


def _write_stream_shards(storage, name: str) -> None:
    """Shards packed per stream (pack's stream_by, index version 2): one language and source per block range."""
    from pipeline.data.shards import ShardWriter, dtype_for_vocab, new_index, write_index

    out = storage.begin(name)
    shards, streams = [], {}
    for k, (stream, (lang, source, n)) in enumerate(MIX_STREAMS.items()):
        with ShardWriter(out.fs, out.path(), f"train.{lang}.{source}", 0, SEQ, dtype_for_vocab(VOCAB), 20) as w:
            w.write_blocks(_patterns(n, 10 + k))
        shards += [{**i.to_dict(), "stream": stream} for i in w.close()]
        streams[stream] = {"lang": lang, "source": source, "documents": n}
    with ShardWriter(out.fs, out.path(), "val", 0, SEQ, dtype_for_vocab(VOCAB), 64) as w:
        w.write_blocks(_patterns(16, 99))
    val = [i.to_dict() for i in w.close()]
    for s in shards + val:
        out.record(s["file"], s["bytes"], s["sha256"])
    index = new_index(seq_len=SEQ, vocab_size=VOCAB, bos_id=1, eos_id=2,
                      splits={"train": {"shards": shards, "streams": streams}, "val": {"shards": val}})
    write_index(out.fs, out.path(), index)
    out.commit({"stage": "pack", "config_hash": f"test-{name}", "inputs": {}, "metrics": {}})


def test_language_mix_is_trained_on_and_reported_per_language(run_root, tmp_path):
    """Two phases over stream-packed shards: kk upsampled and en subsampled by language, then kk-web alone by source.
    The manifest's tokens and epochs per stream, language and source are exactly what the logged sample ids of each
    step hold; a run resumed from a mid-phase checkpoint draws the same samples and reports the same numbers; an
    unknown mix key is one line before any weights load."""
    from pipeline import runner, tracking
    from pipeline.errors import ConfigError
    from pipeline.stages import get_stage, load_config
    from pipeline.storage import Storage

    storage = Storage(str(run_root))
    _write_stream_shards(storage, "shards-mix")
    ck = tmp_path / "ck"
    phases = [{"name": "web", "shards": "shards-mix", "until_step": 6, "mix": {"kk": 3.0, "ru": 1.0, "en": 0.5}},
              {"name": "kk", "shards": "shards-mix", "mix": {"kk-web": 1.0, "*": 0}, "mix_by": "source"}]
    cfg = load_config("pretrain", _config(tmp_path / "p.yaml", max_steps=10, checkpoint_every=4, eval_every=10,
                                          keep_checkpoints=3, generation={"every": 0, "prompts": []},
                                          checkpoint_dir=str(ck), phases=phases))
    m = runner.run_stage("pretrain", cfg, storage, progress=False).manifest["metrics"]

    def records(kind):
        from pipeline.training.pretrain import read_metrics

        return [r for r in read_metrics(ck / "metrics.jsonl") if r["kind"] == kind]

    samples = _last_per_step(records("samples"))
    assert sorted(samples) == list(range(1, 11))
    bounds = np.cumsum([n for _, _, n in MIX_STREAMS.values()])
    names = list(MIX_STREAMS)

    def drawn(steps):
        ids = [i for s in steps for i in samples[s]["sample_ids"]]
        counts = np.bincount(np.searchsorted(bounds, ids, side="right"), minlength=3)
        return dict(zip(names, counts.tolist()))

    web, kk = m["phases"]["web"], m["phases"]["kk"]
    assert web["samples"] == 6 * 8 and kk["samples"] == 4 * 8 and web["mix"] == phases[0]["mix"]
    assert {n: v["samples"] for n, v in web["streams"].items()} == drawn(range(1, 7))
    assert {n: v["samples"] for n, v in kk["streams"].items()} == drawn(range(7, 11)) == {
        "en/en-web": 0, "kk/kk-web": 32, "ru/ru-web": 0}
    for ph in (web, kk):
        for n, v in ph["streams"].items():
            assert v["tokens"] == v["samples"] * SEQ and v["epochs"] == pytest.approx(v["samples"] / MIX_STREAMS[n][2])
        assert ph["languages"]["kk"]["tokens"] == ph["streams"]["kk/kk-web"]["tokens"]
        assert ph["sources"]["kk-web"]["epochs"] == ph["streams"]["kk/kk-web"]["epochs"]
    assert kk["languages"]["kk"]["epochs"] == 2.0  # 32 samples of 16 blocks
    # a pass of the web mix is 48 kk + 48 ru + 32 en samples: kk's share is 3/8, en's 1/4 (binomial spread)
    assert 0.2 < web["streams"]["kk/kk-web"]["samples"] / 48 < 0.6 and web["streams"]["en/en-web"]["samples"] < 22
    assert sum(m["tokens_by_language"].values()) == m["tokens"] == 10 * 8 * SEQ
    assert m["tokens_by_source"]["kk-web"] == m["tokens_by_language"]["kk"]
    rows = dict(get_stage("pretrain").summary(m))
    assert rows["phase web by language"].startswith("en ") and "kk-web 1.02k tokens (2.00 epochs)" in rows["phase kk by source"]
    logged = tracking.numeric_metrics(m)  # what MLflow gets from the manifest
    assert logged["phases.web.languages.kk.tokens"] == web["languages"]["kk"]["tokens"]
    assert logged["phases.kk.streams.kk/kk-web.epochs"] == 2.0
    start = records("start")[0]
    assert start["mix"]["web"]["kk/kk-web"]["share"] == pytest.approx(3 / 8)
    assert start["mix"]["kk"]["en/en-web"]["weight"] == 0.0

    # killed after step 6 with its last checkpoint at 4 (mid web phase): the rerun resumes from 4 and draws the
    # same samples, so it reports the same numbers
    first = {s: r["sample_ids"] for s, r in samples.items()}
    assert sorted(p.name for p in ck.glob("step-*")) == ["step-10", "step-4", "step-8"]
    shutil.rmtree(ck / "step-10")
    shutil.rmtree(ck / "step-8")
    shutil.rmtree(run_root / "models" / "pretrain")
    again = runner.run_stage("pretrain", cfg, storage, progress=False).manifest["metrics"]
    assert again["resumed_from_step"] == 4
    assert {s: r["sample_ids"] for s, r in _last_per_step(records("samples")).items()} == first
    assert again["phases"] == m["phases"] and again["tokens_by_language"] == m["tokens_by_language"]

    bad = load_config("pretrain", _config(tmp_path / "bad.yaml", max_steps=4, checkpoint_dir=str(tmp_path / "ck2"),
                                          phases=[{"shards": "shards-mix", "mix": {"kz": 2.0}}]))
    with pytest.raises(ConfigError, match=r"^phases\[0\] \(main, shards-mix/\): mix key 'kz' names no language of the "
                                          r"shards \(languages: en, kk, ru\)$"):
        runner.run_stage("pretrain", bad, storage, progress=False)
    old = load_config("pretrain", _config(tmp_path / "old.yaml", max_steps=4, checkpoint_dir=str(tmp_path / "ck3"),
                                          phases=[{"shards": "shards", "mix": {"kk": 2.0}}]))
    with pytest.raises(ConfigError, match="mix needs shards packed per language / source"):
        runner.run_stage("pretrain", old, storage, progress=False)
    assert not list((tmp_path / "ck2").glob("step-*")) and not list((tmp_path / "ck3").glob("step-*"))
