"""Hugging Face Llama / Qwen2 / Qwen3 checkpoint -> GGUF (llama.cpp's file format), and GGUF -> HF weights again.

Written against the ``gguf`` library (the format's reference writer, maintained with llama.cpp):
:class:`gguf.GGUFWriter` for the file, :mod:`gguf.quants` for the Q8_0 / Q4_0 blocks, the
``gguf.TENSOR_NAMES`` constants for the tensor names of the ``llama``, ``qwen2`` and ``qwen3`` architectures
(``gguf.MODEL_TENSORS`` lists which each architecture has). The mapping itself is ours and short:

=================================================  ==========================  =====================
HF ``LlamaForCausalLM`` key                          GGUF tensor                  note
=================================================  ==========================  =====================
``model.embed_tokens.weight``                        ``token_embd.weight``
``model.layers.N.input_layernorm.weight``            ``blk.N.attn_norm.weight``   F32
``model.layers.N.self_attn.{q,k}_proj.weight``       ``blk.N.attn_{q,k}.weight``  rows permuted (RoPE)
``model.layers.N.self_attn.v_proj.weight``           ``blk.N.attn_v.weight``
``model.layers.N.self_attn.o_proj.weight``           ``blk.N.attn_output.weight``
``model.layers.N.post_attention_layernorm.weight``   ``blk.N.ffn_norm.weight``    F32
``model.layers.N.mlp.{gate,up,down}_proj.weight``    ``blk.N.ffn_{gate,up,down}`` 
``model.norm.weight``                                ``output_norm.weight``       F32
``lm_head.weight``                                   ``output.weight``            left out when tied
=================================================  ==========================  =====================

The families (:mod:`pipeline.models.families`) differ only in a few tensors and in RoPE, as llama.cpp's own
``convert_hf_to_gguf.py`` writes them (``Qwen2Model`` / ``Qwen3Model`` there: no tensor changes but the names):

* ``qwen2`` (Qwen2, Qwen2.5): also ``self_attn.{q,k,v}_proj.bias`` -> ``blk.N.attn_{q,k,v}.bias`` (F32).
* ``qwen3``: also ``self_attn.{q,k}_norm.weight`` -> ``blk.N.attn_{q,k}_norm.weight`` (F32), and a
  ``head_dim`` that need not be hidden / heads (written as ``attention.key_length`` / ``value_length``).
* llama.cpp runs ``qwen2`` / ``qwen3`` with NEOX-style RoPE (rotating halves, as HF does), so their q/k rows
  are written as they are; only ``llama`` gets the permutation below.

What the export refuses (one line, and the quantize stage goes on with its other variants): Llama with
attention/MLP biases, a sliding-window Qwen config, Qwen3 with attention biases, activations other than SiLU,
RoPE scaling other than none / linear (e.g. Qwen2.5's YaRN).

RoPE: HF rotates the two halves of each head (``rotate_half``), llama.cpp's ``llama`` graph
rotates adjacent pairs. Within every head of ``q_proj`` / ``k_proj`` the output rows are
reordered so that row ``i`` of the first half and row ``i`` of the second half become rows
``2i`` and ``2i+1``; attention scores are unchanged (:func:`permute_qk` / :func:`unpermute_qk`).

Types: 1-D tensors (the RMSNorm weights) stay F32, as llama.cpp expects. A matrix whose rows
are not a whole number of quantisation blocks (32 values for Q8_0 / Q4_0) falls back to F16.
In the 4-bit file the output head (the token embedding when tied) is stored as Q8_0 unless
``q4_keep_head_q8=False``, as ``llama-quantize`` keeps the output head at a higher precision.

Tokenizer: our tokenizers are byte-level BPE (``tokenizers``), which llama.cpp reads as
``tokenizer.ggml.model = "gpt2"``: the token strings in id order (rows past the tokenizer's size
padded with ``[PADn]`` of type UNUSED), token types (special added tokens CONTROL, other added
tokens USER_DEFINED), the merges, bos/eos/pad (and ``<|im_end|>`` as end-of-turn when present),
whether BOS is prepended, and the chat template (without HF's ``{% generation %}`` markers,
which only HF understands and which do not change the rendered text).

llama.cpp does not run the tokenizer's own pre-tokenizer regex; it picks one of its built-in ones by the name in
``tokenizer.ggml.pre``. The tokenizer's Split regex is matched exactly against the presets we train with
(:data:`pipeline.data.tokenization.LLAMA_CPP_PRE`: ``llama-bpe``, ``qwen2`` -- also what a tokenizer extended from
Qwen 2/2.5/3 carries --, ``gpt-4o``, ``gpt-2``); a regex llama.cpp has no preset for (round 1's ``cyrillic-aware``)
is refused, because llama.cpp would tokenize text differently from training; ``gguf.pre_tokenizer`` forces a name
for a user who accepts that. llama.cpp applies no normaliser either: the tokenizer's NFC only matters for text
that is not NFC already.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import gguf
import numpy as np
import torch
from transformers import AutoTokenizer

from pipeline.data.tokenization import LLAMA_CPP_PRE, PATTERNS
from pipeline.errors import InputError
from pipeline.models.families import FAMILIES, family_of
from pipeline.models.llama import rope_settings

ARCH = "llama"
ARCHES = tuple(f.gguf_arch for f in FAMILIES.values())
SUPPORTED = ("F16", "Q8_0", "Q4_0")
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
# HF suffix inside a decoder layer -> (gguf MODEL_TENSOR member name, needs the RoPE row permutation)
_LAYER_MAP = {
    "input_layernorm.weight": ("ATTN_NORM", None),
    "self_attn.q_proj.weight": ("ATTN_Q", "q"),
    "self_attn.k_proj.weight": ("ATTN_K", "k"),
    "self_attn.v_proj.weight": ("ATTN_V", None),
    "self_attn.o_proj.weight": ("ATTN_OUT", None),
    "post_attention_layernorm.weight": ("FFN_NORM", None),
    "mlp.gate_proj.weight": ("FFN_GATE", None),
    "mlp.up_proj.weight": ("FFN_UP", None),
    "mlp.down_proj.weight": ("FFN_DOWN", None),
}
# the extra tensors of the other architectures (1-D, so F32), none with the RoPE permutation
_ARCH_EXTRA = {
    "llama": {},
    "qwen2": {"self_attn.q_proj.bias": ("ATTN_Q", None), "self_attn.k_proj.bias": ("ATTN_K", None),
              "self_attn.v_proj.bias": ("ATTN_V", None)},
    "qwen3": {"self_attn.q_norm.weight": ("ATTN_Q_NORM", None), "self_attn.k_norm.weight": ("ATTN_K_NORM", None)},
}


def _layer_map(arch: str) -> dict[str, tuple[str, str | None]]:
    """HF suffix inside a decoder layer -> (gguf MODEL_TENSOR member, 'q'/'k' for the RoPE permutation) of ``arch``."""
    if arch == "llama":
        return dict(_LAYER_MAP)
    return {**{k: (member, None) for k, (member, _) in _LAYER_MAP.items()}, **_ARCH_EXTRA[arch]}


_GLOBAL_MAP = {
    "model.embed_tokens.weight": "TOKEN_EMBD",
    "model.norm.weight": "OUTPUT_NORM",
    "lm_head.weight": "OUTPUT",
}


# ------------------------------------------------------------------------------- the config


@dataclass(frozen=True)
class LlamaDims:
    """The numbers of a Llama / Qwen2 / Qwen3 config that the GGUF header and the RoPE permutation need."""

    n_layers: int
    hidden: int
    ffn: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    context_length: int
    rope_theta: float
    rms_eps: float
    tied: bool
    rope_scaling: dict[str, Any] | None = None
    arch: str = ARCH  # llama.cpp architecture: llama, qwen2, qwen3


def gguf_problem(config: Any, where: str = "the model") -> str | None:
    """Why a model of a supported family cannot be written as GGUF (one line), or None when it can."""
    arch = family_of(config, where).gguf_arch
    if arch == "llama" and (getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False)):
        return f"{where} has attention/MLP biases, which the GGUF llama export does not map"
    if arch == "qwen3" and getattr(config, "attention_bias", False):
        return f"{where} is a Qwen3 with attention biases, which the GGUF qwen3 export does not map"
    if arch != "llama" and getattr(config, "use_sliding_window", False):
        return f"{where} uses sliding-window attention (use_sliding_window: true), which the GGUF {arch} export does not write"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"{where} uses hidden_act={config.hidden_act!r}; llama.cpp's {arch} graph is SwiGLU (silu)"
    rope = rope_settings(config)
    if rope["rope_type"] not in ("linear", "default"):
        return f"{where} uses rope_scaling type {rope['rope_type']!r}; the GGUF export supports none or 'linear'"
    if _head_dim(config) % 2:
        return f"{where} has an odd head size {_head_dim(config)}; RoPE needs it even"
    return None


def _head_dim(config: Any) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def model_dims(config: Any, where: str = "the model") -> LlamaDims:
    """The dims of a Llama / Qwen2 / Qwen3 config, whether or not GGUF can hold it (:func:`gguf_problem`);
    :class:`InputError` (one line naming the families) for any other model."""
    arch = family_of(config, where).gguf_arch
    rope = rope_settings(config)
    n_heads = int(config.num_attention_heads)
    return LlamaDims(
        n_layers=int(config.num_hidden_layers), hidden=int(config.hidden_size), ffn=int(config.intermediate_size),
        n_heads=n_heads, n_kv_heads=int(getattr(config, "num_key_value_heads", None) or n_heads),
        head_dim=_head_dim(config), vocab_size=int(config.vocab_size), context_length=int(config.max_position_embeddings),
        rope_theta=float(rope["rope_theta"]), rms_eps=float(config.rms_norm_eps),
        tied=bool(getattr(config, "tie_word_embeddings", False)),
        rope_scaling=rope if rope["rope_type"] == "linear" else None, arch=arch,
    )


def check_llama_config(config: Any, where: str = "the model") -> LlamaDims:
    """:func:`model_dims`, and :class:`InputError` when GGUF cannot hold the model (:func:`gguf_problem`).
    (The name predates the Qwen families.)"""
    problem = gguf_problem(config, where)
    if problem:
        raise InputError(problem)
    return model_dims(config, where)


# ------------------------------------------------------------------------------- tensors


def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF (half-split RoPE) row order -> llama.cpp (adjacent-pair RoPE) row order, per head."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """The inverse of :func:`permute_qk`."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tensor_name(member: str, layer: int | None = None, kind: str = "weight") -> str:
    base = gguf.TENSOR_NAMES[getattr(gguf.MODEL_TENSOR, member)]
    return (base.format(bid=layer) if layer is not None else base) + "." + kind


def _kind(suffix: str) -> str:
    return "bias" if suffix.endswith(".bias") else "weight"


def hf_to_gguf_name(key: str, arch: str = ARCH) -> tuple[str, str | None]:
    """(GGUF tensor name, 'q'/'k' when the RoPE permutation applies) of an HF state-dict key."""
    if key in _GLOBAL_MAP:
        return tensor_name(_GLOBAL_MAP[key]), None
    m = _LAYER_RE.match(key)
    layer_map = _layer_map(arch)
    if m and m.group(2) in layer_map:
        member, perm = layer_map[m.group(2)]
        return tensor_name(member, int(m.group(1)), _kind(m.group(2))), perm
    raise InputError(f"weight {key!r} has no place in a GGUF {arch} model (is this a plain "
                     f"{next(f.causal_lm for f in FAMILIES.values() if f.gguf_arch == arch)}?)")


def gguf_to_hf_names(n_layers: int, arch: str = ARCH) -> dict[str, tuple[str, str | None]]:
    """GGUF tensor name -> (HF key, permutation) for an ``arch`` model of ``n_layers`` layers."""
    found = {tensor_name(member): (key, None) for key, member in _GLOBAL_MAP.items()}
    for i in range(n_layers):
        for suffix, (member, perm) in _layer_map(arch).items():
            found[tensor_name(member, i, _kind(suffix))] = (f"model.layers.{i}.{suffix}", perm)
    return found


def _qtype(name: str) -> Any:
    return getattr(gguf.GGMLQuantizationType, name)


def choose_type(gguf_name: str, shape: tuple[int, ...], target: str, *, tied: bool = False,
                q4_keep_head_q8: bool = True) -> str:
    """The GGML type a tensor gets in a ``target`` (F16 / Q8_0 / Q4_0) file."""
    if len(shape) == 1:
        return "F32"
    want = target
    head = tensor_name("TOKEN_EMBD") if tied else tensor_name("OUTPUT")  # the matrix that makes the logits
    if target == "Q4_0" and q4_keep_head_q8 and gguf_name == head:
        want = "Q8_0"
    if want != "F16":
        block, _ = gguf.GGML_QUANT_SIZES[_qtype(want)]
        if shape[-1] % block:
            want = "F16"
    return want


# ------------------------------------------------------------------------------- tokenizer


def _split_patterns(node: Any) -> list[str]:
    """Every Split regex in a tokenizer.json pre-tokenizer (a Sequence or a single one)."""
    if isinstance(node, dict):
        if node.get("type") == "Split" and isinstance(node.get("pattern"), dict) and "Regex" in node["pattern"]:
            return [node["pattern"]["Regex"]]
        return [p for child in node.get("pretokenizers") or [] for p in _split_patterns(child)]
    return []


def _pre_name(tokenizer_json: dict[str, Any]) -> tuple[str | None, str]:
    """(tokenizer.ggml.pre, how it was chosen) from a tokenizer.json's pre-tokenizer; None when llama.cpp has no
    preset that splits as it does."""
    found = _split_patterns(tokenizer_json.get("pre_tokenizer"))
    if len(found) == 1:
        for kind, pattern in PATTERNS.items():
            if found[0] == pattern:
                return LLAMA_CPP_PRE[kind], f"the {kind} regex exactly"
    what = f"regex {found[0][:80]!r}" if len(found) == 1 else f"{len(found)} split regexes"
    return None, f"llama.cpp has no preset for this pre-tokenizer ({what})"


def strip_hf_generation_markers(template: str) -> str:
    """Drop ``{% generation %}`` / ``{% endgeneration %}`` (an HF-only Jinja extension for assistant masks)."""
    return re.sub(r"\{%-?\s*(end)?generation\s*-?%\}", "", template)


@dataclass
class TokenizerMeta:
    tokens: list[str]
    types: list[int]
    merges: list[str]
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    eot_id: int | None
    add_bos: bool
    pre: str
    pre_reason: str
    chat_template: str | None
    padded: int = 0  # rows past the tokenizer's size

    def summary(self) -> dict[str, Any]:
        return {"tokens": len(self.tokens), "padded_rows": self.padded, "merges": len(self.merges), "pre": self.pre,
                "pre_reason": self.pre_reason, "bos_id": self.bos_id, "eos_id": self.eos_id, "pad_id": self.pad_id,
                "eot_id": self.eot_id, "add_bos": self.add_bos, "chat_template": self.chat_template is not None}


def tokenizer_meta(folder: str, vocab_size: int, config: Any = None, pre: str | None = None) -> TokenizerMeta:
    """What GGUF needs of the HF tokenizer saved in ``folder`` (a byte-level BPE ``tokenizer.json``)."""
    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        raise InputError(f"{folder} has no tokenizer.json; the GGUF export needs the (fast, byte-level BPE) tokenizer")
    raw = json.loads(path.read_text(encoding="utf-8"))
    model = raw.get("model") or {}
    if model.get("type") != "BPE":
        raise InputError(f"{path} is a {model.get('type')!r} tokenizer; the GGUF export handles byte-level BPE only")
    if "ByteLevel" not in json.dumps(raw.get("pre_tokenizer")) and "ByteLevel" not in json.dumps(raw.get("decoder")):
        raise InputError(f"{path} is a BPE without the byte-level mapping; llama.cpp's gpt2 tokenizer needs byte-level BPE")
    tok = AutoTokenizer.from_pretrained(folder)
    vocab = tok.get_vocab()
    n = max(vocab.values()) + 1
    if n > vocab_size:
        raise InputError(f"the tokenizer has {n} tokens but the model's embedding has only {vocab_size} rows")
    by_id: dict[int, str] = {i: t for t, i in vocab.items()}
    added = {a["id"]: a for a in raw.get("added_tokens", [])}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(int(gguf.TokenType.UNUSED))
        elif i in added:
            tokens.append(by_id[i])
            types.append(int(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED))
        else:
            tokens.append(by_id[i])
            types.append(int(gguf.TokenType.NORMAL))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    def tid(attr: str, cfg_attr: str) -> int | None:
        value = getattr(tok, attr, None)
        if value is None and config is not None:
            value = getattr(config, cfg_attr, None)
            if isinstance(value, list):
                value = value[0] if value else None
        return int(value) if value is not None else None

    bos, eos, pad = tid("bos_token_id", "bos_token_id"), tid("eos_token_id", "eos_token_id"), tid("pad_token_id", "pad_token_id")
    probe = tok("a")["input_ids"]
    add_bos = bool(bos is not None and probe and probe[0] == bos)
    eot = vocab.get("<|im_end|>")
    template = getattr(tok, "chat_template", None)
    if isinstance(template, dict):  # several named templates: keep the default one
        template = template.get("default")
    if pre:
        pre_name, reason = pre, "set in the config"
    else:
        found, reason = _pre_name(raw)
        if found is None:
            raise InputError(f"{path}: {reason}, so llama.cpp would split text differently from training. Retrain the "
                             "tokenizer with a llama.cpp preset (pretokenizer: llama3, qwen2, gpt4o or gpt2), or set "
                             "gguf.pre_tokenizer: <name> in the quantize config to accept the mismatch")
        pre_name = found
    return TokenizerMeta(tokens=tokens, types=types, merges=merges, bos_id=bos, eos_id=eos, pad_id=pad, eot_id=eot,
                         add_bos=add_bos, pre=pre_name, pre_reason=reason,
                         chat_template=strip_hf_generation_markers(template) if template else None, padded=vocab_size - n)


# ------------------------------------------------------------------------------- writing


@dataclass
class ExportResult:
    path: str
    target: str
    size_bytes: int
    tensor_types: dict[str, str]  # gguf tensor name -> GGML type
    fallbacks: list[str] = field(default_factory=list)  # matrices that could not take the target type
    tokenizer: dict[str, Any] = field(default_factory=dict)

    def type_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for t in self.tensor_types.values():
            counts[t] = counts.get(t, 0) + 1
        return dict(sorted(counts.items()))


def _file_type(target: str) -> int:
    return int({"F16": gguf.LlamaFileType.MOSTLY_F16, "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[target])


def iter_state_dict(state_dict: dict[str, Any], dims: LlamaDims) -> Iterator[tuple[str, np.ndarray]]:
    """(GGUF name, float32 numpy array in GGUF row order) for every weight, in the file's order."""
    keys = [k for k in state_dict if not k.endswith("rotary_emb.inv_freq")]
    if dims.tied:
        keys = [k for k in keys if k != "lm_head.weight"]
    names = {k: hf_to_gguf_name(k, dims.arch) for k in keys}  # raises on a key with no place before any work
    expected = set(gguf_to_hf_names(dims.n_layers, dims.arch)) - ({tensor_name("OUTPUT")} if dims.tied else set())
    missing = expected - {n for n, _ in names.values()}
    if missing:
        raise InputError(f"the checkpoint lacks {len(missing)} {dims.arch} weights, e.g. {sorted(missing)[0]}")

    def position(key: str) -> tuple[int, int, str]:  # embedding, layers in order, final norm and head
        m = _LAYER_RE.match(key)
        if m:
            return (1, int(m.group(1)), key)
        return (0 if key == "model.embed_tokens.weight" else 2, 0, key)

    order = sorted(keys, key=position)
    for key in order:
        t = state_dict[key]
        arr = t.detach().to(torch.float32).cpu().numpy() if hasattr(t, "detach") else np.asarray(t, dtype=np.float32)
        name, perm = names[key]
        if perm == "q":
            arr = permute_qk(arr, dims.n_heads)
        elif perm == "k":
            arr = permute_qk(arr, dims.n_kv_heads)
        yield name, np.ascontiguousarray(arr)


def write_gguf(
    path: str,
    state_dict: dict[str, Any],
    config: Any,
    tokenizer_folder: str,
    target: str,
    *,
    name: str = "model",
    q4_keep_head_q8: bool = True,
    pre: str | None = None,
    extra: dict[str, str] | None = None,
    meta: TokenizerMeta | None = None,
    progress: Callable[[str], None] | None = None,
) -> ExportResult:
    """Write a Llama / Qwen2 / Qwen3 state dict and its tokenizer as one GGUF file of type ``target`` (F16, Q8_0 or Q4_0).

    ``meta`` (from :func:`tokenizer_meta`) saves reading the tokenizer again when writing several files.
    """
    if target not in SUPPORTED:
        raise InputError(f"unknown GGUF type {target!r}; supported: {', '.join(SUPPORTED)}")
    dims = check_llama_config(config)
    if meta is None:
        meta = tokenizer_meta(tokenizer_folder, dims.vocab_size, config, pre=pre)
    w = gguf.GGUFWriter(path, dims.arch)
    # -- general
    w.add_name(name)
    w.add_file_type(_file_type(target))
    if target != "F16":
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, value in (extra or {}).items():
        w.add_string(key, value)
    # -- hyper-parameters
    w.add_vocab_size(dims.vocab_size)
    w.add_context_length(dims.context_length)
    w.add_embedding_length(dims.hidden)
    w.add_block_count(dims.n_layers)
    w.add_feed_forward_length(dims.ffn)
    w.add_head_count(dims.n_heads)
    w.add_head_count_kv(dims.n_kv_heads)
    w.add_rope_dimension_count(dims.head_dim)
    if dims.head_dim * dims.n_heads != dims.hidden:
        w.add_key_length(dims.head_dim)
        w.add_value_length(dims.head_dim)
    w.add_rope_freq_base(dims.rope_theta)
    w.add_layer_norm_rms_eps(dims.rms_eps)
    if dims.rope_scaling and dims.rope_scaling["rope_type"] == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(dims.rope_scaling["factor"]))
    # -- tokenizer
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(meta.pre)
    w.add_token_list(meta.tokens)
    w.add_token_types(meta.types)
    w.add_token_merges(meta.merges)
    for value, add in ((meta.bos_id, w.add_bos_token_id), (meta.eos_id, w.add_eos_token_id),
                       (meta.pad_id, w.add_pad_token_id), (meta.eot_id, w.add_eot_token_id)):
        if value is not None:
            add(value)
    w.add_add_bos_token(meta.add_bos)
    w.add_add_eos_token(False)
    if meta.chat_template:
        w.add_chat_template(meta.chat_template)
    # -- tensors
    types: dict[str, str] = {}
    fallbacks: list[str] = []
    for gname, arr in iter_state_dict(state_dict, dims):
        kind = choose_type(gname, arr.shape, target, tied=dims.tied, q4_keep_head_q8=q4_keep_head_q8)
        if len(arr.shape) > 1 and kind == "F16" and target != "F16":
            fallbacks.append(gname)
        if kind == "F32":
            w.add_tensor(gname, arr.astype(np.float32))
        elif kind == "F16":
            w.add_tensor(gname, arr.astype(np.float16))
        else:
            qt = _qtype(kind)
            w.add_tensor(gname, gguf.quants.quantize(arr, qt), raw_dtype=qt)
        types[gname] = kind
        if progress:
            progress(gname)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    finally:
        w.close()
    return ExportResult(path=path, target=target, size_bytes=os.path.getsize(path), tensor_types=types,
                        fallbacks=fallbacks, tokenizer=meta.summary())


# ------------------------------------------------------------------------------- reading back


def read_gguf_state_dict(path: str, n_layers: int | None = None, reader: Any = None) -> tuple[dict[str, Any], dict[str, str]]:
    """Dequantize every tensor of a llama / qwen2 / qwen3 GGUF back to an HF state dict (float32 torch) of the
    matching transformers class (``LlamaForCausalLM``, ``Qwen2ForCausalLM``, ``Qwen3ForCausalLM``).

    Returns ``(state_dict, {gguf name: GGML type})``. The Q/K row permutation is undone. A tied
    model's file has no ``output.weight``; the HF model ties the head to the embedding itself.
    """
    reader = reader if reader is not None else gguf.GGUFReader(path)  # parsing a 150k-token list takes seconds
    arch = str(_field_value(reader, "general.architecture"))
    if arch not in ARCHES:
        raise InputError(f"{path} is a GGUF of architecture {arch!r}; this reader knows {', '.join(ARCHES)}")
    layers = n_layers if n_layers is not None else int(_field_value(reader, f"{arch}.block_count"))
    heads = int(_field_value(reader, f"{arch}.attention.head_count"))
    kv_heads = int(_field_value(reader, f"{arch}.attention.head_count_kv"))
    names = gguf_to_hf_names(layers, arch)
    state: dict[str, Any] = {}
    types: dict[str, str] = {}
    for t in reader.tensors:
        if t.name not in names:
            raise InputError(f"{path}: tensor {t.name!r} is not part of a {layers}-layer {arch} model")
        key, perm = names[t.name]
        arr = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        arr = arr.reshape(tuple(reversed([int(x) for x in t.shape])))
        if perm == "q":
            arr = unpermute_qk(arr, heads)
        elif perm == "k":
            arr = unpermute_qk(arr, kv_heads)
        state[key] = torch.from_numpy(np.ascontiguousarray(arr))
        types[t.name] = t.tensor_type.name
    return state, types


def _field_value(reader: Any, key: str) -> Any:
    f = reader.get_field(key)
    if f is None:
        raise InputError(f"GGUF file lacks the {key} field")
    return f.contents()


def read_metadata(path: str) -> dict[str, Any]:
    """Every key/value of a GGUF file except the big token arrays (their lengths instead)."""
    reader = gguf.GGUFReader(path)
    out: dict[str, Any] = {}
    for key, f in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        value = f.contents()
        if isinstance(value, list) and len(value) > 16:
            value = f"<{len(value)} items>"
        out[key] = value
    return out
