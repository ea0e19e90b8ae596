"""The C++ extension builds against MPI and its allreduce is right on 4 ranks."""

import pytest
import torch
from mpi_launch import REPO, run_mpi


def test_allreduce_on_four_ranks() -> None:
    proc = run_mpi(4, REPO / "tests/mpi_scripts/core_allreduce.py", timeout=120)
    assert proc.stdout.count(": ok") == 4, proc.stdout


def test_rejects_wrong_dtype_and_non_contiguous() -> None:
    from mpi4py import MPI

    from rannc_py.comm import allreduce

    with pytest.raises(ValueError, match="float32"):
        allreduce(torch.zeros(4, dtype=torch.float64), MPI.COMM_SELF)
    with pytest.raises(ValueError, match="contiguous"):
        allreduce(torch.zeros(4, 4)[:, 1], MPI.COMM_SELF)
