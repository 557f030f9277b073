"""Build llmpipe-base and llmpipe-data with `make images` (podman, chroot isolation) FROM a Debian we
bootstrap ourselves, then run the image's ENTRYPOINT + CMD as its non-root USER by chroot-ing into
the image's root filesystem (no container runtime needed), and run a real stage (collect) the same way.

    .venv/bin/pytest -m images tests/docker/test_image_build.py

Needs root, podman, debootstrap (apt-get install podman buildah debootstrap) and Debian's archive
and PyPI. torch is the CPU build of this virtualenv's version: from $PIP_FIND_LINKS when that folder
holds its wheel (bind-mounted into the build), else from PyPI.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import CORPUS, write_configs

pytestmark = [pytest.mark.images, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
BASE = "localhost/debian-bootstrap:bookworm"
REGISTRY = "localhost/llmpipe-test"
TAG = "test"


def _need_tools() -> None:
    missing = [t for t in ("podman", "debootstrap", "unshare", "chroot") if not shutil.which(t)]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (apt-get install podman buildah debootstrap)")
    if os.geteuid() != 0:
        pytest.skip("needs root (debootstrap, podman image mount)")


def _build_flags() -> tuple[str, list[str]]:
    import torch

    flags = ["--isolation chroot"]
    args = []
    links = os.environ.get("PIP_FIND_LINKS", "")
    if links and Path(links).is_dir() and list(Path(links).glob(f"torch-{torch.__version__}-*.whl")):
        flags += [f"--volume {links}:/wheels:ro", "--build-arg PIP_FIND_LINKS=/wheels"]
    cert = os.environ.get("PIP_CERT") or "/etc/ssl/certs/ca-certificates.crt"
    if Path(cert).is_file():  # a TLS-intercepting proxy's CA, as the host trusts it
        flags += [f"--volume {cert}:/etc/ssl/certs/build-ca.crt:ro", "--build-arg PIP_CERT=/etc/ssl/certs/build-ca.crt"]
    args.append(f"TORCH_SPEC=torch=={torch.__version__}")
    return " ".join(flags), args


def _run_in_image(image: str, argv: list[str], home: Path, prepare: str = "") -> subprocess.CompletedProcess:
    """Run argv (already ENTRYPOINT + CMD) in IMAGE's root filesystem as the image's USER, in a
    private mount and PID namespace: /dev, /proc, a tmpfs /tmp, and HOME bind-mounted from the host."""
    info = json.loads(subprocess.run(["podman", "image", "inspect", image], capture_output=True, text=True, check=True).stdout)[0]
    cfg = info["Config"]
    rootfs = subprocess.run(["podman", "image", "mount", image], capture_output=True, text=True, check=True).stdout.strip()
    try:
        env = " ".join(shlex.quote(e) for e in cfg.get("Env", []))
        script = f"""
set -e
R={shlex.quote(rootfs)}
mount --rbind /dev "$R/dev"
mount -t proc proc "$R/proc"
mount -t tmpfs tmpfs "$R/tmp"
mount --bind {shlex.quote(str(home))} "$R{cfg['WorkingDir']}"
{prepare}
exec chroot --userspec={shlex.quote(cfg['User'])} "$R" /usr/bin/env -i {env} \
  /bin/sh -c 'cd "$0" && exec "$@"' {shlex.quote(cfg['WorkingDir'])} {" ".join(shlex.quote(a) for a in argv)}
"""
        # own PID namespace: whatever the command leaves running dies with it
        return subprocess.run(["unshare", "--mount", "--propagation", "private", "--pid", "--fork", "sh", "-c", script],
                              capture_output=True, text=True, timeout=600)
    finally:
        subprocess.run(["podman", "image", "unmount", image], capture_output=True)


@pytest.mark.timeout(5400)
def test_data_image_builds_from_a_bootstrapped_debian_and_runs_as_non_root(tmp_path):
    _need_tools()
    t0 = time.time()
    subprocess.run([str(ROOT / "docker" / "bootstrap-debian.sh"), BASE], check=True, timeout=1800)
    flags, args = _build_flags()
    make = ["make", "images", "ENGINE=podman", f"REGISTRY={REGISTRY}", f"IMAGE_TAG={TAG}", "IMAGE_FAMILIES=data",
            "SERVER_IMAGES=", f"BASE_IMAGE={BASE}", f"IMAGE_BUILD_FLAGS={flags}", *args]
    log = tmp_path / "build.log"
    with log.open("w") as fh:
        build = subprocess.run(make, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, timeout=5000)
    assert build.returncode == 0, log.read_text()[-5000:]
    built = time.time() - t0
    image = f"{REGISTRY}/llmpipe-data:{TAG}"
    text = log.read_text()
    # the build-time import checks ran (or their layers were cached, which podman does only for a step that passed)
    _ran_or_cached(text, "&& python /opt/llmpipe/smoke.py base", ["smoke: base:"])
    _ran_or_cached(text, "RUN python /opt/llmpipe/smoke.py data", ["smoke: data:"])

    info = json.loads(subprocess.run(["podman", "image", "inspect", image], capture_output=True, text=True, check=True).stdout)[0]
    cfg = info["Config"]
    assert cfg["User"] == "1000:1000"
    assert cfg["Entrypoint"] == ["dumb-init", "--", "llmpipe"] and cfg["Cmd"] == ["--help"]
    assert cfg["Labels"]["org.opencontainers.image.title"] == "llmpipe-data"
    assert any(e == "LLMPIPE_IMAGE_FAMILY=data" for e in cfg["Env"])

    rootfs = Path(subprocess.run(["podman", "image", "mount", image], capture_output=True, text=True, check=True).stdout.strip())
    try:  # nothing the build ran as root left root-owned files in HOME (the user could not write there)
        image_home = rootfs / cfg["WorkingDir"].lstrip("/")
        assert [p for p in [image_home, *image_home.rglob("*")] if p.lstat().st_uid != 1000] == []
    finally:
        subprocess.run(["podman", "image", "unmount", image], capture_output=True)

    home = tmp_path / "home"
    home.mkdir()
    os.chown(home, 1000, 1000)
    # 1. the image's own ENTRYPOINT + CMD, as its USER
    out = _run_in_image(image, cfg["Entrypoint"] + cfg["Cmd"], home)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "usage: llmpipe" in out.stdout and "run" in out.stdout
    who = _run_in_image(image, ["id", "-u"], home)
    assert who.stdout.strip() == "1000", who.stdout + who.stderr

    # 2. a real stage through the same entrypoint: collect over the committed corpus
    cfgdir = write_configs(home / "jobs", corpus=Path("/tmp/corpus"))
    for p in [home, *home.rglob("*")]:
        os.chown(p, 1000, 1000)
    prepare = f'cp -r {shlex.quote(str(CORPUS))} "$R/tmp/corpus"'
    argv = cfg["Entrypoint"] + ["run", "collect", "--config", "jobs/collect.yaml", "--root", "runs/img", "--no-progress"]
    run = _run_in_image(image, argv, home, prepare=prepare)
    assert run.returncode == 0, run.stdout + run.stderr
    manifest = json.loads((home / "runs" / "img" / "raw" / "manifest.json").read_text())
    assert manifest["stage"] == "collect" and manifest["files"]
    assert (home / "runs" / "img" / "raw").stat().st_uid == 1000  # written as the non-root user
    print(f"\nbuilt base + data in {built:.0f} s; image size "
          f"{int(info['Size']) / 2**30:.2f} GiB; collect in the image: {manifest.get('metrics', {})}", file=sys.stderr)


def _make_images(families: str, log: Path, *extra: str) -> subprocess.CompletedProcess:
    """`make images` of llmpipe-base + FAMILIES FROM the bootstrapped Debian (podman caches the base's layers: the
    second family's build reuses them), the build's output in LOG."""
    subprocess.run([str(ROOT / "docker" / "bootstrap-debian.sh"), BASE], check=True, timeout=1800)
    flags, args = _build_flags()
    make = ["make", "images", "ENGINE=podman", f"REGISTRY={REGISTRY}", f"IMAGE_TAG={TAG}", f"IMAGE_FAMILIES={families}",
            "SERVER_IMAGES=", f"BASE_IMAGE={BASE}", f"IMAGE_BUILD_FLAGS={flags}", *args, *extra]
    with log.open("w") as fh:
        return subprocess.run(make, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, timeout=5000, check=False)


def _ran_or_cached(text: str, step: str, lines: list[str]) -> None:
    """LINES are in the build log, or the RUN STEP was a cached layer (podman caches only a step that succeeded,
    so an earlier build printed them)."""
    missing = [line for line in lines if line not in text]
    if missing:
        at = text.find(step)
        assert at >= 0, f"{step!r} is not in the build log"
        end = text.find("STEP ", at)
        assert "Using cache" in text[at:end if end > 0 else None], f"{missing} not in the build log and {step!r} not cached"


COMPILERS = ["cc", "c++", "gcc", "g++", "x86_64-linux-gnu-gcc", "x86_64-linux-gnu-g++", "clang", "nvcc"]


@pytest.mark.timeout(5400)
def test_train_image_builds_its_ops_portable_and_prebuilt_on_the_cpu_base(tmp_path):
    """llmpipe-train (docker/train.Dockerfile) on the CPU base: the builder stage `ops` is the same bootstrapped
    Debian (+ g++, as make images passes BUILDER_IMAGE=BASE_IMAGE with TORCH_SPEC); DeepSpeed's cpu_adam is compiled
    through docker/portable-cxx.sh (no AVX-512 code, although this host has it), smoke.py train passes in the build
    and again as uid 1000 in the image, which has no compiler, so cpu_adam cannot have been JIT-compiled. flash-attn,
    liger-kernel and the CUDA ops are GPU-only: the CPU build says it skipped them."""
    _need_tools()
    t0 = time.time()
    log = tmp_path / "build.log"
    build = _make_images("train", log)
    assert build.returncode == 0, log.read_text()[-5000:]
    built = time.time() - t0
    text = log.read_text()
    assert f"FROM {BASE} AS ops" in text  # the CPU base's builder is the base itself (make images: BUILDER_IMAGE)
    _ran_or_cached(text, "RUN set -eu;", ["train ops: profile cpu, DS_BUILD_CPU_ADAM=1",
                                         "train ops: portable: deepspeed/ops/adam/cpu_adam_op",
                                         "-D__AVX256__ -march=x86-64-v3", "AVX-512 instructions: 0",
                                         "flash-attn and liger-kernel skipped (GPU-only)"])
    _ran_or_cached(text, "RUN python /opt/llmpipe/smoke.py train", [
        "smoke: train: DeepSpeed op cpu_adam loads prebuilt (cpu_adam_op",
        "smoke: train: DeepSpeedCPUAdam steps",
        "GPU-only checks skipped (CUDA version, flash-attn, liger-kernel)",
        "smoke: train: "])

    image = f"{REGISTRY}/llmpipe-train:{TAG}"
    info = json.loads(subprocess.run(["podman", "image", "inspect", image], capture_output=True, text=True, check=True).stdout)[0]
    cfg = info["Config"]
    assert cfg["User"] == "1000:1000"
    assert cfg["Entrypoint"] == ["dumb-init", "--", "llmpipe"] and cfg["Cmd"] == ["--help"]
    assert cfg["Labels"]["org.opencontainers.image.title"] == "llmpipe-train"
    assert "LLMPIPE_IMAGE_FAMILY=train" in cfg["Env"]

    rootfs = Path(subprocess.run(["podman", "image", "mount", image], capture_output=True, text=True, check=True).stdout.strip())
    try:
        # the builder's compiler and wrapper stayed in the builder
        path = next(e for e in cfg["Env"] if e.startswith("PATH=")).split("=", 1)[1].split(":")
        found = [f"{d}/{c}" for d in path for c in COMPILERS if (rootfs / d.lstrip("/") / c).exists()]
        assert found == [], f"a compiler in the image: {found}"
        assert not (rootfs / "opt" / "portable-cxx").exists()
        sos = list((rootfs / "opt" / "llmpipe" / "venv").glob("lib/python3*/site-packages/deepspeed/ops/adam/cpu_adam_op*.so"))
        assert len(sos) == 1, sos
        if shutil.which("objdump"):  # the ops' code runs on any x86-64-v3 node: no AVX-512 instruction
            dis = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(sos[0])], capture_output=True, text=True, check=True).stdout
            assert "ymm" in dis and "%zmm" not in dis
    finally:
        subprocess.run(["podman", "image", "unmount", image], capture_output=True, check=False)

    home = tmp_path / "home"
    home.mkdir()
    os.chown(home, 1000, 1000)
    # 1. the image's own ENTRYPOINT + CMD, as its USER
    out = _run_in_image(image, cfg["Entrypoint"] + cfg["Cmd"], home)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "usage: llmpipe" in out.stdout
    # 2. no compiler as the user either (so nothing below can be a JIT build)
    cc = _run_in_image(image, ["/bin/sh", "-c", "for c in " + " ".join(COMPILERS) + "; do command -v $c; done; id -u"], home)
    assert cc.stdout.split() == ["1000"], cc.stdout + cc.stderr
    # 3. the train checks again as uid 1000: cpu_adam loads from the deepspeed package, DeepSpeedCPUAdam steps
    smoke = _run_in_image(image, ["python", "/opt/llmpipe/smoke.py", "train"], home)
    assert smoke.returncode == 0, smoke.stdout + smoke.stderr
    assert "smoke: train: DeepSpeed op cpu_adam loads prebuilt" in smoke.stdout
    assert "smoke: train: DeepSpeedCPUAdam steps" in smoke.stdout
    assert "GPU-only checks skipped (CUDA version, flash-attn, liger-kernel)" in smoke.stdout
    assert not (home / ".cache" / "torch_extensions").exists()  # where a JIT build would have gone
    print(f"\nbuilt base + train in {built:.0f} s; image size {int(info['Size']) / 2**30:.2f} GiB", file=sys.stderr)


CHECK_SERVER = r"""
import json, sys, time, urllib.request, urllib.error
def call(path, host, body=None):
    req = urllib.request.Request("http://127.0.0.1:5055" + path, data=body and json.dumps(body).encode(),
                                 headers={"Host": host, "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
for _ in range(120):
    try:
        if call("/health", "x")[0] == 200:
            break
    except OSError:
        time.sleep(1)
else:
    sys.exit("server did not come up")
print("create", *call("/api/2.0/mlflow/experiments/create", "mlflow.llm-pipeline.svc:5000", {"name": "img"}))
print("foreign", call("/api/2.0/mlflow/experiments/search", "evil.example.com:5000", {"max_results": 1})[0])
"""


@pytest.mark.timeout(1800)
def test_mlflow_server_image_serves_with_the_k8s_allowed_hosts(tmp_path):
    """llmpipe-mlflow (docker/mlflow.Dockerfile) FROM the bootstrapped Debian: `mlflow server` with the
    --allowed-hosts of k8s/mlflow/server.yaml answers the in-cluster name and refuses a foreign one."""
    import yaml

    _need_tools()
    subprocess.run([str(ROOT / "docker" / "bootstrap-debian.sh"), BASE], check=True, timeout=1800)
    flags, _ = _build_flags()
    image = f"{REGISTRY}/llmpipe-mlflow:{TAG}"
    cmd = f"podman build {flags} --build-arg BASE_IMAGE={BASE} -f docker/mlflow.Dockerfile -t {image} ."
    build = subprocess.run(shlex.split(cmd), cwd=ROOT, capture_output=True, text=True, timeout=1700)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    server = next(d for d in yaml.safe_load_all((ROOT / "k8s" / "mlflow" / "server.yaml").read_text()) if d["kind"] == "Deployment")
    hosts = next(a for a in server["spec"]["template"]["spec"]["containers"][0]["args"] if a.startswith("--allowed-hosts="))
    home = tmp_path / "home"
    home.mkdir()
    (home / "check.py").write_text(CHECK_SERVER)
    os.chown(home, 1000, 1000)
    script = (f"mlflow server --host 127.0.0.1 --port 5055 --workers 1 --backend-store-uri sqlite:////tmp/m.db "
              f"--artifacts-destination /tmp/art {shlex.quote(hosts)} >/tmp/server.log 2>&1 & "
              "python check.py; s=$?; [ $s = 0 ] || cat /tmp/server.log; exit $s")
    out = _run_in_image(image, ["/bin/sh", "-c", script], home)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "create 200" in out.stdout and "experiment_id" in out.stdout
    assert "foreign 403" in out.stdout
