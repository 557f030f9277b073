"""`llmpipe summary`: one report of a whole pipeline run, read from the manifests under the run root.

Every section is optional: a run that stopped early (or a stage that does not exist on this root)
simply has fewer sections. Nothing here computes anything new: the numbers are those the stages
committed, so the summary and the manifests can never disagree.
"""

from __future__ import annotations

import json
from typing import Any

from pipeline.registry import lineage_chain
from pipeline.stages import ORDER, get_stage
from pipeline.tracking import sqlite_path, sqlite_uri, ui_command

SPARK = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float], width: int = 48) -> str:
    if not values:
        return ""
    if len(values) > width:  # mean of equal buckets
        step = len(values) / width
        values = [sum(values[int(i * step):int((i + 1) * step)]) / max(1, len(values[int(i * step):int((i + 1) * step)]))
                  for i in range(width)]
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    return "".join(SPARK[min(len(SPARK) - 1, int((v - lo) / span * (len(SPARK) - 1) + 0.5))] for v in values)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:,.4g}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _read_jsonl(storage: Any, *parts: str) -> list[dict[str, Any]]:
    path = storage.path(*parts)
    if not storage.fs.exists(path):
        return []
    with storage.fs.open(path, "rb") as fh:
        return [json.loads(line) for line in fh.read().decode("utf-8").splitlines() if line.strip()]


def _read_json(storage: Any, *parts: str) -> Any:
    path = storage.path(*parts)
    if not storage.fs.exists(path):
        return None
    with storage.fs.open(path, "rb") as fh:
        return json.loads(fh.read())


def _variants(storage: Any, done: dict[str, Any], outputs: dict[str, str]) -> dict[str, Any]:
    """Outputs of clean/pack run under other names (pretrain's data phases and what they were packed from)."""
    if "models/pretrain" not in done:
        return {}
    return {e["artifact"]: storage.manifest(e["artifact"]) for e in lineage_chain(storage, "models/pretrain")
            if not e.get("missing") and e["stage"] in ORDER and get_stage(e["stage"]).renamable()
            and e["artifact"] not in outputs}


def render(storage: Any) -> str:
    out: list[str] = [f"== run summary: {storage.uri} " + "=" * 20]
    outputs = {get_stage(stage).OUTPUT: stage for stage in ORDER}  # each stage's default output -> the stage
    manifests = {name: storage.manifest(name) for name in outputs}
    done = {n: m for n, m in manifests.items() if m}
    if not done:
        return out[0] + "\n  nothing committed under this root yet"

    # time per stage
    out.append("time per stage")
    total = 0.0
    by_stage = {outputs[n]: m for n, m in done.items()}
    variants = _variants(storage, done, outputs)  # clean/pack run again under another config (a second data phase)
    for stage in ORDER:
        runs = [(by_stage.get(stage), "")] + [(vm, f"  -> {n}/") for n, vm in variants.items() if vm.get("stage") == stage]
        for m, note in runs:
            if m:
                secs = float(m.get("duration_s") or 0) + float(m.get("parts_duration_s") or 0)  # ranks, then the merge
                total += secs
                out.append(f"  {stage:<10} {secs:8.1f}s   finished {m.get('ended_at', '')}{note}")
    out.append(f"  {'total':<10} {total:8.1f}s   (stage work; installs and start-up not counted)")

    clean = done.get("clean")
    if clean:
        m = clean["metrics"]
        out.append("documents (clean)")
        out.append(f"  in {_fmt(m.get('documents_in'))}, kept {_fmt(m.get('kept'))}, dropped {_fmt(m.get('dropped'))}")
        reasons = sorted((m.get("dropped_by_reason") or {}).items(), key=lambda kv: -kv[1])
        for reason, n in reasons[:8]:
            out.append(f"    {reason:<30} {_fmt(n)}")
        if len(reasons) > 8:
            out.append(f"    {f'{len(reasons) - 8} more reasons':<30} {_fmt(sum(n for _, n in reasons[8:]))}")
        if m.get("kept_by_language"):
            out.append("  kept by language: " + ", ".join(f"{k} {_fmt(v)}" for k, v in sorted(m["kept_by_language"].items())))
        for name, vm in variants.items():
            if vm.get("stage") == "clean":
                v = vm.get("metrics") or {}
                out.append(f"  {name}/: kept {_fmt(v.get('kept'))} of {_fmt(v.get('documents_in'))}")

    tok = done.get("tokenizer")
    if tok and tok["metrics"].get("fertility"):
        m = tok["metrics"]
        out.append(f"tokenizer fertility (tokens per word, held-out text; vocab {_fmt(m.get('vocab_size'))})")
        for lang, row in sorted(m["fertility"].items()):
            ours = row.get("ours")
            refs = ", ".join(f"{k} {v:.2f} ({ours / v:.2f}x)" for k, v in sorted(row.items()) if k != "ours" and v)
            out.append(f"  {lang}: ours {ours:.2f}" + (f"   vs {refs}" if refs else ""))

    pre = done.get("models/pretrain")
    if pre:
        m = pre["metrics"]
        records = _read_jsonl(storage, "models/pretrain", "train_metrics.jsonl")
        losses = [r["loss"] for r in records if r.get("kind", "train") == "train" and "loss" in r]
        vals = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
        out.append(f"pretrain: {_fmt(m.get('steps'))} steps, {_fmt(m.get('tokens'))} tokens, {_fmt(m.get('tokens_per_s'))} tokens/s")
        if losses:
            out.append(f"  train loss {losses[0]:.3f} -> {losses[-1]:.3f}  {sparkline(losses)}")
        if vals:
            out.append("  val loss   " + "  ".join(f"step {s}: {v:.3f}" for s, v in vals))
        phases = m.get("phases") or {}
        if len(phases) > 1:
            out.append("  phases     " + ", ".join(f"{n} steps {p['steps'][0]}-{p['steps'][1]} on {p['shards']}/"
                                                 for n, p in phases.items()))
    for name in ("models/sft", "models/dpo", "models/reward"):
        m = (done.get(name) or {}).get("metrics")
        if not m:
            continue
        stage = name.split("/")[1]
        if stage == "sft":
            out.append(f"sft: eval loss {m.get('eval_loss_before', float('nan')):.3f} -> {m.get('eval_loss_after', float('nan')):.3f}"
                       f" ({m.get('mode')}, {_fmt(m.get('steps'))} steps)")
        elif stage == "dpo":
            out.append(f"dpo: reward accuracy {m.get('eval_reward_accuracy_before', 0):.2f} -> {m.get('eval_reward_accuracy_after', 0):.2f},"
                       f" margin {m.get('eval_reward_margin_before', 0):.3f} -> {m.get('eval_reward_margin_after', 0):.3f}")
        else:
            out.append(f"reward model: held-out accuracy {m.get('eval_accuracy_before', 0):.2f} -> {m.get('eval_accuracy_after', 0):.2f}")

    ev = done.get("eval")
    if ev:
        models = ev["metrics"].get("models") or {}
        order = [m.get("label") or m.get("path", "").rstrip("/").split("/")[-1] for m in (ev.get("config") or {}).get("models", [])]
        models = {k: models[k] for k in [*order, *models] if k in models}  # the config's column order
        keys: list[str] = []
        for row in models.values():
            keys += [k for k in row if k not in keys and isinstance(row[k], (int, float))]
        keys = [k for k in keys if ("perplexity" in k or k.startswith("lm_eval") or k.startswith("bits_per_byte"))
                and not k.endswith("_acc_norm")]
        if models and keys:
            out.append("evaluation (" + storage.url("eval", ev["metrics"].get("report", "report.md")) + ")")
            width = max(len(k) for k in keys)
            out.append("  " + " " * width + "".join(f"{label:>12}" for label in models))
            for k in keys:
                out.append("  " + k.ljust(width) + "".join(f"{_fmt(models[label].get(k, '-')):>12}" for label in models))
        results = _read_json(storage, "eval", "results.json") or {}
        gens = results.get("generations") or {}  # {label: [{prompt, greedy: {text}, sampled: {text}}, ...]}
        if isinstance(gens, dict) and gens:
            out.append("generations (greedy; sampled ones in the report)")
            labels = list(gens)
            for i, first in enumerate(gens[labels[0]][:6]):
                prompt = str(first.get("prompt", "")).replace("\n", " / ")[:48]
                out.append(f"  prompt: {prompt}")
                for label in labels:
                    rows = gens[label]
                    if i < len(rows):
                        text = (rows[i].get("greedy") or {}).get("text", "")
                        out.append(f"    {label:<9} {str(text).strip().replace(chr(10), ' ')[:70]}")

    qz = done.get("quantized")
    if qz:
        m = qz["metrics"]
        orig = m.get("original") or {}
        out.append(f"quantized ({m.get('model')}): original {_fmt(orig.get('size_bytes'))} bytes, perplexity {_fmt(orig.get('perplexity'))}")
        for name, v in (m.get("variants") or {}).items():
            delta = v.get("perplexity_delta_pct")
            out.append(f"  {name:<11} {_fmt(v.get('size_bytes')):>14} bytes  perplexity {_fmt(v.get('perplexity'))}"
                       + (f" ({delta:+.2f}%)" if isinstance(delta, (int, float)) else ""))

    reg = done.get("registry")
    if reg:
        m = reg["metrics"]
        line = f"registry: {m.get('name')} version {m.get('version')}, alias {m.get('alias')}"
        if "promoted" in m:
            line += f"; champion is version {m.get('champion_version')}" + (" (promoted now)" if m["promoted"] else "")
        out.append(line)
        out.append(f"  lineage:  llmpipe lineage models:/{m.get('name')}@{'champion' if m.get('promoted') else m.get('alias')} --root {storage.uri}")
        uri = m.get("tracking_uri") or ""
        if sqlite_path(uri) and storage.is_local:  # the embedded store travels with the root: point at this copy's
            uri = sqlite_uri(storage.path("mlflow", "mlflow.db"))
        out.append(f"  MLflow UI: {ui_command(uri)}   (then http://127.0.0.1:5000)")
    return "\n".join(out)
