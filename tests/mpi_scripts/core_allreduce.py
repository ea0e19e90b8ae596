"""On every rank: allreduce float32 buffers with rannc_py._core's binding and check them.

Drives ``_core.comm_allreduce`` (what :func:`rannc_py.comm.allreduce` calls)
directly, on the world and on a sub-communicator, both passed as ``py2f()``.
"""

import torch
from mpi4py import MPI

from rannc_py import _core


def allreduce(t: torch.Tensor, comm: MPI.Comm) -> None:
    work = _core.comm_allreduce(t.data_ptr(), t.numel(), comm.py2f(), "mpi", [], True, 1 << 20)
    work.wait()
    assert work.status == 1, work.message  # 1: completed without error


comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
for n in (0, 1, 7, 1000, 1 << 16):
    buf = torch.arange(n, dtype=torch.float32) * (rank + 1)
    allreduce(buf, comm)
    expected = torch.arange(n, dtype=torch.float32) * (size * (size + 1) / 2)
    torch.testing.assert_close(buf, expected, rtol=1e-6, atol=0)
# A sub-communicator travels the same way.
sub = comm.Split(rank % 2, rank)
buf = torch.ones(5, dtype=torch.float32)
allreduce(buf, sub)
assert buf[0] == sub.Get_size(), buf
print(f"rank {rank}: ok")
