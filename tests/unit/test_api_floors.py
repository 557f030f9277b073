"""scripts/check_floors.py's API_FLOORS: a bound in pyproject.toml below an API the code calls fails at once.

The real proof is `make test-floors` (tests/k8s at kubernetes's floor); this keeps the table true without
installing anything: each API is still called where it says, exists in the installed version, and the
pyproject.toml bound is not below its first version.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "check_floors.py"

sys.path.insert(0, str(ROOT / "scripts"))
from check_floors import API_FLOORS, api_floor_errors, lower_bound  # noqa: E402


def _requirements() -> dict[str, Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in project.get("optional-dependencies", {}).values():
        reqs += [Requirement(r) for r in extra]
    return {canonicalize_name(r.name): r for r in reqs}


def _resolve(dotted: str):
    """The object a dotted name names: the longest importable module prefix, then attributes."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(dotted)


def test_api_floors_are_true_of_pyproject_the_code_and_the_installed_version():
    reqs = _requirements()
    assert API_FLOORS
    for dist, entries in API_FLOORS.items():
        assert dist in reqs, f"{dist} is not a dependency in pyproject.toml"
        floor = lower_bound(reqs[dist])
        assert floor is not None and not api_floor_errors(dist, floor)
        installed = Version(importlib.metadata.version(dist))
        for api, first, where in entries:
            assert floor >= Version(first), f"pyproject.toml: {dist}>={floor}, below {api} (first in {first})"
            assert api.rsplit(".", 1)[1] in (ROOT / where).read_text(encoding="utf-8"), f"{where} no longer calls {api}"
            assert installed >= Version(first)
            assert callable(_resolve(api)), f"{api} is not in the installed {dist} {installed}"


def test_a_bound_below_the_api_fails_check_floors(tmp_path):
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\nversion = "0"\ndependencies = ["kubernetes>=36"]\n')
    (tmp_path / "floors.txt").write_text("kubernetes==36.0.0\n")
    proc = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "pyproject.toml"), str(tmp_path / "floors.txt")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "kubernetes: pyproject.toml says >=36, but pipeline/k8s/client.py calls " \
           "kubernetes.client.ApiClient.param_serialize, first in 37.0.0" in proc.stderr
    # the same files at 37 pass
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\nversion = "0"\ndependencies = ["kubernetes>=37"]\n')
    (tmp_path / "floors.txt").write_text("kubernetes==37.0.0\n")
    proc = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "pyproject.toml"), str(tmp_path / "floors.txt")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_a_torch_floor_below_sft_packing_masks_fails_check_floors(tmp_path):
    """torch is outside the lock (the platform's build) but held to its API floor all the same: SFT packing needs the
    per-example masks transformers builds only on torch >= 2.6, so torch>=2.5 in pyproject.toml fails."""
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\nversion = "0"\ndependencies = ["torch>=2.5"]\n')
    (tmp_path / "floors.txt").write_text("")
    proc = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "pyproject.toml"), str(tmp_path / "floors.txt")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "torch: pyproject.toml says >=2.5, but pipeline/training/posttrain/trainers.py calls" in proc.stderr
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\nversion = "0"\ndependencies = ["torch>=2.6"]\n')
    proc = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "pyproject.toml"), str(tmp_path / "floors.txt")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr

