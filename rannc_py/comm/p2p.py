"""Nonblocking point-to-point sends and receives of whole tensors.

Any dtype travels as raw bytes, zero-copy from the tensor's own memory. The
MPI call is posted at once by the calling thread; the engine's progress thread
completes it. A receive must name the exact byte size the sender sends.
Messages between two ranks with the same tag on the same communicator arrive
in the order they were sent (MPI's non-overtaking rule).
"""

from __future__ import annotations

from typing import Any

import torch

from rannc_py import _core
from rannc_py.comm._mpi import comm_handle, start
from rannc_py.comm._tensors import check_buffer, nbytes
from rannc_py.comm.work import Work
from rannc_py.errors import ConfigError

MIN_TAG_UB = 2**20  # tags at least up to this are promised to callers


def _check_peer_and_tag(comm: Any, peer: int, tag: int, role: str) -> int:
    handle = comm_handle(comm)
    size = comm.Get_size()
    if not 0 <= peer < size:
        raise ConfigError(f"{role} rank {peer} is outside the communicator's ranks 0..{size - 1}")
    ub = _core.comm_tag_ub(handle)
    if not 0 <= tag <= ub:
        raise ConfigError(f"tag {tag} is outside 0..{ub} (MPI_TAG_UB of this MPI)")
    return handle


def isend(tensor: torch.Tensor, dest: int, tag: int, comm: Any) -> Work:
    """Start sending ``tensor``'s bytes to rank ``dest`` of ``comm``.

    Takes: a contiguous CPU tensor of any dtype (not to be modified until the
    send completes), the destination rank, a tag in ``0..MPI_TAG_UB`` (at
    least ``2**20`` on MPICH and Open MPI), and an mpi4py communicator.
    Returns: a :class:`Work`.
    Raises: ConfigError for a non-contiguous or non-CPU tensor, or a rank or
    tag out of range; CommError if MPI refuses the send.
    """
    t = check_buffer(tensor, "isend tensor")
    handle = _check_peer_and_tag(comm, dest, tag, "destination")
    h = start(_core.comm_isend, t.data_ptr(), nbytes(t), dest, tag, handle)
    return Work(h, (t,), f"isend to rank {dest} (tag {tag})")


def irecv(tensor: torch.Tensor, source: int, tag: int, comm: Any) -> Work:
    """Start receiving into ``tensor`` from rank ``source`` of ``comm``.

    Takes: a contiguous CPU tensor whose byte size equals the sender's, the
    source rank, the tag, and an mpi4py communicator.
    Returns: a :class:`Work`; ``wait()`` raises CommError if the sender's size differs.
    Raises: ConfigError for a non-contiguous or non-CPU tensor, or a rank or
    tag out of range; CommError if MPI refuses the receive.
    """
    t = check_buffer(tensor, "irecv tensor")
    handle = _check_peer_and_tag(comm, source, tag, "source")
    h = start(_core.comm_irecv, t.data_ptr(), nbytes(t), source, tag, handle)
    return Work(h, (t,), f"irecv from rank {source} (tag {tag})")
