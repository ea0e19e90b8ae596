"""The SVE kernels at vector lengths 128 to 2048 bits, without Arm hardware.

Cross-compiles csrc/kernels/tests/test_kernels.cpp and the kernels for
aarch64 with clang (``--target=aarch64-linux-gnu -march=armv8.2-a+sve
-static``, sysroot from g++-aarch64-linux-gnu) and runs it under
``qemu-aarch64 -cpu max,sve-default-vector-length=N``; it must report the
requested vector length and find every SVE kernel bitwise equal to the scalar
reference on sizes that are not multiples of the vector length.

Needs ``clang``, ``g++-aarch64-linux-gnu`` and ``qemu-user`` (tests/run.sh
installs them when it runs as root); skips, saying which is missing, otherwise.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from test_kernels_cpp import REPO, kernel_sources

VECTOR_BITS = [128, 256, 512, 1024, 2048]  # 512: A64FX


def _missing_tools() -> list[str]:
    missing = [t for t in ("clang++", "qemu-aarch64") if shutil.which(t) is None]
    if not Path("/usr/aarch64-linux-gnu/lib").is_dir():
        missing.append("aarch64 sysroot (g++-aarch64-linux-gnu)")
    return missing


@pytest.fixture(scope="module")
def sve_exe(tmp_path_factory):
    missing = _missing_tools()
    if missing:
        pytest.skip(
            f"SVE cross-test needs {', '.join(missing)}; install clang g++-aarch64-linux-gnu qemu-user"
        )
    exe = tmp_path_factory.mktemp("sve") / "test_kernels_sve"
    build = [
        "clang++", "--target=aarch64-linux-gnu", "-march=armv8.2-a+sve", "-static",
        "-std=c++17", "-O2", "-pthread", "-ffp-contract=off", f"-I{REPO / 'csrc'}",
        *kernel_sources(), "-o", str(exe),
    ]  # fmt: skip
    res = subprocess.run(
        build, check=False, capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0, "cross-compiling the SVE kernels failed:\n" + res.stderr
    return exe


@pytest.mark.parametrize("bits", VECTOR_BITS)
def test_sve_matches_scalar(sve_exe, bits):
    cmd = [
        "qemu-aarch64",
        "-cpu",
        f"max,sve-default-vector-length={bits // 8}",
        str(sve_exe),
    ]
    res = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=600)
    out = res.stdout + res.stderr
    assert f"SVE vector length: {bits} bits" in out, out
    assert res.returncode == 0, out
    assert "sve: all kernels match scalar" in out, out
