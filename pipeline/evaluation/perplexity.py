"""Perplexity on validation shards and on raw held-out text (bits per byte per language).

Validation shards: the mean next-token loss over the first ``max_blocks`` blocks (spread evenly
over the split), exactly what the training stages call ``val_loss``.

Raw text: each document is encoded with the model's own tokenizer, BOS first (EOS when there is
no BOS). A document that fits the context (``max_length`` ids) is one window. A longer one is
measured with a sliding window, the "perplexity of fixed-length models" recipe of the Hugging
Face docs: windows of ``max_length`` ids whose starts advance by ``stride``; each window scores
only the ids no earlier window scored (its last ``stride`` or fewer), so every id after the first
is predicted exactly once, and the first id a later window scores sees ``max_length - stride``
ids of context, the last ones ``max_length - 1`` (in the first window an id at position p sees
p). Default stride: half the context (each window costs a forward pass, so the default does
about twice the work of non-overlapping windows). ``stride = max_length - 1`` is the older
one-token overlap, whose later windows started almost without context and so read worse than
the model is. Reported: text tokens, perplexity over them, and bits per byte = total loss in
bits / UTF-8 bytes of the text, the number that stays comparable between tokenizers of
different granularity; also the window, the stride, how many windows came after a document's
first, and the least context any of them gave the first id it scored (None: every document fit).
"""

from __future__ import annotations

import json
import math
from typing import Any, Callable, Iterable

import fsspec
import numpy as np
import torch
import torch.nn.functional as F

from pipeline.data.documents import DocumentSet
from pipeline.data.packing import route_to_val
from pipeline.errors import InputError
from pipeline.storage import storage_options_from_env

LN2 = math.log(2.0)


def spread_indices(n: int, k: int | None) -> list[int]:
    """``k`` block indices spread evenly over ``range(n)`` (all of them when k is None or >= n)."""
    if k is None or k >= n:
        return list(range(n))
    return sorted({int(i) for i in np.linspace(0, n - 1, k).round()})


def _sum_nll(model: Any, ids: Any, mask: Any, targets_mask: Any) -> tuple[float, int]:
    """Summed next-token loss over positions whose *target* is marked in ``targets_mask``."""
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    target = ids[:, 1:]
    keep = targets_mask[:, 1:].bool()
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none")
    nll = nll.reshape(target.shape)[keep]
    return float(nll.sum()), int(keep.sum())


def shard_loss(model: Any, dataset: Any, *, max_blocks: int | None, batch_size: int, device: str,
               bar: Callable[..., Any] | None = None) -> dict[str, Any]:
    """Mean token loss and perplexity over blocks of a :class:`~pipeline.data.packed.PackedDataset`."""
    picks = spread_indices(len(dataset), max_blocks)
    if not picks:
        raise InputError(f"{dataset.uri} has no {dataset.split} blocks to measure (pack with val_fraction > 0)")
    total, count = 0.0, 0
    batches = [picks[i:i + batch_size] for i in range(0, len(picks), batch_size)]
    it: Iterable[list[int]] = bar(batches, desc="val shards", unit=" batch") if bar else batches
    for chunk in it:
        ids = torch.stack([torch.from_numpy(dataset.block(i).astype(np.int64)) for i in chunk]).to(device)
        ones = torch.ones_like(ids)
        s, n = _sum_nll(model, ids, ones, ones)
        total += s
        count += n
    loss = total / count
    return {"blocks": len(picks), "tokens": count, "loss": loss, "perplexity": math.exp(min(loss, 50.0))}


def default_stride(width: int) -> int:
    """Half the context, at least one id."""
    return max(1, width // 2)


def _windows(seq: list[int], width: int, stride: int | None = None) -> list[tuple[list[int], int]]:
    """Sliding windows over ``seq``: ``(ids, first)`` pairs where ``ids`` is at most ``width`` long
    and positions ``first .. len(ids) - 1`` of it are the targets this window scores.

    Starts advance by ``stride`` (1 .. width - 1; None: :func:`default_stride`); a window scores
    the ids after the previous window's end, so each id after ``seq[0]`` is a target exactly once
    and, outside the first window, with at least ``width - stride`` ids of context. The last
    window ends at the end of ``seq`` (it may be shorter than ``width``).
    """
    if width < 2:
        raise ValueError(f"window width {width} < 2: nothing to predict")
    stride = default_stride(width) if stride is None else stride
    if not 1 <= stride <= width - 1:
        raise ValueError(f"stride {stride} outside 1 .. {width - 1} (the window width {width} minus one)")
    if len(seq) <= width:
        return [(seq, 1)]
    out: list[tuple[list[int], int]] = []
    begin, prev_end = 0, 1  # seq[0] is never a target
    while True:
        end = min(begin + width, len(seq))
        out.append((seq[begin:end], prev_end - begin))
        if end == len(seq):
            return out
        prev_end = end
        begin += stride


def text_perplexity(model: Any, tok: Any, texts: list[str], *, max_length: int, batch_size: int, device: str,
                    stride: int | None = None, bar: Callable[..., Any] | None = None,
                    desc: str = "text") -> dict[str, Any]:
    """Tokens, perplexity and bits per byte of ``texts`` under ``model`` (see the module docstring).

    ``stride``: how far each window of ``max_length`` ids advances over a long document (None:
    half of it; capped at ``max_length - 1``, the one-token overlap)."""
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise InputError("no held-out text to measure")
    start_id = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    width = max(2, max_length)
    step = min(default_stride(width) if stride is None else stride, width - 1)
    windows: list[tuple[list[int], int]] = []
    later: list[int] = []  # context of the first id each window after a document's first scores
    n_tokens = n_bytes = 0
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        n_tokens += len(ids)
        n_bytes += len(text.encode("utf-8"))
        seq = ([start_id] if start_id is not None else []) + ids
        for k, (w, first) in enumerate(_windows(seq, width, step)):
            if len(w) > first:
                windows.append((w, first))
                if k:
                    later.append(first)
    windows.sort(key=lambda wf: len(wf[0]), reverse=True)  # similar lengths together: little padding
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    total, count = 0.0, 0
    batches = [windows[i:i + batch_size] for i in range(0, len(windows), batch_size)]
    it: Iterable[list[tuple[list[int], int]]] = bar(batches, desc=desc, unit=" batch") if bar else batches
    for group in it:
        cols = max(len(w) for w, _ in group)
        ids = torch.full((len(group), cols), pad, dtype=torch.long)
        mask = torch.zeros((len(group), cols), dtype=torch.long)
        targets = torch.zeros((len(group), cols), dtype=torch.long)
        for r, (w, first) in enumerate(group):
            ids[r, :len(w)] = torch.tensor(w)
            mask[r, :len(w)] = 1
            targets[r, first:len(w)] = 1  # earlier positions are context only
        s, n = _sum_nll(model, ids.to(device), mask.to(device), targets.to(device))
        total += s
        count += n
    loss = total / max(count, 1)
    return {
        "documents": len(texts),
        "tokens": n_tokens,
        "predicted_tokens": count,
        "bytes": n_bytes,
        "loss": loss,
        "perplexity": math.exp(min(loss, 50.0)),
        "bits_per_byte": total / LN2 / max(n_bytes, 1),
        "bytes_per_token": n_bytes / max(n_tokens, 1),
        "window": width,
        "stride": step,
        "later_windows": len(later),
        "later_min_context": min(later) if later else None,
    }


# ------------------------------------------------------------------------------ held-out text


def heldout_from_run(clean: Any, pack_config: dict[str, Any], languages: list[str], max_documents: int,
                     bar: Callable[..., Any] | None = None) -> dict[str, list[str]]:
    """Documents of ``clean/`` that the pack stage routed to validation (never trained on), per language."""
    fraction, seed = float(pack_config.get("val_fraction", 0.0)), int(pack_config.get("seed", 0))
    if fraction <= 0:
        raise InputError("the shards were packed with val_fraction 0, so no clean document is held out: set "
                         "heldout.from_run false and list heldout.files instead")
    docs = DocumentSet(clean)
    found: dict[str, list[str]] = {lang: [] for lang in languages}
    with (bar(total=len(docs), desc="held-out text", unit=" doc") if bar else _NullBar()) as pbar:
        for batch in docs.iter_batches(columns=["id", "text", "lang"], batch_size=4096):
            for doc_id, text, lang in zip(batch["id"], batch["text"], batch["lang"]):
                if lang in found and len(found[lang]) < max_documents and route_to_val(str(doc_id), fraction, seed):
                    found[lang].append(text)
            pbar.update(len(batch["id"]))
            if all(len(v) >= max_documents for v in found.values()):
                break
    return found


def read_text_files(paths: list[str]) -> list[str]:
    """Documents from local or fsspec paths: .jsonl (a ``text`` field per line) or plain text (blank-line separated)."""
    out: list[str] = []
    for path in paths:
        opts = storage_options_from_env() if "://" in path and not path.startswith("file://") else {}
        try:
            with fsspec.open(path, "rt", encoding="utf-8", **opts) as fh:
                data = fh.read()
        except FileNotFoundError:
            raise InputError(f"held-out text file {path} does not exist") from None
        except UnicodeDecodeError:
            raise InputError(f"held-out text file {path} is not UTF-8 text") from None
        if path.endswith(".jsonl"):
            for n, line in enumerate(data.splitlines(), 1):
                if line.strip():
                    try:
                        out.append(json.loads(line)["text"])
                    except (ValueError, KeyError, TypeError):
                        raise InputError(f"{path}:{n}: expected a JSON object with a \"text\" field") from None
        else:
            out.extend(p.strip() for p in data.split("\n\n") if p.strip())
    return out


class _NullBar:
    def __enter__(self) -> "_NullBar":
        return self

    def __exit__(self, *_: Any) -> None:
        return None

    def update(self, _n: int) -> None:
        return None
