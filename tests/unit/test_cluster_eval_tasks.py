"""Every lm-eval task jobs/cluster/evaluate.yaml names exists in the installed lm-evaluation-harness (a typo would
fail hours into a cluster job), and the kk/ru ones are there."""

from __future__ import annotations

from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]


def test_cluster_evaluate_tasks_exist_in_the_installed_lm_eval():
    from lm_eval.tasks import TaskManager

    from pipeline.evaluation.harness import TASKS_DIR

    tasks = yaml.safe_load((REPO / "jobs" / "cluster" / "evaluate.yaml").read_text(encoding="utf-8"))["lm_eval"]["tasks"]
    assert {"belebele_kaz_Cyrl", "include_base_44_kazakh", "belebele_rus_Cyrl", "xstorycloze_ru", "xwinograd_ru"} <= set(tasks)
    known = set(TaskManager(include_path=[str(TASKS_DIR)], include_defaults=True).all_tasks)
    assert not [t for t in tasks if t not in known]
