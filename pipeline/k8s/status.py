"""``llmpipe k8s status``: a table of the stages' Jobs / PyTorchJobs with their pods, and one
line per cause under each stage that failed or is stuck; then the serving Deployments with the model
version each of their pods runs (``llmpipe k8s status serve``: only those)."""

from __future__ import annotations

import sys
from typing import TextIO

from pipeline.k8s.client import K8sError, Kube
from pipeline.k8s.explain import explain_failure, explain_stuck
from pipeline.k8s.state import Snapshot, age, meta, snapshot

HEADER = ("STAGE", "OBJECT", "ROLE", "STATE", "DONE", "PODS run/pend/fail", "AGE")


def rows(snap: Snapshot) -> list[tuple[str, ...]]:
    out = []
    for stage, sub in snap.by_stage().items():
        for w in sub.workloads:
            pods = sub.pods_of(w)
            phases = [(p.get("status") or {}).get("phase") for p in pods]
            counts = f"{phases.count('Running')}/{phases.count('Pending')}/{phases.count('Failed')}"
            state = w.state + ("*" if w.completion else "")
            out.append((stage, f"{w.kind}/{w.name}", w.role, state, f"{min(w.succeeded, w.total)}/{w.total}", counts,
                        age(meta(w.obj).get("creationTimestamp"))))
    return out


def serving_lines(kube: Kube) -> list[str]:
    """The serving Deployments (stage=serve) and the model version of each of their pods (pipeline/k8s/serving.py)."""
    from pipeline.k8s.serving import status_lines

    try:
        return status_lines(kube)
    except K8sError as exc:  # e.g. a submitter Role from before serving existed: the stages still show
        return [f"(serving Deployments not shown: {exc})"]


def show_status(kube: Kube, stage: str | None = None, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    serving = serving_lines(kube) if stage in (None, "serve") else []
    if stage == "serve":
        out.write(f"namespace {kube.namespace}\n" + "".join(ln + "\n" for ln in serving) if serving else
                  f"no serving Deployment in namespace {kube.namespace} (`make deploy-serve` installs one)\n")
        return 0
    snap = snapshot(kube, stage)
    if not snap.workloads:
        if serving:
            out.write(f"namespace {kube.namespace}\n" + "".join(ln + "\n" for ln in serving))
            return 0
        what = f"stage {stage}" if stage else "llm-pipeline stage"
        out.write(f"no {what} submitted in namespace {kube.namespace} (submit with `llmpipe k8s submit STAGE`)\n")
        return 0
    table = [HEADER] + rows(snap)
    widths = [max(len(r[i]) for r in table) for i in range(len(HEADER))]
    out.write(f"namespace {kube.namespace}\n")
    for r in table:
        out.write("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(r)).rstrip() + "\n")
    for name, sub in snap.by_stage().items():
        if sub.failed:
            lines = explain_failure(sub, kube)
        else:
            lines, _ = explain_stuck(sub, kube) if not sub.succeeded else ([], False)
        for line in lines:
            out.write(f"{name}: {line}\n")
    out.write("* the object whose success finishes the stage\n")
    if serving:
        out.write("\n" + "".join(ln + "\n" for ln in serving))
    return 0
