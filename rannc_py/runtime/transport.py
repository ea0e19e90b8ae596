"""Point-to-point transfers and gradient allreduce for the executor.

Tensors move as raw bytes on their own memory (no pickling); a tensor must be
contiguous and stay alive until its transfer's ``wait`` returns.
"""

from __future__ import annotations

from typing import Protocol

import torch
from mpi4py import MPI

from rannc_py.comm import collectives as comm_collectives
from rannc_py.comm import p2p as comm_p2p


class Work(Protocol):
    """A transfer in flight."""

    def wait(self) -> None:
        """Block until the transfer completes."""


def isend(t: torch.Tensor, dest: int, tag: int, comm: MPI.Comm) -> Work:
    """Start sending ``t`` to rank ``dest`` of ``comm`` (through the C++ engine)."""
    return comm_p2p.isend(t, dest, tag, comm)


def irecv(t: torch.Tensor, source: int, tag: int, comm: MPI.Comm) -> Work:
    """Start receiving into ``t`` (preallocated with the sender's shape and dtype) from ``source``."""
    return comm_p2p.irecv(t, source, tag, comm)


def iallreduce_sum(t: torch.Tensor, comm: MPI.Comm, algorithm: str = "mpi") -> Work:
    """Start summing float32 ``t`` in place across ``comm`` with ``algorithm``
    (one of :data:`rannc_py.comm.cost.ALGORITHMS`; default ``"mpi"``)."""
    return comm_collectives.allreduce(t, comm, algorithm)


def allgather(t: torch.Tensor, out: torch.Tensor, comm: MPI.Comm) -> Work:
    """Start gathering every rank's ``t`` (any dtype) into ``out`` (``ranks x t``'s elements), rank order."""
    return comm_collectives.allgather(t, out, comm)


def wait_all(works: list[Work]) -> None:
    """Wait for every transfer in ``works`` and clear the list."""
    for w in works:
        w.wait()
    works.clear()
