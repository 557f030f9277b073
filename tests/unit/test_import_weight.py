"""What the light commands import: `llmpipe --help`, `llmpipe config STAGE` and the up-front config checks
of `llmpipe pipeline` load the stage modules and their configs, so the libraries that take seconds to
import must stay out of them (they are imported where a stage actually runs)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.stages import ORDER

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "transformers", "mlflow", "kubernetes", "lm_eval", "gguf", "matplotlib", "optimum", "accelerate",
         "datasets", "trl", "peft", "deepspeed")


def _heavy_after(code: str) -> list[str]:
    probe = f"{code}\nimport sys, json\nprint(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}})))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, check=True).stdout
    return [m for m in json.loads(out.strip().splitlines()[-1]) if m in HEAVY]


def test_help_imports_no_heavy_library():
    assert _heavy_after("from pipeline.cli import build_parser\nbuild_parser()") == []


@pytest.mark.parametrize("stage", ORDER)
def test_a_stage_config_imports_no_heavy_library(stage):
    config = REPO / "jobs" / "demo" / f"{stage}.yaml"
    code = (f"from pipeline.cli import build_parser\nbuild_parser()\nfrom pipeline.stages import load_config\n"
            f"load_config({stage!r}, {str(config)!r}, [])")
    assert _heavy_after(code) == []
