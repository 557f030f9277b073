"""Build-time check of an llmpipe image: its stages and libraries import, and pins are consistent.

    python /opt/llmpipe/smoke.py FAMILY      (base, data, train, eval, registry)

Run by each Dockerfile as its last step, so an image that cannot run its stages fails to build.
"""

from __future__ import annotations

import importlib
import subprocess
import sys

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
    print(f"smoke: {family}: {len(modules)} modules import, packages consistent")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "base"))
