"""The ``local`` preset: this machine's devices and links, measured once and cached.

Measures a matmul's FLOP/s and a large copy's memory bandwidth in this
process, and MPI point-to-point latency and bandwidth between two local ranks
(a short ``mpiexec -n 2`` run of :mod:`rannc_py.planner._mpi_probe`). Results
are cached as JSON in the cache directory (``$RANNC_CACHE_DIR``, default
``~/.cache/rannc_py``), keyed by host name and torch thread count, so only the
first call pays the few seconds.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from rannc_py.errors import ConfigError
from rannc_py.planner.cluster import Cluster, Device, Link


def cache_dir() -> Path:
    """The on-disk cache folder: ``$RANNC_CACHE_DIR`` or ``~/.cache/rannc_py`` (created)."""
    d = Path(os.environ.get("RANNC_CACHE_DIR") or Path.home() / ".cache" / "rannc_py")
    d.mkdir(parents=True, exist_ok=True)
    return d


def _median_time(fn, repeats: int = 5) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_compute() -> tuple[float, float]:
    """(fp32 matmul FLOP/s, memory bandwidth in bytes/s) of this process at its torch thread count."""
    n = 512
    a, b = torch.randn(n, n), torch.randn(n, n)
    flops = 2 * n**3 / _median_time(lambda: torch.mm(a, b))
    x = torch.empty(16 * 2**20 // 4)
    y = torch.empty_like(x)
    bw = 2 * x.nbytes / _median_time(lambda: y.copy_(x))  # read + write
    return flops, bw


def measure_mpi(timeout: float = 120) -> tuple[float, float]:
    """(latency seconds, bandwidth bytes/s) between two local MPI ranks.

    Raises:
        ConfigError: mpiexec is missing or the probe fails.
    """
    mpiexec = Path(sys.executable).parent / "mpiexec"
    exe = str(mpiexec) if mpiexec.exists() else shutil.which("mpiexec")
    if not exe:
        raise ConfigError("the 'local' preset measures MPI links but mpiexec was not found; "
                          "install MPI (pip install mpich mpi4py)")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [exe, "-n", "2", sys.executable, "-m", "rannc_py.planner._mpi_probe"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, check=True)
    except (subprocess.SubprocessError, OSError) as e:
        raise ConfigError(f"MPI link probe failed ({e}); check that `{' '.join(cmd)}` runs") from e
    data = json.loads(out.stdout.strip().splitlines()[-1])
    return float(data["latency"]), float(data["bandwidth"])


def local_cluster(ranks: int, *, memory: int | None = None, name: str = "local") -> Cluster:
    """A :class:`Cluster` of ``ranks`` processes on this machine, from cached or fresh measurements.

    Args:
        ranks: number of MPI ranks to plan for.
        memory: bytes per rank; default: physical memory divided by ``ranks``.
        name: label stored in the cluster.
    Raises:
        ConfigError: the MPI probe fails.
    """
    key = f"{platform.node()}-t{torch.get_num_threads()}"
    path = cache_dir() / f"local-calibration-{key}.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        flops, bw = measure_compute()
        lat, net_bw = measure_mpi()
        data = {"flops": flops, "memory_bandwidth": bw, "latency": lat, "bandwidth": net_bw}
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, path)
    if memory is None:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // ranks
    dev = Device("local", (("float32", data["flops"]),), memory, data["memory_bandwidth"])
    link = Link(data["bandwidth"], data["latency"])
    return Cluster(name, dev, ranks, ranks, link, link, "switched")
