"""What the quantize stage does, step by step (the stage module only hands over to :func:`quantize`).

1. Check everything that can be checked before any compute: a Llama / Qwen2 / Qwen3 checkpoint, a byte-level
   BPE tokenizer when a GGUF variant is asked for, token ids of the shards inside the model's
   vocabulary, llama-cpp-python when ``llamacpp: require``.
2. Perplexity of the original (float32) on the evaluation blocks.
3. Each variant: write it, load it back from what was written, measure it; GGUF files also
   under llama.cpp when available (perplexity, greedy tokens vs the HF model).
4. ``report.md`` and the metrics.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
import time
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from pipeline.errors import InputError, PipelineError
from pipeline.quantization import gguf_export, int8, quality, w4

GGUF_TARGETS = {"gguf-f16": "F16", "gguf-q8_0": "Q8_0", "gguf-q4_0": "Q4_0"}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json")


def _model_weight_bytes(manifest: dict[str, Any]) -> int:
    files = manifest.get("files", [])
    return sum(int(f["size"]) for f in files if "/" not in f["path"] and f["path"].endswith(_WEIGHT_SUFFIXES))


def _load_config(folder: str, name: str) -> Any:
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise InputError(f"{name}/ has no config.json: not a Hugging Face checkpoint")
    try:
        return AutoConfig.from_pretrained(folder)
    except (ValueError, KeyError, OSError) as exc:
        raise InputError(f"{name}/config.json cannot be read by transformers: {str(exc).splitlines()[0]}") from None


def _tokenizer_folder(cfg: Any, ctx: Any, model_folder: str, tmp: str) -> str | None:
    if os.path.isfile(os.path.join(model_folder, "tokenizer.json")):
        return model_folder
    if cfg.tokenizer:
        folder = ctx.inputs[cfg.tokenizer].download(os.path.join(tmp, "tokenizer"))
        if os.path.isfile(os.path.join(folder, "tokenizer.json")):
            return folder
        raise InputError(f"{cfg.tokenizer}/ has no tokenizer.json")
    return None


def quantize(cfg: Any, ctx: Any, out: Any) -> dict[str, Any]:
    art = ctx.inputs[cfg.model]
    wanted_gguf = [v for v in cfg.variants if v in GGUF_TARGETS]
    tmp = tempfile.mkdtemp(prefix="llmpipe-quantize-")
    try:
        # ---------------------------------------------------------------- 1. checks before compute
        folder = art.download(os.path.join(tmp, "model"))
        config = _load_config(folder, cfg.model)
        dims = gguf_export.model_dims(config, f"{cfg.model}/")  # llama / qwen2 / qwen3, else one line naming them
        variant_names = list(cfg.variants)
        problem = gguf_export.gguf_problem(config, f"{cfg.model}/") if wanted_gguf else None
        if problem:  # the GGUF variants cannot be written; the others still are
            variant_names = [v for v in variant_names if v not in GGUF_TARGETS]
            if not variant_names:
                raise InputError(f"{problem}; no other variant was asked for (add int8)")
            ctx.log(f"quantize: skipping {', '.join(wanted_gguf)}: {problem}")
            wanted_gguf = []
        tok_folder = _tokenizer_folder(cfg, ctx, folder, tmp)
        wanted_w4 = [v for v in cfg.variants if v in w4.METHODS]
        w4_libs = w4.require_library(wanted_w4) if wanted_w4 else None
        if wanted_w4 and tok_folder is None:
            raise InputError(f"{cfg.model}/ has no tokenizer.json and no `tokenizer` artifact is configured; "
                             f"{', '.join(wanted_w4)} save it next to the weights (vLLM serves the folder)")
        for v in wanted_w4:
            w4.check_group_size(config, getattr(cfg, v).group_size, v, f"{cfg.model}/")
        meta = None
        if wanted_gguf:
            if tok_folder is None:
                raise InputError(f"{cfg.model}/ has no tokenizer.json and no `tokenizer` artifact is configured; "
                                 "the GGUF variants need the tokenizer")
            meta = gguf_export.tokenizer_meta(tok_folder, dims.vocab_size, config, pre=cfg.gguf.pre_tokenizer)
        cpp = quality.llama_cpp_version() if cfg.llamacpp != "off" and wanted_gguf else None
        if cfg.llamacpp == "require" and wanted_gguf and cpp is None:
            raise PipelineError("llamacpp: require, but llama_cpp (llama-cpp-python) does not import here; "
                                "`make test-llamacpp` builds it into .venv, or set llamacpp: auto")
        shards = ctx.inputs[cfg.shards]
        opts = ctx.storage.storage_options if not ctx.storage.is_local else None
        blocks = quality.eval_blocks(shards.url(), cfg.split, cfg.max_blocks, storage_options=opts)
        if int(blocks.max()) >= dims.vocab_size:
            raise InputError(f"{cfg.shards}/ holds token id {int(blocks.max())}, outside the model's vocabulary of "
                             f"{dims.vocab_size}: were the shards packed with this model's tokenizer?")
        calib, calib_facts = None, None
        if wanted_w4:
            c = cfg.calibration
            calib, calib_facts = w4.calibration_samples(
                shards.url(), c.split, c.samples, c.seq_len, storage_options=opts,
                avoid=(lambda n: quality.eval_indices(n, cfg.max_blocks)) if c.split == cfg.split else None)
            if int(calib.max()) >= dims.vocab_size:
                raise InputError(f"{cfg.shards}/{c.split} holds token id {int(calib.max())}, outside the model's "
                                 f"vocabulary of {dims.vocab_size}")
        tokenizer = AutoTokenizer.from_pretrained(tok_folder) if tok_folder else None
        prompt_ids = list(tokenizer(cfg.prompt)["input_ids"]) if tokenizer is not None else None
        ctx.log(f"quantize: {cfg.model}/ ({dims.n_layers} layers, hidden {dims.hidden}, vocab {dims.vocab_size}"
                f"{', tied' if dims.tied else ''}); {len(blocks)} x {blocks.shape[1]} tokens of {cfg.shards}/{cfg.split}; "
                f"variants {', '.join(variant_names)}; llama.cpp {cpp or 'not used'}")

        # ---------------------------------------------------------------- 2. the original
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        model.eval()
        t0 = time.perf_counter()
        ppl0 = quality.perplexity(model, blocks, batch_size=cfg.batch_size,
                                  bar=lambda it: ctx.bar(it, desc="perplexity original", unit="batch"))
        size0 = _model_weight_bytes(art.manifest)
        saved_dtype = str(getattr(config, "dtype", None) or "float32").replace("torch.", "")
        original = {"size_bytes": size0, "perplexity": round(ppl0, 6), "dtype": saved_dtype}
        ctx.log(f"original: {size0 / 1e6:.2f} MB, perplexity {ppl0:.4f} ({time.perf_counter() - t0:.1f}s)")
        ref_greedy = quality.hf_greedy(model, prompt_ids, cfg.greedy_tokens) if cpp and prompt_ids else None

        # ---------------------------------------------------------------- 3. the variants
        variants: dict[str, dict[str, Any]] = {}
        gguf_results: dict[str, gguf_export.ExportResult] = {}
        base = cfg.model.rstrip("/").split("/")[-1] or "model"
        for name in variant_names:
            t0 = time.perf_counter()
            if name == "int8":
                local = os.path.join(tmp, "out", "int8")
                qmodel = int8.quantize_int8(copy.deepcopy(model), cfg.int8.exclude)
                n_mod = int8.quantized_modules(qmodel)
                size = int8.save_int8(qmodel, local, tokenizer)
                del qmodel
                back = int8.load_int8(local)  # measured as loaded back from disk
                ppl = quality.perplexity(back, blocks, batch_size=cfg.batch_size,
                                         bar=lambda it: ctx.bar(it, desc="perplexity int8", unit="batch"))
                del back
                out.put_local(local, "int8")
                entry: dict[str, Any] = {"path": "int8", "format": "optimum-quanto qint8 weights (W8A16)",
                                         "quantized_modules": n_mod}
            elif name in w4.METHODS:
                local = os.path.join(tmp, "out", name)
                settings = getattr(cfg, name)
                t1 = time.perf_counter()
                size = w4.quantize_w4(copy.deepcopy(model), name, settings, calib, tokenizer, local, log=ctx.log)
                quantize_s = time.perf_counter() - t1
                qc = w4.quantization_config(local)
                back = w4.load_w4(local)  # transformers' compressed-tensors loader, as a user would
                ppl = quality.perplexity(back, blocks, batch_size=cfg.batch_size,
                                         bar=lambda it, n=name: ctx.bar(it, desc=f"perplexity {n}", unit="batch"))
                del back
                out.put_local(local, name)
                entry = {"path": name, "format": f"compressed-tensors {qc.get('format')} W4A16 ({name.upper()}, "
                                                 f"group {settings.group_size}, llm-compressor {w4_libs['llmcompressor']})",
                         "method": name, "group_size": settings.group_size, "symmetric": settings.symmetric,
                         "ignore": list(settings.ignore), "quant_method": qc.get("quant_method"),
                         "calibration": calib_facts, "quantize_seconds": round(quantize_s, 2)}
            else:
                target = GGUF_TARGETS[name]
                rel = f"gguf/{base}-{target.lower()}.gguf"
                local = os.path.join(tmp, "out", rel)
                os.makedirs(os.path.dirname(local), exist_ok=True)
                state = model.state_dict()
                with ctx.bar(total=len(state) - int(dims.tied), desc=f"write {rel}", unit="tensor") as wbar:
                    res = gguf_export.write_gguf(local, state, config, tok_folder, target, name=base,
                                                 q4_keep_head_q8=cfg.gguf.q4_keep_head_q8, pre=cfg.gguf.pre_tokenizer,
                                                 extra={"general.source.llmpipe_artifact": cfg.model}, meta=meta,
                                                 progress=lambda _name: wbar.update(1))
                gguf_results[name] = res
                size = res.size_bytes
                state, _ = gguf_export.read_gguf_state_dict(local)
                back = copy.deepcopy(model)
                missing, unexpected = back.load_state_dict(state, strict=False)
                if unexpected or set(missing) - ({"lm_head.weight"} if dims.tied else set()):
                    raise PipelineError(f"{rel} does not load back into the model: missing {missing}, unexpected {unexpected}")
                ppl = quality.perplexity(back, blocks, batch_size=cfg.batch_size,
                                         bar=lambda it, n=name: ctx.bar(it, desc=f"perplexity {n}", unit="batch"))
                del back, state
                entry = {"path": rel, "format": f"GGUF {target}", "tensor_types": res.type_counts(),
                         "f16_fallbacks": len(res.fallbacks)}
                if cpp:
                    threads = cfg.threads or os.cpu_count() or 1
                    entry["llamacpp_perplexity"] = round(quality.llamacpp_perplexity(
                        local, blocks, threads=threads, bar=lambda it, n=name: ctx.bar(it, desc=f"llama.cpp {n}", unit="block")), 6)
                    if prompt_ids:
                        got = quality.llamacpp_greedy(local, prompt_ids, cfg.greedy_tokens, threads=threads)
                        entry["llamacpp_greedy_match"] = got == ref_greedy
                        entry["llamacpp_greedy_tokens"] = got
                out.put_local(local, os.path.dirname(rel))  # put_local(file, folder) keeps the file name
                os.remove(local)
            entry.update(size_bytes=int(size), size_ratio=round(size / size0, 4) if size0 else None,
                         perplexity=round(ppl, 6), perplexity_delta_pct=quality.delta_pct(ppl, ppl0),
                         seconds=round(time.perf_counter() - t0, 2))
            variants[name] = entry
            ctx.log(f"{name}: {size / 1e6:.2f} MB, perplexity {ppl:.4f} ({entry['perplexity_delta_pct']:+.2f}%)"
                    + (f", llama.cpp {entry['llamacpp_perplexity']:.4f}" if "llamacpp_perplexity" in entry else "")
                    + (f", greedy {'matches' if entry['llamacpp_greedy_match'] else 'differs from'} HF"
                       if "llamacpp_greedy_match" in entry else "") + f" ({entry['seconds']:.1f}s)")

        # ---------------------------------------------------------------- 4. report and metrics
        metrics: dict[str, Any] = {
            "model": cfg.model,
            "original": original,
            "variants": variants,
            "eval_split": cfg.split,
            "eval_blocks": int(len(blocks)),
            "seq_len": int(blocks.shape[1]),
            "eval_predictions": int(len(blocks) * (blocks.shape[1] - 1)),
            "llamacpp": cpp,
            "greedy_reference_tokens": ref_greedy,
            "tied_embeddings": dims.tied,
            "architecture": dims.arch,  # llama.cpp's: llama, qwen2, qwen3
        }
        if calib_facts is not None:
            metrics["calibration"] = calib_facts
            metrics["llmcompressor"] = w4_libs
        if meta is not None:
            metrics["gguf_tokenizer"] = meta.summary()
        out.write_text("report.md", render_report(metrics, cfg))
        return metrics
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------- report.md


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.2f} MB"


def render_report(m: dict[str, Any], cfg: Any) -> str:
    orig = m["original"]
    lines = [
        f"# Quantization of `{m['model']}/`",
        "",
        f"Perplexity on {m['eval_blocks']} blocks x {m['seq_len']} tokens of `{cfg.shards}/` split `{m['eval_split']}` "
        f"({m['eval_predictions']} next-token predictions), the same blocks for every row. "
        "GGUF rows: the file dequantized back into the transformers model"
        + ("; the llama.cpp column runs the file itself." if m.get("llamacpp") else
           "; llama.cpp was not used (install llama-cpp-python, e.g. `make test-llamacpp`, to add its column)."),
        "",
        "| variant | path | size | vs original | perplexity | delta | time | llama.cpp perplexity | greedy = HF |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
        f"| original | `{m['model']}/` | {_mb(orig['size_bytes'])} | 1.00x | {orig['perplexity']:.4f} | | | | |",
    ]
    for name, v in m["variants"].items():
        cpp = f"{v['llamacpp_perplexity']:.4f}" if v.get("llamacpp_perplexity") is not None else ""
        greedy = {True: "yes", False: "no", None: ""}[v.get("llamacpp_greedy_match")]
        ratio = f"{v['size_ratio']:.2f}x" if v.get("size_ratio") else ""
        secs = f"{v['seconds']:.1f} s" if v.get("seconds") is not None else ""
        lines.append(f"| {name} | `{v['path']}` | {_mb(v['size_bytes'])} | {ratio} | {v['perplexity']:.4f} | "
                     f"{v['perplexity_delta_pct']:+.2f}% | {secs} | {cpp} | {greedy} |")
    lines += ["", "Sizes are the weight files for the original, int8 (safetensors, quanto's map) and GPTQ / AWQ "
              "(safetensors), the whole file for GGUF (it carries the tokenizer too). Time: making the variant, "
              "writing it, loading it back and measuring it (GPTQ / AWQ: calibration included).", ""]
    cal = m.get("calibration")
    if cal:
        shared = (f"; {cal['blocks_shared_with_eval']} of them also among the perplexity blocks (the split has too few "
                  "others)" if cal.get("blocks_shared_with_eval") else ", none of them among the perplexity blocks")
        lines += [f"GPTQ / AWQ calibration: {cal['samples']} sequences x {cal['seq_len']} tokens from {cal['blocks']} "
                  f"blocks of split `{cal['split']}`{shared}; llm-compressor {m['llmcompressor']['llmcompressor']}, "
                  f"compressed-tensors {m['llmcompressor']['compressed_tensors']}.", ""]
    gg = {k: v for k, v in m["variants"].items() if k.startswith("gguf-")}
    if gg:
        lines += ["## Tensor types", ""]
        for name, v in gg.items():
            types = ", ".join(f"{k}: {n}" for k, n in v["tensor_types"].items())
            fb = f"; {v['f16_fallbacks']} matrices kept in F16 (rows not a whole number of blocks)" if v["f16_fallbacks"] else ""
            lines.append(f"- {name}: {types}{fb}")
        lines.append("")
    lines += ["## Loading", ""]
    if "int8" in m["variants"]:
        lines += ["int8 (optimum-quanto, int8 weights with per-channel scales, float activations):", "", "```python",
                  "from optimum.quanto import QuantizedModelForCausalLM",
                  "from transformers import AutoTokenizer",
                  f"model = QuantizedModelForCausalLM.from_pretrained(\"quantized/{m['variants']['int8']['path']}\")",
                  f"tokenizer = AutoTokenizer.from_pretrained(\"quantized/{m['variants']['int8']['path']}\")",
                  "```", ""]
    w4v = {k: v for k, v in m["variants"].items() if k in w4.METHODS}
    for name, v in w4v.items():
        lines += [f"{name} (4-bit weights, group size {v['group_size']}, compressed-tensors `pack-quantized`): a "
                  "Hugging Face folder; transformers loads it (with compressed-tensors installed), vLLM serves it:",
                  "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
                  f"model = AutoModelForCausalLM.from_pretrained(\"quantized/{v['path']}\")",
                  f"tokenizer = AutoTokenizer.from_pretrained(\"quantized/{v['path']}\")",
                  "```", "", "```", f"vllm serve quantized/{v['path']}", "```", ""]
    if gg:
        first = next(iter(gg.values()))["path"]
        lines += [f"GGUF (llama.cpp, {m.get('architecture') or 'llama'} architecture):", "", "```",
                  f"llama-cli -m quantized/{first} -p \"...\"",
                  f"python -c 'from llama_cpp import Llama; Llama(model_path=\"quantized/{first}\")'",
                  "```", ""]
        tok = m.get("gguf_tokenizer") or {}
        lines += ["## Tokenizer in the GGUF files", "",
                  f"Byte-level BPE as `tokenizer.ggml.model = gpt2`: {tok.get('tokens')} tokens "
                  f"({tok.get('padded_rows')} padding rows), {tok.get('merges')} merges, bos {tok.get('bos_id')}, "
                  f"eos {tok.get('eos_id')}, pad {tok.get('pad_id')}, end-of-turn {tok.get('eot_id')}, "
                  f"BOS prepended: {tok.get('add_bos')}, chat template: {'yes' if tok.get('chat_template') else 'no'}.",
                  "",
                  f"`tokenizer.ggml.pre = {tok.get('pre')}` ({tok.get('pre_reason')}). llama.cpp splits text with its "
                  "built-in regex of that name and does not apply the tokenizer's normaliser, so text it tokenizes itself "
                  "can get different (valid) ids than the HF tokenizer; token ids from the HF tokenizer behave the same "
                  "in both, which is how the greedy column is measured.", ""]
    return "\n".join(lines)
