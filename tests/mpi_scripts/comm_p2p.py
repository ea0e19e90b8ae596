"""Point-to-point through rannc_py.comm on 2+ ranks: dtypes, sizes, tags, order, errors."""

import time

import torch
from _expect import each_raises_config_error  # the scripts' folder is sys.path[0]

from rannc_py import _core
from rannc_py._util import usable_cores
from rannc_py.comm import (  # sets the MPI thread level first
    allreduce,
    dedicate_cores,
    irecv,
    isend,
    wait_all,
)
from rannc_py.errors import CommError

# isort: split
from mpi4py import MPI  # after rannc_py.comm on purpose

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
assert MPI.Query_thread() == MPI.THREAD_MULTIPLE
right, left = (rank + 1) % size, (rank - 1) % size


def payload(n: int, dtype: torch.dtype, src: int, salt: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * src + salt)
    return (torch.randn(n, generator=g) * 100).to(dtype)


# Ring exchange: every dtype, sizes from 0 bytes to a few MiB, large tags.
salt = 0
for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int64, torch.int8, torch.bool):
    for n in (0, 1, 3, 1000, 1 << 20):
        salt += 1
        send = payload(n, dtype, rank, salt)
        recv = torch.empty(n, dtype=dtype)
        tag = (salt * 7919) % (2**20 + 1)
        works = [irecv(recv, left, tag, comm), isend(send, right, tag, comm)]
        wait_all(works)
        assert all(w.is_completed() for w in works)
        torch.testing.assert_close(recv, payload(n, dtype, left, salt), rtol=0, atol=0)

# Multi-dimensional and offset views (contiguous) go zero-copy: the receive
# writes into the base tensor's memory.
base = torch.zeros(4, 6)
view = base[1:3]
w = irecv(view, left, 2**20, comm)
isend(torch.full((2, 6), float(rank)), right, 2**20, comm).wait()
w.wait()
assert torch.equal(base[1:3], torch.full((2, 6), float(left))) and base[0].abs().sum() == 0 and base[3].abs().sum() == 0

# Many messages in flight, same tag: they arrive in the order sent.
k = 32
recvs = [torch.empty(100) for _ in range(k)]
rw = [irecv(r, left, 5, comm) for r in recvs]
sends = [torch.full((100,), float(rank * 1000 + i)) for i in range(k)]
sw = [isend(s, right, 5, comm) for s in sends]
del sends  # the Works keep the tensors alive
wait_all(sw + rw)
for i, r in enumerate(recvs):
    assert torch.equal(r, torch.full((100,), float(left * 1000 + i))), (i, r[:3])

# Bad input: rejected on the calling rank before anything is sent.
each_raises_config_error([
    (lambda: isend(torch.zeros(4, 4)[:, 1], right, 0, comm), "contiguous"),
    (lambda: isend(torch.zeros(4), size, 0, comm), "outside"),
    (lambda: irecv(torch.zeros(4), 0, -1, comm), "tag"),
    (lambda: isend([1.0], right, 0, comm), "torch.Tensor"),
])

# A receive smaller than the message (truncated), or larger (short message),
# fails on wait() with CommError, no hang.
if size >= 2 and rank < 2:
    for sent, posted, tag, match in ((10, 4, 77, "rank 0"), (4, 10, 78, "expected 40 bytes, received 16")):
        if rank == 0:
            isend(torch.zeros(sent), 1, tag, comm).wait()
            continue
        try:
            irecv(torch.zeros(posted), 0, tag, comm).wait()
        except CommError as e:
            assert match in str(e), e
        else:
            raise AssertionError(f"receiving {posted} floats of a {sent}-float message must raise CommError")

# Starting a collective never blocks, not even the first one on a new
# communicator: rank 1 joins only after rank 0 has started and then sent.
fresh = comm.Dup()
token = torch.zeros(1)
x = torch.full((1000,), float(rank))
if rank == 0:
    w = allreduce(x, fresh, "ring")
    isend(token, 1, 9, comm).wait()
elif rank == 1:
    irecv(token, 0, 9, comm).wait()
    w = allreduce(x, fresh, "ring")
else:
    w = allreduce(x, fresh, "ring")
# The progress thread completes it with no wait() from Python.
while not w.is_completed():
    pass
w.wait()
assert torch.equal(x, torch.full((1000,), float(sum(range(size)))))

# The engine's two ways of waiting (a core of its own: polling while a thread
# waits; shared cores: backing off) both deliver a message that ends a long
# wait, and a collective whose last rank is late. The choice follows this
# node's ranks and torch threads against the cores.
torch.set_num_threads(1)
assert dedicate_cores(comm) == (size <= usable_cores())
for dedicated in (True, False):
    _core.comm_set_dedicated(dedicated)
    got = torch.zeros(1000)
    w = irecv(got, left, 11, comm)
    if rank == 0:
        time.sleep(0.05)  # every other rank is blocked in wait() meanwhile
    isend(torch.full((1000,), float(rank)), right, 11, comm).wait()
    w.wait()
    assert torch.equal(got, torch.full((1000,), float(left)))
    late = torch.full((1000,), float(rank))
    if rank == size - 1:
        time.sleep(0.05)
    allreduce(late, comm, "ring").wait()
    assert torch.equal(late, torch.full((1000,), float(sum(range(size)))))
comm.Barrier()
print(f"rank {rank}: ok")
