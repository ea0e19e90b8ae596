"""Communication between ranks: point-to-point and collectives over MPI.

The operations run in the C++ engine of ``rannc_py._core``: each call starts
the communication and returns a :class:`~rannc_py.comm.work.Work` at once; a
background progress thread drives it while Python computes, with the GIL
released, and ``Work.wait()`` blocks until it is done.

MPI threading: the engine's progress thread calls MPI while the caller's
thread may too, so MPI must run at ``MPI_THREAD_MULTIPLE``. Importing any of
the operations below sets ``mpi4py.rc.thread_level = "multiple"`` before it
imports ``mpi4py.MPI`` (mpi4py's default too); a program that initialises MPI
itself at a lower level gets a :class:`rannc_py.CommError` on first use.

``rannc_py.comm.cost`` (the α-β cost formulas) imports no MPI, so the planner
can use it offline; the names here load their modules on first use.
"""

from __future__ import annotations

from rannc_py._lazy import lazy_attributes

_LAZY = {
    "Work": "rannc_py.comm.work",
    "dedicate_cores": "rannc_py.comm._mpi",
    "wait_all": "rannc_py.comm.work",
    "isend": "rannc_py.comm.p2p",
    "irecv": "rannc_py.comm.p2p",
    "allreduce": "rannc_py.comm.collectives",
    "reduce_scatter": "rannc_py.comm.collectives",
    "allgather": "rannc_py.comm.collectives",
    "ALGORITHMS": "rannc_py.comm.cost",
    "GATHER_ALGORITHMS": "rannc_py.comm.cost",
}

__all__ = list(_LAZY)


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY)
