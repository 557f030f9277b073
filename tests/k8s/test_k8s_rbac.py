"""`llmpipe k8s` needs no more than the llmpipe-submitter Role of k8s/rbac.yaml: the fake API
server answers 403 to every verb on every resource that Role does not grant."""

from __future__ import annotations

import pytest
import yaml

from tests.k8s.conftest import REPO
from tests.k8s.fakeapi import Scenario

RBAC = REPO / "k8s" / "rbac.yaml"
VERBS = ["get", "list", "create", "update", "patch", "delete"]
RESOURCES = ["configmaps", "secrets", "serviceaccounts", "persistentvolumeclaims", "pods", "pods/log", "events",
             "jobs", "pytorchjobs"]


def granted() -> set[tuple[str, str]]:
    roles = [d for d in yaml.safe_load_all(RBAC.read_text()) if d and d.get("kind") == "Role"
             and d["metadata"]["name"] == "llmpipe-submitter"]
    assert roles, "k8s/rbac.yaml has no Role llmpipe-submitter"
    return {(verb, res) for rule in roles[0]["rules"] for verb in rule["verbs"] for res in rule["resources"]}


@pytest.mark.skipif(not RBAC.exists(), reason="k8s/rbac.yaml is not in this checkout")
def test_every_action_works_with_the_submitter_role_alone(fake, chart, llmpipe):
    allowed = granted()
    for verb in VERBS:
        for res in RESOURCES:
            if (verb, res) not in allowed:
                fake.deny(verb, res)
    # the role is least-privilege indeed (what helm needs besides, tests/k8s/test_helm_rbac.py, is no more than this)
    assert {("create", "pods"), ("delete", "pods"), ("create", "serviceaccounts"), ("delete", "persistentvolumeclaims")} <= fake.denied
    fake.scenarios["llmpipe-clean-merge"] = Scenario(after="llmpipe-clean-part")
    for _ in range(2):  # the second submit deletes and recreates everything
        rc, out, err = llmpipe("k8s", "submit", "clean", "--wait", "--interval", "0.1")
        assert rc == 0, err
    assert "existed" in out
    # an OOM-killed Master: recreated by the operator until the stage's restart budget fails it (it used to be
    # failed at once: our guess, not the operator's behaviour)
    fake.scenarios["llmpipe-pretrain"] = Scenario(outcome="oom", restart_budget=True, steps=1)
    rc, _, err = llmpipe("k8s", "submit", "pretrain", "--wait", "--interval", "0.1", "--set", "nnodes=1")
    assert rc == 1 and "without reaching a new checkpoint" in err and "forbidden" not in err
    for args in (["logs", "clean"], ["logs", "clean", "-f"], ["status"], ["wait", "clean"]):
        rc, _, err = llmpipe("k8s", *args)
        assert rc == 0 and "forbidden" not in err, (args, err)
    denied = [r for r in fake.requests if r[0] == "PUT" or r[0] == "PATCH"]
    assert denied == []
