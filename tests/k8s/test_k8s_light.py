"""`llmpipe k8s` runs with only the `k8s` extra installed (requirements-k8s.lock: what `make status`, `make logs` and
`make deploy-pipeline` install into .venv-k8s), and imports no torch.

Each command runs in a subprocess whose interpreter sees the standard library, the llmpipe package and, one symlink
per file of each distribution's RECORD, exactly the distributions that requirements-k8s.lock pins (python -I -S: no
site-packages, no PYTHONPATH): a module outside the extra fails to import there, as it would in .venv-k8s. Against the
fake API server (tests/k8s/fakeapi.py), helm rendering the real chart.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.k8s.conftest import SITE_VALUES
from tests.k8s.fakeapi import Scenario

REPO = Path(__file__).resolve().parents[2]
K8S_LOCK = REPO / "requirements-k8s.lock"
HEAVY = {"torch", "deepspeed", "transformers", "numpy", "mlflow", "datasets", "pyarrow", "accelerate", "trl", "peft",
         "tokenizers", "lm_eval", "fsspec", "s3fs"}

RUN = r"""
import json, sys
sys.path[:0] = [sys.argv[1], sys.argv[2]]
rc = 3
try:
    from pipeline.cli import main
    rc = main(sys.argv[3:])
except SystemExit as e:  # argparse's --help
    rc = e.code or 0
except BaseException:
    import traceback
    traceback.print_exc()
finally:
    sys.stdout.flush()
    print("\nMODULES " + json.dumps(sorted({m.split(".")[0] for m in sys.modules})), file=sys.stderr)
sys.exit(rc)
"""


def _pins(lock: Path) -> dict[str, str]:
    return dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", lock.read_text(), re.M))


@pytest.fixture(scope="module")
def light_path(tmp_path_factory) -> Path:
    """A folder with the files of exactly the k8s lock's distributions (symlinks into this virtualenv), at the
    versions this virtualenv has: the lock's under `make test`, the floors' under `make test-floors`."""
    root = tmp_path_factory.mktemp("k8s-extra")
    for name in _pins(K8S_LOCK):
        dist = md.distribution(name)
        for f in dist.files or []:
            src = Path(dist.locate_file(f)).resolve()
            if f.parts[0] in ("..", "bin") or not src.is_file():
                continue
            dst = root / f
            dst.parent.mkdir(parents=True, exist_ok=True)
            if not dst.exists():
                dst.symlink_to(src)
    return root


def light(path: Path, *args: str) -> tuple[int, str, str, set[str]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", RUN, str(path), str(REPO), *args], capture_output=True,
                          text=True, env=env, timeout=120)
    err, _, mods = proc.stderr.rpartition("\nMODULES ")
    return proc.returncode, proc.stdout, err, set(json.loads(mods or "[]"))


def test_the_extra_is_in_pyproject_and_locked_against_the_full_lock():
    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["k8s"]
    names = {re.split(r"[<>=!~;\[ ]", r)[0].lower() for r in extra}
    assert names >= {"kubernetes", "pyyaml"}
    pins, full = _pins(K8S_LOCK), _pins(REPO / "requirements.lock")
    assert {n.lower() for n in pins} >= names
    assert not {n.lower() for n in pins} & (HEAVY | {"torch"})
    assert {n: v for n, v in pins.items() if full.get(n) != v} == {}, "requirements-k8s.lock differs from requirements.lock"


def test_the_light_interpreter_cannot_import_torch(light_path):
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", f"import sys; sys.path[:0] = [{str(light_path)!r}]; import torch"],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "No module named 'torch'" in proc.stderr


def test_help_and_status_logs_wait_submit_need_only_the_extra(light_path, fake, chart):
    rc, out, err, mods = light(light_path, "k8s", "--help")
    assert rc == 0 and "submit" in out and "status" in out, err
    assert not mods & HEAVY, mods & HEAVY

    rc, out, err, mods = light(light_path, "k8s", "status")
    assert rc == 0, err
    assert "kubernetes" in mods and not mods & HEAVY, mods & HEAVY

    # a stage submitted from the light install and waited for, its logs, the status
    fake.scenarios["llmpipe-collect"] = Scenario(logs=["collected 3 documents"])
    rc, out, err, mods = light(light_path, "k8s", "submit", "collect", "-f", str(SITE_VALUES), "--wait", "--interval", "0.1")
    assert rc == 0, out + err
    assert "not validated here (No module named" in err  # said, not silently skipped
    assert not mods & HEAVY, mods & HEAVY
    rc, out, err, mods = light(light_path, "k8s", "wait", "collect", "--interval", "0.1")
    assert rc == 0, out + err
    assert not mods & HEAVY, mods & HEAVY
    rc, out, err, mods = light(light_path, "k8s", "logs", "collect")
    assert rc == 0 and out.splitlines() == ["collected 3 documents"], out + err
    assert not mods & HEAVY, mods & HEAVY
    rc, out, err, mods = light(light_path, "k8s", "status")
    assert rc == 0 and "Job/llmpipe-collect" in out, out + err
    assert not mods & HEAVY, mods & HEAVY


def test_make_status_and_logs_install_only_the_extra():
    # -W: as if the lock had changed, so the install recipe prints even where .venv-k8s exists
    out = subprocess.run(["make", "-n", "-W", "requirements-k8s.lock", "status", "logs", "STAGE=clean"], cwd=REPO, capture_output=True, text=True).stdout
    assert "requirements-k8s.lock" in out and ".venv-k8s/bin/llmpipe k8s status" in out
    assert ".venv-k8s/bin/llmpipe k8s logs clean" in out
    assert "requirements.lock" not in out.replace("requirements-k8s.lock", "") and "torch" not in out
