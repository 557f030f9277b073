"""scripts/fetch_tools.py: which helm and kubectl `make tools` provides, on every platform.

Fake ``helm`` / ``kubectl`` shell scripts on a temporary PATH, the platform monkeypatched, a temporary
--bin: nothing is downloaded (a fabricated wheel stands in for PyPI) and the repository's .cache/bin is
not touched.
"""

from __future__ import annotations

import importlib.util
import io
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "fetch_tools.py"


def _load():
    spec = importlib.util.spec_from_file_location("fetch_tools", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ft = _load()


def fake_helm(path: Path, version: str = "v3.14.4+g81c902a") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'#!/bin/sh\n[ "$1 $2" = "version --short" ] && echo "{version}" && exit 0\nexit 1\n')
    path.chmod(0o755)
    return path


def fake_kubectl(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('#!/bin/sh\n[ "$1 $2" = "version --client" ] && echo "Client Version: v1.33.0" && exit 0\nexit 1\n')
    path.chmod(0o755)
    return path


def fake_wheel(workdir: Path) -> Path:
    """A wheel laid out like the pinned one: *.jsii.tgz > package/lib/layer.zip > helm/helm, kubectl/kubectl."""
    tools = workdir / "layer-src"
    layer = io.BytesIO()
    with zipfile.ZipFile(layer, "w") as z:
        z.write(fake_helm(tools / "helm", "v4.1.4+gfake"), "helm/helm")
        z.write(fake_kubectl(tools / "kubectl"), "kubectl/kubectl")
    tgz = io.BytesIO()
    with tarfile.open(fileobj=tgz, mode="w:gz") as tar:
        info = tarfile.TarInfo("package/lib/layer.zip")
        info.size = len(layer.getvalue())
        tar.addfile(info, io.BytesIO(layer.getvalue()))
    wheel = workdir / "fake-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as whl:
        whl.writestr("fake/_jsii/fake@1.0.jsii.tgz", tgz.getvalue())
    return wheel


@pytest.fixture
def env(tmp_path, monkeypatch):
    """An empty PATH directory, no HELM/KUBECTL, a Linux x86-64 host, and no download allowed."""
    pathdir = tmp_path / "path"
    pathdir.mkdir()
    monkeypatch.setenv("PATH", str(pathdir))
    monkeypatch.delenv("HELM", raising=False)
    monkeypatch.delenv("KUBECTL", raising=False)
    monkeypatch.setattr(ft.platform, "system", lambda: "Linux")
    monkeypatch.setattr(ft.platform, "machine", lambda: "x86_64")

    def no_download(workdir):
        raise AssertionError("fetch_tools tried to download in a test")

    monkeypatch.setattr(ft, "download", no_download)
    return pathdir


def host(monkeypatch, system: str, machine: str) -> None:
    monkeypatch.setattr(ft.platform, "system", lambda: system)
    monkeypatch.setattr(ft.platform, "machine", lambda: machine)


def run(bindir: Path, *args: str) -> int:
    try:
        return ft.main(["--bin", str(bindir), *args])
    except SystemExit as exc:
        return exc.code


@pytest.mark.parametrize("system,machine", [("Darwin", "arm64"), ("Linux", "x86_64"), ("Linux", "aarch64")])
def test_tools_on_path_are_linked(env, tmp_path, monkeypatch, system, machine):
    host(monkeypatch, system, machine)
    helm, kubectl = fake_helm(env / "helm"), fake_kubectl(env / "kubectl")
    bindir = tmp_path / "bin"
    assert run(bindir) == 0
    assert (bindir / "helm").is_symlink() and os.readlink(bindir / "helm") == str(helm)
    assert os.readlink(bindir / "kubectl") == str(kubectl)
    assert not (bindir / ".fetch_tools").exists()  # nothing came from the wheel
    # what make deploy-* runs ($(CACHE)/bin/helm) is the found helm
    out = subprocess.run([str(bindir / "helm"), "version", "--short"], capture_output=True, text=True).stdout
    assert out.strip() == "v3.14.4+g81c902a"
    # a second run keeps them, even when PATH no longer has them... as long as the targets work
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    assert run(bindir) == 0 and os.readlink(bindir / "helm") == str(helm)


def test_helm_env_is_used_as_is(env, tmp_path, monkeypatch, capsys):
    host(monkeypatch, "Darwin", "arm64")
    helm = fake_helm(tmp_path / "opt" / "helm", "v4.0.0+gabc")
    kubectl = fake_kubectl(tmp_path / "opt" / "kubectl")
    monkeypatch.setenv("HELM", str(helm))
    monkeypatch.setenv("KUBECTL", str(kubectl))
    bindir = tmp_path / "bin"
    assert run(bindir) == 0
    assert not (bindir / "helm").exists() and not (bindir / "kubectl").exists()  # make and llmpipe use $HELM
    assert capsys.readouterr().err == ""


def test_helm_env_naming_the_output_counts_as_unset(env, tmp_path, monkeypatch):
    """HELM=.cache/bin/helm (what the Makefile defaults to) names what this script makes, not a choice."""
    helm = fake_helm(env / "helm")
    bindir = tmp_path / "bin"
    monkeypatch.setenv("HELM", str(bindir / "helm"))
    fake_kubectl(env / "kubectl")
    assert run(bindir) == 0 and os.readlink(bindir / "helm") == str(helm)


@pytest.mark.parametrize("how", ["env", "path"])
def test_too_old_helm_is_refused(env, tmp_path, monkeypatch, capsys, how):
    host(monkeypatch, "Darwin", "x86_64")
    fake_kubectl(env / "kubectl")
    if how == "env":
        monkeypatch.setenv("HELM", str(fake_helm(tmp_path / "old" / "helm", "v3.7.2+g663a896")))
    else:
        fake_helm(env / "helm", "v3.7.2+g663a896")
    bindir = tmp_path / "bin"
    code = run(bindir)
    err = capsys.readouterr().err
    assert "v3.7.2, older than helm 3.8" in err, err
    if how == "env":
        assert code == 1 and "$HELM is" in err
    else:
        assert code == 2 and "helm on PATH" in err and "brew install helm" in err
    assert not (bindir / "helm").exists()


def test_helm_env_that_is_not_there(env, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HELM", str(tmp_path / "no-such-helm"))
    assert run(tmp_path / "bin") == 1
    assert "$HELM is" in capsys.readouterr().err


@pytest.mark.parametrize("system,machine", [("Darwin", "arm64"), ("Linux", "aarch64")])
def test_other_platform_without_tools_exits_2_saying_how_to_install(env, tmp_path, monkeypatch, capsys, system, machine):
    host(monkeypatch, system, machine)
    assert run(tmp_path / "bin") == 2
    err = capsys.readouterr().err
    assert f"cannot fetch helm and kubectl on {system} {machine}" in err
    assert "brew install helm kubectl" in err
    assert "https://helm.sh/docs/intro/install/" in err and "https://kubernetes.io/docs/tasks/tools/" in err
    assert "HELM=/path/to/helm" in err
    assert not (tmp_path / "bin").exists()


def test_other_platform_without_kubectl_still_serves_helm(env, tmp_path, monkeypatch, capsys):
    host(monkeypatch, "Darwin", "arm64")
    helm = fake_helm(env / "helm")
    bindir = tmp_path / "bin"
    assert run(bindir) == 0
    assert os.readlink(bindir / "helm") == str(helm) and not (bindir / "kubectl").exists()
    err = capsys.readouterr().err
    assert "no kubectl" in err and "make deploy-*" in err and "brew install kubectl" in err


def test_linux_x86_64_without_tools_fetches_the_wheel(env, tmp_path, monkeypatch, capsys):
    real = REPO / ".cache" / "bin"
    before = {p.name: p.stat().st_mtime_ns for p in real.iterdir()} if real.is_dir() else {}
    wheels = []

    def download(workdir):
        wheels.append(fake_wheel(workdir))
        return wheels[-1]

    monkeypatch.setattr(ft, "download", download)
    bindir = tmp_path / "bin"
    assert run(bindir) == 0
    assert len(wheels) == 1
    for name in ("helm", "kubectl"):
        assert (bindir / name).is_file() and not (bindir / name).is_symlink()
    assert (bindir / ".fetch_tools").read_text() == f"{ft.PACKAGE}=={ft.VERSION}\nhelm kubectl\n"
    assert "v4.1.4+gfake" in capsys.readouterr().err
    # idempotent: nothing fetched again
    assert run(bindir) == 0 and len(wheels) == 1
    # the repository's own .cache/bin is untouched
    after = {p.name: p.stat().st_mtime_ns for p in real.iterdir()} if real.is_dir() else {}
    assert after == before


def test_linux_x86_64_fetches_only_what_path_lacks(env, tmp_path, monkeypatch):
    monkeypatch.setattr(ft, "download", lambda workdir: fake_wheel(workdir))
    helm = fake_helm(env / "helm")
    bindir = tmp_path / "bin"
    assert run(bindir) == 0
    assert os.readlink(bindir / "helm") == str(helm)
    assert (bindir / "kubectl").is_file() and not (bindir / "kubectl").is_symlink()
    assert (bindir / ".fetch_tools").read_text().splitlines() == [f"{ft.PACKAGE}=={ft.VERSION}", "kubectl"]


def test_a_stale_link_is_replaced(env, tmp_path, monkeypatch):
    """helm uninstalled (or upgraded to another path) since the last run: the link is decided again."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "helm").symlink_to(tmp_path / "gone" / "helm")
    helm, kubectl = fake_helm(env / "helm"), fake_kubectl(env / "kubectl")
    assert run(bindir) == 0
    assert os.readlink(bindir / "helm") == str(helm) and os.readlink(bindir / "kubectl") == str(kubectl)


def test_a_fetched_binary_of_another_wheel_version_is_refetched(env, tmp_path, monkeypatch):
    monkeypatch.setattr(ft, "download", lambda workdir: fake_wheel(workdir))
    bindir = tmp_path / "bin"
    fake_helm(bindir / "helm", "v4.0.0+gold")
    fake_kubectl(bindir / "kubectl")
    (bindir / ".fetch_tools").write_text(f"{ft.PACKAGE}==0.0.1\n")
    assert run(bindir) == 0
    out = subprocess.run([str(bindir / "helm"), "version", "--short"], capture_output=True, text=True).stdout
    assert out.strip() == "v4.1.4+gfake"


def test_help_teaches_the_order_and_the_platforms():
    out = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    text = " ".join(out.stdout.split())
    for phrase in ("$HELM", "PATH", "Linux x86-64", "brew install helm kubectl", "https://helm.sh/docs/intro/install/",
                   "https://kubernetes.io/docs/tasks/tools/", "v3.8", "exits 2", "kubectl alone is not needed"):
        assert phrase in text, phrase


def test_make_tools_passes_helm_and_kubectl_given_to_make(tmp_path):
    """`make deploy-x HELM=...` checks that helm; without it, deploy runs .cache/bin/helm (what tools provided)."""
    def dry(*args: str) -> str:
        proc = subprocess.run(["make", "-n", *args], cwd=REPO, capture_output=True, text=True, timeout=60,
                              env={k: v for k, v in os.environ.items() if k not in ("HELM", "KUBECTL", "MAKEFLAGS")})
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    out = dry("tools", "HELM=/opt/helm3/helm", "KUBECTL=/opt/k/kubectl")
    assert "HELM='/opt/helm3/helm' KUBECTL='/opt/k/kubectl' " in out and "scripts/fetch_tools.py --bin .cache/bin" in out
    out = dry("deploy-pretrain")
    tools_line = next(ln for ln in out.splitlines() if "fetch_tools.py" in ln)
    assert "HELM=" not in tools_line
    assert ".cache/bin/helm upgrade --install llmpipe-pretrain " in out
