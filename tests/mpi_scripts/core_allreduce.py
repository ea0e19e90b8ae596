"""On every rank: allreduce a float32 buffer with rannc_py._core and check it."""

import numpy as np
from mpi4py import MPI

from rannc_py import _core

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
for n in (0, 1, 7, 1000, 1 << 16):
    buf = np.arange(n, dtype=np.float32) * (rank + 1)
    _core.allreduce_sum_f32(buf, comm.py2f())
    expected = np.arange(n, dtype=np.float32) * (size * (size + 1) / 2)
    np.testing.assert_allclose(buf, expected, rtol=1e-6)
# A sub-communicator travels the same way.
sub = comm.Split(rank % 2, rank)
buf = np.ones(5, dtype=np.float32)
_core.allreduce_sum_f32(buf, sub.py2f())
assert buf[0] == sub.Get_size(), buf
print(f"rank {rank}: ok")
