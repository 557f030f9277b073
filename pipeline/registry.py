"""The MLflow model registry as the pipeline uses it: model URIs and versions, the lineage a version
carries, and promotion (gates that move the champion alias). The register stage and the CLI
(`llmpipe promote`, `llmpipe lineage`, `llmpipe summary`) both build on it."""

from __future__ import annotations

import datetime as dt
import json
import re
import tempfile
from typing import Any, Literal

from pydantic import Field

from pipeline.config import StrictModel
from pipeline.errors import InputError

# mlflow.exceptions stays imported where it is used: the register stage imports this module at the
# top, so `llmpipe config register` and `llmpipe stages` would pay mlflow's ~1.5-2.5 s import.


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
            if alias:
                hint = f"; its aliases: {', '.join(aliases) or 'none'}"
            else:  # a version number: say which versions exist
                versions = sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
                hint = f"; its versions: {', '.join(map(str, versions)) or 'none'}"
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

