"""Image references in the rendered workloads: a digest when the values give one, and the pull policy that follows.

Rendered by the real helm binary (tests/helm/chart.py) and validated against the API server's schemas.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.helm.chart import REPO, CHART, helm_run, one, pod_templates, render, render_error, validate, workloads

CLUSTER = REPO / "jobs" / "cluster"
DIGEST = {f: "sha256:" + c * 64 for f, c in (("data", "a"), ("train", "b"), ("eval", "c"), ("registry", "d"))}


def containers(objs: list[dict]) -> list[dict]:
    out = []
    for w in workloads(objs) + [o for o in objs if o["kind"] == "Deployment"]:
        tpls = pod_templates(w) if w["kind"] != "Deployment" else [("server", w["spec"]["template"])]
        for _, tpl in tpls:
            out += tpl["spec"].get("initContainers", []) + tpl["spec"]["containers"]
    return out


def render_stage(stage: str, *sets: str, values: list[Path] = ()) -> list[dict]:
    objs = render(stage, CLUSTER / f"{stage}.yaml", *sets, values=values)
    for obj in objs:
        validate(obj)
    return objs


def test_a_tag_is_pulled_always_by_default():
    for stage, family in (("collect", "data"), ("pretrain", "train"), ("evaluate", "eval"), ("register", "registry")):
        objs = render_stage(stage)
        for c in containers(objs):
            assert c["image"] == f"ghcr.io/llm-pipeline/llmpipe-{family}:0.1.0", (stage, c["image"])
            assert c["imagePullPolicy"] == "Always", (stage, c["name"])


def test_family_digests_pin_each_stage_by_content(tmp_path):
    site = tmp_path / "site.yaml"  # one site file for every stage, as `make deploy-pipeline VALUES=...` applies it
    site.write_text(yaml.safe_dump({"image": {"registry": "registry.example.com/team", "tag": "1.2.3", "digests": DIGEST}}))
    for stage, family in (("collect", "data"), ("clean", "data"), ("pretrain", "train"), ("sft", "train"),
                          ("evaluate", "eval"), ("register", "registry")):
        objs = render_stage(stage, values=[site])
        for c in containers(objs):
            assert c["image"] == f"registry.example.com/team/llmpipe-{family}@{DIGEST[family]}", (stage, c["image"])
            assert c["imagePullPolicy"] == "IfNotPresent"
        # the tag stays the version label
        assert {w["metadata"]["labels"]["app.kubernetes.io/version"] for w in workloads(objs)} == {"1.2.3"}


def test_release_digest_and_per_stage_override_win(tmp_path):
    digest = "sha256:" + "e" * 64
    objs = render_stage("pretrain", f"image.digest={digest}", "image.digests.train=" + DIGEST["train"])
    assert {c["image"] for c in containers(objs)} == {f"ghcr.io/llm-pipeline/llmpipe-train@{digest}"}
    site = tmp_path / "site.yaml"
    site.write_text(yaml.safe_dump({"image": {"digests": DIGEST}, "stages": {"pretrain": {"image": {"digest": digest}}}}))
    assert {c["image"] for c in containers(render_stage("pretrain", values=[site]))} == {f"ghcr.io/llm-pipeline/llmpipe-train@{digest}"}
    assert {c["image"] for c in containers(render_stage("sft", values=[site]))} == {f"ghcr.io/llm-pipeline/llmpipe-train@{DIGEST['train']}"}
    # a full repository with a digest
    objs = render_stage("collect", "image.repository=my.registry/llmpipe-data", f"image.digest={digest}")
    assert {c["image"] for c in containers(objs)} == {f"my.registry/llmpipe-data@{digest}"}


def test_an_explicit_pull_policy_wins():
    objs = render_stage("pretrain", "image.pullPolicy=IfNotPresent")
    assert {c["imagePullPolicy"] for c in containers(objs)} == {"IfNotPresent"}
    objs = render_stage("pretrain", "image.pullPolicy=Always", "image.digests.train=" + DIGEST["train"])
    assert {c["imagePullPolicy"] for c in containers(objs)} == {"Always"}


@pytest.mark.parametrize("sets, message", [
    (["image.digest=sha256:abc"], "/image/digest"),
    (["image.digest=" + "b" * 64], "/image/digest"),  # the algorithm is part of the digest
    (["image.digests.training=" + DIGEST["train"]], "training"),  # a family that does not exist
    (["image.pullPolicy=Sometimes"], "pullPolicy"),
])
def test_malformed_digests_are_refused(sets, message):
    assert message in render_error("pretrain", CLUSTER / "pretrain.yaml", *sets)


def test_serving_images_take_digests_too():
    def serve(*sets: str, values: str) -> list[dict]:
        args = ["template", "llmpipe-serve", str(CHART), "-n", "llm-pipeline", "--set", "stage=serve",
                "-f", str(CLUSTER / "values" / values)]
        for s in sets:
            args += ["--set", s]
        objs = [d for d in yaml.safe_load_all(helm_run(*args).stdout) if d]
        for obj in objs:
            validate(obj)
        return objs

    vllm = "sha256:" + "f" * 64
    objs = serve("image.digests.eval=" + DIGEST["eval"], f"serving.vllm.image.digest={vllm}", values="serve.yaml")
    deploy = one(objs, "Deployment")
    spec = deploy["spec"]["template"]["spec"]
    images = {c["name"]: (c["image"], c["imagePullPolicy"]) for c in spec.get("initContainers", []) + spec["containers"]}
    assert images["server"] == (f"vllm/vllm-openai@{vllm}", "IfNotPresent")
    assert all(img == (f"ghcr.io/llm-pipeline/llmpipe-eval@{DIGEST['eval']}", "IfNotPresent")
               for name, img in images.items() if name != "server"), images
    objs = serve(values="serve-cpu.yaml")
    c = one(objs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert (c["image"], c["imagePullPolicy"]) == ("ghcr.io/llm-pipeline/llmpipe-eval:0.1.0", "Always")
