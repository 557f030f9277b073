"""Pin the images' Python packages: docker/requirements/<layer>.txt from a working virtualenv.

    .venv/bin/python docker/lock.py            # rewrite the lock files from this environment
    .venv/bin/python docker/lock.py --check    # exit 1 when they are stale (what the tests run)

The images install exactly these versions with ``pip install --no-deps``, so an image holds the
set of packages the test suite passed with, and no resolver runs at image build time.

Layers: ``base`` is the runtime closure of the package's dependencies (pyproject.toml) minus
the libraries only one stage family needs; ``train`` and ``eval`` add those libraries and
whatever they pull in that the base does not already have. torch and its CUDA wheels (torch,
triton, nvidia-*) are never pinned: the base image (a PyTorch/NGC image) brings them, or the
``TORCH_SPEC`` build argument installs them. The closure is taken with the markers of *this*
interpreter (Python version, platform), which is written into each file's header; the base
Dockerfile refuses to build on another Python minor version.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import platform
import sys
import tomllib
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docker" / "requirements"

# libraries that only one stage family imports; everything else in pyproject.toml goes to the base
FAMILY_ONLY = {
    "train": ["deepspeed", "trl", "peft"],  # init, pretrain, sft, dpo, reward
    "eval": ["lm-eval", "gguf", "optimum-quanto"],  # evaluate, quantize
}
# not Python dependencies of the package, but part of every image
IMAGE_TOOLS = {"base": ["dumb-init==1.2.5.post1"]}  # PID 1: forwards SIGTERM to llmpipe, reaps torchrun's children
# brought by the base image or TORCH_SPEC, never pinned here
NEVER = ("torch", "triton", "nvidia-", "pytorch-triton")


def _skip(name: str) -> bool:
    name = canonicalize_name(name)
    return any(name == n or (n.endswith("-") and name.startswith(n)) for n in NEVER)


def project_requirements() -> list[Requirement]:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    return [Requirement(r) for r in data["project"]["dependencies"]]


def closure(roots: list[Requirement]) -> dict[str, str]:
    """canonical name -> installed version for the roots and everything they need here."""
    env = default_environment()
    found: dict[str, str] = {}
    todo = [(r, "") for r in roots]
    seen: set[tuple[str, str]] = set()
    while todo:
        req, extra = todo.pop()
        if req.marker is not None and not req.marker.evaluate({**env, "extra": extra}):
            continue
        name = canonicalize_name(req.name)
        if _skip(name):
            continue
        try:
            dist = md.distribution(req.name)
        except md.PackageNotFoundError:
            raise SystemExit(f"lock: {req.name} (needed for {req}) is not installed in {sys.prefix}; run `make install` first")
        if not req.specifier.contains(dist.version, prereleases=True):
            raise SystemExit(f"lock: installed {req.name} {dist.version} does not satisfy {req}; reinstall the environment")
        found[name] = dist.version
        for ex in sorted(req.extras) or [""]:
            if (name, ex) in seen:
                continue
            seen.add((name, ex))
            for line in dist.requires or []:
                todo.append((Requirement(line), ex))
    return found


def layers() -> dict[str, dict[str, str]]:
    reqs = project_requirements()
    family_of = {canonicalize_name(n): fam for fam, names in FAMILY_ONLY.items() for n in names}
    unknown = set(family_of) - {canonicalize_name(r.name) for r in reqs}
    if unknown:
        raise SystemExit(f"lock: FAMILY_ONLY names packages that pyproject.toml does not depend on: {sorted(unknown)}")
    base = closure([r for r in reqs if canonicalize_name(r.name) not in family_of])
    out = {"base": base}
    for fam in FAMILY_ONLY:
        full = closure([r for r in reqs if family_of.get(canonicalize_name(r.name)) == fam])
        out[fam] = {n: v for n, v in full.items() if n not in base}
    return out


def render(layer: str, pins: dict[str, str]) -> str:
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    head = [
        f"# {layer}: pinned by docker/lock.py; do not edit (rerun it after changing dependencies)",
        f"# python {py}",
        f"# platform {platform.system().lower()} {platform.machine()}",
    ]
    lines = [f"{n}=={v}" for n, v in sorted(pins.items())] + IMAGE_TOOLS.get(layer, [])
    return "\n".join(head + sorted(lines, key=str.lower)) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="compare with the committed files instead of writing them")
    args = ap.parse_args(argv)
    stale = []
    for layer, pins in layers().items():
        path = OUT / f"{layer}.txt"
        text = render(layer, pins)
        if args.check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(path.relative_to(ROOT).as_posix())
        else:
            OUT.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            print(f"{path.relative_to(ROOT)}: {len(pins)} packages")
    if stale:
        print(f"lock: stale: {', '.join(stale)}; run: .venv/bin/python docker/lock.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
