"""The contention probe on ranks that may share cores: one figure, the same on every rank."""

import math

import torch

from rannc_py.comm import dedicate_cores  # sets the MPI thread level first
from rannc_py.runtime.autoplan import job_contention
from rannc_py.runtime.link_probe import contended_latency

# isort: split
from mpi4py import MPI

comm = MPI.COMM_WORLD
torch.set_num_threads(1)
state = torch.get_rng_state()
dedicated = dedicate_cores(comm)
got = job_contention(None, comm, dedicated)
assert (got is None) == dedicated, (got, dedicated)
assert torch.equal(torch.get_rng_state(), state), "the probe must leave the caller's random stream alone"
x = contended_latency(comm)  # measured whatever the cores
assert math.isfinite(x) and x >= 0.0, x
figures = comm.allgather(x)
assert len(set(figures)) == 1, figures  # every rank plans with the same figure
print(f"rank {comm.Get_rank()}: ok ({x * 1e6:.0f} us per round, dedicated={dedicated})")
