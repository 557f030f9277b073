"""`llmpipe run quantize` with the 4-bit calibrated variants, GPTQ and AWQ (llm-compressor), on a tiny trained
Llama whose widths are multiples of the default group size (hidden 128, MLP 256): calibration on the run's own
validation blocks (not the ones perplexity is measured on), compressed-tensors folders that transformers loads
back, their rows in the metrics and report.md; and the clear errors (group size that does not divide the widths,
an invalid group size).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("llmcompressor", reason="the `quantize` extra (pip install -e '.[quantize]') is not installed")

from pipeline.cli import main  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
DEMO_CFG = str(REPO / "jobs" / "demo" / "quantize.yaml")
FAST = ("--set", "max_blocks=8", "--set", "llamacpp=off", "--set", "calibration.samples=8", "--set", "awq.n_grid=5",
        "--set", "gptq.group_size=128", "--set", "awq.group_size=128")


@pytest.fixture(scope="module")
def template_root(tmp_path_factory) -> Path:
    from tests.fixtures.quantize_model import commit_run_root

    root = tmp_path_factory.mktemp("quantize-w4-template")
    commit_run_root(root, hidden=128, steps=60)
    return root


def _run(root: Path, *extra: str) -> int:
    return main(["run", "quantize", "-c", DEMO_CFG, "--root", str(root), "--no-progress", *FAST, *extra])


def test_gptq_and_awq_variants(run_root, capsys):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    assert _run(run_root, "--set", "variants=[gptq,awq]") == 0
    out = capsys.readouterr().out
    assert "== quantize: done" in out and "gptq" in out and "awq" in out

    manifest = json.loads((run_root / "quantized" / "manifest.json").read_text(encoding="utf-8"))
    m = manifest["metrics"]
    orig = m["original"]
    assert set(m["variants"]) == {"gptq", "awq"}
    # calibration: 8 sequences of the shards' 64-token blocks from the val split, none of them a perplexity block
    # (the val split has 34 blocks, perplexity reads 8)
    assert m["calibration"] == {"split": "val", "samples": 8, "seq_len": 64, "tokens": 512, "blocks": 8,
                                "blocks_shared_with_eval": 0}
    assert m["llmcompressor"]["llmcompressor"] and m["llmcompressor"]["compressed_tensors"]
    files = {f["path"] for f in manifest["files"]}
    original = AutoModelForCausalLM.from_pretrained(run_root / "models" / "dpo").eval()
    ids = torch.tensor([[0, 5, 17, 42, 99, 7, 300, 12]])
    with torch.no_grad():
        ref = original(ids).logits
    for name, v in m["variants"].items():
        folder = run_root / "quantized" / name
        assert v["path"] == name and v["method"] == name and v["group_size"] == 128
        assert {f"{name}/config.json", f"{name}/model.safetensors", f"{name}/tokenizer.json", f"{name}/recipe.yaml"} <= files
        # the checkpoint is compressed-tensors with 4-bit integer weight groups of 128, the head left in float
        qc = json.loads((folder / "config.json").read_text(encoding="utf-8"))["quantization_config"]
        assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
        weights = qc["config_groups"]["group_0"]["weights"]
        assert (weights["num_bits"], weights["type"], weights["strategy"], weights["group_size"]) == (4, "int", "group", 128)
        assert qc["ignore"] == ["lm_head"]
        with safe_open(str(folder / "model.safetensors"), "pt") as f:
            keys = set(f.keys())
            packed = f.get_tensor("model.layers.0.mlp.down_proj.weight_packed")
            scale = f.get_tensor("model.layers.0.mlp.down_proj.weight_scale")
        assert "model.layers.0.self_attn.q_proj.weight" not in keys  # replaced by weight_packed + weight_scale
        assert packed.dtype == torch.int32 and tuple(packed.shape) == (128, 256 // 8)  # 8 nibbles per int32
        assert tuple(scale.shape) == (128, 256 // 128)  # one scale per 128 inputs
        # sizes: the packed weights are smaller than the float32 original (embeddings stay float)
        assert 0 < v["size_bytes"] < 0.5 * orig["size_bytes"] and v["size_ratio"] < 0.5
        # the perplexity delta is measured, finite, and small for 4-bit weights of a trained model
        assert math.isfinite(v["perplexity"]) and math.isfinite(v["perplexity_delta_pct"])
        assert v["perplexity_delta_pct"] == pytest.approx(100 * (v["perplexity"] - orig["perplexity"]) / orig["perplexity"], abs=1e-3)
        assert abs(v["perplexity_delta_pct"]) < 10, v
        assert v["seconds"] > 0 and 0 < v["quantize_seconds"] <= v["seconds"]
        # transformers loads the folder (its compressed-tensors quantizer) and predicts like the original
        back = AutoModelForCausalLM.from_pretrained(folder).eval()
        assert back.config.quantization_config is not None
        with torch.no_grad():
            logits = back(ids).logits
        assert torch.isfinite(logits).all()
        assert (logits.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.75
        gen = back.generate(ids, max_new_tokens=4, do_sample=False)
        assert gen.shape == (1, ids.shape[1] + 4)

    report = (run_root / "quantized" / "report.md").read_text(encoding="utf-8")
    for name, v in m["variants"].items():
        assert f"| {name} | `{name}` | {v['size_bytes'] / 1e6:.2f} MB |" in report and f"{v['perplexity_delta_pct']:+.2f}%" in report
        assert f"vllm serve quantized/{name}" in report
    assert "GPTQ / AWQ calibration: 8 sequences x 64 tokens from 8 blocks of split `val`" in report


def test_group_size_that_does_not_divide_the_widths(template_root, capsys):
    # 96 does not divide hidden 128 / MLP 256: refused before any compute, naming the widths and what to write
    assert _run(template_root, "--set", "variants=[int8,gptq]", "--set", "gptq.group_size=96") == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "gptq.group_size 96 does not divide hidden_size (q/k/v/gate/up_proj inputs) = 128" in err
    assert "set `gptq.group_size: 64`" in err and "-1 for one scale per output channel" in err
    assert not (template_root / "quantized").exists()


def test_group_size_config_errors(template_root, capsys):
    assert _run(template_root, "--set", "variants=[awq]", "--set", "awq.group_size=0") == 2
    err = capsys.readouterr().err
    assert "group_size 0" in err and "-1 for one scale per output channel" in err
    assert _run(template_root, "--set", "variants=[gptq,awq,gptqq]") == 2
    assert "unknown variant 'gptqq'" in capsys.readouterr().err


def test_calibration_skips_the_perplexity_blocks(template_root):
    from pipeline.quantization import quality, w4
    from pipeline.storage import Storage

    url = Storage(str(template_root)).path("shards")
    avoid = lambda n: quality.eval_indices(n, 8)  # noqa: E731
    data, facts = w4.calibration_samples(url, "val", 12, 32, avoid=avoid)
    assert data.shape == (12, 32) and facts["blocks"] == 6 and facts["blocks_shared_with_eval"] == 0
    evals = quality.eval_blocks(url, "val", 8)
    assert not any((data[i] == e[:32]).all() or (data[i] == e[32:]).all() for i in range(12) for e in evals)
    # more sequences than the blocks outside the perplexity ones: all of those, then shared ones, said so
    data, facts = w4.calibration_samples(url, "val", 40, None, avoid=avoid)
    n_val = len(quality.eval_blocks(url, "val", None))
    assert facts["blocks"] == min(40, n_val) and facts["blocks_shared_with_eval"] == facts["blocks"] - (n_val - 8)
    with pytest.raises(Exception, match="longer than the shards' blocks"):
        w4.calibration_samples(url, "val", 4, 128)
