"""rannc_py.comm: point-to-point and collectives, across ranks and in process."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from mpi_launch import REPO, run_mpi


def test_p2p_on_three_ranks() -> None:
    proc = run_mpi(3, REPO / "tests/mpi_scripts/comm_p2p.py", timeout=180)
    assert proc.stdout.count(": ok") == 3, proc.stdout


def test_collectives_on_every_group_size_up_to_eight() -> None:
    proc = run_mpi(8, REPO / "tests/mpi_scripts/comm_collectives.py", timeout=300)
    assert proc.stdout.count(": ok") == 8, proc.stdout


def test_allreduce_64_mib_every_algorithm() -> None:
    proc = run_mpi(4, REPO / "tests/mpi_scripts/comm_large.py", timeout=240)
    assert proc.stdout.count(": ok") == 4, proc.stdout


def test_cost_module_imports_no_mpi() -> None:
    code = "import sys, rannc_py.comm.cost, rannc_py.comm; print('mpi4py.MPI' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("algorithm", ["mpi", "ring", "halving_doubling", "torus"])
def test_single_rank_allreduce_is_identity(algorithm: str) -> None:
    from mpi4py import MPI

    from rannc_py.comm import allreduce

    x = torch.randn(3, 5)
    t = x.clone()
    w = allreduce(t, MPI.COMM_SELF, algorithm)
    w.wait()
    assert w.is_completed()
    assert torch.equal(t, x)


def test_rejects_bad_arguments_in_process() -> None:
    from mpi4py import MPI

    from rannc_py import ConfigError
    from rannc_py.comm import allreduce, isend

    with pytest.raises(ConfigError, match="not contiguous"):
        isend(torch.zeros(3, 4).t(), 0, 0, MPI.COMM_SELF)
    with pytest.raises(ConfigError, match="segment_bytes"):
        allreduce(torch.zeros(3), MPI.COMM_SELF, "ring", segment_bytes=2)
    with pytest.raises(ConfigError, match="torus_shape"):
        allreduce(torch.zeros(3), MPI.COMM_SELF, "torus", (0,))
    with pytest.raises(ConfigError, match="intracommunicator"):
        allreduce(torch.zeros(3), MPI.COMM_NULL)
