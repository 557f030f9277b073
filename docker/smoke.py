"""Build-time check of an llmpipe image: its stages and libraries import, and pins are consistent.

    python /opt/llmpipe/smoke.py FAMILY      (base, data, train, eval, registry)

Run by each Dockerfile as its last step, so an image that cannot run its stages fails to build.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

# which image runs which stage (the chart's per-family image defaults follow this map)
FAMILIES = {
    "data": ["collect", "clean", "tokenizer", "pack"],
    "train": ["init", "pretrain", "sft", "dpo", "reward"],
    "eval": ["evaluate", "quantize"],
    "registry": ["register"],
}
# libraries a family's stages import lazily (inside functions), imported here up front
LIBRARIES = {
    "base": ["torch", "transformers", "tokenizers", "datasets", "fasttext", "pyarrow", "s3fs", "mlflow", "kubernetes"],
    "data": [],
    "train": ["deepspeed", "trl", "peft"],
    "eval": ["lm_eval", "gguf", "optimum.quanto", "llmcompressor", "compressed_tensors"],
    "registry": [],
}

# pyproject.toml's [tool.uv] override-dependencies: a package's own pin on these is replaced by our range on purpose
# (llmcompressor's release pins transformers <= 5.17.0; the lock's newer transformers runs it, tests check that)
OVERRIDDEN = ("transformers",)


def main(family: str) -> int:
    if family not in LIBRARIES:
        print(f"smoke: unknown image family {family!r}; one of {', '.join(LIBRARIES)}", file=sys.stderr)
        return 2
    modules = LIBRARIES["base"] + LIBRARIES[family] + [f"pipeline.stages.{s}" for s in FAMILIES.get(family, [])]
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as exc:  # any failure to import means the image cannot run the stage
            print(f"smoke: {family}: import {name} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
    # every installed distribution's requirements hold (the base installs requirements.lock with --no-deps: this is
    # where a lock that misses a package, or a torch of the base image that a locked package rejects, shows)
    check = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    problems = [line for line in check.stdout.splitlines() if line.strip() and not line.startswith("No broken")
                and not any(f" has requirement {name}" in line for name in OVERRIDDEN)]
    if problems:
        print(f"smoke: {family}: inconsistent packages:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    if family == "train":
        try:
            train_checks()
        except Exception as exc:  # noqa: BLE001 - any failure here means a training job would fail on the cluster
            print(f"smoke: train: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
    print(f"smoke: {family}: {len(modules)} modules import, packages consistent")
    return 0


# DeepSpeed's op names (matrix deepspeed_ops, DS_BUILD_<NAME>) and their builders in deepspeed.ops.op_builder
OP_BUILDERS = {"cpu_adam": "CPUAdamBuilder", "cpu_adagrad": "CPUAdagradBuilder", "fused_adam": "FusedAdamBuilder",
               "async_io": "AsyncIOBuilder"}
MATRIX = Path(__file__).with_name("matrix.toml")  # /opt/llmpipe/matrix.toml in the images (docker/matrix.toml here)


def load_matrix(path: Path = MATRIX) -> dict:
    import tomllib

    return tomllib.loads(path.read_text())


def base_version(version: str) -> str:
    return version.split("+")[0]


def train_checks(matrix: dict | None = None) -> list[str]:
    """The train image's own checks (raise on the first failure; return what was skipped):

    - torch, Python and (CUDA builds) CUDA are the matrix's;
    - DeepSpeed is the matrix's, and each op of deepspeed_ops loads PREBUILT (installed_ops, the compiled module in the
      deepspeed package, not a just-in-time build: the image has no compiler), and DeepSpeedCPUAdam takes a step;
    - CUDA builds: flash-attn (its compiled extension loads against this torch) and liger-kernel import, at the
      matrix's versions. A CPU build skips them, and says so.
    """
    import importlib.metadata as md

    import torch

    m = matrix or load_matrix()
    cuda = torch.version.cuda
    # DeepSpeed picks its accelerator from the machine (a GPU-less build host: cpu); the ops were built for the
    # accelerator of this torch, which a GPU node picks
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if cuda else "cpu")
    got = {"torch": base_version(torch.__version__), "python": "%d.%d" % sys.version_info[:2],
           "deepspeed": md.version("deepspeed")}
    if cuda:
        got["cuda"] = ".".join(cuda.split(".")[:2])
    for key, value in got.items():
        if value != m[key]:
            raise RuntimeError(f"{key} {value} is not docker/matrix.toml's {m[key]}")

    import deepspeed.ops.op_builder as op_builder
    from deepspeed.git_version_info import installed_ops

    ds_dir = Path(importlib.import_module("deepspeed").__file__).parent
    for op in m["deepspeed_ops"]:
        if not installed_ops.get(op):
            raise RuntimeError(f"DeepSpeed op {op} is not prebuilt (installed_ops: {installed_ops})")
        builder = getattr(op_builder, OP_BUILDERS[op])  # the accelerator's builder class (cpu or cuda)
        module = builder().load()
        where = Path(module.__file__).resolve()
        if ds_dir.resolve() not in where.parents:  # a JIT build lands in ~/.cache/torch_extensions
            raise RuntimeError(f"DeepSpeed op {op} loaded from {where}, not the prebuilt one in {ds_dir}")
        print(f"smoke: train: DeepSpeed op {op} loads prebuilt ({where.name})")
    if "cpu_adam" in m["deepspeed_ops"]:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        p = torch.nn.Parameter(torch.ones(8))
        opt = DeepSpeedCPUAdam([p], lr=0.1)
        p.grad = torch.ones(8)
        opt.step()
        if not bool((p.detach() < 1).all()):
            raise RuntimeError(f"DeepSpeedCPUAdam took no step: {p.detach().tolist()}")
        print("smoke: train: DeepSpeedCPUAdam steps")

    skipped = []
    if cuda:
        import flash_attn
        import flash_attn_2_cuda  # noqa: F401  the compiled kernels: an ABI mismatch with this torch fails here
        import liger_kernel.transformers  # noqa: F401

        for dist, key in (("flash-attn", "flash_attn"), ("liger-kernel", "liger_kernel")):
            if base_version(md.version(dist)) != m[key]:
                raise RuntimeError(f"{dist} {md.version(dist)} is not docker/matrix.toml's {m[key]}")
        print(f"smoke: train: flash-attn {flash_attn.__version__} and liger-kernel {md.version('liger-kernel')} import "
              f"(torch {torch.__version__}, CUDA {cuda})")
    else:
        skipped = ["CUDA version", "flash-attn", "liger-kernel"]
        print(f"smoke: train: torch {torch.__version__} is a CPU build: GPU-only checks skipped ({', '.join(skipped)}); "
              "DeepSpeed's CPU ops checked")
    return skipped


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "base"))
