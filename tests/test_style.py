"""The code stays formatted, linted (complexity ≤ 15 included) and type-checked: CI runs these with the tests."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PATHS = ["src", "tests", "benchmarks", "docs/experiments"]


def _run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)


@pytest.mark.parametrize("args", [("check",), ("format", "--check")], ids=["lint", "format"])
def test_ruff(args):
    if shutil.which("ruff") is None:
        pytest.skip("ruff is not installed (it is in the test extra)")
    r = _run("ruff", *args, *PATHS)
    assert r.returncode == 0, r.stdout + r.stderr


def test_mypy_on_the_package():
    pytest.importorskip("mypy", reason="mypy is not installed (it is in the test extra)")
    r = _run(sys.executable, "-m", "mypy")  # files and options: [tool.mypy] in pyproject.toml
    assert r.returncode == 0, r.stdout + r.stderr
