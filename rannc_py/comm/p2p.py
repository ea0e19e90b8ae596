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
from rannc_py.comm.tensors import check_tensor, nbytes
from rannc_py.comm.work import Work
from rannc_py.errors import ConfigError


def _post(is_send: bool, tensor: torch.Tensor, peer: int, tag: int, comm: Any) -> Work:
    """Check a transfer's arguments, post it to the engine and return its Work."""
    what, role = ("isend", "destination") if is_send else ("irecv", "source")
    t = check_tensor(tensor, f"{what} tensor")
    handle = comm_handle(comm)
    size = comm.Get_size()
    if not 0 <= peer < size:
        raise ConfigError(f"{role} rank {peer} is outside the communicator's ranks 0..{size - 1}")
    ub = _core.comm_tag_ub(handle)
    if not 0 <= tag <= ub:
        raise ConfigError(f"tag {tag} is outside 0..{ub} (MPI_TAG_UB of this MPI)")
    h = start(_core.comm_isend if is_send else _core.comm_irecv, t.data_ptr(), nbytes(t), peer, tag, handle)
    return Work(h, (t,), f"{what} {'to' if is_send else 'from'} rank {peer} (tag {tag})")


def isend(tensor: torch.Tensor, dest: int, tag: int, comm: Any) -> Work:
    """Start sending ``tensor``'s bytes to rank ``dest`` of ``comm``.

    Takes: a contiguous CPU tensor of any dtype (not to be modified until the
    send completes), the destination rank, a tag in ``0..MPI_TAG_UB`` (at
    least ``2**20`` on MPICH and Open MPI), and an mpi4py communicator.
    Returns: a :class:`Work`.
    Raises: ConfigError for a non-contiguous or non-CPU tensor, or a rank or
    tag out of range; CommError if MPI refuses the send.
    """
    return _post(True, tensor, dest, tag, comm)


def irecv(tensor: torch.Tensor, source: int, tag: int, comm: Any) -> Work:
    """Start receiving into ``tensor`` from rank ``source`` of ``comm``.

    Takes: a contiguous CPU tensor whose byte size equals the sender's, the
    source rank, the tag, and an mpi4py communicator.
    Returns: a :class:`Work`; ``wait()`` raises CommError if the sender's size differs.
    Raises: ConfigError for a non-contiguous or non-CPU tensor, or a rank or
    tag out of range; CommError if MPI refuses the receive.
    """
    return _post(False, tensor, source, tag, comm)
