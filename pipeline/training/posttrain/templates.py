"""The model folder for post-training, checked before any weights load: its tokenizer and chat template, its
positions against max_length, and the tokens that end an assistant turn.

ChatML tokenizers get :data:`CHATML_TRAIN_TEMPLATE`, which renders exactly like the tokenizer stage's ChatML (BOS,
tools, tool calls and tool results) but marks each assistant turn (its content, tool calls and ``<|im_end|>``) with
``{% generation %}``, so that TRL's ``assistant_only_loss`` trains on what the assistant says and nothing else.
"""

from __future__ import annotations

from typing import Any

from transformers import AutoTokenizer

from pipeline.data.tokenization import chat_template
from pipeline.errors import InputError
from pipeline.models.checkpoint import causal_lm_config
from pipeline.training.common import has_tokenizer, local_copy

IM_START, IM_END = "<|im_start|>", "<|im_end|>"

# ChatML exactly as pipeline.data.tokenization.chat_template renders it (BOS first, tools and tool calls), with what
# the assistant says -- its content, tool calls and <|im_end|> -- inside {% generation %}, so that the assistant mask
# covers what the model must say.
CHATML_TRAIN_TEMPLATE = chat_template(IM_START, IM_END, bos=True, tools=True, generation_markers=True)


def is_chatml(template: str | None) -> bool:
    return bool(template) and IM_START in template and IM_END in template  # type: ignore[operator]


def prepare_tokenizer(tok_dir: str, chat_template: str = "auto") -> Any:
    """The tokenizer with a chat template that marks assistant tokens; InputError when it cannot have one."""
    tok = AutoTokenizer.from_pretrained(tok_dir)
    vocab = tok.get_vocab()
    has_chat_tokens = IM_START in vocab and IM_END in vocab
    if chat_template != "auto":
        tok.chat_template = chat_template
    elif tok.chat_template is None or is_chatml(tok.chat_template):
        if not has_chat_tokens:
            raise InputError(
                f"the tokenizer in {tok_dir} has no chat template and no {IM_START} / {IM_END} tokens: train the tokenizer "
                "with the chat tokens (tokenizer stage, special_tokens.chat) or set chat_template in the config")
        tok.chat_template = CHATML_TRAIN_TEMPLATE
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def _ids(tok: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, **kw: Any) -> dict[str, Any]:
    out = tok.apply_chat_template(messages, tools=tools or None, tokenize=True, return_dict=True, **kw)
    return {k: list(v) for k, v in out.items()}


def assistant_alignment(tok: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> str | None:
    """None when every assistant turn's training tokens are what generation must produce; else what differs.

    For the k-th assistant message: the ids of the conversation before it with the generation prompt must be an exact
    prefix of the whole conversation's ids, and the assistant-mask span (``{% generation %}``, what TRL trains on)
    must start right there and end with the turn's end token -- i.e. the tokens trained on are the tokens a model
    continuing that prompt has to emit. A pre-tokenizer that lets the header's last token (``assistant\\n``) merge
    with the answer's first breaks this."""
    full = _ids(tok, messages, tools, return_assistant_tokens_mask=True)
    ids, mask = full["input_ids"], full["assistant_masks"]
    spans, start = [], None
    for i, m in enumerate([*mask, 0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            spans.append((start, i))
            start = None
    turns = [k for k, m in enumerate(messages) if m.get("role") == "assistant"]
    if len(spans) != len(turns):
        return f"{len(turns)} assistant turns but {len(spans)} masked spans"
    end_ids = set(stop_token_ids(tok))
    for (a, b), k in zip(spans, turns):
        prompt = _ids(tok, messages[:k], tools, add_generation_prompt=True)["input_ids"]
        if ids[:len(prompt)] != prompt:
            at = next((i for i, (x, y) in enumerate(zip(ids, prompt)) if x != y), min(len(ids), len(prompt)))
            return (f"assistant turn {k}: the prompt's ids are not a prefix of the conversation's (first difference at "
                    f"{at}: {tok.convert_ids_to_tokens(ids[at:at + 2])} vs {tok.convert_ids_to_tokens(prompt[at:at + 2])})")
        if a != len(prompt):
            return f"assistant turn {k}: the trained tokens start at {a}, generation starts at {len(prompt)}"
        if ids[b - 1] not in end_ids:
            return f"assistant turn {k}: the trained tokens end with {tok.convert_ids_to_tokens(ids[b - 1])!r}, not an end token"
    return None


def stop_token_ids(tok: Any) -> list[int]:
    """Token ids that end an assistant turn: <|im_end|> (when the tokenizer has it) and EOS."""
    ids = []
    vocab = tok.get_vocab()
    if IM_END in vocab:
        ids.append(vocab[IM_END])
    if tok.eos_token_id is not None and tok.eos_token_id not in ids:
        ids.append(tok.eos_token_id)
    return ids


def model_folder(ctx: Any, cfg: Any, tmp: str) -> tuple[str, str]:
    """(model dir, tokenizer dir) as local folders; InputError when the tokenizer is missing (the model itself is
    checked by :func:`check_max_length`)."""
    model_dir = local_copy(ctx.inputs[cfg.model], tmp)
    if has_tokenizer(model_dir):
        return model_dir, model_dir
    if cfg.tokenizer:
        tok_dir = local_copy(ctx.inputs[cfg.tokenizer], tmp)
        if has_tokenizer(tok_dir):
            return model_dir, tok_dir
    raise InputError(f"{cfg.model}/ has no tokenizer (tokenizer.json / tokenizer_config.json) and no tokenizer "
                     "artifact is configured: set `tokenizer: tokenizer` or save the tokenizer with the model")


def check_max_length(cfg: Any, model_dir: str) -> Any:
    """The model's config (a causal LM, checked without loading weights) against max_length."""
    mc = causal_lm_config(model_dir, f"{cfg.model}/")
    limit = getattr(mc, "max_position_embeddings", None)
    if limit is not None and cfg.max_length > limit:
        raise InputError(f"max_length {cfg.max_length} is beyond the model's max_position_embeddings {limit} "
                         f"({cfg.model}/config.json): lower max_length")
    return mc
