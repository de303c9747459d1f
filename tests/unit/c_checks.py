"""Compile a C file of _Static_asserts against a library's installed header:
how the ABI tests check the declarations ublkd writes itself for the
libraries it loads at run time (libnbd, librbd)."""

import shutil
import subprocess
from pathlib import Path

KERNEL_DIR = Path(__file__).resolve().parents[2] / "ublkd" / "kernel"


def assert_compiles(tmp_path: Path, header: Path, source: str) -> None:
    """`source` compiles with our headers on the include path, or the test
    fails with gcc's message (or the package to install)."""
    assert shutil.which("gcc"), "gcc is missing: run scripts/bootstrap"
    assert header.exists(), f"{header} is missing: run scripts/bootstrap"
    (tmp_path / "check.c").write_text(source)
    result = subprocess.run(["gcc", "-Wall", "-Werror", "-c", "-I", str(KERNEL_DIR), "-o",
                             str(tmp_path / "check.o"), str(tmp_path / "check.c")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
