"""Reading the MLflow model registry: model URIs, versions and the lineage a version carries."""

from __future__ import annotations

import json
import re
import tempfile
from typing import Any

from pipeline.errors import InputError

_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    m = _URI.match(uri.strip())
    if not m:
        raise InputError(f"{uri!r} is not a model URI: use models:/NAME@ALIAS (e.g. models:/llm-pipeline@champion) "
                         "or models:/NAME/VERSION")
    return m.group("name"), m.group("alias"), m.group("version")


def get_version(client: Any, uri: str) -> Any:
    from mlflow.exceptions import MlflowException

    name, alias, version = parse_model_uri(uri)
    try:
        return client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    except MlflowException as exc:
        try:
            aliases = sorted(client.get_registered_model(name).aliases)
            hint = f"; its aliases: {', '.join(aliases) or 'none'}"
        except MlflowException:
            hint = f"; no registered model {name!r}"
        raise InputError(f"{uri} does not resolve{hint}") from exc


def lineage(client: Any, uri: str) -> dict[str, Any]:
    """The registered version, its tags and the lineage chain logged beside it."""
    mv = get_version(client, uri)
    chain: list[dict[str, Any]] = []
    run_root = None
    if mv.run_id:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                path = client.download_artifacts(mv.run_id, "lineage.json", tmp)
                with open(path, encoding="utf-8") as fh:
                    data = json.load(fh)
                chain, run_root = data.get("chain", []), data.get("run_root")
            except Exception:  # noqa: BLE001 - older versions, or artefacts not reachable: the tags still tell
                chain = []
    if not chain:
        chain = [{"artifact": k[len("lineage."):], "fingerprint": v.split()[0], "config_hash": v.split()[-1]}
                 for k, v in (mv.tags or {}).items() if k.startswith("lineage.")]
    return {"uri": uri, "name": mv.name, "version": int(mv.version), "aliases": list(getattr(mv, "aliases", []) or []),
            "run_id": mv.run_id, "run_root": run_root, "tags": dict(mv.tags or {}), "chain": chain}


def format_lineage(info: dict[str, Any]) -> str:
    aliases = f" (aliases: {', '.join(info['aliases'])})" if info["aliases"] else ""
    lines = [f"{info['name']} version {info['version']}{aliases}  <- {info['uri']}",
             f"  registered by MLflow run {info['run_id']}" + (f", run root {info['run_root']}" if info["run_root"] else "")]
    decision = info["tags"].get("promotion.decision")
    if decision:
        lines.append(f"  promotion: {decision} at {info['tags'].get('promotion.at')} "
                     f"(compared with version {info['tags'].get('promotion.compared_with')})")
    metrics = {k[len("metric."):]: v for k, v in info["tags"].items() if k.startswith("metric.")}
    if metrics:
        shown = ", ".join(f"{k} {float(v):.4g}" for k, v in sorted(metrics.items())[:8])
        lines.append(f"  metrics: {shown}" + (" ..." if len(metrics) > 8 else ""))
    lines.append("  chain (each artifact, then what it was made from):")
    for e in info["chain"]:
        if e.get("missing"):
            lines.append(f"    {e['artifact']:<18} (manifest no longer under the run root)")
            continue
        head = f"    {e['artifact']:<18} {str(e.get('stage') or ''):<9} fingerprint {str(e.get('fingerprint'))[:12]}  " \
               f"config {str(e.get('config_hash'))[:12]}"
        if e.get("ended_at"):
            head += f"  {e['ended_at']}"
        lines.append(head)
        if e.get("inputs"):
            lines.append(f"      <- {', '.join(e['inputs'])}")
        if e.get("sources"):
            lines.append(f"      sources: {', '.join(map(str, e['sources']))}")
        if e.get("mlflow_run_id"):
            lines.append(f"      mlflow run {e['mlflow_run_id']}")
    return "\n".join(lines)
