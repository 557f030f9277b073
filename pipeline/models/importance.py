"""Which contiguous run of decoder layers changes the residual stream least: importance-based down-scaling.

The measure is the one of Gromov et al. 2024, "The Unreasonable Ineffectiveness of the Deeper Layers"
(arXiv:2403.17887): for a run of ``n`` layers starting at layer ``l``,

    d(l, n) = arccos(cos(h_l, h_{l+n})) / pi

where ``h_l`` is the residual stream entering layer ``l`` (``h_0`` the embeddings, ``h_L`` what leaves the
last of ``L`` layers, before the final norm), the cosine taken over the hidden dimension of one token. A run
whose output points where its input did (d near 0) barely changes what the layers above it see, so it is the
one to remove: the pruned model feeds ``h_l`` straight into layer ``l + n``. The paper scores the final token
of each sequence; our validation blocks are cuts of a packed stream, where no position is special and every
position is the last token of its causal prefix, so the score here is the mean over every token of every
block (B x T samples instead of B).

Candidates: starts ``0 .. L - n - 1`` by default, so the last layer is always kept. The paper's similarity
method ranges over every start, but it finds the final layer to be the exception to "deeper layers are
redundant" and its simple heuristic ("drop the deepest layers") keeps the final one; that layer also writes
the stream the output head reads. ``keep_last_layer=False`` scores every start ``0 .. L - n``.

The hidden states are taken with forward hooks on the decoder layers (a pre-hook on layer 0 for ``h_0``, an
output hook on each layer for ``h_{i+1}``), not ``output_hidden_states``: transformers reports the *normed*
final state as the last entry of ``hidden_states``, which is not ``h_L``. The hooks keep only the last
``n + 1`` states of the forward pass in flight, so scoring costs no more memory than ``n + 1`` activations and
rides along any forward pass: :class:`RunDistance` is a context manager, and the init stage runs the existing
validation-perplexity code (:func:`pipeline.evaluation.perplexity.shard_loss`) inside it, so the scores and the
perplexity before the drop come from one pass over the blocks.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch


def decoder_layers(model: Any) -> Any:
    """The ``nn.ModuleList`` of decoder layers of an HF causal LM (Llama, Qwen2/3 and the like: ``model.model.layers``)."""
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no decoder layer list (model.model.layers)")
    return layers


def candidate_starts(n_layers: int, run: int, keep_last_layer: bool = True) -> list[int]:
    """The first layers of the runs of ``run`` consecutive layers that may be removed (see the module docstring)."""
    if not 1 <= run < n_layers:
        raise ValueError(f"a run of {run} layers cannot be removed from {n_layers}: keep at least one layer")
    return list(range(n_layers - run + (0 if keep_last_layer else 1)))


def angular_distance(a: Any, b: Any) -> Any:
    """arccos(cos(a, b)) / pi along the last dimension, in [0, 1] (0: same direction), in float32.

    Computed as 2 atan2(|a' - b'|, |a' + b'|) / pi of the unit vectors a', b': the same angle, but exact near 0,
    where arccos of a float32 cosine is not (a cosine 1 ulp below 1 reads as an angle of 3e-4 rad)."""
    a = torch.nn.functional.normalize(a.float(), dim=-1, eps=1e-12)
    b = torch.nn.functional.normalize(b.float(), dim=-1, eps=1e-12)
    return 2.0 * torch.atan2((a - b).norm(dim=-1), (a + b).norm(dim=-1)) / math.pi


def _hidden(output: Any) -> Any:
    return output[0] if isinstance(output, (tuple, list)) else output


class RunDistance:
    """While active, every forward pass of ``model`` adds to the mean angular distance of each candidate run of
    ``run`` layers (over every token of every sequence). ``scores()``: ``{start: mean distance}``."""

    def __init__(self, model: Any, run: int, *, keep_last_layer: bool = True):
        self.layers = decoder_layers(model)
        self.n_layers = len(self.layers)
        self.run = run
        self.starts = candidate_starts(self.n_layers, run, keep_last_layer)
        self._sums = [0.0] * len(self.starts)
        self._count = 0  # tokens seen per start (every start sees every token)
        self._states: dict[int, Any] = {}
        self._handles: list[Any] = []

    def _record(self, index: int, hidden: Any) -> None:
        if index == 0:
            self._states = {}
        self._states[index] = hidden.detach()
        start = index - self.run
        if 0 <= start <= self.starts[-1]:
            d = angular_distance(self._states.pop(start), hidden)
            self._sums[start] += float(d.double().sum())
            if start == 0:
                self._count += d.numel()
        self._states.pop(start, None)  # states older than the window are never needed again

    def __enter__(self) -> "RunDistance":
        def pre_hook(_module: Any, args: tuple, kwargs: dict) -> None:
            self._record(0, args[0] if args else kwargs["hidden_states"])

        self._handles.append(self.layers[0].register_forward_pre_hook(pre_hook, with_kwargs=True))
        for i, layer in enumerate(self.layers):
            self._handles.append(layer.register_forward_hook(
                lambda _m, _a, out, i=i: self._record(i + 1, _hidden(out))))
        return self

    def __exit__(self, *_: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._states = {}

    def scores(self) -> dict[int, float]:
        if not self._count:
            raise ValueError("no forward pass ran while the layer-run distances were being recorded")
        return {s: self._sums[i] / self._count for i, s in enumerate(self.starts)}

    @property
    def tokens(self) -> int:
        return self._count


def least_important_run(scores: dict[int, float]) -> int:
    """The start of the run with the smallest distance (the shallowest one on a tie)."""
    return min(scores, key=lambda s: (scores[s], s))


def run_scores(model: Any, batches: Iterable[Any], run: int, *, keep_last_layer: bool = True) -> dict[int, float]:
    """``{start: mean angular distance}`` of every candidate run of ``run`` layers over ``batches`` of input ids
    (``(B, T)`` tensors on the model's device)."""
    with RunDistance(model, run, keep_last_layer=keep_last_layer) as probe, torch.no_grad():
        for ids in batches:
            model(input_ids=ids)
    return probe.scores()
