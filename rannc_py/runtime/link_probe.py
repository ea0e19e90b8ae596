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
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

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
