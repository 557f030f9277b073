"""Render a stage's objects from the Helm chart with ``helm template`` (the same values as
``helm upgrade --install``), so ``llmpipe k8s submit`` and ``make deploy-<stage>`` create the
same Jobs.

helm is found as ``$HELM``, else ``.cache/bin/helm`` (``scripts/fetch_tools.py`` puts it there),
else ``helm`` on ``PATH``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import yaml

from pipeline.k8s import CHART, release_name
from pipeline.k8s.client import K8sError

REPO = Path(__file__).resolve().parents[2]


def _candidates(relative: str) -> list[Path]:
    """A project path looked up from the working directory, then from the source checkout."""
    return [Path.cwd() / relative, REPO / relative]


def find_helm() -> str:
    env = os.environ.get("HELM")
    if env:
        path = shutil.which(env)
        if not path:
            raise K8sError(f"$HELM is {env!r}, which is not an executable")
        return path
    for cand in _candidates(".cache/bin/helm"):
        if cand.is_file() and os.access(cand, os.X_OK):
            return str(cand)
    path = shutil.which("helm")
    if path:
        return path
    raise K8sError("helm not found: run `python scripts/fetch_tools.py` (puts helm in .cache/bin/), "
                   "install helm 3.8+ on PATH, or set $HELM")


def find_chart(chart: str | None = None) -> Path:
    chosen = chart or os.environ.get("LLMPIPE_CHART")
    options = [Path(chosen)] if chosen else _candidates(CHART)
    for cand in options:
        if (cand / "Chart.yaml").is_file():
            return cand
    raise K8sError(f"no Helm chart at {options[0]} (a folder with Chart.yaml): pass --chart or set $LLMPIPE_CHART")


def default_config(stage: str) -> Path:
    for cand in _candidates(f"jobs/cluster/{stage}.yaml"):
        if cand.is_file():
            return cand
    raise K8sError(f"no jobs/cluster/{stage}.yaml here or in {REPO}: pass --config FILE")


def shape_values(stage: str, config: Path) -> list[str]:
    """The workload shape the config is sized for: ``values/<config name>.yaml`` beside it, else
    ``values/<stage>.yaml`` (jobs/cluster/values/; the Makefile's ``stage_values`` is the same rule)."""
    folder = Path(config).parent / "values"
    for cand in (folder / f"{Path(config).stem}.yaml", folder / f"{stage}.yaml"):
        if cand.is_file():
            return [str(cand)]
    return []


def helm_command(stage: str, config: Path, namespace: str, chart: Path, values: list[str], sets: list[str]) -> list[str]:
    cmd = [find_helm(), "template", release_name(stage), str(chart), "--namespace", namespace,
           "--set", f"stage={stage}", "--set-file", f"config={config}"]
    for path in values:
        cmd += ["--values", path]
    for assignment in sets:
        cmd += ["--set", assignment]
    return cmd


def render(stage: str, config: Path, namespace: str, chart: Path, values: list[str] = (), sets: list[str] = ()) -> list[dict]:
    """The chart's objects for one stage, in the order helm prints them."""
    for path in values:
        if not Path(path).is_file():
            raise K8sError(f"--values {path}: no such file")
    cmd = helm_command(stage, config, namespace, chart, list(values), list(sets))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except OSError as exc:
        raise K8sError(f"cannot run helm ({cmd[0]}): {exc}") from None
    if proc.returncode != 0:
        lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("WARNING")]
        detail = "; ".join(lines)[:600] or f"exit status {proc.returncode}"
        raise K8sError(f"helm template failed for {stage}: {detail.removeprefix('Error: ')}")
    try:
        docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    except yaml.YAMLError as exc:
        raise K8sError(f"helm template printed YAML that does not parse: {exc}") from None
    objects = []
    for doc in docs:
        if doc.get("kind") == "List":
            objects.extend(doc.get("items") or [])
        elif isinstance(doc, dict) and doc.get("kind") and (doc.get("metadata") or {}).get("name"):
            objects.append(doc)
    if not objects:
        raise K8sError(f"helm template rendered no objects for {stage} from {chart}")
    return objects
