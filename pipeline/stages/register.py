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
from typing import Any

from pydantic import Field

from pipeline.config import ExecField, StrictModel
from pipeline.errors import InputError, PipelineError
from pipeline.registry import PromoteConfig, lineage_chain, promote
from pipeline.stage import Stage, StageContext
from pipeline.storage import OutputDir


class RegisterConfig(StrictModel):
    model: str = Field("models/dpo", description="artifact holding the HF model to register (and its tokenizer)")
    eval: str | None = Field("eval", description="evaluate's artifact whose metrics go on the version; null: none")
    eval_label: str | None = Field(None, description="the model's label in the evaluation (default: last part of `model`)")
    name: str = Field("llm-pipeline", min_length=1, description="registered model name")
    alias: str = Field("candidate", min_length=1, description="alias set on the new version")
    description: str | None = None
    # the gates decide promotion, not what is registered: changing them does not re-register
    promote: PromoteConfig = ExecField(default_factory=PromoteConfig, description="the gates of `llmpipe promote`")
    auto_promote: bool = ExecField(False, description="run the promotion right after registering (the demo does; on a "
                                                   "cluster promotion is usually a separate, deliberate step)")


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


def _version(pkg: str) -> str:
    import importlib.metadata

    return importlib.metadata.version(pkg)


def _ensure_model(client: Any, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, tags={"llmpipe": "true"})


class RegisterStage(Stage):
    name = "register"
    config = RegisterConfig
    OUTPUT = "registry"
    INPUTS = ("models/dpo", "eval")  # the default; `inputs(cfg)` follows cfg.model / cfg.eval
    ARTIFACTS = ("registration.json",)  # report files tracking logs to MLflow

    def inputs(self, cfg: RegisterConfig) -> list[str]:
        return [cfg.model, *([cfg.eval] if cfg.eval else [])]

    def run(self, cfg: RegisterConfig, ctx: StageContext, out: OutputDir) -> dict[str, Any]:
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

        client = MlflowClient(tracker.uri, registry_uri=tracker.uri)  # not a registry URI set earlier in this process
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
            mlflow.set_registry_uri(tracker.uri)  # MLflow's model-version calls read the process-wide one too
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

    def summary(self, m: dict[str, Any]) -> list[tuple[str, Any]]:
        rows = [("model", f"{m.get('name')} version {m.get('version')} (alias {m.get('alias')})"),
                ("uri", m.get("model_uri")), ("tracking", m.get("tracking_uri"))]
        if "promoted" in m:
            rows.append(("promotion", f"champion -> version {m.get('champion_version')}" if m["promoted"]
                         else f"not promoted (champion stays version {m.get('champion_version')})"))
        return rows


STAGE = RegisterStage()
