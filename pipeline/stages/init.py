"""init: ``tokenizer/`` (+ a preset, or local pretrained weights) -> ``models/init/`` HF checkpoint.

* ``source: random``: a Llama of a preset shape (``tiny``, ``125m``, ``350m``, ``1b``; see
  :mod:`pipeline.models.llama` for the shapes and parameter counts), with any field overridden,
  initialised from ``seed``.
* ``source: pretrained``: a local Llama-family checkpoint. When its vocabulary is not ours, the
  input embedding (and an untied output head) is rebuilt for our tokenizer: rows of tokens both
  vocabularies hold (same token string) are copied, the other rows get the mean of the old
  tokens' rows (``new_token_init: mean``), N(0, initializer_range) (``random``), or the stage
  refuses (``forbid``). The hub is used only with ``allow_hub: true``.
* ``scale`` then changes the depth: ``{mode: down, drop_layers: [...]}`` removes layers (0-based);
  ``{mode: up, target_layers: N}`` is SOLAR depth up-scaling: two copies of the n-layer stack,
  the top k layers dropped from the first and the bottom k from the second (layers
  ``0..n-k-1`` then ``k..n-1``, N = 2(n-k); 12 -> 16 uses k = 4).

The vocabulary is ``len(tokenizer)`` rounded up to ``pad_vocab_multiple``; BOS/EOS/PAD ids go
into the model config and generation config. The output is ``save_pretrained`` (safetensors)
plus the tokenizer files, so ``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained`` load it.
All checks on the inputs (folder, architecture, tokenizer, vocabulary) run before any weights
are loaded.
"""

from __future__ import annotations

import copy
import os
import tempfile
from typing import Any


from pipeline.config import SHAPE_FIELDS, DownScale, InitConfig, UpScale  # noqa: F401  (re-exported)
from pipeline.errors import ConfigError, InputError, PipelineError
from pipeline.runner import StageContext
from pipeline.storage import OutputDir

NAME = "init"
INPUTS = ["tokenizer"]
OUTPUT = "models/init"

SMOKE_TEXT = "Қазақстан Республикасы. Москва — столица России. The quick brown fox."

# ------------------------------------------------------------------------------------ config


def _special_ids(tokenizer: Any) -> dict[str, int | None]:
    return {"bos_id": tokenizer.bos_token_id, "eos_id": tokenizer.eos_token_id, "pad_id": tokenizer.pad_token_id}


def _random_model(cfg: InitConfig, vocab: int, ids: dict[str, int | None]) -> tuple[Any, dict[str, Any]]:
    import torch
    from transformers import LlamaForCausalLM

    from pipeline.models.llama import llama_config

    config = llama_config(cfg.shape(), vocab, initializer_range=cfg.initializer_range, **ids)
    torch.manual_seed(cfg.seed)
    return LlamaForCausalLM(config), {}


def _pretrained_model(cfg: InitConfig, ctx: StageContext, tokenizer: Any, vocab: int, ids: dict[str, int | None]) -> tuple[Any, dict[str, Any]]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.models import llama as L

    # every check before any weights are read
    folder = L.resolve_pretrained(cfg.pretrained_path or "", cfg.allow_hub)
    L.check_pretrained(folder)
    old_config = LlamaConfig.from_pretrained(folder, local_files_only=True)
    old_tok = L.load_tokenizer(folder, "pretrained model's")
    match = L.match_vocab(L.tokenizer_tokens(tokenizer), old_tok.get_vocab(), old_config.vocab_size)
    if match.matched == 0:
        raise InputError(
            f"none of our {match.n_tokens} tokens exists in the vocabulary of {cfg.pretrained_path} "
            "(different tokenizer family?): nothing to transfer"
        )
    if match.new_ids and cfg.new_token_init == "forbid":
        sample = ", ".join(repr(tokenizer.convert_ids_to_tokens(i)) for i in match.new_ids[:5])
        raise InputError(
            f"{len(match.new_ids)} of our {match.n_tokens} tokens are not in the vocabulary of {cfg.pretrained_path} "
            f"(e.g. {sample}) and new_token_init is 'forbid'"
        )
    ctx.log(f"init: {cfg.pretrained_path}: {match.matched} of our {match.n_tokens} tokens matched, {len(match.new_ids)} new")
    if match.matched < match.n_tokens / 2:
        ctx.log("init: warning: fewer than half of our tokens matched: tokens are matched by string, so a tokenizer "
                "with another byte/space convention (SentencePiece '▁' vs byte-level 'Ġ') shares few of them")

    old = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True)
    sd = dict(old.state_dict())
    tied = bool(old_config.tie_word_embeddings)
    gen = torch.Generator().manual_seed(cfg.seed)
    std = float(getattr(old_config, "initializer_range", 0.02))
    info: dict[str, Any] = {
        "pretrained_vocab_size": old_config.vocab_size,
        "pretrained_tokenizer_size": len(old_tok),
        "vocab_matched": match.matched,
        "vocab_new": len(match.new_ids),
        "vocab_padding": vocab - match.n_tokens,
        "vocab_identical": match.identical and vocab == old_config.vocab_size,
    }
    if not info["vocab_identical"]:
        sd["model.embed_tokens.weight"] = L.transfer_vocab(
            sd["model.embed_tokens.weight"], match, vocab, cfg.new_token_init if cfg.new_token_init != "forbid" else "mean",
            generator=gen, std=std,
        )
        if tied:
            sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
        else:
            sd["lm_head.weight"] = L.transfer_vocab(
                sd["lm_head.weight"], match, vocab, cfg.new_token_init if cfg.new_token_init != "forbid" else "mean",
                generator=gen, std=std,
            )
    config = copy.deepcopy(old.config)
    del old
    config.vocab_size = vocab
    config.bos_token_id, config.eos_token_id, config.pad_token_id = ids["bos_id"], ids["eos_id"], ids["pad_id"]
    if cfg.max_position_embeddings is not None:
        config.max_position_embeddings = cfg.max_position_embeddings
    if cfg.rope_theta is not None:
        config.rope_theta = cfg.rope_theta
    info["pretrained_files"] = {
        f: os.path.getsize(os.path.join(folder, f)) for f in sorted(os.listdir(folder)) if f.endswith((".safetensors", ".bin", ".json"))
    }
    return L.build_from_state_dict(config, sd), info


def _scale(cfg: InitConfig, model: Any) -> tuple[Any, dict[str, Any]]:
    from pipeline.models import llama as L

    n = model.config.num_hidden_layers
    try:
        if isinstance(cfg.scale, DownScale):
            layer_map = L.drop_layer_map(n, cfg.scale.drop_layers)
        else:
            layer_map = L.solar_layer_map(n, cfg.scale.target_layers)  # type: ignore[union-attr]
    except ValueError as exc:
        raise ConfigError(f"scale: {exc}") from None
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = len(layer_map)
    scaled = L.build_from_state_dict(config, L.remap_layers(dict(model.state_dict()), layer_map))
    info = {"mode": cfg.scale.mode, "from_layers": n, "to_layers": len(layer_map), "layer_map": layer_map}  # type: ignore[union-attr]
    if isinstance(cfg.scale, UpScale):
        info["recipe"] = cfg.scale.recipe
        info["k"] = n - len(layer_map) // 2
    return scaled, info


def _smoke(model: Any, tokenizer: Any) -> None:
    """One short forward pass: the saved model must produce finite logits."""
    import torch

    ids = tokenizer(SMOKE_TEXT, add_special_tokens=False)["input_ids"][:16]
    if tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id, *ids]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    if not torch.isfinite(logits).all():
        raise PipelineError("the initialised model produces non-finite logits; check the source weights and dtype")


def run(cfg: InitConfig, ctx: StageContext, out: OutputDir) -> dict[str, Any]:
    import torch
    from transformers import GenerationConfig

    from pipeline.models import llama as L

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = L.load_tokenizer(ctx.inputs["tokenizer"].download(tmp), "pipeline's")
    vocab = L.padded_vocab(len(tokenizer), cfg.pad_vocab_multiple)
    ids = _special_ids(tokenizer)
    if cfg.source == "random":
        model, info = _random_model(cfg, vocab, ids)
    else:
        model, info = _pretrained_model(cfg, ctx, tokenizer, vocab, ids)
    scale_info: dict[str, Any] = {"mode": "none"}
    if cfg.scale is not None:
        model, scale_info = _scale(cfg, model)
        ctx.log(f"init: scaled {scale_info['from_layers']} -> {scale_info['to_layers']} layers: {scale_info['layer_map']}")
    model = model.to(torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=ids["bos_id"], eos_token_id=ids["eos_id"], pad_token_id=ids["pad_id"]
    )
    _smoke(model, tokenizer)
    counts = L.param_counts(model)
    shape = L.shape_of(model.config)

    with tempfile.TemporaryDirectory() as tmp:
        target = out.path() if out.storage.is_local else tmp  # save big checkpoints in place when we can
        model.save_pretrained(target, safe_serialization=True)
        tokenizer.save_pretrained(target)
        for name in os.listdir(target):  # safetensors writes 0600; other pods (other users) read this
            path = os.path.join(target, name)
            os.chmod(path, os.stat(path).st_mode | 0o044)
        if not out.storage.is_local:
            out.put_local(tmp)

    metrics: dict[str, Any] = {
        "source": cfg.source,
        "preset": cfg.preset,
        "pretrained_path": cfg.pretrained_path,
        "params_total": counts["total"],
        "params_embedding": counts["embedding"],
        "params_lm_head": counts["lm_head"],
        "params_non_embedding": counts["non_embedding"],
        "layers": shape.num_layers,
        "hidden_size": shape.hidden_size,
        "intermediate_size": shape.intermediate_size,
        "heads": shape.num_heads,
        "kv_heads": shape.num_kv_heads,
        "max_position_embeddings": shape.max_position_embeddings,
        "rope_theta": shape.rope_theta,
        "tie_word_embeddings": shape.tie_word_embeddings,
        "vocab_size": vocab,
        "tokenizer_size": len(tokenizer),
        **{k: v for k, v in ids.items()},
        "dtype": cfg.dtype,
        "scale": scale_info,
        **info,
    }
    return metrics


def summary(m: dict[str, Any]) -> list[tuple[str, Any]]:
    src = m["source"] + (f" ({m['preset']})" if m.get("preset") else f" ({m['pretrained_path']})")
    rows: list[tuple[str, Any]] = [
        ("source", src),
        ("parameters", f"{m['params_total']:,} ({m['params_non_embedding']:,} non-embedding)"),
        ("layers / hidden / ffn", f"{m['layers']} / {m['hidden_size']} / {m['intermediate_size']}"),
        ("heads / kv heads", f"{m['heads']} / {m['kv_heads']}"),
        ("vocab", f"{m['vocab_size']:,} rows for {m['tokenizer_size']:,} tokens"),
        ("dtype", m["dtype"] + (", tied embeddings" if m["tie_word_embeddings"] else "")),
    ]
    if "vocab_matched" in m:
        rows.append(("vocab transfer", "identical" if m["vocab_identical"] else f"{m['vocab_matched']:,} matched, {m['vocab_new']:,} new"))
    sc = m.get("scale") or {}
    if sc.get("mode", "none") != "none":
        rows.append((f"scaled {sc['mode']}", f"{sc['from_layers']} -> {sc['to_layers']} layers {sc['layer_map']}"))
    return rows
