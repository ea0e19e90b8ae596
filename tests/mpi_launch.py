"""Run a Python script under ``mpiexec -n N`` from a test, with a hard timeout.

A hang then fails the test instead of freezing the suite, and every rank's
output is shown when it fails.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def mpiexec_path() -> str:
    beside = Path(sys.executable).parent / "mpiexec"
    if beside.exists():
        return str(beside)
    found = shutil.which("mpiexec")
    if not found:
        raise RuntimeError("mpiexec not found: install MPI with `pip install mpich mpi4py`")
    return found


def run_mpi(
    nprocs: int, script: str | Path, *args: str, timeout: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Launch ``script`` on ``nprocs`` ranks; raise AssertionError with all output on failure."""
    full_env = dict(os.environ)
    full_env.update(
        OMP_NUM_THREADS="1",
        RANNC_TORCH_THREADS="1",
        PYTHONPATH=os.pathsep.join([str(REPO), full_env.get("PYTHONPATH", "")]),
    )
    if env:
        full_env.update(env)
    # Oversubscription (more ranks than cores) is fine with MPICH's hydra.
    cmd = [mpiexec_path(), "-n", str(nprocs), sys.executable, str(script), *args]
    try:
        proc = subprocess.run(
            cmd, check=False, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=str(REPO)
        )
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = (e.stderr or b"").decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        raise AssertionError(
            f"{' '.join(cmd)} did not finish in {timeout}s (hang?)\nstdout:\n{out}\nstderr:\n{err}"
        ) from None
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited with {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        )
    return proc
