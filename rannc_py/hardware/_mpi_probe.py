"""Run under ``mpiexec -n 2``: print MPI ping-pong latency and bandwidth as JSON (rank 0)."""

from __future__ import annotations

import json

from mpi4py import MPI

from rannc_py.hardware.calibrate import measure_link


def main() -> None:
    """Measure the link between the two ranks and print it as JSON on rank 0."""
    link = measure_link(MPI.COMM_WORLD)
    if MPI.COMM_WORLD.Get_rank() == 0:
        print(json.dumps({"latency": link.latency, "bandwidth": link.bandwidth}))


if __name__ == "__main__":
    main()
