"""The code stays ruff-clean, the package mypy-clean and its imports one-way (STYLE.md), checked like any
other test. Every tool reads its settings from pyproject.toml."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _run(tool: str, *args: str) -> None:
    exe = BIN / tool
    if not exe.exists():
        pytest.skip(f"{tool} is not installed in this environment (tests/run.sh installs it)")
    proc = subprocess.run([str(exe), *args], capture_output=True, text=True, cwd=REPO, timeout=600, check=False)
    assert proc.returncode == 0, f"{tool} found problems:\n{proc.stdout}\n{proc.stderr}"


def test_ruff() -> None:
    _run("ruff", "check", "rannc_py", "tests", "benchmarks", "examples")


def test_mypy() -> None:
    _run("mypy", "rannc_py")


def test_import_layers() -> None:
    _run("lint-imports", "--no-cache")
