"""Fertility benchmark: our BPE against Llama 3 and Qwen 3 on held-out kk/ru/en text.

Trains ``pipeline.data.tokenization.train_bpe`` with the default ``TokenizerConfig`` (or the
``--set`` overrides) on the training files of the offline corpus, measures tokens per word,
bytes per token and the share of split words on ``corpus/heldout/{lang}.txt`` for ours and the
reference tokenizers, and checks our fertility relative to Llama 3 against the goals.

    .venv/bin/python benchmarks/bench_fertility.py --cache .cache [--set vocab_size=32000 ...] [--json out.json]

Needs ``make corpus`` first (the corpus and ``refs/`` in the cache). Exit status 0 when every
goal passes, 1 when one fails, 2 when the cache is missing.
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

from pipeline.config import apply_override  # noqa: E402
from pipeline.data.tokenization import TokenizerConfig  # noqa: E402
from pipeline.errors import PipelineError  # noqa: E402

GOALS = {"kk": 0.30, "ru": 0.78, "en": 1.10}  # max fertility of ours / Llama 3
REFERENCES = ("llama3", "qwen3")


def read_training(cache: Path, langs: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for lang in langs:
        texts: list[str] = []
        for path in sorted((cache / "corpus" / lang).glob("*.jsonl")):
            with open(path, encoding="utf-8") as fh:
                for line in fh:
                    if line.strip():
                        texts.append(json.loads(line)["text"])
        out[lang] = texts
    return out


def read_heldout(cache: Path, langs: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for lang in langs:
        path = cache / "corpus" / "heldout" / f"{lang}.txt"
        out[lang] = [p.strip() for p in path.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", default=os.environ.get("LLMPIPE_CACHE", ".cache"))
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="TokenizerConfig override, e.g. --set min_frequency=3")
    ap.add_argument("--json", help="write the full report here")
    ap.add_argument("--save", help="also save our tokenizer (HF layout) into this folder")
    ap.add_argument("--llamacpp", action="store_true",
                    help="also write a GGUF with our tokenizer (and a 1-layer random model) and count the held-out "
                         "documents llama.cpp itself tokenizes into exactly our ids (needs llama-cpp-python: "
                         "make test-llamacpp)")
    args = ap.parse_args(argv)

    from pipeline.data.tokenization import fertility_report, format_report_markdown, load_reference, save_hf, train_bpe

    cache = Path(args.cache)
    data: dict = {}
    for assignment in args.overrides:
        apply_override(data, assignment)
    cfg = TokenizerConfig.model_validate(data)
    langs = list(GOALS)
    missing = [str(p) for p in [cache / "corpus" / "heldout" / f"{lang}.txt" for lang in langs] if not p.exists()]
    missing += [str(cache / "refs" / r / "tokenizer.json") for r in REFERENCES if not (cache / "refs" / r / "tokenizer.json").exists()]
    if missing:
        print(f"bench_fertility: missing {', '.join(missing)}; run `make corpus` "
              f"(or `.venv/bin/python scripts/fetch_corpus.py --cache {cache}`)", file=sys.stderr)
        return 2
    try:
        train = read_training(cache, langs)
        heldout = read_heldout(cache, langs)
        refs = {name: load_reference(str(cache / "refs" / name)) for name in REFERENCES}
        t0 = time.perf_counter()
        ours = train_bpe(train, cfg)
        train_s = time.perf_counter() - t0
    except PipelineError as exc:
        print(f"bench_fertility: {exc}", file=sys.stderr)
        return 2
    report = fertility_report({"ours": ours, **refs}, heldout)
    print(f"trained on {sum(sum(map(len, v)) for v in train.values()) / 1e6:.1f}M corpus chars "
          f"({', '.join(f'{k} {sum(map(len, v)) / 1e6:.2f}M' for k, v in train.items())}), "
          f"sampled to {cfg.train_chars / 1e6:.0f}M chars, mix {cfg.mix}, vocab {cfg.vocab_size}, "
          f"min_frequency {cfg.min_frequency}, pretokenizer {cfg.pretokenizer}, "
          f"split_digits {cfg.split_digits}, {cfg.unicode_form}: {train_s:.0f} s")
    print()
    print(format_report_markdown(report, goals=GOALS, baseline="llama3"))
    passed = all(
        report["languages"][lang]["tokenizers"]["ours"]["ratios"]["llama3"] <= goal for lang, goal in GOALS.items()
    )
    print("ALL GOALS PASS" if passed else "SOME GOALS FAIL")
    if args.json:
        report["config"] = cfg.model_dump(mode="json")
        report["goals"] = GOALS
        report["train_seconds"] = train_s
        report["machine"] = platform.platform()
        Path(args.json).write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    if args.save:
        save_hf(ours, cfg, args.save)
    if args.llamacpp:
        report["llamacpp_identical"] = llamacpp_identical(ours, cfg, heldout)
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    return 0 if passed else 1


def llamacpp_identical(ours: object, cfg: TokenizerConfig, heldout: dict[str, list[str]]) -> dict[str, list[int]]:
    """{lang: [documents llama.cpp tokenizes into exactly our ids, documents]} through a GGUF written by our exporter
    (tokenizer.ggml.pre from our regex); printed one line per language."""
    import tempfile

    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from pipeline.data.tokenization import save_hf
    from pipeline.quantization import gguf_export, quality

    if quality.llama_cpp_version() is None:
        print("bench_fertility: --llamacpp needs llama-cpp-python (make test-llamacpp)", file=sys.stderr)
        return {}
    out: dict[str, list[int]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        save_hf(ours, cfg, tmp)
        tok = AutoTokenizer.from_pretrained(tmp)
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=-(-len(tok) // 64) * 64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
        path = os.path.join(tmp, "vocab.gguf")
        gguf_export.write_gguf(path, model.state_dict(), model.config, tmp, "F16")
        print()
        for lang, docs in heldout.items():
            mine = [tok(d, add_special_tokens=False)["input_ids"] for d in docs]
            theirs = quality.llamacpp_tokenize(path, docs)
            out[lang] = [sum(a == b for a, b in zip(mine, theirs)), len(docs)]
            print(f"llama.cpp tokenizes {lang} held-out text into our ids: {out[lang][0]}/{out[lang][1]} documents")
    return out


if __name__ == "__main__":
    sys.exit(main())
