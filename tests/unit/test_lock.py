"""requirements.lock and requirements-dev.lock: what `make install`, CI and the images install.

Checked offline: the pins satisfy pyproject.toml (a requirement changed without `make lock` fails here), torch stays
out, the dev lock holds the runtime lock pin for pin, and scripts/check_floors.py tells a true floor from an untrue one.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]

sys.path.insert(0, str(ROOT / "scripts"))
from check_floors import parse_lock  # noqa: E402  (scripts/check_floors.py: the one reader of the lock format)


def pins(name: str) -> list[tuple[str, Version, str]]:
    """(canonical name, version, marker) per pin line of a lock file."""
    return parse_lock(ROOT / name)


def _check_satisfies(requirements: list[str], lock: str) -> int:
    locked = pins(lock)
    checked = 0
    for req in map(Requirement, requirements):
        name = canonicalize_name(req.name)
        if name == "torch":
            continue
        versions = [v for n, v, _ in locked if n == name]
        assert versions, f"{req} is not in {lock}: run `make lock`"
        for v in versions:
            assert req.specifier.contains(v, prereleases=True), f"{lock} pins {req.name}=={v}, but pyproject.toml says {req}"
        checked += 1
    return checked


def test_runtime_lock_satisfies_pyproject():
    extras = PROJECT["optional-dependencies"]
    assert _check_satisfies(PROJECT["dependencies"] + extras["image"] + extras["quantize"], "requirements.lock") > 25


def test_dev_lock_satisfies_pyproject_extras():
    extras = PROJECT["optional-dependencies"]
    assert _check_satisfies(extras["dev"] + extras["bench"], "requirements-dev.lock") >= 7


@pytest.mark.parametrize("lock", ["requirements.lock", "requirements-dev.lock"])
def test_torch_and_cuda_wheels_stay_out(lock):
    text = (ROOT / lock).read_text(encoding="utf-8")
    names = {n for n, _, _ in pins(lock)}
    # nvidia-ml-py (llm-compressor's): the pure-Python NVML bindings, no CUDA inside
    assert not {n for n in names if n in ("torch", "triton") or (n.startswith("nvidia-") and n != "nvidia-ml-py")}
    assert "#    make lock" in text.splitlines()[1]  # how to refresh it
    assert text.rstrip().endswith("# The following packages were excluded from the output:\n# torch")


def test_dev_lock_holds_the_runtime_lock_pin_for_pin():
    """The images install requirements.lock; make install installs it with requirements-dev.lock, which was compiled
    against it (-c): the runtime sets are the same."""
    runtime, dev = set(pins("requirements.lock")), set(pins("requirements-dev.lock"))
    assert runtime and runtime <= dev, sorted(runtime - dev)[:5]


def test_lock_markers_parse():
    for lock in ("requirements.lock", "requirements-dev.lock"):
        for _, _, marker in pins(lock):
            if marker:
                Marker(marker)


def _run_floors(tmp_path, deps: list[str], lines: list[str]) -> subprocess.CompletedProcess:
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\nversion = "0"\ndependencies = [\n'
                                             + "".join(f'  "{d}",\n' for d in deps) + "]\n")
    (tmp_path / "floors.txt").write_text("\n".join(lines) + "\n")
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "check_floors.py"), str(tmp_path / "pyproject.toml"),
                           str(tmp_path / "floors.txt")], capture_output=True, text=True)


def test_check_floors_accepts_true_floors_and_names_untrue_ones(tmp_path):
    deps = ["torch>=2.6", "numpy>=1.26,<3", "pyyaml>=6.0.3", "legacy>=1; python_version < '3.0'"]
    ok = _run_floors(tmp_path, deps, ["numpy==1.26.0", "    # via x", "pyyaml==6.0.3"])
    assert ok.returncode == 0 and "2 direct dependencies" in ok.stdout, ok.stderr
    bad = _run_floors(tmp_path, deps, ["numpy==2.0.1", "pyyaml==6.0.3"])
    assert bad.returncode == 1
    assert "numpy: pyproject.toml says >=1.26, but the lowest installable with the rest is 2.0.1" in bad.stderr
    missing = _run_floors(tmp_path, deps + ["kubernetes"], ["numpy==1.26.0", "pyyaml==6.0.3", "kubernetes==37.0.1"])
    assert missing.returncode == 1 and "kubernetes: no lower bound" in missing.stderr


def test_overridden_pins_are_the_ones_the_image_check_tolerates():
    """pyproject's [tool.uv] override-dependencies (a package's own pin replaced by our range, e.g. llmcompressor's
    transformers <= 5.17.0) are exactly what docker/smoke.py's `pip check` lets pass in the images, nothing more."""
    sys.path.insert(0, str(ROOT / "docker"))
    import smoke

    overrides = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["uv"]["override-dependencies"]
    assert sorted(canonicalize_name(Requirement(r).name) for r in overrides) == sorted(smoke.OVERRIDDEN)
    for r in map(Requirement, overrides):  # the override is our own range, as pinned in the lock
        assert [r.specifier.contains(v) for n, v, _ in pins("requirements.lock") if n == canonicalize_name(r.name)] == [True]
