"""init: ``tokenizer/`` (+ a preset, or local pretrained weights) -> ``models/init/`` HF checkpoint.

* ``source: random``: a Llama of a preset shape (``tiny``, ``125m``, ``350m``, ``1b``; see
  :mod:`pipeline.models.llama` for the shapes and parameter counts), with any field overridden,
  initialised from ``seed``: every weight matrix N(0, initializer_range) (``init_std: normal``, the Hugging Face
  Llama init), or with the residual branches' output projections (``o_proj``, ``down_proj``) at
  initializer_range / sqrt(2 x layers) (``init_std: depth_scaled``, GPT-2 / Megatron), so that each of the 2L
  residual additions starts as a small update and the residual stream's variance does not grow with depth.
* ``source: pretrained``: a local checkpoint of a supported family (``model_type`` llama, qwen2 -- Qwen2 and
  Qwen2.5 --, or qwen3; :mod:`pipeline.models.families`). When its vocabulary is not ours, the
  input embedding (and an untied output head) is rebuilt for our tokenizer: rows of tokens both
  vocabularies hold (same token string) are copied, the other rows get the mean of the old
  tokens' rows (``new_token_init: mean``), N(0, initializer_range) (``random``), or the stage
  refuses (``forbid``); when our tokenizer extends the checkpoint's (the tokenizer stage's ``extend``), a new
  token's rows start as the mean of the rows of its pieces under the checkpoint's tokenizer (``pieces``, what
  ``auto``, the default, picks then; :mod:`pipeline.models.vocab`). The hub is used only with ``allow_hub: true``.
* ``scale`` then changes the depth: ``{mode: down, drop_layers: [...]}`` removes layers (0-based);
  ``{mode: down, target_layers: N, select: importance}`` removes the run of ``layers - N`` consecutive
  layers whose output is closest in angle to its input on packed validation blocks (Gromov et al. 2024;
  :mod:`pipeline.models.importance`), the last layer kept; ``{mode: up, target_layers: N}`` is SOLAR depth
  up-scaling: two copies of the n-layer stack, the top k layers dropped from the first and the bottom k
  from the second (layers ``0..n-k-1`` then ``k..n-1``, N = 2(n-k); 12 -> 16 uses k = 4).
* ``validation: {artifact: shards}`` (needed by ``select: importance``, optional otherwise): the pack
  output whose validation blocks init measures: the perplexity of the model before and after scaling
  (the same blocks, in float32, before the ``dtype`` cast), and the layer-run scores.

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
from typing import Annotated, Any, Literal, Union

from pydantic import AliasChoices, Field, field_validator, model_validator

from pipeline.config import ArtifactName, StrictModel
from pipeline.errors import ConfigError, InputError, PipelineError
from pipeline.stage import Stage, StageContext
from pipeline.storage import OutputDir


class DownScale(StrictModel):
    """Remove layers: the ones named in ``drop_layers`` (0-based), or down to ``target_layers`` by dropping the
    contiguous run of ``layers - target_layers`` layers that ``select`` picks."""

    mode: Literal["down"]
    drop_layers: Annotated[list[int], Field(min_length=1)] | None = Field(
        None, description="0-based layers to remove, e.g. [10, 11] (or give target_layers instead)")
    target_layers: int | None = Field(
        None, ge=1, description="layers after down-scaling; `select` picks the run of consecutive layers to remove")
    select: Literal["importance"] | None = Field(
        None, description="with target_layers (default importance): the run whose output is closest in angle to its "
        "input on the `validation` blocks (mean over tokens of arccos(cos(h_l, h_l+n)) / pi, Gromov et al. 2024)")
    keep_last_layer: bool | None = Field(
        None, description="with target_layers (default true): never drop the last layer (it writes what the output "
        "head reads); false: runs ending at the last layer are candidates too")

    @field_validator("drop_layers")
    @classmethod
    def _valid(cls, value: list[int] | None) -> list[int] | None:
        if value is None:
            return None
        if any(i < 0 for i in value):
            raise ValueError("layer indices are 0-based and non-negative")
        if len(set(value)) != len(value):
            raise ValueError(f"drop_layers has repeats: {value}")
        return sorted(value)

    @model_validator(mode="after")
    def _one_way(self) -> "DownScale":
        if (self.drop_layers is None) == (self.target_layers is None):
            raise ValueError(
                "scale mode down takes exactly one of drop_layers: [i, j, ...] (the 0-based layers to remove) or "
                "target_layers: N with select: importance (the layers to keep; the run to drop is measured), "
                f"got {'both' if self.drop_layers is not None else 'neither'}")
        if self.drop_layers is not None:
            extra = [f for f in ("keep_last_layer", "select") if getattr(self, f) is not None]
            if extra:
                raise ValueError(f"{' and '.join(extra)} apply to target_layers; drop_layers names the layers itself")
        return self


class UpScale(StrictModel):
    """SOLAR depth up-scaling to ``target_layers`` (even, between n+1 and 2n for an n-layer base)."""

    mode: Literal["up"]
    target_layers: int = Field(..., ge=2, description="layers after up-scaling: 2 x (n - k)")
    recipe: Literal["solar"] = Field(
        "solar", validation_alias=AliasChoices("recipe", "copy"),
        description="how layers are copied (also accepted as `copy`); solar: layers 0..n-k-1 then k..n-1",
    )

    @field_validator("target_layers")
    @classmethod
    def _even(cls, value: int) -> int:
        if value % 2:
            raise ValueError(f"SOLAR up-scaling gives 2 x (n - k) layers, an even number; got {value}")
        return value


class ValidationBlocks(StrictModel):
    """Packed validation blocks (a pack output) that init measures the model on."""

    artifact: ArtifactName = Field(..., description="the pack output to read, e.g. shards")
    split: str = Field("val", description="split of the shards")
    max_blocks: int = Field(32, ge=1, description="blocks measured, spread evenly over the split")
    batch_size: int = Field(4, ge=1, description="blocks per forward pass")
    device: str = Field("auto", description="auto (cuda when visible), cpu, cuda, cuda:N; the model moves back to "
                                            "the CPU afterwards")


SHAPE_FIELDS = ("num_layers", "hidden_size", "intermediate_size", "num_heads", "num_kv_heads", "tie_word_embeddings")


class InitConfig(StrictModel):
    source: Literal["random", "pretrained"] = "random"
    preset: Literal["tiny", "125m", "350m", "1b"] | None = Field(
        None, description="model shape for source: random (tiny is a CPU-test size)"
    )
    # explicit overrides of the preset (source: random); the last two also apply to pretrained models
    num_layers: int | None = Field(None, ge=1)
    hidden_size: int | None = Field(None, ge=8)
    intermediate_size: int | None = Field(None, ge=1)
    num_heads: int | None = Field(None, ge=1)
    num_kv_heads: int | None = Field(None, ge=1, description="key/value heads (GQA); = num_heads for plain attention")
    tie_word_embeddings: bool | None = None
    max_position_embeddings: int | None = Field(None, ge=16)
    rope_theta: float | None = Field(None, gt=0)
    initializer_range: float = Field(0.02, gt=0, description="std of the random init (source: random)")
    init_std: Literal["normal", "depth_scaled"] = Field(
        "normal", description="source random: normal = N(0, initializer_range) for every weight matrix; depth_scaled = "
        "the residual output projections (o_proj, down_proj) at initializer_range / sqrt(2 x layers) (GPT-2/Megatron)")
    # pretrained weights
    pretrained_path: str | None = Field(
        None, description="local folder of an HF checkpoint with its tokenizer, model_type llama, qwen2 (Qwen2/2.5) or "
        "qwen3 (a hub id only with allow_hub)"
    )
    allow_hub: bool = Field(False, description="let pretrained_path be a Hugging Face hub id that is downloaded")
    new_token_init: Literal["auto", "pieces", "mean", "random", "forbid"] = Field(
        "auto", description="rows for our tokens the pretrained vocabulary lacks: pieces = the mean of the rows of the "
        "pieces the pretrained tokenizer cuts the token into (input and untied output head; added/special tokens get "
        "the mean), mean = the mean of the old rows, random = N(0, initializer_range), forbid = refuse to run when "
        "there are any; auto = pieces when our tokenizer extends the pretrained one (its tokens at their ids, ours "
        "after: the tokenizer stage's extend), else mean (pipeline/models/vocab.py)"
    )
    # vocabulary, depth, numerics
    pad_vocab_multiple: int = Field(64, ge=1, description="embedding rows = len(tokenizer) rounded up to this")
    scale: Annotated[Union[DownScale, UpScale], Field(discriminator="mode")] | None = None
    validation: ValidationBlocks | None = Field(
        None, description="packed validation blocks: perplexity before/after scaling, and what select: importance "
        "measures the layers on")
    dtype: Literal["float32", "bfloat16"] = "float32"
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> "InitConfig":
        if self.source == "random":
            if self.preset is None:
                raise ValueError("source 'random' needs a `preset` (tiny, 125m, 350m, 1b); override fields on top of it")
            if self.pretrained_path is not None:
                raise ValueError("pretrained_path is only read with source: pretrained")
            problems = self.shape().problems()
            if problems:
                raise ValueError("; ".join(problems))
        else:
            if not self.pretrained_path:
                raise ValueError("source 'pretrained' needs `pretrained_path` (a local model folder)")
            if self.init_std != "normal":
                raise ValueError("init_std applies to source: random; a pretrained model keeps its trained weights")
            if self.preset is not None:
                raise ValueError("preset applies to source: random; a pretrained model keeps its own shape (use `scale` for depth)")
            given = [f for f in SHAPE_FIELDS if getattr(self, f) is not None]
            if given:
                raise ValueError(
                    f"{', '.join(given)} cannot change a pretrained model's shape; only max_position_embeddings, "
                    "rope_theta and `scale` apply to it"
                )
        if isinstance(self.scale, DownScale) and self.scale.target_layers is not None:
            if self.validation is None:
                raise ValueError(
                    "scale select: importance measures the layers on packed validation blocks: add "
                    "`validation: {artifact: shards}` (the pack output; optionally split: val, max_blocks: 32)")
            layers = self.shape().num_layers if self.source == "random" else None
            if layers is not None and self.scale.target_layers >= layers:
                raise ValueError(f"scale.target_layers {self.scale.target_layers} must be below the model's "
                                 f"{layers} layers (down-scaling removes layers)")
        return self

    def shape(self) -> Any:
        from pipeline.models.llama import resolve_shape

        return resolve_shape(self.preset or "tiny", **{f: getattr(self, f) for f in (*SHAPE_FIELDS, "max_position_embeddings", "rope_theta")})


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
    model = LlamaForCausalLM(config)
    residual_std = depth_scaled_init(model, cfg.initializer_range) if cfg.init_std == "depth_scaled" else cfg.initializer_range
    return model, {"init_std": cfg.init_std, "initializer_range": cfg.initializer_range, "residual_out_std": residual_std}


RESIDUAL_OUTPUTS = ("self_attn.o_proj", "mlp.down_proj")  # the projections whose outputs are added to the residual stream


def depth_scaled_init(model: Any, std: float) -> float:
    """Redraw every decoder layer's residual output projections (``o_proj``, ``down_proj``) from
    N(0, std / sqrt(2 x layers)) (GPT-2, Radford et al. 2019 sec. 2.3; Megatron-LM's scaled_init_method_normal),
    in place, with the torch RNG as it stands; returns that std. Every other weight keeps its draw."""
    import math

    import torch

    layers = model.model.layers
    scaled = std / math.sqrt(2 * len(layers))
    with torch.no_grad():
        for layer in layers:
            for name in RESIDUAL_OUTPUTS:
                layer.get_submodule(name).weight.normal_(0.0, scaled)
    return scaled


def _pretrained_model(cfg: InitConfig, ctx: StageContext, tokenizer: Any, vocab: int, ids: dict[str, int | None]) -> tuple[Any, dict[str, Any]]:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from pipeline.models import llama as L
    from pipeline.models.families import tokenizer_reload_problem

    # every check before any weights are read
    folder = L.resolve_pretrained(cfg.pretrained_path or "", cfg.allow_hub)
    raw_config = L.check_pretrained(folder)
    reload = tokenizer_reload_problem(tokenizer, raw_config)
    if reload:  # e.g. a qwen2 folder: AutoTokenizer makes every later stage read a Qwen2Tokenizer
        raise InputError(f"{reload}. Use a tokenizer that {raw_config['model_type']} keeps: one extended from the "
                         "checkpoint's (the tokenizer stage's `extend`), or trained with pretokenizer: qwen2 and "
                         "<|endoftext|> in special_tokens.extra")
    old_config = AutoConfig.from_pretrained(folder, local_files_only=True)  # llama, qwen2 or qwen3 (checked above)
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

    old = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True)
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
        from pipeline.models import vocab as V

        ours = L.tokenizer_tokens(tokenizer)
        info["vocab_extends_pretrained"] = V.extends(ours, old_tok.get_vocab())
        init = info["new_token_init"] = V.resolve_init(cfg.new_token_init, info["vocab_extends_pretrained"])
        pieces = None
        if init == "pieces":  # each new token: the mean of the rows of its pieces under the pretrained tokenizer
            pieces = V.decompose(ours, match.new_ids, old_tok.backend_tokenizer, old_rows=old_config.vocab_size,
                                 added_ids=tokenizer.added_tokens_decoder,
                                 to_text=lambda t: tokenizer.convert_tokens_to_string([t]))
            info["new_token_pieces"] = pieces.stats()
        V.transfer_embeddings(sd, match, vocab, init, tied=tied, pieces=pieces, generator=gen, std=std)
    config = copy.deepcopy(old.config)
    del old
    config.vocab_size = vocab
    config.bos_token_id, config.eos_token_id, config.pad_token_id = ids["bos_id"], ids["eos_id"], ids["pad_id"]
    if cfg.max_position_embeddings is not None:
        config.max_position_embeddings = cfg.max_position_embeddings
    if cfg.rope_theta is not None:
        L.set_rope_theta(config, cfg.rope_theta)
    info["pretrained_files"] = {
        f: os.path.getsize(os.path.join(folder, f)) for f in sorted(os.listdir(folder)) if f.endswith((".safetensors", ".bin", ".json"))
    }
    return L.build_from_state_dict(config, sd), info


def _validation_blocks(cfg: InitConfig, ctx: StageContext, tokenizer: Any, vocab: int) -> Any:
    """The packed validation blocks of ``cfg.validation``, checked against our tokenizer (before any weights load)."""
    from pipeline.data.packed import PackedDataset
    from pipeline.evaluation.loading import check_against_shards

    v = cfg.validation
    assert v is not None
    art = ctx.inputs[v.artifact]
    blocks = PackedDataset(art.url(), v.split, storage_options=ctx.storage.storage_options)
    if not len(blocks):
        raise InputError(f"{art.url()} has no {v.split} blocks to measure on (pack with val_fraction > 0, or name "
                         "another split in validation.split)")
    check_against_shards(tokenizer, {"vocab_size": vocab}, blocks.index, "init's tokenizer/", blocks.block(0))
    return blocks


def _perplexity(model: Any, blocks: Any, cfg: InitConfig, ctx: StageContext, desc: str) -> dict[str, Any]:
    """Loss and perplexity of ``model`` on the validation blocks (the code evaluate and the training stages use)."""
    from pipeline.evaluation.loading import pick_device
    from pipeline.evaluation.perplexity import shard_loss

    v = cfg.validation
    assert v is not None
    device = pick_device(v.device)
    model.to(device).eval()
    try:
        return shard_loss(model, blocks, max_blocks=v.max_blocks, batch_size=v.batch_size, device=device,
                          bar=lambda it, **kw: ctx.bar(it, **{**kw, "desc": desc}))
    finally:
        model.to("cpu")


def _scale(cfg: InitConfig, model: Any, blocks: Any = None, ctx: StageContext | None = None) -> tuple[Any, dict[str, Any]]:
    from pipeline.models import importance as I
    from pipeline.models import llama as L

    n = model.config.num_hidden_layers
    sc = cfg.scale
    before: dict[str, Any] | None = None
    chosen: dict[str, Any] = {}
    try:
        if isinstance(sc, DownScale) and sc.target_layers is not None:
            if sc.target_layers >= n:
                raise ValueError(f"target_layers {sc.target_layers} must be below the model's {n} layers "
                                 "(down-scaling removes layers)")
            run = n - sc.target_layers
            # one pass over the blocks: the validation perplexity, with the layer-run distances recorded alongside
            keep_last = sc.keep_last_layer is not False  # None: the default, true
            with I.RunDistance(model, run, keep_last_layer=keep_last) as probe:
                before = _perplexity(model, blocks, cfg, ctx, "layer importance")  # type: ignore[arg-type]
            scores = probe.scores()
            start = I.least_important_run(scores)
            layer_map = L.drop_layer_map(n, range(start, start + run))
            chosen = {"select": sc.select or "importance", "keep_last_layer": keep_last, "run_length": run,
                      "scores": {str(s): d for s, d in scores.items()}, "run_start": start,
                      "dropped": list(range(start, start + run)), "score_tokens": probe.tokens}
        elif isinstance(sc, DownScale):
            layer_map = L.drop_layer_map(n, sc.drop_layers or [])
        else:
            layer_map = L.solar_layer_map(n, sc.target_layers)  # type: ignore[union-attr]
    except ValueError as exc:
        raise ConfigError(f"scale: {exc}") from None
    if before is None and blocks is not None:
        before = _perplexity(model, blocks, cfg, ctx, "perplexity before scaling")  # type: ignore[arg-type]
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = len(layer_map)
    scaled = L.build_from_state_dict(config, L.remap_layers(dict(model.state_dict()), layer_map))
    info = {"mode": sc.mode, "from_layers": n, "to_layers": len(layer_map), "layer_map": layer_map}  # type: ignore[union-attr]
    if isinstance(sc, UpScale):
        info["recipe"] = sc.recipe
        info["k"] = n - len(layer_map) // 2
    info.update(chosen)
    if before is not None:
        after = _perplexity(scaled, blocks, cfg, ctx, "perplexity after scaling")  # type: ignore[arg-type]
        info.update({"loss_before": before["loss"], "perplexity_before": before["perplexity"],
                     "loss_after": after["loss"], "perplexity_after": after["perplexity"],
                     "val_blocks": after["blocks"], "val_tokens": after["tokens"]})
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


class InitStage(Stage):
    name = "init"
    config = InitConfig
    OUTPUT = "models/init"
    INPUTS = ("tokenizer",)  # the default; `inputs(cfg)` adds the validation blocks' pack output

    def inputs(self, cfg: InitConfig) -> list[str]:
        return ["tokenizer", *([cfg.validation.artifact] if cfg.validation is not None else [])]

    def run(self, cfg: InitConfig, ctx: StageContext, out: OutputDir) -> dict[str, Any]:
        import torch
        from transformers import GenerationConfig

        from pipeline.models import llama as L

        with tempfile.TemporaryDirectory() as tmp:
            tokenizer = L.load_tokenizer(ctx.inputs["tokenizer"].download(tmp), "pipeline's")
        vocab = L.padded_vocab(len(tokenizer), cfg.pad_vocab_multiple)
        ids = _special_ids(tokenizer)
        blocks = _validation_blocks(cfg, ctx, tokenizer, vocab) if cfg.validation is not None else None
        if cfg.source == "random":
            model, info = _random_model(cfg, vocab, ids)
        else:
            model, info = _pretrained_model(cfg, ctx, tokenizer, vocab, ids)
        scale_info: dict[str, Any] = {"mode": "none"}
        if cfg.scale is not None:
            model, scale_info = _scale(cfg, model, blocks, ctx)
            ctx.log(f"init: scaled {scale_info['from_layers']} -> {scale_info['to_layers']} layers: {scale_info['layer_map']}")
        val: dict[str, Any] = {}
        if blocks is not None:  # the saved model's validation perplexity (measured after scaling, when it scaled)
            if "loss_after" in scale_info:
                p = {"loss": scale_info["loss_after"], "perplexity": scale_info["perplexity_after"],
                     "blocks": scale_info["val_blocks"], "tokens": scale_info["val_tokens"]}
            else:
                p = _perplexity(model, blocks, cfg, ctx, "perplexity")
            val = {"val_loss": p["loss"], "val_perplexity": p["perplexity"], "val_blocks": p["blocks"],
                   "val_tokens": p["tokens"], "validation": f"{cfg.validation.artifact}/{blocks.split}"}  # type: ignore[union-attr]
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
            **val,
            **info,
        }
        return metrics

    def summary(self, m: dict[str, Any]) -> list[tuple[str, Any]]:
        src = m["source"] + (f" ({m['preset']})" if m.get("preset") else f" ({m['pretrained_path']})")
        rows: list[tuple[str, Any]] = [
            ("source", src),
            ("parameters", f"{m['params_total']:,} ({m['params_non_embedding']:,} non-embedding)"),
            ("layers / hidden / ffn", f"{m['layers']} / {m['hidden_size']} / {m['intermediate_size']}"),
            ("heads / kv heads", f"{m['heads']} / {m['kv_heads']}"),
            ("vocab", f"{m['vocab_size']:,} rows for {m['tokenizer_size']:,} tokens"),
            ("dtype", m["dtype"] + (", tied embeddings" if m["tie_word_embeddings"] else "")),
        ]
        if m.get("init_std"):
            rows.append(("init std", f"N(0, {m['initializer_range']:g})" + (
                f", residual outputs {m['residual_out_std']:.4g}" if m["init_std"] == "depth_scaled" else "")))
        if "vocab_matched" in m:
            rows.append(("vocab transfer", "identical" if m["vocab_identical"] else f"{m['vocab_matched']:,} matched, "
                         f"{m['vocab_new']:,} new" + (f" ({m['new_token_init']})" if m.get("new_token_init") else "")))
        sc = m.get("scale") or {}
        if sc.get("mode", "none") != "none":
            rows.append((f"scaled {sc['mode']}", f"{sc['from_layers']} -> {sc['to_layers']} layers {sc['layer_map']}"))
        if sc.get("scores"):
            d = sc["dropped"]
            rows.append(("dropped run", f"layers {d[0]}..{d[-1]}: angular distance {sc['scores'][str(d[0])]:.4f}, "
                                        f"the smallest of {len(sc['scores'])} runs of {sc['run_length']}"))
            rows.append(("run scores", ", ".join(f"{s}: {x:.4f}" for s, x in sc["scores"].items())))
        if "perplexity_before" in sc:
            rows.append(("val perplexity", f"{sc['perplexity_before']:,.4g} before -> {sc['perplexity_after']:,.4g} after "
                                           f"scaling ({m['val_blocks']} blocks of {m['validation']})"))
        elif "val_perplexity" in m:
            rows.append(("val perplexity", f"{m['val_perplexity']:,.4g} ({m['val_blocks']} blocks of {m['validation']})"))
        return rows


STAGE = InitStage()
