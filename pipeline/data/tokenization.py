"""Byte-level BPE tokenizers for Kazakh, Russian and English, and how to measure them.

* :func:`train_bpe` trains a byte-level BPE with Hugging Face ``tokenizers`` on text sampled to
  the configured language mix (languages short of their share are repeated, deterministically).
* :func:`extend_tokenizer` continues the BPE of an existing tokenizer (Llama 3, Qwen, ...) on
  our corpus: the new tokens are *merges* appended after the base's own, so every text the
  base handled is tokenized the same up to the new merges, and round trips stay exact. ``extend.new_tokens`` says
  how many to add, or ``extend.target_size`` the size to reach; :func:`extension_report` says what the expansion
  gained per language (base vs expanded tokens per word on held-out text) and what it added.
* :func:`save_hf` writes the ``save_pretrained`` layout (``AutoTokenizer`` loads it offline)
  with BOS/EOS/PAD, the chat tokens and a ChatML chat template.
* :func:`fertility_report` compares tokenizers on held-out text: tokens per word (fertility),
  bytes per token and the share of words cut into more than one token, per language, with the
  ratio of every tokenizer to every other. A *word* is one definition for all of them:
  :data:`WORD_PATTERN` (runs of Unicode letters/digits, apostrophe contractions kept whole).

Pre-tokenizers are the ones llama.cpp implements, by its preset names (``tokenizer.ggml.pre`` of a GGUF): a model
is only usable in llama.cpp / Ollama when they split text exactly as training did, and llama.cpp cannot take a
regex from the file. ``llama3`` (``llama-bpe``, the default: letters with at most one leading non-letter that is
not a newline, digits in runs of up to three), ``qwen2`` (the same with one digit per pre-token), ``gpt4o``
(``gpt-4o``, o200k: case runs split, combining marks kept with letters) and ``gpt2``. ``cyrillic-aware`` is our
own regex from round 1 (a word may start with up to three non-letters, a newline included; inner apostrophes and
hyphens): a few percent fewer tokens on kk/ru, but no llama.cpp preset reproduces it, so a GGUF of such a model
is refused, and a newline can merge with the first word of a chat answer (docs/benchmarks.md has both).
"""

from __future__ import annotations

import heapq
import json
import random
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal

from pydantic import Field, field_validator, model_validator
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from pipeline.config import StrictModel
from pipeline.errors import ConfigError, InputError

# transformers (save_hf) stays imported where it is used: the tokenizer stage imports this module, so
# `llmpipe config tokenizer` and `llmpipe stages` would otherwise pay its ~3 s import.


class SpecialTokens(StrictModel):
    bos: str = "<|begin_of_text|>"
    eos: str = "<|end_of_text|>"
    pad: str = "<|pad|>"
    chat: list[str] = Field(
        default_factory=lambda: ["<|im_start|>", "<|im_end|>"],
        description="chat-turn markers the SFT chat template uses",
    )
    tools: list[str] = Field(
        default_factory=lambda: ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"],
        description="function-calling markers (Hermes / Qwen 2.5 layout): tokens of their own, not special, so that "
                    "decoded answers keep them for the tool-call parser; [] for none")
    extra: list[str] = Field(default_factory=list)

    def all(self) -> list[str]:
        seen: list[str] = []
        for tok in [self.bos, self.eos, self.pad, *self.chat, *self.tools, *self.extra]:
            if tok not in seen:
                seen.append(tok)
        return seen


class ExtendConfig(StrictModel):
    """Extension mode: add tokens learned from our corpus to an existing tokenizer, a number of them (``new_tokens``)
    or up to a size (``target_size``)."""

    base: str = Field(..., description="path of the tokenizer.json (or its folder) to extend")
    new_tokens: int = Field(8000, ge=1, description="how many corpus tokens to add (give this or target_size)")
    target_size: int | None = Field(
        None, ge=1, description="instead of new_tokens: add corpus tokens until the tokenizer holds this many tokens "
        "in all (the base's, its added tokens, ours, and the special tokens the base lacks), e.g. 168000 for Qwen "
        "(151,669 tokens) + 16,329")

    @model_validator(mode="after")
    def _one_size(self) -> "ExtendConfig":
        if self.target_size is not None and "new_tokens" in self.model_fields_set:
            raise ValueError("give new_tokens (how many to add) or target_size (the size to reach), not both")
        return self

    def to_add(self, base_size: int, missing_specials: int) -> int:
        """How many corpus tokens to learn for a base of ``base_size`` tokens lacking ``missing_specials``."""
        if self.target_size is None:
            return self.new_tokens
        n = self.target_size - base_size - missing_specials
        if n < 1:
            raise ConfigError(f"extend.target_size {self.target_size} is not above the base's {base_size:,} tokens "
                              f"(+ {missing_specials} special tokens it lacks): nothing to add; raise it or give new_tokens")
        return n


class TokenizerConfig(StrictModel):
    vocab_size: int = Field(32000, ge=256, le=1_000_000)
    min_frequency: int = Field(2, ge=1)
    mix: dict[str, float] = Field(
        default_factory=lambda: {"kk": 0.45, "ru": 0.25, "en": 0.30},
        description="language -> share of the training text, reached by sampling (short languages are repeated)",
    )
    train_chars: int = Field(30_000_000, ge=1000, description="characters of text sampled for training")
    heldout_fraction: float = Field(0.05, gt=0, lt=0.5, description="share of documents held out for the fertility report")
    unicode_form: Literal["NFC", "NFKC", "none"] = "NFC"
    add_bos: bool = Field(True, description="the saved tokenizer puts BOS before every text it encodes (with special "
                                           "tokens), as pack does before every document and as the GGUF says")
    pretokenizer: Literal["llama3", "qwen2", "gpt4o", "gpt2", "cyrillic-aware"] = Field(
        "llama3", description="regex that splits text into words before BPE, by llama.cpp preset: llama3 (llama-bpe), "
        "qwen2, gpt4o (gpt-4o), gpt2; cyrillic-aware: round 1's own, which no llama.cpp preset reproduces (no GGUF)"
    )
    split_digits: bool = Field(False, description="cyrillic-aware only: one digit per pre-token (default: runs of up to 3)")
    max_token_length: int | None = Field(None, ge=1, description="longest token the trainer may create, in characters (None: no limit)")
    model_max_length: int = Field(2048, ge=1, description="model_max_length written to tokenizer_config.json")
    special_tokens: SpecialTokens = Field(default_factory=SpecialTokens)
    references: dict[str, str] = Field(
        default_factory=dict, description="name -> local tokenizer.json to compare fertility against"
    )
    extend: ExtendConfig | None = None
    seed: int = 0

    @field_validator("mix")
    @classmethod
    def _mix_positive(cls, value: dict[str, float]) -> dict[str, float]:
        if not value:
            raise ValueError("mix needs at least one language")
        if any(v < 0 for v in value.values()) or sum(value.values()) <= 0:
            raise ValueError("mix shares must be >= 0 and sum to more than 0")
        return value


# ------------------------------------------------------------------------------ pre-tokenizers

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
LLAMA3_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
# A word: letters with their combining marks, an inner apostrophe (' ’ ʼ) or hyphen joining two
# letter runs, and up to three leading non-letters (a space, a newline, an opening quote or
# bracket, a comma and a space...).
_LETTERS = r"[\p{L}\p{M}]+"
_JOINER = r"['’ʼ\-]"
CYRILLIC_AWARE_PATTERN = (
    rf"""[^\p{{L}}\p{{M}}\p{{N}}]{{0,3}}{_LETTERS}(?:{_JOINER}{_LETTERS})*"""
    r"""|{digits}"""
    r"""| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
QWEN2_PATTERN = LLAMA3_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")
# o200k (GPT-4o), as in llama.cpp's src/llama-vocab.cpp (LLAMA_VOCAB_PRE_TYPE_GPT4O, "original regex from
# tokenizer.json")
GPT4O_PATTERN = (
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"""
    r"""|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"""
    r"""|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
PRETOKENIZERS = ("llama3", "qwen2", "gpt4o", "gpt2", "cyrillic-aware")
# our pre-tokenizer -> llama.cpp's preset of the same regex (tokenizer.ggml.pre); cyrillic-aware has none
LLAMA_CPP_PRE = {"llama3": "llama-bpe", "qwen2": "qwen2", "gpt4o": "gpt-4o", "gpt2": "gpt-2"}
PATTERNS = {"llama3": LLAMA3_PATTERN, "qwen2": QWEN2_PATTERN, "gpt4o": GPT4O_PATTERN, "gpt2": GPT2_PATTERN}

# One definition of "word" for every tokenizer in a report.
WORD_PATTERN = r"[^\W_]+(?:['’ʼ][^\W_]+)*"
_WORD_RE = re.compile(WORD_PATTERN)


def pretokenizer_pattern(kind: str, split_digits: bool = False) -> str:
    if kind in PATTERNS:
        return PATTERNS[kind]
    if kind == "cyrillic-aware":
        return CYRILLIC_AWARE_PATTERN.replace("{digits}", r"\p{N}" if split_digits else r"\p{N}{1,3}")
    raise ConfigError(f"unknown pretokenizer {kind!r}; choose one of {', '.join(PRETOKENIZERS)}")


def build_pretokenizer(kind: str, *, split_digits: bool = False) -> pre_tokenizers.PreTokenizer:
    """The regex split (``kind``) followed by the byte-level mapping.

    ``gpt2`` is the GPT-2 pattern, ``llama3`` the Llama 3 / tiktoken cl100k pattern,
    ``cyrillic-aware`` ours (see the module docstring); ``split_digits`` only affects ours.
    """
    pattern = pretokenizer_pattern(kind, split_digits)
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def build_normalizer(form: str) -> normalizers.Normalizer | None:
    if form == "NFC":
        return normalizers.NFC()
    if form == "NFKC":
        return normalizers.NFKC()
    if form == "none":
        return None
    raise ConfigError(f"unknown unicode_form {form!r}; choose NFC, NFKC or none")


# ------------------------------------------------------------------------------------ training


def sample_mix(texts_by_lang: dict[str, Iterable[str]], cfg: TokenizerConfig) -> tuple[dict[str, list[str]], dict[str, Any]]:
    """Documents per language, sampled to ``cfg.mix`` shares of ``cfg.train_chars``.

    Each language's documents are shuffled (seeded by ``cfg.seed`` and the language); a language
    with more text than its share is cut, one with less is repeated in fresh shuffles until it
    reaches it. Languages outside the mix are ignored; mix languages with no text are left out
    and the others' shares renormalised. Returns the sample and, per language, what was used.
    """
    docs = {lang: [t for t in texts if t and not t.isspace()] for lang, texts in texts_by_lang.items() if cfg.mix.get(lang, 0) > 0}
    docs = {lang: d for lang, d in docs.items() if d}
    if not docs:
        raise InputError(
            f"no training text for any language of the mix ({', '.join(k for k, v in cfg.mix.items() if v > 0)}); "
            f"got languages: {', '.join(sorted(texts_by_lang)) or 'none'}"
        )
    total_share = sum(cfg.mix[lang] for lang in docs)
    sample: dict[str, list[str]] = {}
    stats: dict[str, Any] = {}
    for lang in sorted(docs):
        items = docs[lang]
        target = cfg.mix[lang] / total_share * cfg.train_chars
        available = sum(map(len, items))
        rng = random.Random(f"{cfg.seed}:{lang}")
        picked: list[str] = []
        used = 0
        epoch = 0
        while used < target:
            order = list(range(len(items)))
            rng.shuffle(order)
            for i in order:
                if used >= target:
                    break
                picked.append(items[i])
                used += len(items[i])
            epoch += 1
        sample[lang] = picked
        stats[lang] = {"documents": len(picked), "chars": used, "available_chars": available, "repeat": round(used / available, 3)}
    return sample, stats


def _new_bpe(cfg: TokenizerConfig) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    norm = build_normalizer(cfg.unicode_form)
    if norm is not None:
        tokenizer.normalizer = norm
    tokenizer.pre_tokenizer = build_pretokenizer(cfg.pretokenizer, split_digits=cfg.split_digits)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def train_bpe(texts_by_lang: dict[str, Iterable[str]], cfg: TokenizerConfig) -> Tokenizer:
    """A byte-level BPE of ``cfg.vocab_size`` tokens (special tokens at ids 0..n-1, then the
    256 byte symbols, then the merges), trained on text sampled to ``cfg.mix``."""
    sample, _stats = sample_mix(texts_by_lang, cfg)
    specials = cfg.special_tokens.all()
    if cfg.vocab_size < 256 + len(specials):
        raise ConfigError(f"vocab_size {cfg.vocab_size} is below the 256 byte symbols + {len(specials)} special tokens")
    tokenizer = _new_bpe(cfg)
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in specials],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        max_token_length=cfg.max_token_length,
        show_progress=False,
    )

    def batches() -> Iterator[list[str]]:
        for lang in sorted(sample):
            items = sample[lang]
            for i in range(0, len(items), 1000):
                yield items[i : i + 1000]

    tokenizer.train_from_iterator(batches(), trainer=trainer, length=sum(map(len, sample.values())))
    for i, tok in enumerate(specials):  # the contract: special tokens at the lowest ids, in order
        if tokenizer.token_to_id(tok) != i:
            raise RuntimeError(f"special token {tok!r} got id {tokenizer.token_to_id(tok)}, expected {i}")
    return tokenizer


# ------------------------------------------------------------------------------ HF save / load


TOOLS_SYSTEM = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
TOOLS_SYSTEM_END = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n"
    "</tool_call>"
)


def chat_template(start: str = "<|im_start|>", end: str = "<|im_end|>", *, bos: bool = True, tools: bool = True,
                  generation_markers: bool = False) -> str:
    """ChatML: ``<|im_start|>role\\ncontent<|im_end|>\\n`` per turn, then (``add_generation_prompt``) the assistant
    header, preceded by the tokenizer's ``bos_token`` when ``bos``.

    With ``tools`` it also renders function calling the way Hermes 2 Pro and Qwen 2.5 do (and llama.cpp's Hermes
    chat format parses): the ``tools`` JSON schemas in the system turn inside ``<tools></tools>``, each assistant
    tool call as ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`` after its content, and
    consecutive ``tool`` messages as one user turn of ``<tool_response>`` blocks. A message's content may be None
    (an assistant turn that only calls). ``generation_markers`` wraps what the assistant says (content, calls and
    ``<|im_end|>``) in ``{% generation %}``, for TRL's assistant-only loss; it does not change the text."""
    gen_open, gen_close = ("{% generation %}", "{% endgeneration %}") if generation_markers else ("", "")
    parts = []
    if bos:
        parts.append("{%- if bos_token %}{{ bos_token }}{% endif %}")
    parts.append("{%- set ns = namespace(first=0) %}")
    if tools:
        parts.append(
            "{%- if tools %}"
            f"{{{{ '{start}system\\n' }}}}"
            "{%- if messages and messages[0]['role'] == 'system' %}"
            "{{ (messages[0]['content'] or '') + '\\n\\n' }}{%- set ns.first = 1 %}{%- endif %}"
            "{{ " + json.dumps(TOOLS_SYSTEM) + " }}"
            "{%- for tool in tools %}{{ '\\n' }}{{ tool | tojson }}{%- endfor %}"
            "{{ " + json.dumps(TOOLS_SYSTEM_END) + " }}"
            f"{{{{ '{end}\\n' }}}}"
            "{%- endif %}"
        )
    # Qwen 2.5's constructs (loop.index0 lookups, namespace, tojson): what llama.cpp's Jinja engine runs for its GGUFs
    parts.append(
        "{%- for message in messages %}"
        "{%- if not (loop.first and ns.first) %}"
        "{%- set content = message['content'] if message['content'] is string else '' %}"
        "{%- if message['role'] == 'assistant' %}"
        f"{{{{ '{start}assistant\\n' }}}}{gen_open}{{{{ content }}}}"
        "{%- for call in (message['tool_calls'] or []) %}"
        "{%- set fn = call['function'] if call['function'] is defined else call %}"
        "{%- if content or not loop.first %}{{ '\\n' }}{%- endif %}"
        "{{ '<tool_call>\\n{\"name\": \"' + fn['name'] + '\", \"arguments\": ' }}"
        "{%- if fn['arguments'] is string %}{{ fn['arguments'] }}{%- else %}{{ fn['arguments'] | tojson }}{%- endif %}"
        "{{ '}\\n</tool_call>' }}"
        "{%- endfor %}"
        f"{{{{ '{end}' }}}}{gen_close}{{{{ '\\n' }}}}"
        "{%- elif message['role'] == 'tool' %}"
        "{%- if loop.index0 == ns.first or messages[loop.index0 - 1]['role'] != 'tool' %}"
        f"{{{{ '{start}user' }}}}{{%- endif %}}"
        "{{ '\\n<tool_response>\\n' + content + '\\n</tool_response>' }}"
        "{%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}"
        f"{{{{ '{end}\\n' }}}}{{%- endif %}}"
        "{%- else %}"
        f"{{{{ '{start}' + message['role'] + '\\n' + content + '{end}\\n' }}}}"
        "{%- endif %}"
        "{%- endif %}"
        "{%- endfor %}"
        f"{{%- if add_generation_prompt %}}{{{{ '{start}assistant\\n' }}}}{{%- endif %}}"
    )
    return "".join(parts)


def save_hf(tokenizer: Tokenizer, cfg: TokenizerConfig, local_dir: str) -> None:
    """``save_pretrained`` layout (tokenizer.json, tokenizer_config.json, chat_template.jinja)."""
    from transformers import PreTrainedTokenizerFast

    st = cfg.special_tokens
    missing = [t for t in st.all() if tokenizer.token_to_id(t) is None]
    if missing:
        tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
    extra = [t for t in [*st.chat, *st.extra] if t not in (st.bos, st.eos, st.pad)]
    if st.tools:  # own tokens, not special ones: a decoded answer keeps them for the tool-call parser
        tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in st.tools])
    if cfg.add_bos:
        bos_id = tokenizer.token_to_id(st.bos)
        tokenizer.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{st.bos} $A", pair=f"{st.bos} $A {st.bos} $B",
                                          special_tokens=[(st.bos, bos_id)]),
        ])
    tokenizer = Tokenizer.from_str(tokenizer.to_str())  # the added tokens' flags as saved (see SpecialTokens.tools)
    kwargs: dict[str, Any] = {}
    if len(st.chat) >= 2:
        kwargs["chat_template"] = chat_template(st.chat[0], st.chat[1], bos=cfg.add_bos, tools=bool(st.tools))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=st.bos,
        eos_token=st.eos,
        pad_token=st.pad,
        additional_special_tokens=extra,
        model_max_length=cfg.model_max_length,
        clean_up_tokenization_spaces=False,
        padding_side="right",
        **kwargs,
    )
    Path(local_dir).mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(local_dir)


def load_reference(path: str) -> Tokenizer:
    """A ``tokenizer.json`` file, or a folder holding one."""
    p = Path(path)
    file = p / "tokenizer.json" if p.is_dir() else p
    if not file.exists():
        where = f"{p} has no tokenizer.json" if p.is_dir() else f"{p} does not exist"
        raise InputError(f"reference tokenizer: {where} (fetch the references with `make corpus`)")
    try:
        return Tokenizer.from_file(str(file))
    except Exception as exc:  # tokenizers raises a bare Exception on bad JSON / schema
        raise InputError(f"reference tokenizer {file} is not a valid tokenizer.json: {str(exc).splitlines()[0][:200]}") from None


# ------------------------------------------------------------------------------------ fertility


def count_words(text: str) -> int:
    return sum(1 for _ in _WORD_RE.finditer(text))


def _measure(tokenizer: Tokenizer, texts: list[str], batch: int = 256) -> dict[str, float]:
    tokens = words = split = nbytes = 0
    for i in range(0, len(texts), batch):
        chunk = texts[i : i + batch]
        for text, enc in zip(chunk, tokenizer.encode_batch(chunk, add_special_tokens=False)):
            tokens += len(enc.ids)
            nbytes += len(text.encode("utf-8"))
            starts = [s for s, e in enc.offsets if e > s]
            ends = [e for s, e in enc.offsets if e > s]
            # tokens overlapping a word: offsets are sorted, so a window over them is enough
            j = 0
            for m in _WORD_RE.finditer(text):
                ws, we = m.span()
                words += 1
                while j < len(ends) and ends[j] <= ws:
                    j += 1
                k = j
                n = 0
                while k < len(starts) and starts[k] < we:
                    n += 1
                    k += 1
                if n > 1:
                    split += 1
    return {
        "tokens": tokens,
        "words": words,
        "bytes": nbytes,
        "fertility": tokens / words if words else 0.0,
        "bytes_per_token": nbytes / tokens if tokens else 0.0,
        "split_word_share": split / words if words else 0.0,
    }


def fertility_report(tokenizers: dict[str, Tokenizer], texts_by_lang: dict[str, list[str]]) -> dict:
    """Per language and tokenizer: tokens per word, bytes per token, share of words split into
    more than one token; words and documents per language; and each tokenizer's fertility as a
    ratio of every other's (``ratios[other]``: below 1 means fewer tokens than ``other``).

    Texts are encoded without special tokens. Words are :data:`WORD_PATTERN` matches.
    """
    languages: dict[str, Any] = {}
    for lang in sorted(texts_by_lang):
        texts = [t for t in texts_by_lang[lang] if t]
        if not texts:
            continue
        per_tok = {name: _measure(tok, texts) for name, tok in tokenizers.items()}
        for name, stats in per_tok.items():
            stats["ratios"] = {
                other: (stats["fertility"] / o["fertility"] if o["fertility"] else None)
                for other, o in per_tok.items()
                if other != name
            }
        first = next(iter(per_tok.values()))
        languages[lang] = {
            "docs": len(texts),
            "words": first["words"],
            "bytes": first["bytes"],
            "chars": sum(map(len, texts)),
            "tokenizers": per_tok,
        }
    return {"word_pattern": WORD_PATTERN, "tokenizers": list(tokenizers), "languages": languages}


def format_report_markdown(report: dict, goals: dict[str, float] | None = None, baseline: str | None = None) -> str:
    """The report as Markdown tables: one row per language and tokenizer, with the ratio to
    each other tokenizer; with ``goals`` (language -> max ratio of the first tokenizer to
    ``baseline``) a PASS/FAIL column."""
    names = report.get("tokenizers", [])
    lines = [f"Words are matches of `{report.get('word_pattern', WORD_PATTERN)}`; texts encoded without special tokens.", ""]
    ratio_cols = [(a, b) for a in names[:1] for b in names[1:]]
    head = ["language", "docs", "words", "tokenizer", "tokens/word", "bytes/token", "split words"]
    head += [f"{a}/{b}" for a, b in ratio_cols]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join(["---"] * 3 + ["---"] + ["---:"] * (len(head) - 4)) + "|")
    for lang, entry in report.get("languages", {}).items():
        for i, (name, s) in enumerate(entry["tokenizers"].items()):
            row = [lang if i == 0 else "", f"{entry['docs']:,}" if i == 0 else "", f"{entry['words']:,}" if i == 0 else "", name]
            row += [f"{s['fertility']:.3f}", f"{s['bytes_per_token']:.2f}", f"{s['split_word_share']:.1%}"]
            for a, b in ratio_cols:
                r = entry["tokenizers"][a]["ratios"].get(b) if name == a else None
                row.append(f"{r:.3f}x" if r is not None else "")
            lines.append("| " + " | ".join(row) + " |")
    if goals and names and baseline:
        ours = names[0]
        lines += ["", f"| language | {ours}/{baseline} | goal | result |", "|---|---:|---:|---|"]
        for lang, goal in goals.items():
            entry = report.get("languages", {}).get(lang)
            r = entry["tokenizers"][ours]["ratios"].get(baseline) if entry else None
            verdict = "n/a" if r is None else ("PASS" if r <= goal else "FAIL")
            lines.append(f"| {lang} | {'' if r is None else f'{r:.3f}x'} | <= {goal:.2f}x | {verdict} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------ extension


def _pieces(base: Tokenizer, texts: Iterable[str]) -> Counter[str]:
    """Pre-tokenized pieces (in the base's byte-level alphabet) with their counts."""
    counts: Counter[str] = Counter()
    norm = base.normalizer
    pre = base.pre_tokenizer
    if pre is None:
        raise InputError("the base tokenizer has no pre-tokenizer; extension supports byte-level BPE tokenizers")
    for text in texts:
        if norm is not None:
            text = norm.normalize_str(text)
        counts.update(piece for piece, _ in pre.pre_tokenize_str(text))
    return counts


def _continue_bpe(words: list[list[str]], freqs: list[int], vocab: set[str], n_new: int, min_frequency: int) -> list[tuple[str, str]]:
    """Continue BPE on words already segmented by the base: ``n_new`` merges whose result is
    not in ``vocab``, most frequent pair first (ties broken by the pair itself)."""
    pair_counts: Counter[tuple[str, str]] = Counter()
    where: dict[tuple[str, str], set[int]] = defaultdict(set)
    for wi, (w, f) in enumerate(zip(words, freqs)):
        for a, b in zip(w, w[1:]):
            pair_counts[(a, b)] += f
            where[(a, b)].add(wi)
    heap = [(-c, p) for p, c in pair_counts.items()]
    heapq.heapify(heap)
    merges: list[tuple[str, str]] = []
    known = set(vocab)
    while heap and len(merges) < n_new:
        neg, pair = heapq.heappop(heap)
        count = pair_counts.get(pair, 0)
        if count <= 0:
            continue
        if -neg != count:  # stale entry: push the current count back
            heapq.heappush(heap, (-count, pair))
            continue
        if count < min_frequency:
            break
        merged = pair[0] + pair[1]
        if merged in known:  # the base already has this token: not a new one, skip the pair
            pair_counts[pair] = 0
            continue
        known.add(merged)
        merges.append(pair)
        a, b = pair
        for wi in list(where.pop(pair, ())):
            w, f = words[wi], freqs[wi]
            for x, y in zip(w, w[1:]):  # remove the word's old pairs
                pair_counts[(x, y)] -= f
            out: list[str] = []
            i = 0
            while i < len(w):
                if i + 1 < len(w) and w[i] == a and w[i + 1] == b:
                    out.append(merged)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            words[wi] = out
            for x, y in zip(out, out[1:]):
                pair_counts[(x, y)] += f
                where[(x, y)].add(wi)
                heapq.heappush(heap, (-pair_counts[(x, y)], (x, y)))
        pair_counts[pair] = 0
    return merges


def extend_tokenizer(base: Tokenizer, texts_by_lang: dict[str, Iterable[str]], cfg: TokenizerConfig) -> tuple[Tokenizer, list[str]]:
    """Add ``cfg.extend.new_tokens`` tokens learned from our corpus to a byte-level BPE ``base`` (or as many as
    bring it to ``cfg.extend.target_size`` tokens, special tokens it lacks included; fewer when the corpus has no
    more pairs of ``min_frequency``).

    The corpus is sampled to ``cfg.mix`` as for training, pre-tokenized and segmented by the
    base; BPE then continues on those segmentations, and each new merge is appended after the
    base's merges with a fresh id (after every existing id, added tokens included). The base's
    own tokens, ids and merges are untouched, so the new tokenizer encodes like the base except
    where a new merge applies. ``cfg.special_tokens`` missing from the base are added as special
    tokens. Returns the tokenizer and the new tokens as text.
    """
    if cfg.extend is None:
        raise ConfigError("extend_tokenizer needs `extend` in the tokenizer config (base, new_tokens)")
    data = json.loads(base.to_str())
    model = data.get("model", {})
    if model.get("type") != "BPE":
        raise InputError(f"extension supports BPE tokenizers; the base is {model.get('type')!r}")
    vocab: dict[str, int] = model["vocab"]
    # Added tokens the model's vocabulary lacks (Qwen's <|endoftext|>... at 151,643+, after its 151,643 BPE tokens)
    # go into it at their ids: `tokenizers` gives an added token that is not in the model's vocabulary the id
    # len(vocabulary) + its rank, so with our merges after them they would move past the merges, leaving a hole where
    # they were. In the vocabulary they keep their ids (and no merge of ours can make one: they count as known).
    for added_token in data.get("added_tokens", []):
        vocab.setdefault(added_token["content"], added_token["id"])
    lacking = [t for t in cfg.special_tokens.all() if base.token_to_id(t) is None]
    n_new = cfg.extend.to_add(base.get_vocab_size(with_added_tokens=True), len(lacking))
    sample, _ = sample_mix(texts_by_lang, cfg)
    counts = _pieces(base, (t for lang in sorted(sample) for t in sample[lang]))
    pieces = sorted(counts)
    words: list[list[str]] = []
    for piece in pieces:
        words.append([tok.value for tok in base.model.tokenize(piece)])
    freqs = [counts[p] for p in pieces]
    merges = _continue_bpe(words, freqs, set(vocab), n_new, cfg.min_frequency)
    next_id = max([*vocab.values(), *(t["id"] for t in data.get("added_tokens", []))]) + 1
    merge_list = model.get("merges", [])
    as_strings = bool(merge_list) and isinstance(merge_list[0], str)
    for a, b in merges:
        vocab[a + b] = next_id
        next_id += 1
        merge_list.append(f"{a} {b}" if as_strings else [a, b])
    model["merges"] = merge_list
    extended = Tokenizer.from_str(json.dumps(data, ensure_ascii=False))
    missing = [t for t in cfg.special_tokens.all() if extended.token_to_id(t) is None]
    if missing:
        extended.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
    decoder = decoders.ByteLevel()
    added = [decoder.decode([a + b]) for a, b in merges]
    return extended, added


# Cyrillic letters Kazakh has and Russian does not (Ә Ғ Қ Ң Ө Ұ Ү Һ І): a token holding one is Kazakh
KAZAKH_LETTERS = frozenset("әғқңөұүһіӘҒҚҢӨҰҮҺІ")


def token_script(text: str) -> str:
    """What an added token is made of, for the extension report: ``kazakh`` (a Kazakh-only letter), ``cyrillic``,
    ``latin``, ``mixed`` (letters of several scripts) or ``no letters`` (digits, punctuation, spaces)."""
    letters = [c for c in text if c.isalpha()]
    if not letters:
        return "no letters"
    if any(c in KAZAKH_LETTERS for c in letters):
        return "kazakh"
    if all("\u0400" <= c <= "\u04ff" for c in letters):
        return "cyrillic"
    if all(c.isascii() for c in letters):
        return "latin"
    return "mixed"


def extension_report(report: dict, added: list[str], *, base_size: int, size: int, requested: int,
                     ours: str = "ours", base: str = "base") -> dict[str, Any]:
    """What an extension did, from the fertility ``report`` holding ``ours`` (the expanded tokenizer) and ``base``:
    tokens added (asked for, learned, by :func:`token_script`, the longest), the sizes before and after, and per
    language the base's and the expanded tokenizer's tokens per word and held-out tokens, and the share of tokens
    saved."""
    languages: dict[str, Any] = {}
    for lang, entry in report.get("languages", {}).items():
        b, e = entry["tokenizers"][base], entry["tokenizers"][ours]
        languages[lang] = {
            "words": entry["words"],
            "base_fertility": round(b["fertility"], 4),
            "expanded_fertility": round(e["fertility"], 4),
            "ratio": round(e["fertility"] / b["fertility"], 4) if b["fertility"] else None,
            "base_tokens": b["tokens"],
            "expanded_tokens": e["tokens"],
            "tokens_saved": round(1 - e["tokens"] / b["tokens"], 4) if b["tokens"] else None,
        }
    scripts = Counter(token_script(t) for t in added)
    return {
        "base_size": base_size,
        "size": size,
        "requested": requested,
        "added": len(added),
        "specials_added": size - base_size - len(added),
        "by_script": dict(sorted(scripts.items(), key=lambda kv: -kv[1])),
        "longest": sorted(added, key=lambda t: (-len(t), t))[:10],
        "languages": languages,
    }


def format_extension_markdown(ext: dict[str, Any]) -> str:
    """The extension report as Markdown: sizes, tokens added by script, and base vs expanded per language."""
    lines = [
        f"Base: {ext['base_size']:,} tokens. Expanded: {ext['size']:,} tokens = {ext['added']:,} learned from the corpus "
        f"(asked for {ext['requested']:,})" + (f" + {ext['specials_added']} special tokens the base lacked"
                                               if ext["specials_added"] else "") + ".",
        "",
        "Added tokens by script: " + ", ".join(f"{k} {v:,}" for k, v in ext["by_script"].items()) + ".",
        "Longest: " + ", ".join(f"`{t.strip() or repr(t)}`" for t in ext["longest"][:5]) + ".",
        "",
        "| language | words | base tokens/word | expanded tokens/word | expanded / base | held-out tokens saved |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for lang, row in ext["languages"].items():
        ratio = f"{row['ratio']:.3f}x" if row["ratio"] is not None else ""
        saved = f"{row['tokens_saved']:.1%}" if row["tokens_saved"] is not None else ""
        lines.append(f"| {lang} | {row['words']:,} | {row['base_fertility']:.3f} | {row['expanded_fertility']:.3f} | "
                     f"{ratio} | {saved} |")
    return "\n".join(lines) + "\n"

__all__ = [
    "WORD_PATTERN",
    "build_pretokenizer",
    "count_words",
    "extend_tokenizer",
    "extension_report",
    "fertility_report",
    "format_extension_markdown",
    "format_report_markdown",
    "load_reference",
    "sample_mix",
    "save_hf",
    "token_script",
    "train_bpe",
]
