"""Builds the kernels' standalone C++ test natively and runs it.

csrc/kernels/tests/test_kernels.cpp compares every vector path this CPU has
(AVX2 here on x86-64) with the scalar reference, bitwise, on odd sizes,
misaligned pointers and several threads.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
KERNELS = REPO / "csrc" / "kernels"


def kernel_sources() -> list[str]:
    """The kernel sources without the Python bindings, plus the C++ test."""
    srcs = sorted(str(p) for p in KERNELS.glob("*.cpp") if p.name != "bind_kernels.cpp")
    return [str(KERNELS / "tests" / "test_kernels.cpp"), *srcs]


def test_native_vector_paths_match_scalar(tmp_path):
    cxx = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no C++ compiler (c++, g++ or clang++) on PATH")
    exe = tmp_path / "test_kernels"
    build = [
        cxx,
        "-std=c++17",
        "-O2",
        "-pthread",
        f"-I{REPO / 'csrc'}",
        *kernel_sources(),
        "-o",
        str(exe),
    ]
    subprocess.run(build, check=True, capture_output=True, text=True, timeout=300)
    run = subprocess.run(
        [str(exe)], check=False, capture_output=True, text=True, timeout=300
    )
    if run.returncode == 2:
        pytest.skip(
            f"this CPU has no vector kernel path to compare: {run.stdout.strip()}"
        )
    assert run.returncode == 0, run.stdout + run.stderr
