"""Helpers for the chart tests: find helm, render the chart, validate what it renders.

Validation is offline: core kinds against the Kubernetes JSON schemas that kubernetes-validate
ships (pinned to K8S_VERSION, strict: unknown fields fail), PyTorchJob against the schema
generated from the Kubeflow training-operator v1.8.1 CRD (tests/helm/schemas/README.md).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "llm-pipeline"
SCHEMAS = Path(__file__).parent / "schemas"
K8S_VERSION = "1.33.0"  # the bootstrap (k8s/) pins Pod Security to v1.33 as well
PYTORCHJOB_SCHEMA = SCHEMAS / "pytorchjob-kubeflow.org-v1.json"

SINGLE = ["collect", "tokenizer", "init", "evaluate", "quantize", "register"]
SHARDED = ["clean", "pack"]
TRAINING = ["pretrain", "sft", "dpo", "reward"]


def find_helm() -> str | None:
    for cand in (os.environ.get("HELM"), str(REPO / ".cache" / "bin" / "helm"), shutil.which("helm")):
        if cand and Path(cand).is_file() and os.access(cand, os.X_OK):
            return cand
    return None


def kubectl() -> str:
    """kubectl ($KUBECTL, .cache/bin/kubectl from `make tools`, or PATH); skips the test without one."""
    for cand in (os.environ.get("KUBECTL"), str(REPO / ".cache" / "bin" / "kubectl"), shutil.which("kubectl")):
        if cand and Path(cand).is_file():
            return cand
    pytest.skip("kubectl not found ($KUBECTL, .cache/bin/kubectl or PATH)")


def helm() -> str:
    path = find_helm()
    if path is None:
        pytest.skip("helm not found: `make tools` (scripts/fetch_tools.py puts it in .cache/bin/) or set $HELM")
    return path


def helm_run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([helm(), *args], capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{proc.stderr}")
    return proc


def template_args(stage: str, config: Path | str, *sets: str, values: list[Path] = (), namespace: str = "llm-pipeline") -> list[str]:
    """The arguments of the contract's install command (release llmpipe-<stage>)."""
    args = ["template", f"llmpipe-{stage}", str(CHART), "-n", namespace, "--set", f"stage={stage}",
            "--set-file", f"config={config}"]
    for v in values:
        args += ["-f", str(v)]
    for s in sets:
        args += ["--set", s]
    return args


def render(stage: str, config: Path | str, *sets: str, values: list[Path] = ()) -> list[dict]:
    out = helm_run(*template_args(stage, config, *sets, values=values)).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def render_error(stage: str, config: Path | str, *sets: str) -> str:
    """helm's error output for values that must be refused (fails the test if helm accepts them)."""
    proc = helm_run(*template_args(stage, config, *sets), check=False)
    assert proc.returncode != 0, f"helm accepted {sets} for {stage}"
    return proc.stderr


@lru_cache(maxsize=1)
def pytorchjob_validator():
    import jsonschema

    schema = json.loads(PYTORCHJOB_SCHEMA.read_text())
    return jsonschema.Draft202012Validator(schema)


def validate(obj: dict) -> None:
    """Raise on an object the API server (or the training operator's CRD) would refuse."""
    if obj["apiVersion"] == "kubeflow.org/v1" and obj["kind"] == "PyTorchJob":
        errors = sorted(pytorchjob_validator().iter_errors(obj), key=lambda e: list(e.absolute_path))
        if errors:
            e = errors[0]
            raise ValueError(f"PyTorchJob {'/'.join(map(str, e.absolute_path))}: {e.message}")
        return
    import kubernetes_validate

    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def workloads(objs: list[dict]) -> list[dict]:
    return [o for o in objs if o["kind"] in ("Job", "PyTorchJob")]


def pod_templates(obj: dict) -> list[tuple[str, dict]]:
    """(replica, pod template) of a Job or a PyTorchJob."""
    if obj["kind"] == "Job":
        return [("job", obj["spec"]["template"])]
    return [(name, spec["template"]) for name, spec in obj["spec"]["pytorchReplicaSpecs"].items()]


def one(objs: list[dict], kind: str, role: str | None = None) -> dict:
    found = [o for o in objs if o["kind"] == kind and (role is None or o["metadata"]["labels"].get("llmpipe.io/role") == role)]
    assert len(found) == 1, f"{len(found)} {kind} (role {role}) in {[(o['kind'], o['metadata']['name']) for o in objs]}"
    return found[0]
