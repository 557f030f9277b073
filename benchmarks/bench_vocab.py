"""Vocabulary expansion benchmark: Qwen 3's tokenizer vs the same expanded with kk/ru tokens, on held-out kk/ru/en.

Runs the tokenizer stage's extension (``pipeline.data.tokenization.extend_tokenizer``) with the recipe's config,
``jobs/cluster/tokenizer-qwen05b.yaml`` (REFS_DIR pointed at the cache's reference tokenizers; ``train_chars``
lowered to what the offline corpus holds, see --train-chars), on the training files of the offline corpus, and
measures tokens per word, bytes per token and the share of split words on ``corpus/heldout/{kk,ru,en}.txt`` for
the base (Qwen 3), the expanded tokenizer and Llama 3. Then what init will do with the new tokens: how many pieces
each is cut into by the base (``pipeline.models.vocab.decompose``), whether the expanded tokenizer extends the base
(``auto`` -> ``pieces``), and the time of the piece-mean rows on a matrix of Qwen2.5-0.5B's shape (151,936 x 896).

    .venv/bin/python benchmarks/bench_vocab.py --cache .cache [--sizes 156000,160000,168000,184000] [--json out.json]

Needs ``make corpus`` first. Exit status 0, or 2 when the cache is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_fertility import read_heldout, read_training  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "jobs" / "cluster" / "tokenizer-qwen05b.yaml"
LANGS = ["kk", "ru", "en"]
QWEN25_05B_ROWS, QWEN25_05B_HIDDEN = 151_936, 896  # config.json of Qwen/Qwen2.5-0.5B: vocab_size, hidden_size


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", default=os.environ.get("LLMPIPE_CACHE", ".cache"))
    ap.add_argument("--config", default=str(RECIPE), help="tokenizer config with `extend` (default: the recipe's)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="config override, e.g. --set extend.target_size=160000")
    ap.add_argument("--train-chars", type=int, default=30_000_000,
                    help="characters sampled for the extension (the recipe's 300M would repeat the 3.3M kk+ru characters "
                         "of the offline corpus ~90 times over; 30M is what bench-data's tokenizer samples)")
    ap.add_argument("--sizes", default="", help="comma-separated target sizes: also extend to each and print one "
                                                "row per size (fertility vs size)")
    ap.add_argument("--json", help="write the reports here")
    args = ap.parse_args(argv)

    cache = Path(args.cache).resolve()
    missing = [str(cache / "corpus" / "heldout" / f"{lang}.txt") for lang in LANGS
               if not (cache / "corpus" / "heldout" / f"{lang}.txt").exists()]
    missing += [str(cache / "refs" / r / "tokenizer.json") for r in ("qwen3", "llama3")
                if not (cache / "refs" / r / "tokenizer.json").exists()]
    if missing:
        print(f"bench_vocab: missing {', '.join(missing)}; run `make corpus`", file=sys.stderr)
        return 2
    os.environ["REFS_DIR"] = str(cache / "refs")

    from pipeline.data.tokenization import (
        extend_tokenizer,
        extension_report,
        fertility_report,
        format_extension_markdown,
        format_report_markdown,
        load_reference,
        save_hf,
    )
    from pipeline.stages import load_config

    cfg = load_config("tokenizer", args.config, [f"train_chars={args.train_chars}", *args.overrides])
    assert cfg.extend is not None, f"{args.config} has no `extend`"
    base = load_reference(cfg.extend.base)
    refs = {name: load_reference(path) for name, path in cfg.references.items()}
    train = read_training(cache, [lang for lang in LANGS if cfg.mix.get(lang, 0) > 0])
    heldout = read_heldout(cache, LANGS)
    base_size = base.get_vocab_size()
    lacking = sum(base.token_to_id(t) is None for t in cfg.special_tokens.all())

    t0 = time.perf_counter()
    ext, added = extend_tokenizer(base, train, cfg)
    extend_s = time.perf_counter() - t0
    report = fertility_report({"expanded": ext, "qwen3": base, **refs}, heldout)
    ext_report = extension_report(report, added, base_size=base_size, size=ext.get_vocab_size(),
                                  requested=cfg.extend.to_add(base_size, lacking), ours="expanded", base="qwen3")
    print(f"config {Path(args.config).relative_to(REPO) if Path(args.config).is_relative_to(REPO) else args.config}"
          f" (train_chars {cfg.train_chars:,}, mix {cfg.mix}, min_frequency {cfg.min_frequency}), "
          f"trained on {', '.join(f'{k} {sum(map(len, v)) / 1e6:.2f}M chars' for k, v in train.items())} "
          f"of the offline corpus: {extend_s:.0f} s")
    print()
    print(format_extension_markdown(ext_report))
    print(format_report_markdown(report))

    init = init_side(cfg, ext, base, save_hf)
    print(f"init: expanded extends Qwen 3's tokenizer: {init['extends']} (new_token_init auto -> {init['auto']}); "
          f"{init['stats']['from_pieces']:,} new tokens from pieces (mean {init['stats']['pieces_mean']:.2f} pieces, "
          f"max {init['stats']['pieces_max']}; {init['stats']['via_text']} through text), "
          f"{init['stats']['global_mean_added']} special tokens at the global mean; decompose {init['decompose_s']:.1f} s, "
          f"piece-mean rows on {QWEN25_05B_ROWS:,} x {QWEN25_05B_HIDDEN} (Qwen2.5-0.5B, tied) {init['rows_s']:.1f} s")

    sweep = []
    for size in [int(s) for s in args.sizes.split(",") if s.strip()]:
        c = cfg.model_copy(update={"extend": cfg.extend.model_copy(update={"target_size": size})})
        t0 = time.perf_counter()
        e, a = extend_tokenizer(base, train, c)
        secs = time.perf_counter() - t0
        r = extension_report(fertility_report({"expanded": e, "qwen3": base}, heldout), a, base_size=base_size,
                             size=e.get_vocab_size(), requested=c.extend.to_add(base_size, lacking),
                             ours="expanded", base="qwen3")
        sweep.append({"size": size, "added": len(a), "seconds": round(secs, 1), "languages": r["languages"]})
    if sweep:
        print("\n| size | learned | " + " | ".join(f"{lang} tokens/word (x Qwen 3)" for lang in LANGS) + " |")
        print("|---:|---:|" + "---:|" * len(LANGS))
        for row in sweep:
            cells = [f"{row['languages'][lang]['expanded_fertility']:.3f} ({row['languages'][lang]['ratio']:.3f}x)"
                     for lang in LANGS]
            print(f"| {row['size']:,} | {row['added']:,} | " + " | ".join(cells) + " |")
    if args.json:
        out = {"config": cfg.model_dump(mode="json"), "extension": ext_report, "fertility": report,
               "init": init, "sweep": sweep, "extend_seconds": extend_s, "machine": platform.platform()}
        Path(args.json).write_text(json.dumps(out, indent=2, ensure_ascii=False), encoding="utf-8")
    return 0


def init_side(cfg, ext, base, save_hf) -> dict:
    """What init does with the expanded tokenizer against Qwen's (loaded as init loads a checkpoint's tokenizer)."""
    import tempfile

    import torch
    from transformers import AutoTokenizer

    from pipeline.models import llama as L
    from pipeline.models import vocab as V

    with tempfile.TemporaryDirectory() as tmp:
        save_hf(ext, cfg, tmp)
        ours = AutoTokenizer.from_pretrained(tmp, local_files_only=True)
    qwen = AutoTokenizer.from_pretrained(str(Path(cfg.extend.base).parent), local_files_only=True)
    tokens = L.tokenizer_tokens(ours)
    match = L.match_vocab(tokens, qwen.get_vocab(), QWEN25_05B_ROWS)
    extends = V.extends(tokens, qwen.get_vocab())
    t0 = time.perf_counter()
    pieces = V.decompose(tokens, match.new_ids, qwen.backend_tokenizer, old_rows=QWEN25_05B_ROWS,
                         added_ids=ours.added_tokens_decoder, to_text=lambda t: ours.convert_tokens_to_string([t]))
    decompose_s = time.perf_counter() - t0
    embed = torch.randn(QWEN25_05B_ROWS, QWEN25_05B_HIDDEN, generator=torch.Generator().manual_seed(0)) * 0.02
    sd = {V.EMBED_KEY: embed, V.HEAD_KEY: embed}
    t0 = time.perf_counter()
    V.transfer_embeddings(sd, match, L.padded_vocab(len(ours), 64), "pieces", tied=True, pieces=pieces,
                          generator=torch.Generator(), std=0.02)
    rows_s = time.perf_counter() - t0
    return {"extends": extends, "auto": V.resolve_init("auto", extends), "matched": match.matched,
            "new": len(match.new_ids), "stats": pieces.stats(), "decompose_s": round(decompose_s, 2),
            "rows_s": round(rows_s, 2)}


if __name__ == "__main__":
    sys.exit(main())
