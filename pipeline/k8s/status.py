"""``llmpipe k8s status``: a table of the stages' Jobs / PyTorchJobs with their pods, and one
line per cause under each stage that failed or is stuck."""

from __future__ import annotations

import sys
from typing import TextIO

from pipeline.k8s.client import Kube
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


def show_status(kube: Kube, stage: str | None = None, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    snap = snapshot(kube, stage)
    if not snap.workloads:
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
    return 0
