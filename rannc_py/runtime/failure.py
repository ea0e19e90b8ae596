"""A failure on one rank ends every rank, with that rank's message.

Without this, the other ranks would wait forever in a receive or collective
for the rank that raised. With one process there is nobody to wait, so the
exception propagates as usual.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager

from mpi4py import MPI


@contextmanager
def abort_on_error(comm: MPI.Comm, what: str) -> Iterator[None]:
    """Run the body; if it raises on a multi-rank ``comm``, print the traceback
    prefixed with this rank and ``what`` was being done, then abort the job."""
    try:
        yield
    except BaseException:
        if comm.Get_size() == 1:
            raise
        rank = comm.Get_rank()
        text = traceback.format_exc()
        sys.stderr.write(
            f"[rannc_py] rank {rank} failed during {what}; aborting all {comm.Get_size()} ranks\n"
            + "".join(f"[rank {rank}] {line}\n" for line in text.rstrip().splitlines())
        )
        sys.stderr.flush()
        comm.Abort(1)
