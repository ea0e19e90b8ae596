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
