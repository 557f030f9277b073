"""Rows for the tokens a vocabulary expansion adds: the mean of the rows of the pieces they are made of.

When our tokenizer *extends* a pretrained model's (the tokenizer stage's ``extend``: the checkpoint's tokens keep
their ids, ours come after), every token it adds is, by construction, a string the checkpoint's tokenizer already
encodes: a BPE merge of base tokens. The model already knows what that string means as those pieces, so the new
token starts where the pieces are:

* **input embedding**: the row of a new token is the mean of the rows of the ids the *checkpoint's* tokenizer cuts
  its string into (Fast Vocabulary Transfer, Gee et al. 2022, does the same for a whole new vocabulary);
* **output head**: untied, the mean of the head's rows of the same pieces, so the new token's logit starts as the
  mean of its pieces' logits; tied, the head *is* the embedding and follows it (nothing else to do).

How a token string is cut (:func:`decompose`): the checkpoint's BPE model segments the token string itself, in its
own alphabet (``base.model.tokenize``: the segmentation the base gives that string as one pre-token, exact for an
extension, whose tokens are byte-level strings of the same alphabet). When that does not reproduce the string (a
tokenizer of another convention: SentencePiece's ``▁``, byte fallback), the token is decoded to text by our
tokenizer and the text encoded by the checkpoint's (``via_text`` in the stats).

What does not get a piece mean, and gets the mean of all the checkpoint's token rows instead (``init: mean``):

* *added tokens* (special and control tokens: ``<|begin_of_text|>``, ``<|pad|>``, tool markers a base lacks): their
  string is markup, not text; the mean of ``<``, ``|``, ``pad``, ``|``, ``>`` would make the model read a pad as
  those characters;
* a token the checkpoint's tokenizer cuts into *nothing* (an empty string, characters it cannot encode).

Pieces are never new themselves: they are ids of the checkpoint's tokenizer, whose rows exist. A new token made of
other new tokens (a merge of two merges) is the mean of the *base* pieces of its whole string, not the mean of the
two new tokens' means, which would weight a short half as much as a long one. Rows of tokens both vocabularies hold
are copied untouched, so a text made only of old tokens goes through the expanded model exactly as through the old
one (same logits on the old ids; tests/unit/test_vocab_expansion.py checks it bitwise).

``new_token_init: auto`` (the default) takes ``pieces`` when our tokenizer extends the checkpoint's
(:func:`extends`) and ``mean`` otherwise: with a tokenizer of another family the pieces go through decode and encode
under another normaliser and pre-tokenizer, and we have measured neither that nor the piece mean against the global
mean there; configs written before this option keep producing what they produced.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

EMBED_KEY = "model.embed_tokens.weight"
HEAD_KEY = "lm_head.weight"
INITS = ("auto", "pieces", "mean", "random", "forbid")


def extends(our_tokens: list[str], old_vocab: dict[str, int]) -> bool:
    """Whether our tokenizer extends the old one: every old token is ours at the same id (``our_tokens[i]`` is the
    string of our id ``i``). Qwen 3's tokenizer extends Qwen 2.5's (same 151,665 tokens, four more added after)."""
    return bool(old_vocab) and all(0 <= i < len(our_tokens) and our_tokens[i] == t for t, i in old_vocab.items())


def resolve_init(requested: str, extending: bool) -> str:
    """The init actually used: ``auto`` -> ``pieces`` when extending, else ``mean``; ``forbid`` (which has already
    refused any new token) -> ``mean`` for the padding rows."""
    if requested not in INITS:
        raise ValueError(f"unknown new_token_init {requested!r}; choose one of {', '.join(INITS)}")
    if requested == "auto":
        return "pieces" if extending else "mean"
    return "mean" if requested == "forbid" else requested


@dataclass
class Pieces:
    """Each new token's pieces, and the new tokens that get the global mean instead (with why)."""

    pieces: dict[int, list[int]] = field(default_factory=dict)  # our id -> the checkpoint's ids of its pieces
    fallback: dict[int, str] = field(default_factory=dict)  # our id -> "added" | "no pieces"
    via_text: int = 0  # tokens cut by decoding to text and encoding (not by the BPE model on the token string)

    def stats(self) -> dict[str, Any]:
        counts = [len(p) for p in self.pieces.values()]
        reasons = Counter(self.fallback.values())
        return {
            "from_pieces": len(self.pieces),
            "pieces_mean": round(sum(counts) / len(counts), 3) if counts else 0.0,
            "pieces_max": max(counts, default=0),
            "global_mean_added": reasons.get("added", 0),
            "global_mean_no_pieces": reasons.get("no pieces", 0),
            "via_text": self.via_text,
        }


def _bpe_pieces(base: Any, token: str) -> list[tuple[int, str]] | None:
    model = getattr(base, "model", None)
    if type(model).__name__ != "BPE":
        return None
    try:
        pieces = [(t.id, t.value) for t in model.tokenize(token)]
    except Exception:  # a character the model has no symbol for, without byte fallback
        return None
    return pieces


def decompose(tokens: list[str], new_ids: Iterable[int], base: Any, *, old_rows: int, added_ids: Iterable[int] = (),
              to_text: Callable[[str], str] | None = None) -> Pieces:
    """Cut each new token (``tokens[i]``: the string of our id ``i``) into ids of the checkpoint's tokenizer ``base``
    (a ``tokenizers.Tokenizer``, e.g. ``AutoTokenizer(...).backend_tokenizer``) whose rows exist (< ``old_rows``).

    ``added_ids``: our added (special / control) tokens, which get the global mean. ``to_text``: our tokenizer's
    token-string -> text (``convert_tokens_to_string``), for tokens the base's BPE model does not reproduce."""
    added = set(added_ids)
    out = Pieces()
    for nid in new_ids:
        if nid in added:
            out.fallback[nid] = "added"
            continue
        token = tokens[nid]
        ids: list[int] = []
        bpe = _bpe_pieces(base, token) if token else None
        if bpe is not None and "".join(v for _, v in bpe) == token and all(0 <= i < old_rows for i, _ in bpe):
            ids = [i for i, _ in bpe]
        elif token and to_text is not None:
            text = to_text(token)
            if text:
                ids = [i for i in base.encode(text, add_special_tokens=False).ids if 0 <= i < old_rows]
                out.via_text += 1
        if ids:
            out.pieces[nid] = ids
        else:
            out.fallback[nid] = "no pieces"
    return out


def fill_piece_means(new: Any, old: Any, pieces: Pieces) -> None:
    """In place: row ``nid`` of ``new`` := the mean of ``old``'s rows of its pieces, in float32, cast to ``new``'s
    dtype. Tokens with the same number of pieces go in one gather (16k tokens one at a time took 35-50 s on a
    Qwen-sized matrix, 2 cores; grouped, under a second)."""
    import torch

    by_count: dict[int, list[int]] = {}
    for nid, ids in pieces.pieces.items():
        by_count.setdefault(len(ids), []).append(nid)
    with torch.no_grad():
        for nids in by_count.values():
            idx = torch.tensor([pieces.pieces[n] for n in nids])  # [tokens, pieces]
            new[torch.tensor(nids)] = old[idx].float().mean(dim=1).to(new.dtype)


def transfer_embeddings(sd: dict[str, Any], match: Any, rows: int, init: str, *, tied: bool, pieces: Pieces | None = None,
                        generator: Any, std: float) -> None:
    """Rebuild ``sd``'s input embedding and output head for our vocabulary (``match``: a
    :class:`pipeline.models.llama.VocabMatch`), in place: matched rows copied; our new tokens by ``init`` (``pieces``,
    ``mean``, ``random``; ``pieces`` needs ``pieces``, its fallback tokens and the padding rows get the mean); a tied
    head is the new embedding itself, an untied one is rebuilt the same way from its own rows."""
    from pipeline.models.llama import transfer_vocab

    if init == "pieces" and pieces is None:
        raise ValueError("init 'pieces' needs the new tokens' pieces (decompose)")
    base_init = "mean" if init == "pieces" else init
    keys = [EMBED_KEY] if tied else [EMBED_KEY, HEAD_KEY]
    for key in keys:
        old = sd[key]
        new = transfer_vocab(old, match, rows, base_init, generator=generator, std=std)
        if init == "pieces":
            fill_piece_means(new, old, pieces)  # type: ignore[arg-type]
        sd[key] = new
    if tied:
        sd[HEAD_KEY] = sd[EMBED_KEY]


__all__ = ["INITS", "Pieces", "decompose", "extends", "fill_piece_means", "resolve_init", "transfer_embeddings"]
