"""tokenizer: ``clean/`` -> ``tokenizer/`` (HF ``save_pretrained`` layout) and a fertility report.

A stable hash of each document id routes a share of the corpus (``heldout_fraction``) to a
held-out set; the rest, sampled to the language mix, trains a byte-level BPE (or, with
``extend``, adds corpus tokens to an existing tokenizer). The report compares fertility
(tokens per word), bytes per token and the share of split words per language against the
reference tokenizers named in the config. An extension also writes ``extension.json`` / ``extension.md``: the
base's and the expanded tokenizer's tokens per word and held-out tokens per language, and how many tokens were
added (asked for, learned, by script); the init stage then starts each added token from its pieces' rows
(:mod:`pipeline.models.vocab`).
"""

from __future__ import annotations

import hashlib
import tempfile
from collections import defaultdict
from typing import Any

from pipeline.data.documents import DocumentSet
from pipeline.data.tokenization import (
    TokenizerConfig,
    extend_tokenizer,
    extension_report,
    fertility_report,
    format_extension_markdown,
    format_report_markdown,
    load_reference,
    save_hf,
    train_bpe,
)
from pipeline.errors import InputError
from pipeline.stage import Stage, StageContext
from pipeline.storage import OutputDir

HELDOUT_DOCS_PER_LANG = 5000


def unit_hash(key: str, seed: int) -> float:
    """A stable number in [0, 1) for a document id."""
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


def _split_corpus(cfg: TokenizerConfig, ctx: StageContext) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    clean = DocumentSet(ctx.inputs["clean"])
    train: dict[str, list[str]] = defaultdict(list)
    heldout: dict[str, list[str]] = defaultdict(list)
    budget = {lang: share / sum(cfg.mix.values()) * cfg.train_chars for lang, share in cfg.mix.items()}
    used: dict[str, float] = defaultdict(float)
    with ctx.bar(total=len(clean), desc="tokenizer read", unit=" doc") as bar:
        for batch in clean.iter_batches(columns=["id", "text", "lang"], batch_size=2048):
            for doc_id, text, lang in zip(batch["id"], batch["text"], batch["lang"]):
                lang = lang or "unknown"
                if unit_hash(doc_id, cfg.seed) < cfg.heldout_fraction:
                    if len(heldout[lang]) < HELDOUT_DOCS_PER_LANG:
                        heldout[lang].append(text)
                elif lang in budget and used[lang] < budget[lang]:
                    train[lang].append(text)
                    used[lang] += len(text)
            bar.update(len(batch["id"]))
    missing = [lang for lang, share in cfg.mix.items() if share > 0 and not train.get(lang)]
    if missing:
        have = ", ".join(sorted(train)) or "none"
        raise InputError(
            f"the mix asks for {', '.join(missing)} but clean/ has no such documents (languages present: {have}); "
            "fix `mix` or the clean stage's langid.languages"
        )
    return dict(train), dict(heldout)


def _fertility_table(report: dict[str, Any]) -> dict[str, dict[str, float]]:
    """language -> tokenizer -> tokens per word, from the report."""
    table: dict[str, dict[str, float]] = {}
    for lang, per_tok in report.get("languages", {}).items():
        table[lang] = {name: round(stats["fertility"], 4) for name, stats in per_tok.get("tokenizers", {}).items()}
    return table


class TokenizerStage(Stage):
    name = "tokenizer"
    config = TokenizerConfig
    OUTPUT = "tokenizer"
    INPUTS = ("clean",)

    def run(self, cfg: TokenizerConfig, ctx: StageContext, out: OutputDir) -> dict[str, Any]:
        references = {name: load_reference(path) for name, path in cfg.references.items()}
        train, heldout = _split_corpus(cfg, ctx)
        ctx.log("tokenizer: training on " + ", ".join(f"{k} {sum(map(len, v)):,} chars" for k, v in sorted(train.items())))
        added: list[str] = []
        extension: dict[str, Any] | None = None
        if cfg.extend:
            base = load_reference(cfg.extend.base)
            base_size = base.get_vocab_size(with_added_tokens=True)
            requested = cfg.extend.to_add(base_size, sum(base.token_to_id(t) is None for t in cfg.special_tokens.all()))
            tokenizer, added = extend_tokenizer(base, train, cfg)
            compared = {"ours": tokenizer, "base": base, **references}
        else:
            tokenizer = train_bpe(train, cfg)
            compared = {"ours": tokenizer, **references}
        with tempfile.TemporaryDirectory() as tmp:
            save_hf(tokenizer, cfg, tmp)
            out.put_local(tmp)
        report = fertility_report(compared, heldout)
        out.write_json("fertility.json", report)
        out.write_text("fertility.md", format_report_markdown(report))
        if added:
            # JSON, not lines: tokens may hold newlines; not added_tokens.json, which transformers 5 reads as its own
            out.write_json("new_tokens.json", added)
        if cfg.extend:  # base vs expanded on the held-out text, and what was added
            extension = extension_report(report, added, base_size=base_size, size=tokenizer.get_vocab_size(),
                                         requested=requested)
            out.write_json("extension.json", extension)
            out.write_text("extension.md", format_extension_markdown(extension))
            ctx.log(f"tokenizer: {base_size:,} -> {extension['size']:,} tokens ({len(added):,} learned); tokens/word "
                    + ", ".join(f"{lang} {r['base_fertility']:.2f} -> {r['expanded_fertility']:.2f}"
                                for lang, r in extension["languages"].items()))
        return {
            "vocab_size": tokenizer.get_vocab_size(),
            "train_characters": {k: sum(map(len, v)) for k, v in sorted(train.items())},
            "heldout_documents": {k: len(v) for k, v in sorted(heldout.items())},
            "added_tokens": len(added),
            "fertility": _fertility_table(report),
            **({"extension": {k: extension[k] for k in ("base_size", "size", "requested", "added", "by_script", "languages")}}
               if extension else {}),
        }

    def summary(self, m: dict[str, Any]) -> list[tuple[str, Any]]:
        rows: list[tuple[str, Any]] = [("vocab size", m["vocab_size"])]
        rows += [(f"trained on {k}", f"{v:,} chars") for k, v in m["train_characters"].items()]
        if m["added_tokens"]:
            rows.append(("tokens added", m["added_tokens"]))
        ext = m.get("extension")
        if ext:
            rows.append(("expanded", f"{ext['base_size']:,} -> {ext['size']:,} tokens ("
                         + ", ".join(f"{k} {v:,}" for k, v in ext["by_script"].items()) + ")"))
            for lang, r in ext["languages"].items():
                if r["ratio"] is None:  # no words in that language's held-out text
                    continue
                rows.append((f"expanded/base {lang}", f"{r['expanded_fertility']:.2f} / {r['base_fertility']:.2f} tokens "
                             f"per word ({r['ratio']:.2f}x, {r['tokens_saved']:.0%} fewer tokens)"))
        for lang, per_tok in m["fertility"].items():
            ours = per_tok.get("ours")
            shown = ", ".join(
                f"{name} {val:.2f}" + (f" ({ours / val:.2f}x)" if ours and name != "ours" and val else "")
                for name, val in per_tok.items()
            )
            rows.append((f"tokens/word {lang}", shown))
        return rows


STAGE = TokenizerStage()
