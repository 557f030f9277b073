"""Model FLOPs utilisation: the FLOPs of one trained token, the GPUs' peak FLOP/s, and MFU.

FLOPs per token (:func:`matmul_flops_per_token`) -- PaLM's estimate (Chowdhery et al. 2022,
"PaLM: Scaling Language Modeling with Pathways", appendix B)::

    6 * N  +  12 * L * H * Q * T

* ``N``: every parameter except the input embedding (a lookup, no FLOPs). The output head is a
  ``hidden x vocab`` matmul on every token whether or not its weight is tied to the embedding, so
  its ``V * h`` is counted once in both cases (a tied model's ``N`` is its whole parameter count,
  an untied model's is the total less the embedding). ``N`` is counted from the config, so ZeRO-3
  partitioning cannot shrink it. It includes the RMSNorm gains (``2*L*h + h``, elementwise, not
  matmuls: under 0.02% of N for every preset) as PaLM's parameter count does, and equals the
  "non-embedding" column of ``pipeline/models/llama.py``'s preset table.
* ``6``: 2 FLOPs per multiply-add, forward once and backward twice (activation and weight gradients).
* ``12*L*H*Q*T``: the attention scores ``Q K^T`` and ``softmax * V`` (2 matmuls of ``T x Q`` per head,
  2 FLOPs each, x3 for training), ``L`` layers, ``H`` query heads of size ``Q``, ``T`` the sequence
  length. Like PaLM, the full ``T x T`` square is counted although a causal kernel computes about half of
  it; GQA does not change it (the query heads do the matmuls). Activation recomputation (gradient
  checkpointing) is not counted: MFU counts the model's FLOPs, not the hardware's.

Peak FLOP/s (:func:`peak_flops_for`): dense (no 2:4 sparsity) tensor-core bf16/fp16 with fp32
accumulate, per GPU, from NVIDIA's datasheets (cited at each entry). Other dtypes have no entry (fp32
training does not run on these tensor cores at these rates).

MFU = tokens/s per device x FLOPs per token / peak FLOP/s.
"""

from __future__ import annotations

import re
from typing import Any

# (pattern on torch.cuda.get_device_name(), label, dense bf16 FLOP/s). First match wins: the more specific
# names come first ("H100 PCIe" before "H100", "L40S" before "L4", "A100" never matches "A10").
_PEAKS: tuple[tuple[str, str, float], ...] = (
    # NVIDIA H100 Tensor Core GPU datasheet (2023): BF16 Tensor Core 1,979 TFLOPS (SXM) / 1,513 (PCIe) /
    # 1,671 (NVL) "with sparsity"; dense is half: 989.4 / 756.5 / 835.5. Device names: "NVIDIA H100 80GB HBM3"
    # (SXM), "NVIDIA H100 PCIe", "NVIDIA H100 NVL".
    (r"\bH100\b.*\bPCIe\b", "H100 PCIe", 756e12),
    (r"\bH100\b.*\bNVL\b", "H100 NVL", 835e12),
    (r"\bH100\b", "H100 SXM", 989e12),
    # NVIDIA GH200 Grace Hopper Superchip datasheet: the H100 GPU's BF16 1,979 TFLOPS with sparsity -> 989 dense.
    (r"\bGH200\b", "GH200", 989e12),
    # NVIDIA H200 Tensor Core GPU datasheet (2024): BF16 1,979 TFLOPS (SXM) / 1,671 (NVL) with sparsity.
    (r"\bH200\b.*\bNVL\b", "H200 NVL", 835e12),
    (r"\bH200\b", "H200 SXM", 989e12),
    # NVIDIA DGX B200 / HGX B200 datasheet (2024): FP16/BF16 Tensor Core 4.5 PFLOPS per GPU with sparsity -> 2.25 dense.
    (r"\bB200\b", "B200", 2250e12),
    # NVIDIA A100 Tensor Core GPU datasheet (2021): BF16 Tensor Core 312 TFLOPS (624 with sparsity), the same
    # for 40GB/80GB and SXM/PCIe. Names: "NVIDIA A100-SXM4-80GB", "NVIDIA A100-SXM4-40GB",
    # "NVIDIA A100-PCIE-40GB", "NVIDIA A100 80GB PCIe".
    (r"\bA100\b", "A100", 312e12),
    # NVIDIA L40S datasheet (2023): BF16 Tensor Core 362.05 TFLOPS (733 with sparsity).
    (r"\bL40S\b", "L40S", 362.05e12),
    # NVIDIA L40 datasheet (2022): BF16 Tensor Core 181.05 TFLOPS (362.1 with sparsity).
    (r"\bL40\b", "L40", 181.05e12),
    # NVIDIA L4 datasheet (2023): BF16 Tensor Core 121 TFLOPS (242 with sparsity).
    (r"\bL4\b", "L4", 121e12),
    # NVIDIA A10 datasheet (2021): BF16 Tensor Core 125 TFLOPS (250 with sparsity). The "A10G" (AWS G5) is
    # not in NVIDIA's datasheets and is clocked differently: it has no entry (set peak_flops for it).
    (r"\bA10\b", "A10", 125e12),
    # NVIDIA Ada Lovelace architecture whitepaper (v1.1, 2023), table 2: GeForce RTX 4090 peak BF16 Tensor
    # TFLOPS with FP32 accumulate 165.2 (330.4 with sparsity); PyTorch's bf16 matmuls accumulate in fp32.
    (r"\bRTX 4090\b", "RTX 4090", 165.2e12),
)

_TENSOR_DTYPES = {"bf16", "bfloat16", "torch.bfloat16", "fp16", "float16", "half", "torch.float16"}


def peak_flops_for(device_name: str | None, dtype: str = "bf16") -> float | None:
    """Dense tensor-core peak FLOP/s of one GPU, by its ``torch.cuda.get_device_name()``, for ``dtype``
    bf16/fp16 (the same rate on all these GPUs). ``None``: a GPU or dtype not in the table."""
    if not device_name or str(dtype).lower() not in _TENSOR_DTYPES:
        return None
    for pattern, _label, peak in _PEAKS:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            return peak
    return None


def resolve_peak(override: float | None, device_name: str | None, dtype: str) -> tuple[float | None, str]:
    """(peak FLOP/s for MFU, where it came from): the configured number when given, else the table's entry
    for the device; ``(None, why)`` when neither, so MFU is left out."""
    if override:
        return float(override), "config peak_flops"
    peak = peak_flops_for(device_name, dtype)
    if peak is not None:
        return peak, f"table: {device_name} {dtype}"
    if not device_name:
        return None, "no MFU: no GPU and no cpu_peak_flops configured"
    return None, (f"no MFU: no peak FLOP/s for {device_name!r} in {dtype} in pipeline/training/flops.py's table; "
                  "set peak_flops (dense FLOP/s per device) to report it")


def _get(cfg: Any, *names: str, default: Any = None) -> Any:
    for n in names:
        v = cfg.get(n) if isinstance(cfg, dict) else getattr(cfg, n, None)
        if v is not None:
            return v
    return default


def matmul_flops_per_token(cfg: Any, seq_len: int) -> float:
    """Training FLOPs per token, ``6N + 12·L·H·Q·T`` (module docstring), from a Llama config (a
    ``transformers.LlamaConfig``, a dict of its fields, or a ``pipeline.models.llama.Shape`` with ``vocab_size``
    given in a dict). The head is counted once, tied or not; only the input embedding is left out of ``N``."""
    h = int(_get(cfg, "hidden_size"))
    layers = int(_get(cfg, "num_hidden_layers", "num_layers"))
    heads = int(_get(cfg, "num_attention_heads", "num_heads"))
    kv = int(_get(cfg, "num_key_value_heads", "num_kv_heads", default=heads))
    q = int(_get(cfg, "head_dim", default=h // heads))
    ffn = int(_get(cfg, "intermediate_size"))
    vocab = int(_get(cfg, "vocab_size"))
    attn = h * heads * q + 2 * h * kv * q + heads * q * h  # q, k, v, o projections
    if _get(cfg, "attention_bias", default=False):
        attn += heads * q + 2 * kv * q + h
    mlp = 3 * h * ffn  # SwiGLU: gate, up, down
    if _get(cfg, "mlp_bias", default=False):
        mlp += 2 * ffn + h
    n = layers * (attn + mlp + 2 * h) + h + vocab * h  # + 2 RMSNorms per layer, final norm, output head (once)
    return 6.0 * n + 12.0 * layers * heads * q * seq_len


def mfu(tokens_per_s_per_device: float | None, fpt: float, peak_flops: float | None) -> float | None:
    """Model FLOPs utilisation; ``None`` without a peak or a throughput."""
    if not peak_flops or not tokens_per_s_per_device:
        return None
    return tokens_per_s_per_device * fpt / peak_flops
