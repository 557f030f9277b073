"""Llama-family models: size presets, config building, parameter counts, and checkpoint surgery.

Presets (Llama-3-style: SwiGLU MLP, RMSNorm eps 1e-5, RoPE theta 500k, no biases, untied
output head). Parameter counts with a 32,000-token vocabulary (:func:`preset_param_counts`):

======  ======  ======  =====  ========  =====  =============  =============  ===========
preset  layers  hidden  heads  kv heads  ffn    total          non-embedding  blocks only
======  ======  ======  =====  ========  =====  =============  =============  ===========
tiny    2       64      4      2         192    4,194,624      2,146,624      98,624
125m    12      768     12     12        2048   134,105,856    109,529,856    84,953,856
350m    24      1024    16     16        2816   373,867,520    341,099,520    308,331,520
1b      16      2048    32     8         8192   1,104,218,112  1,038,682,112  973,146,112
======  ======  ======  =====  ========  =====  =============  =============  ===========

"non-embedding" leaves out the input embedding only: an untied output head is a matmul per
token, so it stays in, as in the 6N FLOPs-per-token estimate. "blocks only" is the decoder
layers (+ final norm). With ``tie_word_embeddings: true`` the total drops by one embedding
(125m: 109.5M, 350m: 341.1M, 1b: 1.04B). The 125m/350m/1b shapes are the ones
``benchmarks/bench_train_gpu.py`` measures.

Surgery, all on plain state dicts (no library internals), for every family of :mod:`pipeline.models.families`
(Llama, Qwen2, Qwen3 share the ``model.embed_tokens`` / ``model.layers.N.*`` / ``lm_head`` layout):

* :func:`transfer_vocab` maps embedding (and untied head) rows from an old tokenizer's ids to
  ours by token string; tokens only we have get the mean of the old rows (or random rows).
* :func:`drop_layer_map` / :func:`solar_layer_map` give, for each new layer, the old layer it
  is copied from; :func:`remap_layers` applies such a map to ``model.layers.N.*`` keys.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, replace
from typing import Any, Iterable

from pipeline.errors import InputError
from pipeline.models.families import causal_lm_class, family_of

# torch, transformers, accelerate and huggingface_hub are imported in the functions that use them:
# the init stage's config validation imports this module (resolve_shape) for `llmpipe config init`
# and `llmpipe pipeline`'s up-front checks, which they would slow by seconds (torch ~2 s,
# transformers' Llama classes ~3 s more, measured on the dev box).

LLAMA_MODEL_TYPES = ("llama",)  # the random-init presets; init takes every family of pipeline.models.families
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
_LAYER_KEY = re.compile(r"^(model\.layers\.)(\d+)(\..*)$")


@dataclass(frozen=True)
class Shape:
    """The architecture numbers of a Llama model (everything but the vocabulary)."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    max_position_embeddings: int = 4096
    rope_theta: float = 500_000.0
    tie_word_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def problems(self) -> list[str]:
        """What makes this shape unbuildable (empty when fine)."""
        found = []
        if self.hidden_size % self.num_heads:
            found.append(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")
        elif self.head_dim % 2:
            found.append(f"head size hidden_size/num_heads = {self.head_dim} must be even for RoPE")
        if self.num_heads % self.num_kv_heads:
            found.append(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads} (GQA groups)")
        return found


PRESETS: dict[str, Shape] = {
    # CPU-test size: builds and runs a forward pass in milliseconds
    "tiny": Shape(num_layers=2, hidden_size=64, intermediate_size=192, num_heads=4, num_kv_heads=2, max_position_embeddings=1024),
    "125m": Shape(num_layers=12, hidden_size=768, intermediate_size=2048, num_heads=12, num_kv_heads=12),
    "350m": Shape(num_layers=24, hidden_size=1024, intermediate_size=2816, num_heads=16, num_kv_heads=16),
    "1b": Shape(num_layers=16, hidden_size=2048, intermediate_size=8192, num_heads=32, num_kv_heads=8),
}


def resolve_shape(preset: str, **overrides: Any) -> Shape:
    """A preset with the given fields replaced (None values are ignored)."""
    if preset not in PRESETS:
        raise KeyError(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
    return replace(PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None})


def padded_vocab(n_tokens: int, multiple: int) -> int:
    """``n_tokens`` rounded up to a multiple of ``multiple`` (tensor-core friendly matmuls)."""
    return -(-n_tokens // multiple) * multiple


def llama_config(shape: Shape, vocab_size: int, *, bos_id: int | None, eos_id: int | None, pad_id: int | None,
                 initializer_range: float = 0.02) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        max_position_embeddings=shape.max_position_embeddings,
        rope_theta=shape.rope_theta,
        tie_word_embeddings=shape.tie_word_embeddings,
        rms_norm_eps=1e-5,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        initializer_range=initializer_range,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )


def param_counts(model: Any) -> dict[str, int]:
    """total (tied tensors once), embedding (input), lm_head (0 when tied) and non-embedding."""
    total = sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    head_n = 0 if head is emb else head.numel()
    return {"total": total, "embedding": emb.numel(), "lm_head": head_n, "non_embedding": total - emb.numel()}


def preset_param_counts(shape: Shape, vocab_size: int = 32000) -> dict[str, int]:
    """Parameter counts of a shape, from a model built on the meta device (no memory, no init)."""
    import torch
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(llama_config(shape, vocab_size, bos_id=None, eos_id=None, pad_id=None))
    return param_counts(model)


# ------------------------------------------------------------------------------ pretrained


def resolve_pretrained(path: str, allow_hub: bool) -> str:
    """A local folder holding the checkpoint; downloads from the hub only when ``allow_hub``."""
    expanded = os.path.expanduser(path)
    if os.path.isdir(expanded):
        return expanded
    if os.path.exists(expanded):
        raise InputError(f"pretrained_path {path} is a file, not a model folder (config.json + weights)")
    if not allow_hub:
        raise InputError(
            f"pretrained_path {path!r} is not a local folder, and hub downloads are off: download the model to a "
            "folder (e.g. on the PVC) and point pretrained_path there, or set allow_hub: true where the hub is reachable"
        )
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])
    except Exception as exc:  # offline, unreachable, unknown repo, gated: all the same to the user
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"could not fetch {path!r} from the Hugging Face hub (unreachable, offline or not allowed): {first}") from None


def check_pretrained(folder: str) -> dict[str, Any]:
    """Read and check ``config.json`` (a model of a supported family, :mod:`pipeline.models.families`, with
    weights) before anything is loaded."""
    cfg_path = os.path.join(folder, "config.json")
    if not os.path.isfile(cfg_path):
        raise InputError(f"{folder} has no config.json: not a Hugging Face model folder")
    try:
        with open(cfg_path, encoding="utf-8") as fh:
            raw = json.load(fh)
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"{cfg_path} is not readable JSON: {exc}") from None
    family_of(raw, folder)  # llama, qwen2, qwen3: one line naming them otherwise
    if not any(os.path.exists(os.path.join(folder, f)) for f in WEIGHT_FILES):
        raise InputError(f"{folder} has a config.json but no weights ({' / '.join(WEIGHT_FILES)})")
    return raw


def load_tokenizer(folder: str, what: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as exc:  # missing files, bad JSON, a tokenizer class that needs sentencepiece...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"cannot load the {what} tokenizer from {folder}: {first}") from None


# ---------------------------------------------------------------------------- vocabulary


@dataclass
class VocabMatch:
    """Which of our token ids have a row in the old embedding, and where."""

    new_to_old: dict[int, int]  # our id -> old row, for tokens both vocabularies hold
    new_ids: list[int]  # our ids the old vocabulary lacks
    n_tokens: int  # len(our tokenizer)
    old_rows: list[int]  # old rows that belong to a token of the old tokenizer (for the mean)

    @property
    def matched(self) -> int:
        return len(self.new_to_old)

    @property
    def identical(self) -> bool:
        return not self.new_ids and all(k == v for k, v in self.new_to_old.items())

    def stats(self) -> dict[str, Any]:
        return {"matched": self.matched, "new": len(self.new_ids), "identical": self.identical}


def match_vocab(new_tokens: list[str], old_vocab: dict[str, int], old_rows: int) -> VocabMatch:
    """Match our tokens (``new_tokens[i]`` is the string of id ``i``) to an old vocabulary by string."""
    mapping: dict[int, int] = {}
    missing: list[int] = []
    for new_id, token in enumerate(new_tokens):
        old_id = old_vocab.get(token)
        if old_id is not None and 0 <= old_id < old_rows:
            mapping[new_id] = old_id
        else:
            missing.append(new_id)
    real = sorted({i for i in old_vocab.values() if 0 <= i < old_rows})
    return VocabMatch(mapping, missing, len(new_tokens), real)


def tokenizer_tokens(tokenizer: Any) -> list[str]:
    """The token string of every id ``0..len(tokenizer)-1`` (added tokens included)."""
    vocab = tokenizer.get_vocab()
    tokens: list[str | None] = [None] * len(tokenizer)
    for token, idx in vocab.items():
        if 0 <= idx < len(tokens):
            tokens[idx] = token
    holes = [i for i, t in enumerate(tokens) if t is None]
    if holes:
        raise InputError(f"the tokenizer's ids are not contiguous: no token for id(s) {holes[:5]}")
    return tokens  # type: ignore[return-value]


def transfer_vocab(old: Any, match: VocabMatch, rows: int, init: str, *, generator: Any, std: float) -> Any:
    """A ``rows x hidden`` matrix: matched rows copied from ``old``; the rest (our tokens the old
    vocabulary lacks, and the padding rows past ``len(tokenizer)``) the mean of the old tokens'
    rows (``init="mean"``) or N(0, std) (``init="random"``)."""
    import torch

    new = torch.empty(rows, old.shape[1], dtype=old.dtype)
    fill_ids = [*match.new_ids, *range(match.n_tokens, rows)]
    if init == "mean":
        new[fill_ids] = old[match.old_rows].mean(dim=0) if match.old_rows else 0.0
    elif init == "random":
        new[fill_ids] = torch.randn(len(fill_ids), old.shape[1], generator=generator, dtype=torch.float32).to(old.dtype) * std
    else:
        raise ValueError(f"unknown init {init!r}")
    if match.new_to_old:
        new_idx = torch.tensor(list(match.new_to_old.keys()))
        old_idx = torch.tensor(list(match.new_to_old.values()))
        new[new_idx] = old[old_idx]
    return new


# -------------------------------------------------------------------------------- layers


def drop_layer_map(n_layers: int, drop: Iterable[int]) -> list[int]:
    """Down-scaling: the old layers kept, in order, without those in ``drop`` (0-based)."""
    drop = set(drop)
    bad = sorted(i for i in drop if not 0 <= i < n_layers)
    if bad:
        raise ValueError(f"drop_layers {bad} are outside the model's layers 0..{n_layers - 1}")
    keep = [i for i in range(n_layers) if i not in drop]
    if not keep:
        raise ValueError(f"drop_layers would remove all {n_layers} layers")
    return keep


def solar_layer_map(n_layers: int, target: int) -> list[int]:
    """Depth up-scaling as in SOLAR 10.7B (Kim et al. 2023, arXiv:2312.15166).

    Take two copies of the ``n``-layer stack, drop the top ``k`` layers of the first copy and the
    bottom ``k`` layers of the second, and stack them: layers ``0..n-k-1`` then ``k..n-1``, so
    ``target = 2 (n - k)``, i.e. ``k = n - target / 2``. 12 -> 16 drops k = 4
    (``0..7`` + ``4..11``); SOLAR itself went 32 -> 48 with k = 8; 4 -> 6 gives [0,1,2,1,2,3].
    ``target`` must be even and in ``n+1 .. 2n`` (2n means k = 0: the stack twice over).
    """
    if target % 2:
        raise ValueError(f"SOLAR up-scaling gives an even number of layers (2 x (n - k)); target_layers {target} is odd")
    if not n_layers < target <= 2 * n_layers:
        raise ValueError(f"SOLAR up-scaling of {n_layers} layers needs target_layers in {n_layers + 1}..{2 * n_layers}, got {target}")
    k = n_layers - target // 2
    return list(range(0, n_layers - k)) + list(range(k, n_layers))


def remap_layers(state_dict: dict[str, Any], layer_map: list[int]) -> dict[str, Any]:
    """New state dict whose layer ``i`` is a copy of old layer ``layer_map[i]``; other keys as they were.
    Repeated layers are cloned (each layer owns its tensors; safetensors refuses shared ones)."""
    by_layer: dict[int, list[tuple[str, str, Any]]] = {}
    out: dict[str, Any] = {}
    for key, tensor in state_dict.items():
        m = _LAYER_KEY.match(key)
        if m:
            by_layer.setdefault(int(m.group(2)), []).append((m.group(1), m.group(3), tensor))
        else:
            out[key] = tensor
    used: set[int] = set()
    for new_i, old_i in enumerate(layer_map):
        if old_i not in by_layer:
            raise ValueError(f"layer map refers to layer {old_i}, which the checkpoint does not have")
        for prefix, suffix, tensor in by_layer[old_i]:
            out[f"{prefix}{new_i}{suffix}"] = tensor.clone() if old_i in used else tensor
        used.add(old_i)
    return out


def build_from_state_dict(config: Any, state_dict: dict[str, Any]) -> Any:
    """A causal LM of the config's family (Llama, Qwen2, Qwen3) with exactly these weights (nothing randomly
    initialised first)."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):  # parameters on meta; RoPE buffers real
        model = causal_lm_class(family_of(config))(config)
    if config.tie_word_embeddings:
        state_dict = {k: v for k, v in state_dict.items() if k != "lm_head.weight"}
    missing, unexpected = model.load_state_dict(state_dict, strict=False, assign=True)
    if config.tie_word_embeddings:
        missing = [k for k in missing if k != "lm_head.weight"]
        model.tie_weights()
    if missing or unexpected:
        raise RuntimeError(f"state dict does not fit the config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    still_meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if still_meta:
        raise RuntimeError(f"parameters left uninitialised: {still_meta[:5]}")
    return model


def rope_settings(config: Any) -> dict[str, Any]:
    """A config's RoPE settings as one dict: ``rope_theta``, ``rope_type`` and, when scaled, ``factor`` etc.
    (transformers 5 keeps them all in ``config.rope_parameters``)."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    params.setdefault("rope_theta", 10000.0)
    params.setdefault("rope_type", "default")
    return params


def set_rope_theta(config: Any, theta: float) -> None:
    """Set a config's RoPE base, keeping any scaling it has."""
    config.rope_parameters = {**(getattr(config, "rope_parameters", None) or {"rope_type": "default"}), "rope_theta": theta}


def shape_of(config: Any) -> Shape:
    return Shape(
        num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_heads=config.num_attention_heads,
        num_kv_heads=config.num_key_value_heads or config.num_attention_heads,
        max_position_embeddings=config.max_position_embeddings,
        rope_theta=float(rope_settings(config)["rope_theta"]),
        tie_word_embeddings=bool(config.tie_word_embeddings),
    )


def shape_dict(shape: Shape) -> dict[str, Any]:
    return asdict(shape)
