"""Run under ``mpiexec -n 2``: print MPI ping-pong latency and bandwidth as JSON (rank 0)."""

from __future__ import annotations

import json
import statistics
import time

import numpy as np
from mpi4py import MPI


def _pingpong(comm: MPI.Comm, buf: np.ndarray, repeats: int) -> float:
    rank = comm.Get_rank()
    times = []
    for _ in range(repeats):
        comm.Barrier()
        t0 = time.perf_counter()
        if rank == 0:
            comm.Send(buf, dest=1)
            comm.Recv(buf, source=1)
        else:
            comm.Recv(buf, source=0)
            comm.Send(buf, dest=0)
        times.append((time.perf_counter() - t0) / 2)
    return statistics.median(times)


def main() -> None:
    comm = MPI.COMM_WORLD
    small = np.zeros(1, dtype=np.uint8)
    big = np.zeros(8 * 2**20, dtype=np.uint8)
    latency = _pingpong(comm, small, 50)
    t_big = _pingpong(comm, big, 5)
    if comm.Get_rank() == 0:
        bandwidth = big.nbytes / max(t_big - latency, 1e-9)
        print(json.dumps({"latency": latency, "bandwidth": bandwidth}))


if __name__ == "__main__":
    main()
