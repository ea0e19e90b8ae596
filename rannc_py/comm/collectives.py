"""Nonblocking collectives on float32 tensors (allgather: any dtype).

Each call starts the collective and returns a :class:`Work`; the engine's
progress thread runs it while Python computes. Collectives on one
communicator run one after another in call order (every rank must issue them
in the same order, as with MPI); collectives on different communicators run
concurrently.

Algorithms (``ALGORITHMS``), all summing float32 in place:

- ``"mpi"``: the MPI library's own ``MPI_Iallreduce`` (the default).
- ``"ring"``: reduce-scatter then allgather around a ring (Patarasuk & Yuan 2009).
- ``"halving_doubling"``: recursive halving then doubling (Rabenseifner 2004;
  Thakur et al. 2005), any rank count.
- ``"torus"``: ranks as a row-major grid ``torus_shape`` (e.g. ``(2, 2, 2)``);
  a ring reduce-scatter along each dimension in turn on a shrinking part, then
  allgathers in reverse order, the dimension-wise scheme used on Tofu.

``reduce_scatter`` and ``allgather`` take ``GATHER_ALGORITHMS``: ``"mpi"``,
``"ring"`` and ``"torus"``, whose reduce-scatter is the torus allreduce's
first half (rank i's last part is its block i: the blocks split evenly at
every dimension, row-major) and whose allgather is its second half.

Agreement check (``check=True``, the default): before moving data, the ranks
compare element count, algorithm and torus shape with one small
``MPI_Iallreduce`` of six integers (one extra latency, a few microseconds on
a node, about ``2·log2(p)·α`` across nodes). A mismatch then raises
ConfigError from ``wait()`` on every rank. With ``check=False`` that round trip
is saved, and mismatched sizes give undefined results or a hang.

Segmenting: the step-based algorithms cut each message into pieces of at most
``segment_bytes`` (default 1 MiB) so that summing a piece overlaps the
transfer of the next ones.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from rannc_py import _core
from rannc_py.comm._mpi import comm_handle, start
from rannc_py.comm.cost import ALGORITHMS, GATHER_ALGORITHMS, grid_shape
from rannc_py.comm.tensors import check_tensor, nbytes
from rannc_py.comm.work import Work
from rannc_py.errors import ConfigError

DEFAULT_SEGMENT_BYTES = 1 << 20
_MAX_SEGMENT_BYTES = 1 << 30
_INT_MAX = 2**31 - 1


def _check_segment(segment_bytes: int) -> None:
    if not 4 <= segment_bytes <= _MAX_SEGMENT_BYTES:
        raise ConfigError(f"segment_bytes must be in 4..{_MAX_SEGMENT_BYTES}, got {segment_bytes}")


def _check_algorithm(algorithm: str, allowed: Sequence[str], what: str) -> None:
    if algorithm not in allowed:
        raise ConfigError(f"{what}: unknown algorithm {algorithm!r}; choose one of {list(allowed)}")


def _check_mpi_count(algorithm: str, count: int, what: str) -> None:
    if algorithm == "mpi" and count > _INT_MAX:
        raise ConfigError(
            f"{what}: {count} elements exceed MPI's per-call count limit {_INT_MAX}; use algorithm='ring'"
        )


def _check_blocks(what: str, names: tuple[str, str], whole: torch.Tensor, block: torch.Tensor, comm: Any,
                  algorithm: str, segment_bytes: int) -> int:
    """Checks shared by reduce_scatter and allgather, where ``whole`` holds one ``block`` per rank.

    ``names`` are the two tensors' names in ``what``'s messages. Returns the
    communicator's handle.
    """
    _check_algorithm(algorithm, GATHER_ALGORITHMS, what)
    _check_segment(segment_bytes)
    handle = comm_handle(comm)
    p = comm.Get_size()
    if whole.numel() != p * block.numel():
        raise ConfigError(
            f"{what}: {names[0]} has {whole.numel()} elements, expected ranks × {names[1]} = {p} × {block.numel()}"
        )
    return handle


def _torus_grid(algorithm: str, torus_shape: Sequence[int] | None, size: int) -> list[int]:
    """The torus algorithm's grid over ``size`` ranks (default :func:`grid_shape`); [] for the others."""
    if algorithm != "torus":
        if torus_shape is not None:
            raise ConfigError(f"torus_shape is only used by algorithm='torus', got it with {algorithm!r}")
        return []
    shape = list(torus_shape) if torus_shape is not None else list(grid_shape(size))
    if any(not isinstance(d, int) or d < 1 for d in shape):
        raise ConfigError(f"torus_shape sides must be positive integers, got {tuple(shape)}")
    prod = math.prod(shape)
    if not shape or prod != size:
        raise ConfigError(
            f"torus_shape {tuple(shape)} has {prod} cells but the communicator has {size} ranks; "
            "give a shape whose product is the rank count"
        )
    return shape


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    a0, b0 = a.data_ptr(), b.data_ptr()
    return a0 < b0 + nbytes(b) and b0 < a0 + nbytes(a) and nbytes(a) > 0 and nbytes(b) > 0


def allreduce(
    tensor: torch.Tensor,
    comm: Any,
    algorithm: str = "mpi",
    torus_shape: Sequence[int] | None = None,
    *,
    check: bool = True,
    segment_bytes: int = DEFAULT_SEGMENT_BYTES,
) -> Work:
    """Start summing a float32 tensor across the ranks of ``comm``, in place.

    Takes: a contiguous CPU float32 tensor of the same number of elements on
    every rank (not to be read or written until the work completes); an mpi4py
    communicator; an algorithm from ``ALGORITHMS``; for ``"torus"``, the grid
    ``torus_shape`` whose product is the rank count (default: the most nearly
    cubic three-dimensional grid, see :func:`rannc_py.comm.cost.grid_shape`);
    ``check`` and ``segment_bytes`` as in the module docstring.
    Returns: a :class:`Work`; after ``wait()`` every rank's tensor holds the sum.
    Raises: ConfigError for a bad tensor, algorithm, torus shape or segment
    size (at once), or ranks that disagree (from ``wait()``); CommError if MPI fails.
    """
    t = check_tensor(tensor, "allreduce tensor", torch.float32)
    _check_algorithm(algorithm, ALGORITHMS, "allreduce")
    _check_segment(segment_bytes)
    _check_mpi_count(algorithm, t.numel(), "allreduce")
    handle = comm_handle(comm)
    shape = _torus_grid(algorithm, torus_shape, comm.Get_size())
    h = start(_core.comm_allreduce, t.data_ptr(), t.numel(), handle, algorithm, shape, check, segment_bytes)
    return Work(h, (t,), f"allreduce ({algorithm}, {t.numel()} elements)")


def reduce_scatter(
    input: torch.Tensor,
    output: torch.Tensor,
    comm: Any,
    algorithm: str = "mpi",
    torus_shape: Sequence[int] | None = None,
    *,
    check: bool = True,
    segment_bytes: int = DEFAULT_SEGMENT_BYTES,
) -> Work:
    """Start a float32 sum reduce-scatter: rank i gets the sum of block i.

    Takes: ``input``, a contiguous CPU float32 tensor of ``p * m`` elements
    viewed as p consecutive blocks of m (p = ranks of ``comm``), left
    unchanged; ``output``, a contiguous CPU float32 tensor of m elements; an
    algorithm from ``GATHER_ALGORITHMS`` (``"mpi"``: MPI_Ireduce_scatter_block,
    ``"ring"``: a ring, ``"torus"``: a ring along each dimension of
    ``torus_shape`` in turn (default as for :func:`allreduce`); the last two
    work on a copy of ``input``).
    Returns: a :class:`Work`; afterwards ``output`` on rank i equals
    ``sum over ranks of input.view(p, m)[i]``.
    Raises: ConfigError for bad tensors, sizes or torus shape (at once) or
    ranks that disagree on m or the shape (from ``wait()``); CommError if MPI fails.
    """
    i = check_tensor(input, "reduce_scatter input", torch.float32)
    o = check_tensor(output, "reduce_scatter output", torch.float32)
    handle = _check_blocks("reduce_scatter", ("input", "output"), i, o, comm, algorithm, segment_bytes)
    if _overlap(i, o):
        raise ConfigError("reduce_scatter: output overlaps input; pass separate tensors")
    _check_mpi_count(algorithm, o.numel(), "reduce_scatter")
    shape = _torus_grid(algorithm, torus_shape, comm.Get_size())
    h = start(_core.comm_reduce_scatter, i.data_ptr(), o.data_ptr(), o.numel(), handle, algorithm, shape, check,
              segment_bytes)
    return Work(h, (i, o), f"reduce_scatter ({algorithm}, {o.numel()} elements per rank)")


def allgather(
    input: torch.Tensor,
    output: torch.Tensor,
    comm: Any,
    algorithm: str = "mpi",
    torus_shape: Sequence[int] | None = None,
    *,
    check: bool = True,
    segment_bytes: int = DEFAULT_SEGMENT_BYTES,
) -> Work:
    """Start gathering every rank's ``input`` into every rank's ``output``.

    Takes: ``input``, a contiguous CPU tensor of m elements of any dtype;
    ``output``, a contiguous CPU tensor of the same dtype with ``p * m``
    elements (``input`` may be the rank's own block of ``output``); an
    algorithm from ``GATHER_ALGORITHMS`` and, for ``"torus"``, its
    ``torus_shape`` (as for :func:`reduce_scatter`).
    Returns: a :class:`Work`; afterwards ``output.view(p, m)[i]`` is rank i's input.
    Raises: ConfigError for bad tensors, sizes or torus shape (at once) or
    ranks that disagree on m or the shape (from ``wait()``); CommError if MPI fails.
    """
    i = check_tensor(input, "allgather input")
    o = check_tensor(output, "allgather output", i.dtype)
    handle = _check_blocks("allgather", ("output", "input"), o, i, comm, algorithm, segment_bytes)
    own_block = o.data_ptr() + comm.Get_rank() * nbytes(i)
    if _overlap(i, o) and i.data_ptr() != own_block:
        raise ConfigError("allgather: input overlaps output other than as this rank's own block")
    _check_mpi_count(algorithm, nbytes(i), "allgather")
    shape = _torus_grid(algorithm, torus_shape, comm.Get_size())
    h = start(_core.comm_allgather, i.data_ptr(), o.data_ptr(), nbytes(i), handle, algorithm, shape, check,
              segment_bytes)
    return Work(h, (i, o), f"allgather ({algorithm}, {i.numel()} elements per rank)")
