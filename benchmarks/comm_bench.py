"""Allreduce bus bandwidth of every algorithm beside MPI_Allreduce and the cost model.

Launches itself under ``mpiexec -n P`` for each rank count. Each launch first
measures this machine's point-to-point latency α and bandwidth β (ping-pong
through rannc_py.comm) and the reduction cost γ (a float32 add, seconds per
byte), then times ``rannc_py.comm.allreduce`` with each algorithm on buffers
from 4 KiB to 64 MiB and prints, beside every measured point, the bus
bandwidth that ``rannc_py.comm.cost.allreduce_time`` predicts from α, β and γ.
Bus bandwidth is nccl-tests' figure: bytes / time · 2(p−1)/p. The table is
also written to ``benchmarks/results/comm.md``.

    python benchmarks/comm_bench.py [--ranks 2 4] [--min-bytes 4096] [--max-bytes 67108864] [--seconds 0.3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

BASELINE = "MPI_Allreduce"  # blocking, through mpi4py: the reference point
ALGOS = ("mpi", "ring", "halving_doubling", "torus")
COLUMNS = (BASELINE, *ALGOS)


def _pingpong(comm, nbytes: int, iters: int) -> float:
    """One-way seconds of an nbytes MPI message between ranks 0 and 1 (others idle)."""
    import numpy as np

    buf = np.zeros(nbytes, dtype=np.uint8)
    rank = comm.Get_rank()
    comm.Barrier()
    start = time.perf_counter()
    for _ in range(iters):
        if rank == 0:
            comm.Send(buf, 1)
            comm.Recv(buf, 1)
        elif rank == 1:
            comm.Recv(buf, 0)
            comm.Send(buf, 0)
    return (time.perf_counter() - start) / (2 * iters)


def _time_allreduce(comm, n_floats: int, algo: str, shape, seconds: float) -> float:
    """Median seconds of one allreduce (slowest rank), repeated for about ``seconds``."""
    import torch
    from mpi4py import MPI

    from rannc_py.comm import allreduce

    t = torch.ones(n_floats)

    def once() -> None:
        if algo == BASELINE:
            comm.Allreduce(MPI.IN_PLACE, t.numpy(), op=MPI.SUM)
        else:
            allreduce(t, comm, algo, shape).wait()

    once()  # warm-up: communicator set-up, page faults
    samples: list[float] = []
    budget_end = time.perf_counter() + seconds
    while True:
        comm.Barrier()
        start = time.perf_counter()
        once()
        samples.append(comm.allreduce(time.perf_counter() - start, op=MPI.MAX))
        # Every rank must take the same decision to stop.
        if comm.bcast(len(samples) >= 50 or (len(samples) >= 3 and time.perf_counter() > budget_end), root=0):
            break
    return statistics.median(samples)


def worker(args: argparse.Namespace) -> None:
    """Run on every rank of one launch; rank 0 prints one JSON line."""
    import torch

    # Importing an operation loads the engine, which sets the MPI thread level before mpi4py.MPI.
    from rannc_py.comm import allreduce  # noqa: F401

    # isort: split
    from mpi4py import MPI

    from rannc_py.comm.cost import allreduce_time, grid_shape

    comm = MPI.COMM_WORLD
    p = comm.Get_size()
    alpha = comm.bcast(_pingpong(comm, 8, 200), root=0)
    big = 16 << 20
    beta = comm.bcast(big / max(_pingpong(comm, big, 5) - alpha, 1e-9), root=0)
    a, b = torch.ones(big // 4), torch.ones(big // 4)
    start = time.perf_counter()
    for _ in range(5):
        a.add_(b)
    gamma = comm.bcast((time.perf_counter() - start) / (5 * big), root=0)
    shape = grid_shape(p)
    rows: list[dict] = []
    nbytes = args.min_bytes
    while nbytes <= args.max_bytes:
        row = {"bytes": nbytes}
        for algo in COLUMNS:
            s = shape if algo == "torus" else None
            t = _time_allreduce(comm, nbytes // 4, algo, s, args.seconds)
            model = "mpi" if algo == BASELINE else algo
            pred = allreduce_time(model, nbytes, p, alpha=alpha, beta=beta, torus_shape=s, gamma=gamma)
            row[algo] = (t, pred)
        rows.append(row)
        nbytes *= 4
    if comm.Get_rank() == 0:
        print(json.dumps({"ranks": p, "alpha": alpha, "beta": beta, "gamma": gamma, "shape": shape, "rows": rows}))


def busbw(nbytes: int, p: int, seconds: float) -> float:
    """nccl-tests' bus bandwidth in GB/s."""
    return nbytes / seconds * 2 * (p - 1) / p / 1e9 if seconds > 0 else float("inf")


def table(res: dict) -> list[str]:
    p = res["ranks"]
    lines = [
        f"### {p} ranks (torus shape {'x'.join(map(str, res['shape']))})",
        "",
        (
            f"Measured here: α = {res['alpha'] * 1e6:.2f} µs, β = {res['beta'] / 1e9:.2f} GB/s, "
            f"γ = {res['gamma'] * 1e9:.3f} ns/byte."
        ),
        "",
        "Bus bandwidth GB/s, measured (cost model's prediction):",
        "",
        "| size | " + " | ".join(COLUMNS) + " |",
        "|---:|" + "---:|" * len(COLUMNS),
    ]
    for row in res["rows"]:
        n = row["bytes"]
        size = f"{n >> 20} MiB" if n >= 1 << 20 else f"{n >> 10} KiB"
        cells = [f"{busbw(n, p, row[a][0]):.2f} ({busbw(n, p, row[a][1]):.2f})" for a in COLUMNS]
        lines.append(f"| {size} | " + " | ".join(cells) + " |")
    return lines


def _mpi_version() -> str:
    """The MPI library's one-line version, asked of a fresh process so this one never initialises MPI."""
    code = "from mpi4py import MPI; print(MPI.Get_library_version().splitlines()[0])"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    return proc.stdout.strip()


def main() -> None:
    """Parse arguments; launch one mpiexec per rank count, print and write the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--min-bytes", type=int, default=4 << 10)
    parser.add_argument("--max-bytes", type=int, default=64 << 20)
    parser.add_argument("--seconds", type=float, default=0.3, help="time spent per measured point")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/comm.md")
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    mpiexec = Path(sys.executable).parent / "mpiexec"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    passthrough = ["--min-bytes", str(args.min_bytes), "--max-bytes", str(args.max_bytes),
                   "--seconds", str(args.seconds)]
    lines = [
        "# Communication benchmark",
        "",
        (
            f"Allreduce of float32 buffers through `rannc_py.comm.allreduce` on local ranks; "
            f"{platform.machine()}, {os.cpu_count()} CPUs, MPI {_mpi_version()}."
        ),
        (
            "Each point is the median over repetitions of the slowest rank's time. `MPI_Allreduce` is the "
            "blocking library call through mpi4py; the other columns are `rannc_py.comm.allreduce` with that "
            "algorithm (nonblocking, driven by the progress thread). The prediction is "
            "`rannc_py.comm.cost.allreduce_time` (`\"mpi\"` for MPI_Allreduce) with α, β (MPI ping-pong) and γ "
            "(a float32 add) measured in the same launch."
        ),
        (
            f"Load average when the run started: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs "
            "(ranks above the core count, or other load, make small-message times scheduler-bound)."
        ),
        "",
        f"Command: `python benchmarks/comm_bench.py {' '.join(sys.argv[1:])}`",
        "",
    ]
    for p in args.ranks:
        cmd = [str(mpiexec), "-n", str(p), sys.executable, __file__, "--worker", *passthrough]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, check=False)
        if proc.returncode != 0:  # say why, rather than a table of nothing
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
            raise SystemExit(f"the {p}-rank launch failed (exit {proc.returncode}):\n{tail}")
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        section = table(res)
        print("\n".join(section) + "\n")
        lines += [*section, ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
