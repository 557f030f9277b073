"""The evaluate stage's work: checks, per-model measurements, results and the report."""

from __future__ import annotations

import gc
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import fsspec
import torch
from transformers import AutoTokenizer

from pipeline.data.packed import PackedDataset
from pipeline.errors import InputError
from pipeline.evaluation import continuation, generation, harness, loading, perplexity, report, tool_use


@dataclass
class Plan:
    """Everything checked and prepared before the first model is loaded."""

    folders: dict[str, str]
    configs: dict[str, dict[str, Any]]
    chat: dict[str, bool]
    val: Any = None  # PackedDataset of the validation split
    texts: dict[str, list[str]] | None = None
    prompts: list[str] | None = None
    task_manager: Any = None
    tool_items: list[dict[str, Any]] | None = None
    extra_tasks: list[str] | None = None  # the generated continuation group
    continuation_items: dict[str, int] | None = None


def _read_prompts(path: str) -> list[str]:
    try:
        with fsspec.open(path, "rt", encoding="utf-8") as fh:
            lines = fh.read().splitlines()
    except FileNotFoundError:
        raise InputError(f"generation.prompts_file {path} does not exist") from None
    if path.endswith(".jsonl"):
        out = []
        for n, line in enumerate(lines, 1):
            if line.strip():
                try:
                    out.append(json.loads(line)["prompt"])
                except (ValueError, KeyError, TypeError):
                    raise InputError(f"{path}:{n}: expected a JSON object with a \"prompt\" field") from None
        return out
    return [line.strip() for line in lines if line.strip()]


def prepare(cfg: Any, ctx: Any, scratch: str) -> Plan:
    """Fail fast: every input, tokenizer, prompt and task name is checked here, before any compute."""
    folders, configs, chat = {}, {}, {}
    for m in cfg.models:
        art = ctx.inputs[m.path]
        folder = art.download(os.path.join(scratch, "models", m.name))
        configs[m.name] = loading.check_model_folder(folder, f"{art.url()}/")
        folders[m.name] = folder
    plan = Plan(folders, configs, chat)

    shards_name = cfg.perplexity.artifact if cfg.perplexity is not None else "shards"
    sample = None
    if cfg.perplexity is not None or (cfg.heldout is not None and cfg.heldout.from_run) or (
            cfg.continuation is not None and cfg.continuation.from_run):
        shards = ctx.inputs[shards_name]
        split = cfg.perplexity.split if cfg.perplexity is not None else "val"
        plan.val = PackedDataset(shards.url(), split, storage_options=ctx.storage.storage_options)
        sample = plan.val.block(0) if len(plan.val) else None
    for m in cfg.models:
        tok = AutoTokenizer.from_pretrained(plan.folders[m.name])
        if plan.val is not None:
            loading.check_against_shards(tok, configs[m.name], plan.val.index, ctx.inputs[m.path].url(), sample)
        has_template = bool(getattr(tok, "chat_template", None))
        stage = ctx.inputs[m.path].manifest.get("stage")
        if m.chat and not has_template:
            raise InputError(f"{m.name}: chat is true but {ctx.inputs[m.path].url()} has no chat template")
        chat[m.name] = m.chat if m.chat is not None else (has_template and stage in ("sft", "dpo"))

    if cfg.heldout is not None:
        h = cfg.heldout
        texts: dict[str, list[str]] = {lang: [] for lang in h.languages}
        if h.from_run:
            found = perplexity.heldout_from_run(ctx.inputs[h.clean], ctx.inputs[shards_name].manifest.get("config", {}),
                                                h.languages, h.max_documents, bar=ctx.bar)
            for lang, docs in found.items():
                texts[lang] += docs
        for lang, paths in h.files.items():
            texts.setdefault(lang, [])
            texts[lang] += perplexity.read_text_files(paths)[: h.max_documents]
        empty = [lang for lang, docs in texts.items() if not docs]
        if empty:
            raise InputError(f"no held-out text for {', '.join(empty)}: "
                             + ("the run's validation documents hold none in that language; " if h.from_run else "")
                             + "list files under heldout.files or drop the language from heldout.languages")
        plan.texts = texts

    if cfg.generation is not None:
        prompts = list(cfg.generation.prompts)
        if cfg.generation.prompts_file:
            prompts += _read_prompts(cfg.generation.prompts_file)
        prompts = [p for p in prompts if p.strip()]
        if not prompts:
            raise InputError("the prompt set is empty (generation.prompts and generation.prompts_file hold no prompt)")
        plan.prompts = prompts

    if cfg.tool_use is not None:
        plan.tool_items = tool_use.load_items(cfg.tool_use.files, cfg.tool_use.max_items)
        if not any(plan.chat.values()):
            raise InputError("tool_use is set but no model is evaluated with its chat template (chat: true, or a model "
                             "from sft/dpo): function calling needs one")

    if cfg.lm_eval is not None:
        folders_ = harness.materialize(cfg.lm_eval.include_paths, os.path.join(scratch, "tasks"))
        plan.extra_tasks = []
        if cfg.continuation is not None:
            c = cfg.continuation
            clean = cfg.heldout.clean if cfg.heldout is not None else "clean"
            docs = {lang: [] for lang in c.languages}
            if c.from_run:
                docs = perplexity.heldout_from_run(ctx.inputs[clean], ctx.inputs[shards_name].manifest.get("config", {}),
                                                   c.languages, c.max_documents, bar=ctx.bar)
            for lang, paths in c.files.items():
                docs.setdefault(lang, [])
                docs[lang] += perplexity.read_text_files(paths)[: c.max_documents]
            items = continuation.build_items(docs, per_language=c.items_per_language, context_chars=c.context_chars,
                                             continuation_chars=c.continuation_chars, choices=c.choices, seed=c.seed)
            plan.continuation_items = {lang: len(v) for lang, v in items.items()}
            short = [lang for lang, n in plan.continuation_items.items() if n == 0]
            if short:
                ctx.log(f"evaluate: continuation: no items for {', '.join(short)} (fewer than {c.choices} validation "
                        "documents long enough)")
            cont_dir = os.path.join(scratch, "tasks", "continuation")
            plan.extra_tasks = continuation.write_tasks(items, cont_dir)
            if plan.extra_tasks:
                folders_.append(cont_dir)
                ctx.log("evaluate: continuation task items: "
                        + ", ".join(f"{lang} {n}" for lang, n in plan.continuation_items.items()))
        plan.task_manager = harness.task_manager([*cfg.lm_eval.tasks, *plan.extra_tasks], folders_)
    return plan


def _modes(g: Any) -> dict[str, dict[str, Any]]:
    modes: dict[str, dict[str, Any]] = {}
    if g.greedy:
        modes["greedy"] = {"do_sample": False}
    if g.sampled:
        modes["sampled"] = {"do_sample": True, "temperature": g.temperature, "top_p": g.top_p, "top_k": 0}
    return modes


def evaluate(cfg: Any, ctx: Any, out: Any) -> dict[str, Any]:
    device = loading.pick_device(cfg.device)
    dtype = loading.pick_dtype(cfg.dtype, device)
    torch.manual_seed(cfg.seed)
    with tempfile.TemporaryDirectory(prefix="llmpipe-eval-") as scratch:
        plan = prepare(cfg, ctx, scratch)
        ctx.log(f"evaluate: {len(cfg.models)} model(s) on {device} ({str(dtype).replace('torch.', '')}): "
                + ", ".join(f"{m.name}={m.path}" for m in cfg.models))
        flat: dict[str, dict[str, Any]] = {}
        details: dict[str, dict[str, Any]] = {}
        gens: dict[str, list[dict[str, Any]]] = {}
        for m in cfg.models:
            flat[m.name], details[m.name], gens[m.name] = _one_model(cfg, ctx, out, plan, m, device, dtype)
            gc.collect()
        curves = {m.name: report.read_curves(plan.folders[m.name], ctx.inputs[m.path].metrics) for m in cfg.models}

    metrics: dict[str, Any] = {"models": flat, "report": "report.md", "model_count": len(cfg.models)}
    with_val = {k: v["val_loss"] for k, v in flat.items() if v.get("val_loss") is not None}
    if with_val:
        metrics["best_val_loss_model"] = min(with_val, key=with_val.get)  # type: ignore[arg-type]
    results = {**metrics, "details": details, "generations": gens,
               "models_evaluated": {m.name: {"path": m.path, "fingerprint": ctx.inputs[m.path].fingerprint,
                                             "chat": plan.chat[m.name]} for m in cfg.models}}
    out.write_json("results.json", results)
    _write_report(cfg, ctx, out, flat, details, gens, curves, plan)
    return metrics


def _one_model(cfg: Any, ctx: Any, out: Any, plan: Plan, m: Any, device: str, dtype: Any
               ) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
    t0 = time.perf_counter()
    lm = loading.load(m.name, plan.folders[m.name], device, dtype)
    ctx.log(f"evaluate: {m.name} ({m.path}, {sum(p.numel() for p in lm.model.parameters()):,} parameters)")
    flat: dict[str, Any] = {}
    detail: dict[str, Any] = {"chat": plan.chat[m.name]}
    width = min(lm.max_positions, cfg.max_length or lm.max_positions)
    if cfg.perplexity is not None:
        v = perplexity.shard_loss(lm.model, plan.val, max_blocks=cfg.perplexity.max_blocks, batch_size=cfg.batch_size,
                                  device=device, bar=ctx.bar)
        flat.update(val_loss=v["loss"], val_perplexity=v["perplexity"])
        detail["val"] = v
        ctx.log(f"  val loss {v['loss']:.4f} (perplexity {v['perplexity']:,.2f}) over {v['tokens']:,} tokens "
                f"[{time.perf_counter() - t0:.0f}s]")
    if plan.texts is not None:
        detail["heldout"] = {}
        for lang, docs in plan.texts.items():
            t = perplexity.text_perplexity(lm.model, lm.tokenizer, docs, max_length=width, stride=cfg.stride,
                                           batch_size=cfg.batch_size, device=device, bar=ctx.bar,
                                           desc=f"held-out {lang}")
            flat[f"perplexity_{lang}"] = t["perplexity"]
            flat[f"bits_per_byte_{lang}"] = t["bits_per_byte"]
            flat[f"tokens_{lang}"] = t["tokens"]
            detail["heldout"][lang] = t
            ctx.log(f"  {lang}: {t['documents']} docs, {t['tokens']:,} tokens, perplexity {t['perplexity']:,.2f}, "
                    f"{t['bits_per_byte']:.3f} bits/byte [{time.perf_counter() - t0:.0f}s]")
    records: list[dict[str, Any]] = []
    if cfg.generation is not None and plan.prompts:
        g = cfg.generation
        records = generation.generate(lm.model, lm.tokenizer, plan.prompts, chat=plan.chat[m.name], system=g.system,
                                      max_new_tokens=g.max_new_tokens, modes=_modes(g), seed=g.seed, device=device,
                                      max_positions=lm.max_positions, bar=ctx.bar)
        out.write_json(f"{m.name}/generations.json", records)
        ctx.log(f"  {len(records)} prompts x {len(_modes(g))} decodings [{time.perf_counter() - t0:.0f}s]")
    if cfg.lm_eval is not None:
        le = cfg.lm_eval
        res = harness.evaluate(lm.model, lm.tokenizer, le.tasks, plan.task_manager, limit=le.limit,
                               num_fewshot=le.num_fewshot, batch_size=le.batch_size, max_length=lm.max_positions,
                               seed=cfg.seed, chat=le.chat)
        if plan.extra_tasks:  # the generated continuation task: every item (lm_eval's limit is for the others)
            more = harness.evaluate(lm.model, lm.tokenizer, plan.extra_tasks, plan.task_manager, limit=None,
                                    num_fewshot=0, batch_size=le.batch_size, max_length=lm.max_positions,
                                    seed=cfg.seed, chat=False)
            for key in ("results", "n_samples", "versions"):
                res[key] = {**res[key], **more[key]}
        flat.update(harness.flat_metrics(res["results"]))
        detail["lm_eval"] = res
        out.write_json(f"{m.name}/lm_eval.json", res)
        shown = {k: v for k, v in harness.flat_metrics(res["results"]).items() if k.endswith("_acc")}
        ctx.log("  lm_eval " + ", ".join(f"{k[8:-4]} {v:.3f}" for k, v in shown.items())
                + f" [{time.perf_counter() - t0:.0f}s]")
    if plan.tool_items is not None and plan.chat[m.name]:
        tu = tool_use.evaluate(lm.model, lm.tokenizer, plan.tool_items, max_new_tokens=cfg.tool_use.max_new_tokens,
                               device=device, max_positions=lm.max_positions, bar=ctx.bar)
        flat.update(tool_use.flat_metrics(tu["scores"]))
        detail["tool_use"] = tu["scores"]
        out.write_json(f"{m.name}/tool_use.json", tu)
        o = tu["scores"]["overall"]
        ctx.log("  tool use: " + ", ".join(f"{k} {o[k]['share']:.2f} (n={o[k]['n']})" for k in tool_use.MEASURES
                                           if o[k]["share"] is not None) + f" [{time.perf_counter() - t0:.0f}s]")
    flat = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in flat.items()}
    del lm
    return flat, detail, records


def _num(x: float | None) -> str:
    if x is None:
        return "none"
    return str(int(x)) if float(x).is_integer() else str(x)


def _write_report(cfg: Any, ctx: Any, out: Any, flat: dict[str, dict[str, Any]], details: dict[str, dict[str, Any]],
                  gens: dict[str, list[dict[str, Any]]], curves: dict[str, Any], plan: Plan) -> None:
    labels = [m.name for m in cfg.models]
    folder = out.path() if out.storage.is_local else tempfile.mkdtemp(prefix="llmpipe-report-")
    os.makedirs(folder, exist_ok=True)
    sections: list[report.Section] = []

    models_table = report.Table(["model", "artifact", "prompts", "fingerprint"],
                                [[m.name, m.path, "chat template" if plan.chat[m.name] else "raw text",
                                  ctx.inputs[m.path].fingerprint[:12]] for m in cfg.models])
    sections.append(report.Section("Models", tables=[models_table]))

    if cfg.perplexity is not None or plan.texts is not None:
        sec = report.Section("Perplexity", text="Validation shards: mean next-token loss on packed validation blocks. "
                             "Held-out text: documents never trained on, under each model's own tokenizer; bits per "
                             "byte compare across tokenizers, perplexity only within one.")
        if cfg.perplexity is not None:
            sec.tables.append(report.Table(
                ["model", "blocks", "tokens", "val loss", "val perplexity"],
                [[lb, details[lb]["val"]["blocks"], details[lb]["val"]["tokens"], flat[lb]["val_loss"],
                  flat[lb]["val_perplexity"]] for lb in labels], caption=f"{cfg.perplexity.artifact}/ ({cfg.perplexity.split})"))
        if plan.texts is not None:
            rows = []
            for lang in plan.texts:
                for lb in labels:
                    t = details[lb]["heldout"][lang]
                    rows.append([lang, lb, t["documents"], t["tokens"], t["bytes_per_token"], t["perplexity"],
                                 t["bits_per_byte"]])
            sec.tables.append(report.Table(["language", "model", "documents", "tokens", "bytes/token", "perplexity",
                                            "bits per byte"], rows, caption="held-out text"))
            if cfg.plots:
                name = report.plot_grouped({lb: {lang: details[lb]["heldout"][lang]["bits_per_byte"]
                                                 for lang in plan.texts} for lb in labels},
                                           folder, "bits_per_byte.png", "Held-out text (lower is better)", "bits per byte")
                if name:
                    sec.images.append((name, "bits per byte per language and model"))
        sections.append(sec)

    if cfg.lm_eval is not None:
        tasks = list(dict.fromkeys(t for lb in labels for t in details[lb]["lm_eval"]["results"]))
        headers = ["task", "documents"] + [f"{lb} {metric}" for lb in labels for metric in ("acc [95% CI]", "acc_norm")]
        rows = []
        for t in tasks:
            n = details[labels[0]]["lm_eval"]["results"].get(t, {}).get("sample_len")
            rows.append([t, n] + [cell for lb in labels for cell in (
                report.share_with_interval(flat[lb].get(f"lm_eval_{t}_acc"), n), flat[lb].get(f"lm_eval_{t}_acc_norm"))])
        sec = report.Section("lm-evaluation-harness", text=f"tasks: {', '.join(cfg.lm_eval.tasks)}; "
                             f"limit: {_num(cfg.lm_eval.limit)}; chance is 0.25 on 4-way multiple choice; brackets: the "
                             "95% Wilson interval of the accuracy over that many documents (a group's n sums its "
                             "tasks')." + (" llmpipe_cont: the continuation-choice task generated from the run's "
                                           "validation documents (never trained on), every item, items per language: "
                                           + ", ".join(f"{k} {v}" for k, v in (plan.continuation_items or {}).items())
                                           if plan.extra_tasks else ""),
                             tables=[report.Table(headers, rows)])
        if cfg.plots:
            name = report.plot_grouped({lb: {t: flat[lb][f"lm_eval_{t}_acc"] for t in tasks
                                             if flat[lb].get(f"lm_eval_{t}_acc") is not None} for lb in labels},
                                       folder, "lm_eval.png", "lm_eval accuracy (higher is better)", "acc")
            if name:
                sec.images.append((name, "lm_eval accuracy per task and model"))
        sections.append(sec)

    if plan.tool_items is not None:
        langs = list(dict.fromkeys([*sorted({i["lang"] for i in plan.tool_items}), "overall"]))
        rows = []
        for lb in labels:
            sc = details[lb].get("tool_use")
            for lang in langs:
                if sc is None:
                    rows.append([lb, lang] + ["(no chat template)"] + ["–"] * (len(tool_use.MEASURES) - 1))
                    continue
                rows.append([lb, lang] + [report.share_with_interval(sc[lang][k]["share"], sc[lang][k]["n"])
                                          for k in tool_use.MEASURES])
        n_call = sum(1 for i in plan.tool_items if i["reference"])
        sections.append(report.Section(
            "Function calling", text=f"{len(plan.tool_items)} held-out tool-use conversations ({n_call} expect a "
            f"call, {len(plan.tool_items) - n_call} expect none) from {', '.join(cfg.tool_use.files)}; greedy, at most "
            f"{cfg.tool_use.max_new_tokens} new tokens. valid: parseable calls to offered tools with schema-valid "
            "arguments; name / arguments: equal to the reference's (order of calls and keys ignored); abstain: no call "
            "where none fits. Brackets: 95% Wilson intervals.",
            tables=[report.Table(["model", "language", *tool_use.MEASURES], rows)]))

    if cfg.generation is not None and plan.prompts:
        g = cfg.generation
        for mode, what in (("greedy", "greedy decoding"),
                           ("sampled", f"sampled: temperature {g.temperature}, top-p {g.top_p}, seed {g.seed} + prompt number")):
            if mode not in _modes(g):
                continue
            rows = [[i + 1, p] + [gens[lb][i][mode]["text"] or "(empty)" for lb in labels]
                    for i, p in enumerate(plan.prompts)]
            sections.append(report.Section(f"Generations ({mode})", text=f"{what}; at most {g.max_new_tokens} new tokens.",
                                           tables=[report.Table(["#", "prompt", *labels], rows)]))

    if cfg.plots:
        name = report.plot_loss_curves(curves, folder)
        if name:
            sections.append(report.Section("Training curves", text="From each model folder's train_metrics.jsonl.",
                                           images=[(name, "training and validation loss per model")]))

    title = "Evaluation: " + " vs ".join(labels)
    intro = f"Run root {ctx.storage.uri}; {len(labels)} model(s); device {loading.pick_device(cfg.device)}."
    md = report.to_markdown(title, intro, sections)
    page = report.to_html(title, intro, sections, folder)
    if out.storage.is_local:
        out.write_text("report.md", md)
        out.write_text("report.html", page)
    else:
        for f in os.listdir(folder):
            out.put_local(os.path.join(folder, f))
        out.write_text("report.md", md)
        out.write_text("report.html", page)
