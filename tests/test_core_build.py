"""The C++ extension builds against MPI and its allreduce is right on 4 ranks."""

import numpy as np
import pytest
from mpi_launch import REPO, run_mpi


def test_allreduce_on_four_ranks() -> None:
    proc = run_mpi(4, REPO / "tests/mpi_scripts/core_allreduce.py", timeout=120)
    assert proc.stdout.count(": ok") == 4, proc.stdout


def test_rejects_wrong_dtype_and_non_contiguous() -> None:
    from mpi4py import MPI

    from rannc_py import _core

    with pytest.raises(ValueError, match="float32"):
        _core.allreduce_sum_f32(np.zeros(4, dtype=np.float64), MPI.COMM_SELF.py2f())
    with pytest.raises(ValueError, match="contiguous"):
        _core.allreduce_sum_f32(np.zeros((4, 4), dtype=np.float32)[:, 1], MPI.COMM_SELF.py2f())
