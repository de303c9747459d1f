"""Lint is part of `make check`: ruff with the rules pyproject.toml chooses."""

import subprocess
import sys
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[2]


def test_ruff_finds_nothing():
    ruff = Path(sys.executable).with_name("ruff")
    assert ruff.exists(), f"{ruff} is missing: run scripts/bootstrap (make bootstrap)"
    result = subprocess.run([str(ruff), "check", "--no-cache", "--output-format", "concise",
                             "ublkd", "tests", "benchmarks", "setup.py"],
                            cwd=CHECKOUT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
