"""MPI set-up for the communication engine: thread level, handles, shutdown."""

from __future__ import annotations

import atexit
import sys
from collections.abc import Callable
from typing import Any

import mpi4py

from rannc_py.errors import CommError, ConfigError

# The engine's progress thread calls MPI concurrently with the caller's thread.
# This only takes effect if mpi4py.MPI has not been imported yet.
if "mpi4py.MPI" not in sys.modules:
    mpi4py.rc.thread_level = "multiple"

from mpi4py import MPI  # must follow the rc setting

from rannc_py import _core
from rannc_py._util import usable_cores

# Stop the progress thread before mpi4py finalises MPI (it does so after the
# atexit handlers have run).
atexit.register(_core.comm_shutdown)

_thread_ok = False


def require_thread_multiple() -> None:
    """Raise CommError unless MPI runs at MPI_THREAD_MULTIPLE."""
    global _thread_ok
    if _thread_ok:
        return
    level = MPI.Query_thread()
    if level != MPI.THREAD_MULTIPLE:
        raise CommError(
            f"rannc_py.comm needs MPI initialised with MPI_THREAD_MULTIPLE, but it runs at level {level}; "
            "import rannc_py.comm before mpi4py.MPI, or set mpi4py.rc.thread_level = 'multiple'"
        )
    _thread_ok = True


def dedicate_cores(comm: Any) -> bool:
    """Tell the engine whether this rank has a core of its own (collective over ``comm``).

    True when this node's ranks of ``comm`` times this process's torch threads
    fit the cores it may use. Then the engine's progress thread keeps polling
    (yielding) while a thread waits on an operation instead of backing off to
    naps of up to a millisecond, so a message
    that ends a long wait (a pipeline stage waiting for its neighbour, a
    collective waiting for the last rank) is noticed at once; on shared cores
    it backs off, leaving them to the ranks that compute. Returns the choice.
    """
    import torch

    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    ranks_here = node.Get_size()
    node.Free()
    dedicated = ranks_here * torch.get_num_threads() <= usable_cores()
    _core.comm_set_dedicated(dedicated)
    return dedicated


def comm_handle(comm: Any) -> int:
    """Return the Fortran handle of an mpi4py communicator, checking it is one.

    Takes: an ``mpi4py.MPI.Comm`` (an intracommunicator).
    Returns: ``comm.py2f()``.
    Raises: ConfigError if ``comm`` is not an mpi4py intracommunicator or is MPI.COMM_NULL.
    """
    if not isinstance(comm, MPI.Intracomm) or comm == MPI.COMM_NULL:
        raise ConfigError(
            f"expected an mpi4py intracommunicator (e.g. MPI.COMM_WORLD), got {comm!r}"
        )
    require_thread_multiple()
    return int(comm.py2f())


def start(fn: Callable[..., Any], *args: Any) -> Any:
    """Call the ``_core`` function ``fn`` that posts MPI work, and return its handle.

    Raises: ConfigError if the engine rejects an argument (the C++ side's
    ``std::invalid_argument``, which pybind11 turns into ValueError; the
    Python wrappers check the same things first); CommError, carrying MPI's
    message, if MPI refuses the call.
    """
    try:
        return fn(*args)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    except RuntimeError as e:
        raise CommError(str(e)) from None
