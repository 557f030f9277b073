"""Quality of a quantised model against the original, on the same token blocks.

Perplexity here is ``exp`` of the mean next-token negative log-likelihood over every position
of every block (a block of ``seq_len`` tokens gives ``seq_len - 1`` predictions), the same
blocks for every variant. The blocks are the packed validation shards (``pack``'s ``val``
split), read through :class:`pipeline.data.packed.PackedDataset`.

Two engines compute it: the transformers model (the original, the int8 quanto model, and the
GGUF files dequantised back into an HF model), and, when ``llama_cpp`` (llama-cpp-python) is
importable, llama.cpp itself on the GGUF file. Greedy decoding compares the two on a prompt
given as token ids (so llama.cpp's built-in pre-tokenizer plays no part).
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.data.packed import PackedDataset
from pipeline.errors import InputError


def eval_blocks(url: str, split: str, max_blocks: int | None, *, storage_options: dict | None = None) -> np.ndarray:
    """Up to ``max_blocks`` blocks of ``split``, evenly spread over it, as an int64 array (n, seq_len)."""
    ds = PackedDataset(url, split, storage_options=storage_options, verify=True)
    n = len(ds)
    if n == 0:
        raise InputError(f"{url} has an empty {split!r} split: nothing to measure perplexity on (repack with val_fraction > 0)")
    return np.stack([ds.block(int(i)).astype(np.int64) for i in eval_indices(n, max_blocks)])


def eval_indices(n: int, max_blocks: int | None) -> np.ndarray:
    """The block indices :func:`eval_blocks` reads from a split of ``n`` blocks (evenly spread)."""
    take = n if not max_blocks or max_blocks >= n else max_blocks
    return np.unique(np.linspace(0, n - 1, take).round().astype(np.int64))


def hf_nll(model: Any, blocks: np.ndarray, *, batch_size: int = 4,
           bar: Callable[[Iterable[Any]], Iterable[Any]] | None = None) -> tuple[float, int]:
    """(sum of next-token NLL, number of predictions) of a causal LM over ``blocks``."""
    total, count = 0.0, 0
    starts = range(0, len(blocks), batch_size)
    model.eval()
    with torch.inference_mode():
        for s in (bar(starts) if bar else starts):
            ids = torch.from_numpy(blocks[s:s + batch_size])
            logits = model(input_ids=ids).logits.float()
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
            total += float(loss)
            count += ids[:, 1:].numel()
    return total, count


def perplexity(model: Any, blocks: np.ndarray, *, batch_size: int = 4,
               bar: Callable[[Iterable[Any]], Iterable[Any]] | None = None) -> float:
    total, count = hf_nll(model, blocks, batch_size=batch_size, bar=bar)
    return math.exp(total / count)


def delta_pct(value: float, reference: float) -> float:
    return round(100.0 * (value - reference) / reference, 4)


def hf_greedy(model: Any, prompt_ids: list[int], n_new: int) -> list[int]:
    """``n_new`` argmax tokens after ``prompt_ids`` (no stop at EOS: a fixed-length comparison)."""
    ids = torch.tensor([list(prompt_ids)])
    out: list[int] = []
    # the KV cache argument and output: `past_key_values` up to at least 5.17 (our floor), `cache` in later 5.x
    kv = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    model.eval()
    with torch.inference_mode():
        past = None
        step = ids
        for _ in range(n_new):
            res = model(input_ids=step, use_cache=True, **{kv: past})
            past = res[kv]
            nxt = int(res.logits[0, -1].argmax())
            out.append(nxt)
            step = torch.tensor([[nxt]])
    return out


# ------------------------------------------------------------------------------- llama.cpp
# llama_cpp (llama-cpp-python) stays imported where it is used: it is optional (no dependency of
# the package; `make test-llamacpp` builds it), and its absence is an answer here, not an error.


def llama_cpp_version() -> str | None:
    """llama-cpp-python's version when it imports, else None."""
    try:
        import llama_cpp
    except Exception:  # noqa: BLE001 - a broken build is as good as absent here
        return None
    return getattr(llama_cpp, "__version__", "unknown")


def _load_llama(path: str, n_ctx: int, threads: int | None) -> Any:
    from llama_cpp import Llama

    return Llama(model_path=path, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True, verbose=False,
                 n_threads=threads, n_threads_batch=threads, seed=0)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def llamacpp_perplexity(path: str, blocks: np.ndarray, *, threads: int | None = None,
                        bar: Callable[[Iterable[Any]], Iterable[Any]] | None = None) -> float:
    """Perplexity of a GGUF file under llama.cpp, on the same blocks (each evaluated from an empty cache)."""
    seq = int(blocks.shape[1])
    llm = _load_llama(path, seq, threads)
    total, count = 0.0, 0
    try:
        for block in (bar(blocks) if bar else blocks):
            llm.reset()
            llm.eval([int(t) for t in block])
            logp = _log_softmax(np.asarray(llm.scores[: seq - 1]))
            total -= float(logp[np.arange(seq - 1), block[1:]].sum())
            count += seq - 1
    finally:
        llm.close() if hasattr(llm, "close") else None
    return math.exp(total / count)


def llamacpp_greedy(path: str, prompt_ids: list[int], n_new: int, *, threads: int | None = None) -> list[int]:
    """``n_new`` argmax tokens from llama.cpp after ``prompt_ids`` (fed as ids, not text)."""
    llm = _load_llama(path, len(prompt_ids) + n_new + 8, threads)
    out: list[int] = []
    try:
        llm.reset()
        llm.eval(list(prompt_ids))
        for _ in range(n_new):
            nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            out.append(nxt)
            llm.eval([nxt])
    finally:
        llm.close() if hasattr(llm, "close") else None
    return out


def llamacpp_tokenize(path: str, texts: list[str], *, add_special: bool = False) -> list[list[int]]:
    """llama.cpp's own ids for each text (its tokenizer, as the GGUF describes it: vocabulary, merges,
    ``tokenizer.ggml.pre``); ``add_special`` adds BOS when the GGUF says ``add_bos_token``."""
    from llama_cpp import Llama

    llm = Llama(model_path=path, vocab_only=True, verbose=False)
    try:
        return [list(llm.tokenize(t.encode("utf-8"), add_bos=add_special, special=False)) for t in texts]
    finally:
        llm.close() if hasattr(llm, "close") else None


def llamacpp_greedy_text(path: str, text: str, n_new: int, *, threads: int | None = None) -> tuple[list[int], list[int]]:
    """(llama.cpp's ids of ``text`` with BOS as the GGUF says, its ``n_new`` argmax tokens after them): the prompt
    tokenized by llama.cpp itself, as llama-server or Ollama would."""
    prompt = llamacpp_tokenize(path, [text], add_special=True)[0]
    return prompt, llamacpp_greedy(path, prompt, n_new, threads=threads)
