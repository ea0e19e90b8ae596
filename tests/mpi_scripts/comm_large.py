"""A 64 MiB float32 allreduce with every algorithm equals MPI_Allreduce (4 ranks)."""

import torch

from rannc_py.comm import allreduce  # sets the MPI thread level first

# isort: split
from mpi4py import MPI

comm = MPI.COMM_WORLD
rank = comm.Get_rank()
n = (64 << 20) // 4
g = torch.Generator().manual_seed(rank)
x = torch.rand(n, generator=g) + 0.5
ref = x.numpy().copy()
comm.Allreduce(MPI.IN_PLACE, ref, op=MPI.SUM)
ref_t = torch.from_numpy(ref)
for algo, shape in (("mpi", None), ("ring", None), ("halving_doubling", None), ("torus", (2, 2))):
    t = x.clone()
    allreduce(t, comm, algo, shape).wait()
    torch.testing.assert_close(t, ref_t, rtol=1e-6, atol=0, msg=lambda m, algo=algo: f"{algo}: {m}")
    del t
print(f"rank {rank}: ok")
