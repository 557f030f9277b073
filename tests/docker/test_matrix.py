"""The one torch / CUDA / Python matrix (docker/matrix.toml) and everything that must agree with it: the Dockerfiles'
defaults, the Makefile's TORCH_VERSION, requirements.lock, this test virtualenv (the CPU build of the same torch), the
DeepSpeed configs' ops, the table in docs/kubernetes.md; and the train image's build-time checks (docker/smoke.py),
run here on the CPU build. What only a GPU build checks is listed in docs/kubernetes.md ("Images").
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
sys.path.insert(0, str(DOCKER))
import smoke  # noqa: E402

M = smoke.load_matrix()


def _arg_default(dockerfile: str, name: str) -> str:
    return re.search(rf"^ARG {name}=(\S+)$", (DOCKER / dockerfile).read_text(), re.M).group(1)


def _pin(lock: str, name: str) -> str:
    return re.search(rf"^{re.escape(name)}==(\S+)$", (ROOT / lock).read_text(), re.M).group(1)


def test_the_tests_run_the_matrix_torch_and_python():
    import torch

    assert smoke.base_version(torch.__version__) == M["torch"]
    assert "%d.%d" % sys.version_info[:2] == M["python"]
    assert re.search(r"^TORCH_VERSION \?= (\S+)$", (ROOT / "Makefile").read_text(), re.M).group(1) == M["torch"]


def test_the_images_are_built_from_the_matrix_torch_and_cuda():
    tag = f"{M['torch']}-cuda{M['cuda']}-cudnn{M['cudnn']}"
    assert M["runtime_image"] == f"pytorch/pytorch:{tag}-runtime"
    assert M["devel_image"] == f"pytorch/pytorch:{tag}-devel"
    assert _arg_default("base.Dockerfile", "BASE_IMAGE") == M["runtime_image"]
    assert _arg_default("train.Dockerfile", "BUILDER_IMAGE") == M["devel_image"]  # the same torch, with nvcc


def test_deepspeed_is_the_locks_and_the_prebuilt_ops_are_what_the_configs_use():
    assert _pin("requirements.lock", "deepspeed") == M["deepspeed"]
    used = set()
    for path in (ROOT / "pipeline" / "training" / "deepspeed").glob("*.json"):
        cfg = json.loads(path.read_text())
        zero = cfg.get("zero_optimization", {})
        offload = zero.get("offload_optimizer", {}).get("device") in ("cpu", "nvme")
        if offload:
            used.add("cpu_adam")  # DeepSpeedCPUAdam (deepspeed/runtime/engine.py _configure_basic_optimizer)
        elif cfg.get("optimizer", {}).get("type", "").lower() in ("adam", "adamw"):
            used.add("fused_adam")  # FusedAdam on the GPU
        if zero.get("offload_optimizer", {}).get("device") == "nvme" or zero.get("offload_param", {}).get("device") == "nvme":
            used.add("async_io")
    assert used == set(M["deepspeed_ops"]), f"the configs use {sorted(used)}; docker/matrix.toml prebuilds {M['deepspeed_ops']}"
    assert set(M["deepspeed_ops"]) <= set(smoke.OP_BUILDERS)


def test_the_docs_table_is_the_matrix():
    text = (ROOT / "docs" / "kubernetes.md").read_text()
    rows = dict(re.findall(r"^\| (python|torch|CUDA|cuDNN|DeepSpeed|DeepSpeed ops|flash-attn|liger-kernel) \| `([^`]+)` \|", text, re.M))
    assert rows == {"python": M["python"], "torch": M["torch"], "CUDA": M["cuda"], "cuDNN": M["cudnn"],
                    "DeepSpeed": M["deepspeed"], "DeepSpeed ops": ", ".join(M["deepspeed_ops"]),
                    "flash-attn": M["flash_attn"], "liger-kernel": M["liger_kernel"]}
    assert M["runtime_image"] in text and M["devel_image"] in text


FLASH_TAG = re.compile(r"tag=\$\(python -c '(.*?)'\)")


def _flash_tag(version: str, cuda: str, abi: bool) -> str:
    """The train Dockerfile's flash-attn wheel tag, computed by its own one-liner against a stand-in torch."""
    code = FLASH_TAG.search((DOCKER / "train.Dockerfile").read_text()).group(1)
    fake = types.ModuleType("torch")
    fake.__version__ = version
    fake.version = types.SimpleNamespace(cuda=cuda)
    fake._C = types.SimpleNamespace(_GLIBCXX_USE_CXX11_ABI=abi)
    saved = sys.modules.get("torch")
    sys.modules["torch"] = fake
    try:
        from contextlib import redirect_stdout
        from io import StringIO

        buf = StringIO()
        with redirect_stdout(buf):
            exec(code, {})  # noqa: S102 - the Dockerfile's own line
        return buf.getvalue().strip()
    finally:
        sys.modules["torch"] = saved


def test_flash_attn_wheel_name_is_the_one_its_setup_py_looks_for():
    # flash-attention setup.py get_wheel_url() (Dao-AILab/flash-attention, 0251105): CUDA major only ("cu12"),
    # torch major.minor, cxx11abi TRUE/FALSE, cp<py>-cp<py>
    py = "cp%d%d" % sys.version_info[:2]
    assert _flash_tag("2.13.0+cu128", "12.8", True) == f"cu12torch2.13cxx11abiTRUE-{py}-{py}"
    assert _flash_tag("2.13.0", "13.0", False) == f"cu13torch2.13cxx11abiFALSE-{py}-{py}"
    assert "releases/download/v$fa/flash_attn-$fa+$tag-linux_$(uname -m).whl" in (DOCKER / "train.Dockerfile").read_text()


def test_train_checks_refuse_a_jit_only_deepspeed_and_a_foreign_torch():
    """The build-time check fails where it must: this virtualenv's DeepSpeed has no prebuilt op (JIT only), and a
    matrix naming another torch is refused before that. (Where the op is prebuilt: the image build, make images.)"""
    with pytest.raises(RuntimeError, match="is not prebuilt"):
        smoke.train_checks(M)
    with pytest.raises(RuntimeError, match=r"torch 2\.13\.0 is not docker/matrix.toml's 2\.99\.0"):
        smoke.train_checks({**M, "torch": "2.99.0"})


@pytest.mark.slow  # imports every library of the image (~30 s)
def test_smoke_train_fails_the_build_with_a_message():
    proc = subprocess.run([sys.executable, str(DOCKER / "smoke.py"), "train"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "smoke: train:" in proc.stderr and "not prebuilt" in proc.stderr


def test_deepspeed_still_compiles_its_cpu_ops_for_the_build_host():
    """Why docker/portable-cxx.sh exists: DeepSpeed's CPU op builder (cpu_adam's, on the CUDA accelerator too) puts
    -march=native and the host's SIMD width into the extension's flags, and reads no setting to change them. When a
    DeepSpeed release stops doing so, the wrapper can go."""
    import inspect

    from deepspeed.ops.op_builder.builder import OpBuilder
    from deepspeed.ops.op_builder.cpu.builder import CPUOpBuilder

    assert "self.cpu_arch()" in inspect.getsource(CPUOpBuilder.cxx_args)
    assert "self.simd_width()" in inspect.getsource(CPUOpBuilder.cxx_args)
    assert "return '-march=native'" in inspect.getsource(OpBuilder.cpu_arch)
    assert "'-D__AVX512__'" in inspect.getsource(OpBuilder.simd_width)


@pytest.mark.skipif(__import__("platform").machine() != "x86_64", reason="the wrapper rewrites x86_64 flags only")
def test_portable_cxx_turns_the_host_flags_into_a_baseline(tmp_path):
    """The wrapper under a compiler's name, ahead of a fake compiler that prints its arguments: -march=native and
    -D__AVX512__ become -march=x86-64-v3 (or DS_CPU_ARCH) and -D__AVX256__, the rest passes through, the call is
    logged; and the train image puts it on PATH in the builder stage only."""
    real, mine = tmp_path / "real", tmp_path / "wrap"
    real.mkdir()
    mine.mkdir()
    (real / "c++").write_text('#!/bin/sh\nprintf "%s|" "$@"\n')
    (real / "c++").chmod(0o755)
    (mine / "c++").symlink_to(DOCKER / "portable-cxx.sh")
    env = {"PATH": f"{mine}:{real}:/usr/bin:/bin", "PORTABLE_CXX_LOG": str(tmp_path / "log")}
    args = ["-O3", "-march=native", "-fopenmp", "-D__AVX512__", "-I/x y", "-c", "a.cpp"]
    out = subprocess.run(["c++", *args], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split("|")[:-1] == ["-O3", "-march=x86-64-v3", "-fopenmp", "-D__AVX256__", "-I/x y", "-c", "a.cpp"]
    assert (tmp_path / "log").read_text().startswith("c++: -O3 -march=x86-64-v3 -fopenmp -D__AVX256__")
    out = subprocess.run(["c++", "-march=native"], env={**env, "DS_CPU_ARCH": "znver3"}, capture_output=True,
                         text=True, check=True).stdout
    assert out == "-march=znver3|"
    out = subprocess.run(["c++", "-O2", "x.o"], env=env, capture_output=True, text=True, check=True).stdout
    assert out == "-O2|x.o|"
    assert len((tmp_path / "log").read_text().splitlines()) == 2  # only calls with a rewrite are logged

    text = (DOCKER / "train.Dockerfile").read_text()
    ops, final = text.split("\nFROM ${BASE}\n")
    assert "COPY docker/portable-cxx.sh /opt/portable-cxx/portable-cxx" in ops
    assert 'export PATH="/opt/portable-cxx/bin:$PATH"' in ops and "AVX-512 instructions" in ops
    assert "portable-cxx" not in final
