"""register: a model folder (+ its evaluation) -> an MLflow registered model version, alias ``candidate``.

The model is logged with MLflow's transformers flavour (task ``text-generation``, with its
tokenizer) in this stage's MLflow run and registered under ``name``. The version carries lineage
tags: the fingerprints of every artifact in the chain back to the raw data (``lineage.<artifact>``),
the data / tokenizer / config hashes, the code version, and the evaluation metrics of this model
(``metric.<name>``), which ``llmpipe promote`` compares. ``lineage.json`` (the whole chain, with
each stage's config hash, time and MLflow run) is logged beside the model, so
``llmpipe lineage models:/NAME@ALIAS`` works without access to the run root.

With ``auto_promote: true`` the stage then runs the promotion (as ``llmpipe promote`` would): the
decision is recorded as tags and in this stage's metrics; a rejection does not fail the stage.

The output ``registry/`` holds ``registration.json`` (name, version, run, model URI, alias and the
promotion decision). Tracking must be on: ``$MLFLOW_TRACKING_URI``, or the embedded SQLite store of
a local run root.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, ClassVar, Literal

from pydantic import Field

from pipeline.config import StrictModel
from pipeline.errors import InputError, PipelineError
from pipeline.runner import StageContext
from pipeline.storage import OutputDir

NAME = "register"
INPUTS = ["models/dpo", "eval"]  # the default; `inputs(cfg)` follows cfg.model / cfg.eval
OUTPUT = "registry"
ARTIFACTS = ["registration.json"]


class Gate(StrictModel):
    """One promotion gate on an evaluation metric (a ``metric.<name>`` tag of the versions)."""

    metric: str = Field(..., description="metric name as evaluate writes it, e.g. val_perplexity, lm_eval_mc_kk_acc")
    better: Literal["lower", "higher"] = Field("lower", description="which direction is an improvement")
    max_regression_pct: float | None = Field(
        None, ge=0, description="against the champion: the candidate may be worse by at most this percentage")
    min: float | None = Field(None, description="absolute floor for the candidate's value")
    max: float | None = Field(None, description="absolute ceiling for the candidate's value")


class PromoteConfig(StrictModel):
    """Gates that move alias ``to_alias`` (champion) onto the ``from_alias`` (candidate) version."""

    gates: list[Gate] = Field(default_factory=list, description="all must pass; none: always promote")
    from_alias: str = "candidate"
    to_alias: str = "champion"


class RegisterConfig(StrictModel):
    # the gates decide promotion, not what is registered: changing them does not re-register
    EXEC_FIELDS: ClassVar[set[str]] = {"promote", "auto_promote"}

    model: str = Field("models/dpo", description="artifact holding the HF model to register (and its tokenizer)")
    eval: str | None = Field("eval", description="evaluate's artifact whose metrics go on the version; null: none")
    eval_label: str | None = Field(None, description="the model's label in the evaluation (default: last part of `model`)")
    name: str = Field("llm-pipeline", min_length=1, description="registered model name")
    alias: str = Field("candidate", min_length=1, description="alias set on the new version")
    description: str | None = None
    promote: PromoteConfig = Field(default_factory=PromoteConfig, description="the gates of `llmpipe promote`")
    auto_promote: bool = Field(False, description="run the promotion right after registering (the demo does; on a "
                                                   "cluster promotion is usually a separate, deliberate step)")


def inputs(cfg: RegisterConfig) -> list[str]:
    return [cfg.model, *([cfg.eval] if cfg.eval else [])]


def _label(cfg: RegisterConfig) -> str:
    return cfg.eval_label or cfg.model.rstrip("/").split("/")[-1]


def eval_metrics(cfg: RegisterConfig, ctx: StageContext) -> dict[str, float]:
    """This model's scalar metrics from the evaluation artifact."""
    if not cfg.eval:
        return {}
    models = (ctx.inputs[cfg.eval].metrics or {}).get("models") or {}
    label = _label(cfg)
    if label not in models:
        raise InputError(
            f"the evaluation in '{cfg.eval}/' has no model labelled {label!r} (it has: {', '.join(models) or 'none'}); "
            "set eval_label, or add the model to evaluate's config"
        )
    return {k: float(v) for k, v in models[label].items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def lineage_chain(storage: Any, start: str) -> list[dict[str, Any]]:
    """Every artifact the model came from, breadth first from the model back to the raw data."""
    chain, seen, queue = [], set(), [start]
    while queue:
        name = queue.pop(0)
        if name in seen:
            continue
        seen.add(name)
        m = storage.manifest(name)
        if m is None:
            chain.append({"artifact": name, "missing": True})
            continue
        entry = {
            "artifact": name,
            "stage": m.get("stage"),
            "fingerprint": m.get("fingerprint"),
            "config_hash": m.get("config_hash"),
            "code_version": m.get("code_version"),
            "ended_at": m.get("ended_at"),
            "mlflow_run_id": m.get("mlflow_run_id"),
            "uri": storage.url(name),
            "inputs": {k: (v or {}).get("fingerprint") for k, v in (m.get("inputs") or {}).items()},
        }
        if m.get("stage") == "collect":
            entry["sources"] = [
                f"{s.get('name') or s.get('kind', 'source')} ({', '.join(map(str, s.get('paths') or [s.get('dataset') or '?']))})"
                for s in (m.get("config") or {}).get("sources", [])
            ]
        chain.append(entry)
        queue.extend(k for k in (m.get("inputs") or {}) if k not in seen and not k.startswith("external:"))
    return chain


def _version_tags(chain: list[dict[str, Any]], metrics: dict[str, float], model_manifest: dict[str, Any]) -> dict[str, str]:
    tags: dict[str, str] = {"llmpipe.artifact": chain[0]["artifact"], "llmpipe.code_version": str(model_manifest.get("code_version")),
                            "llmpipe.config_hash": str(model_manifest.get("config_hash")),
                            "llmpipe.fingerprint": str(model_manifest.get("fingerprint"))}
    data: dict[str, list[str]] = {"pack": [], "clean": []}
    for e in chain:
        if not e.get("missing"):
            tags[f"lineage.{e['artifact']}"] = f"{e['fingerprint']} config {e['config_hash']}"
            if e["stage"] in data:
                data[e["stage"]].append(f"{e['artifact']}={e['fingerprint']}")
            if e["stage"] == "tokenizer":
                tags["llmpipe.tokenizer_fingerprint"] = e["fingerprint"]
    # the training data (every data phase's shards); a model that saw no shards (init) gets its clean corpus
    picked = data["pack"] or data["clean"]
    if picked:
        tags["llmpipe.data_fingerprint"] = (picked[0].split("=", 1)[1] if len(picked) == 1
                                            else ";".join(sorted(picked)))
    for k, v in metrics.items():
        tags[f"metric.{k}"] = repr(float(v))
    return tags


def run(cfg: RegisterConfig, ctx: StageContext, out: OutputDir) -> dict[str, Any]:
    from pipeline import tracking

    tracker = tracking._active
    if tracker is None or not tracker.on:
        raise PipelineError(
            "register needs MLflow: set MLFLOW_TRACKING_URI to a reachable server, or use a local run root "
            "(embedded SQLite store) without LLMPIPE_TRACKING=off"
        )
    metrics = eval_metrics(cfg, ctx)
    model_art = ctx.inputs[cfg.model]
    chain = lineage_chain(ctx.storage, cfg.model)

    import mlflow
    from mlflow.tracking import MlflowClient
    from transformers import AutoModelForCausalLM, AutoTokenizer

    client = MlflowClient(tracker.uri)
    with tempfile.TemporaryDirectory() as tmp:
        folder = model_art.download(os.path.join(tmp, "model"))
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise InputError(f"'{cfg.model}/' does not load as a transformers causal LM with its tokenizer: {exc}") from exc
        lineage_path = os.path.join(tmp, "lineage.json")
        with open(lineage_path, "w", encoding="utf-8") as fh:
            json.dump({"model": cfg.model, "run_root": ctx.storage.uri, "chain": chain}, fh, indent=2, ensure_ascii=False)
        ctx.log(f"register: logging {cfg.model} ({sum(p.numel() for p in model.parameters()):,} parameters) to {tracker.uri}")
        mlflow.set_tracking_uri(tracker.uri)
        with mlflow.start_run(run_id=tracker.run_id):
            mlflow.log_artifact(lineage_path)
            info = mlflow.transformers.log_model(
                transformers_model={"model": model, "tokenizer": tokenizer},
                name="model",
                task="text-generation",
                # listed, not inferred: inference would import the model again in a subprocess
                pip_requirements=[f"transformers=={_version('transformers')}", f"torch=={_version('torch').split('+')[0]}",
                                  f"tokenizers=={_version('tokenizers')}"],
            )
    _ensure_model(client, cfg.name)
    mv = client.create_model_version(cfg.name, info.model_uri, run_id=tracker.run_id, description=cfg.description,
                                     tags=_version_tags(chain, metrics, model_art.manifest),
                                     model_id=getattr(info, "model_id", None))
    client.set_registered_model_alias(cfg.name, cfg.alias, mv.version)
    ctx.log(f"register: {cfg.name} version {mv.version} -> alias {cfg.alias}")
    record: dict[str, Any] = {
        "name": cfg.name, "version": int(mv.version), "alias": cfg.alias, "run_id": tracker.run_id,
        "model_uri": f"models:/{cfg.name}/{mv.version}", "tracking_uri": tracker.uri, "artifact": cfg.model,
        "fingerprint": model_art.fingerprint, "metrics": metrics,
    }
    if cfg.auto_promote:
        decision = promote(client, cfg.name, cfg.promote, dry_run=False, version=str(mv.version))
        record["promotion"] = decision
        ctx.log("register: " + decision["summary"])
    out.write_json("registration.json", record)
    result: dict[str, Any] = {k: record[k] for k in ("name", "version", "alias", "model_uri", "tracking_uri")}
    if "promotion" in record:
        result["promoted"] = record["promotion"]["decision"] == "promoted"
        result["champion_version"] = record["promotion"].get("champion_version")
    return result


def _version(pkg: str) -> str:
    import importlib.metadata

    return importlib.metadata.version(pkg)


def _ensure_model(client: Any, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, tags={"llmpipe": "true"})


def summary(m: dict[str, Any]) -> list[tuple[str, Any]]:
    rows = [("model", f"{m.get('name')} version {m.get('version')} (alias {m.get('alias')})"),
            ("uri", m.get("model_uri")), ("tracking", m.get("tracking_uri"))]
    if "promoted" in m:
        rows.append(("promotion", f"champion -> version {m.get('champion_version')}" if m["promoted"]
                     else f"not promoted (champion stays version {m.get('champion_version')})"))
    return rows


# ------------------------------------------------------------------------------- promotion


def version_metrics(mv: Any) -> dict[str, float]:
    out = {}
    for k, v in (mv.tags or {}).items():
        if k.startswith("metric."):
            try:
                out[k[len("metric."):]] = float(v)
            except ValueError:
                pass
    return out


def check_gates(gates: list[Gate], cand: dict[str, float], champ: dict[str, float] | None) -> list[dict[str, Any]]:
    """One row per gate: the values, the limit, pass or fail and why."""
    rows = []
    for g in gates:
        c = cand.get(g.metric)
        h = champ.get(g.metric) if champ is not None else None
        row: dict[str, Any] = {"metric": g.metric, "candidate": c, "champion": h, "passed": True, "why": []}
        if c is None:
            row["passed"] = False
            known = ", ".join(sorted(cand)) or "none"
            row["why"].append(f"the candidate has no metric {g.metric!r} (it has: {known})")
            rows.append(row)
            continue
        if g.min is not None and c < g.min:
            row["passed"] = False
            row["why"].append(f"{c:.4g} < min {g.min:.4g}")
        if g.max is not None and c > g.max:
            row["passed"] = False
            row["why"].append(f"{c:.4g} > max {g.max:.4g}")
        if g.max_regression_pct is not None and h is not None and h != 0:
            worse = (c - h) / abs(h) * 100 if g.better == "lower" else (h - c) / abs(h) * 100
            row["regression_pct"] = worse
            if worse > g.max_regression_pct:
                row["passed"] = False
                row["why"].append(f"{worse:+.2f}% worse than the champion (limit {g.max_regression_pct:g}%)")
        rows.append(row)
    return rows


def promote(client: Any, name: str, cfg: PromoteConfig, *, dry_run: bool, version: str | None = None) -> dict[str, Any]:
    """Compare the candidate with the champion on the gates; move the champion alias when all pass."""
    import datetime as dt

    from mlflow.exceptions import MlflowException

    try:
        cand = client.get_model_version(name, version) if version else client.get_model_version_by_alias(name, cfg.from_alias)
    except MlflowException as exc:
        raise InputError(f"registered model {name!r} has no version {'v' + version if version else 'with alias ' + repr(cfg.from_alias)}: "
                         f"run the register stage first ({str(exc).splitlines()[0]})") from exc
    try:
        champ = client.get_model_version_by_alias(name, cfg.to_alias)
    except MlflowException:
        champ = None
    rows = check_gates(cfg.gates, version_metrics(cand), version_metrics(champ) if champ else None)
    passed = all(r["passed"] for r in rows)
    same = champ is not None and champ.version == cand.version
    decision = "already-champion" if same else ("promoted" if passed else "rejected")
    if dry_run and decision == "promoted":
        decision = "would-promote"
    champion_version = cand.version if decision == "promoted" else (champ.version if champ else None)
    summary = {
        "promoted": f"version {cand.version} promoted to {cfg.to_alias}" + (f" (was version {champ.version})" if champ else " (first champion)"),
        "would-promote": f"version {cand.version} would be promoted to {cfg.to_alias} (dry run)",
        "rejected": f"version {cand.version} not promoted: " + "; ".join(w for r in rows for w in r["why"]),
        "already-champion": f"version {cand.version} is already {cfg.to_alias}",
    }[decision]
    result = {"name": name, "candidate_version": int(cand.version), "champion_before": int(champ.version) if champ else None,
              "champion_version": int(champion_version) if champion_version else None, "decision": decision, "gates": rows,
              "summary": summary}
    if not dry_run and not same:
        at = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        tags = {"promotion.decision": decision, "promotion.at": at,
                "promotion.compared_with": str(champ.version) if champ else "none",
                "promotion.gates": json.dumps(rows)[:5000]}
        for k, v in tags.items():
            client.set_model_version_tag(name, cand.version, k, v)
        if decision == "promoted":
            client.set_registered_model_alias(name, cfg.to_alias, cand.version)
            if champ is not None:
                client.set_model_version_tag(name, champ.version, "promotion.superseded_by", str(cand.version))
    return result


def format_decision(result: dict[str, Any]) -> str:
    lines = [f"{result['name']}: candidate version {result['candidate_version']} vs champion "
             f"{'version ' + str(result['champion_before']) if result['champion_before'] else '(none yet)'}"]
    if result["gates"]:
        width = max(len(r["metric"]) for r in result["gates"])
        lines.append(f"  {'gate'.ljust(width)}  {'candidate':>12}  {'champion':>12}  result")
        for r in result["gates"]:
            fmt = lambda v: "-" if v is None else f"{v:.4g}"  # noqa: E731
            res = "pass" if r["passed"] else "FAIL: " + "; ".join(r["why"])
            lines.append(f"  {r['metric'].ljust(width)}  {fmt(r['candidate']):>12}  {fmt(r['champion']):>12}  {res}")
    else:
        lines.append("  no gates configured: the candidate is promoted as it is")
    lines.append(f"decision: {result['summary']}")
    return "\n".join(lines)


def load_promote_config(path: str | None, overrides: list[str]) -> tuple[str, PromoteConfig]:
    """The model name and promotion gates from a register config file (its ``promote`` section)."""
    from pipeline.config import load_config

    cfg = load_config("register", path, overrides)
    return cfg.name, cfg.promote
