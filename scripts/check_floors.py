#!/usr/bin/env python3
"""Check that a lowest-direct resolution puts every direct dependency at its pyproject.toml lower bound.

    python scripts/check_floors.py pyproject.toml floors.txt

``floors.txt`` is ``uv pip compile pyproject.toml --resolution lowest-direct`` (what ``make test-floors``
installs and tests). A direct dependency that resolves above its declared lower bound means the bound
is not a version anyone can install with the rest (another dependency needs more): the bound is untrue,
and this exits 1 naming the versions to write instead. torch is the platform's and is skipped.

It also refuses a bound below the first version that has an API the code calls (``API_FLOORS``), so
lowering such a bound fails at once, before anything is installed; the floors run's tests are the proof.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

SKIP = {"torch"}

# APIs the code calls that set a floor: distribution -> [(the API, the first version that has it, where it is called)].
# tests/unit/test_api_floors.py checks each entry against the code and the installed version.
API_FLOORS: dict[str, list[tuple[str, str, str]]] = {
    # 37.0.0 has ApiClient.param_serialize; 36.0.3 has call_api(resource_path, method, ...) and no param_serialize,
    # and tests/k8s (part of make test-floors) fail on it
    "kubernetes": [("kubernetes.client.ApiClient.param_serialize", "37.0.0", "pipeline/k8s/client.py")],
    # SFT packing relies on transformers' per-example mask for packed rows (masking_utils.py: find_packed_sequence_indices,
    # packed_sequence_mask_function); transformers 5.24 imports this torch class at the top of masking_utils.py (line 19)
    # and treats torch < 2.6 as absent (utils/import_utils.py:206-208, is_torch_available); earlier masking_utils imported
    # it only under _is_torch_greater_or_equal_than_2_6. torch is in SKIP for the resolution, not for this table.
    "torch": [("torch._dynamo._trace_wrapped_higher_order_op.TransformGetItemToIndex", "2.6",
               "pipeline/training/posttrain/trainers.py")],
}


def api_floor_errors(name: str, floor: Version) -> list[str]:
    """Why ``name>=floor`` is below an API the code calls (empty: it is not)."""
    return [f"{name}: pyproject.toml says >={floor}, but {where} calls {api}, first in {first}"
            for api, first, where in API_FLOORS.get(canonicalize_name(name), []) if floor < Version(first)]


def lower_bound(req: Requirement) -> Version | None:
    bounds = [Version(s.version) for s in req.specifier if s.operator in (">=", "==", "~=")]
    return max(bounds) if bounds else None


PIN = re.compile(r"^([A-Za-z0-9._-]+)(?:\[[^\]]*\])?==(\S+?)(?:\s*;\s*(.+))?$")


def parse_lock(path: Path) -> list[tuple[str, Version, str]]:
    """``(canonical name, version, marker)`` per pin line of a ``uv pip compile`` output (``requirements*.lock``)."""
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        m = PIN.match(line.strip())
        if m:
            out.append((canonicalize_name(m.group(1)), Version(m.group(2)), m.group(3) or ""))
    return out


def pins(path: Path) -> dict[str, Version]:
    """name -> version of a lock resolved for one interpreter (no name appears twice)."""
    return {name: version for name, version, _ in parse_lock(path)}


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    project = tomllib.loads(Path(argv[0]).read_text(encoding="utf-8"))["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in ("image", "dev"):  # what make test-floors resolves (bench: only the benchmarks use it)
        reqs += [Requirement(r) for r in project.get("optional-dependencies", {}).get(extra, [])]
    resolved = pins(Path(argv[1]))
    env = default_environment()
    wrong, checked = [], 0
    for req in reqs:
        name = canonicalize_name(req.name)
        if req.marker is not None and not req.marker.evaluate({**env, "extra": ""}):
            continue
        if name in SKIP:  # not resolved by the lock, but still held to the APIs the code needs
            floor = lower_bound(req)
            wrong += api_floor_errors(req.name, floor) if floor is not None else []
            continue
        floor = lower_bound(req)
        got = resolved.get(name)
        if got is None:
            wrong.append(f"{req.name}: not in {argv[1]}")
        elif floor is None:
            wrong.append(f"{req.name}: no lower bound in pyproject.toml (resolved {got})")
        elif got != floor:
            wrong.append(f"{req.name}: pyproject.toml says >={floor}, but the lowest installable with the rest is {got}")
        if floor is not None:
            wrong += api_floor_errors(req.name, floor)
        checked += 1
    if wrong:
        print("check_floors: lower bounds that are not true floors:\n  " + "\n  ".join(wrong), file=sys.stderr)
        return 1
    print(f"check_floors: {checked} direct dependencies resolve to their pyproject.toml lower bounds")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
