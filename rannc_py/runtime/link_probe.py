"""The link as the runtime's transfers see it: measured through its communication engine.

:class:`EngineMessenger` posts :func:`rannc_py.hardware.calibrate.measure_link`'s
messages with :mod:`rannc_py.comm.p2p`, so latency, bandwidth and the
per-message posting cost include the engine's own (its progress thread, the
handles, the Python call), which is what a pipeline's sends and receives
pay. Run as ``mpiexec -n 2 python -m rannc_py.runtime.link_probe`` it prints
the figures as JSON on rank 0 (the ``local`` preset's probe outside a job).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from rannc_py._util import median_time
from rannc_py.comm import dedicate_cores, p2p
from rannc_py.comm.work import Work
from rannc_py.hardware.calibrate import measure_link
from rannc_py.hardware.device import Link


@dataclass(frozen=True)
class EngineMessenger:
    """Posts through the runtime's engine on ``comm`` (a :class:`~rannc_py.hardware.calibrate.Messenger`)."""

    comm: Any

    def post(self, buf: np.ndarray, peer: int, tag: int, send: bool) -> Work:
        t = torch.from_numpy(buf)  # shares the array's memory
        return p2p.isend(t, peer, tag, self.comm) if send else p2p.irecv(t, peer, tag, self.comm)


def engine_link(comm: Any) -> Link:
    """:func:`~rannc_py.hardware.calibrate.measure_link` through the engine (collective over ``comm``)."""
    return measure_link(comm, EngineMessenger(comm))


# Rounds of the contention probe, and the length of each rank's compute between messages (seconds):
# a few scheduler time slices in all, so that descheduled neighbours show in the average.
CONTENDED_ROUNDS = 24
_BURST = 2e-3


def contended_latency(comm: Any) -> float:
    """Seconds one message round costs when every rank of ``comm`` computes between messages (collective).

    For ranks that share cores (more ranks x threads than the machine has):
    a message then waits for its sender to be scheduled, which no ping-pong
    between two otherwise idle ranks shows. Every rank alternates a compute
    burst (``_BURST``) with a ring exchange of one small message through the
    engine, ``CONTENDED_ROUNDS`` times; the same bursts are timed without the
    exchanges; the slowest rank's extra time per round is returned (the same
    on every rank).
    """
    from mpi4py import MPI

    rank, size = comm.Get_rank(), comm.Get_size()
    a = torch.randn(96, 96)
    reps = max(1, round(_BURST / max(1e-7, median_time(lambda: a @ a, 5))))

    def burst() -> None:
        for _ in range(reps):
            a @ a

    def loop(exchange: bool) -> float:
        out, got = torch.zeros(1), torch.zeros(1)
        comm.Barrier()
        t0 = time.perf_counter()
        for k in range(CONTENDED_ROUNDS):
            burst()
            if exchange:
                works = [p2p.irecv(got, (rank - 1) % size, k, comm), p2p.isend(out, (rank + 1) % size, k, comm)]
                for w in works:
                    w.wait()
        return (time.perf_counter() - t0) / CONTENDED_ROUNDS

    alone = loop(False)
    extra = loop(True) - alone
    return max(0.0, float(comm.allreduce(extra, op=MPI.MAX)))


def main() -> None:
    """Measure the link between two ranks and print it as JSON on rank 0."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD.Dup()
    dedicate_cores(comm)  # the engine waits as it will in a job on these ranks
    link = engine_link(comm)
    if comm.Get_rank() == 0:
        print(json.dumps({"latency": link.latency, "bandwidth": link.bandwidth, "overhead": link.overhead}))
    comm.Free()


if __name__ == "__main__":
    main()
