"""The ``local`` preset: this machine's devices and links, measured once and cached.

Measures a matmul's FLOP/s (fp32, and bf16 and fp16, whose rates on a CPU
can be far from fp32's) and a large copy's memory bandwidth in this
process, the runtime's fixed costs (:func:`measure_overheads`), and the MPI
point-to-point latency, bandwidth and per-message posting cost between two ranks.
Inside an MPI job the link is measured by the job's own ranks
(:func:`measure_link`, collective; the runtime does this before planning);
outside one (the CLI, ``rannc_py.plan``) by a short ``mpiexec -n 2`` run of
:mod:`rannc_py.runtime.link_probe` (:func:`measure_mpi`). A one-rank cluster
never communicates and measures no link. Results are cached as JSON in the
cache directory (``$RANNC_CACHE_DIR``, default ``~/.cache/rannc_py``), keyed by
host name and torch thread count, so only the first call pays the few seconds.

Oversubscription: the figures are measured by one process at its torch
thread count. When the job runs more ranks x threads than this process may
use cores (``os.sched_getaffinity``), the ranks share them, so each rank's
device gets ``cores / (ranks x threads)`` of the measured compute and memory
bandwidth (:func:`core_share`).
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
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from rannc_py._util import atomic_write, cache_dir, median_time, usable_cores
from rannc_py.errors import ConfigError
from rannc_py.hardware.device import Link

# Message sizes of the ping-pong: the smallest gives the latency, the slope
# between the smallest and the largest the bandwidth.
LINK_SIZES = (8, 2**16, 2**20, 2**23)
# Round trips per size (median kept); large messages need fewer to be stable.
LINK_REPEATS = (50, 20, 10, 5)


def _cache_path() -> Path:
    # "cpu": compute figures timed on CPU time at one thread (older files: wall clock);
    # "v2": link latency from the fastest round trips, with the message overhead (older: medians).
    return cache_dir() / f"local-calibration-cpu-v2-{platform.node()}-t{torch.get_num_threads()}.json"


def _read_cache() -> dict[str, float]:
    try:
        data = json.loads(_cache_path().read_text())
    except (OSError, ValueError):
        return {}
    return {k: float(v) for k, v in data.items()} if isinstance(data, dict) else {}


def _write_cache(data: dict[str, float]) -> None:
    atomic_write(_cache_path(), json.dumps(data))  # concurrent jobs on one host never read half a file


def core_share(ranks: int, threads: int | None = None) -> float:
    """Fraction of one rank's measured speed it keeps when ``ranks`` ranks of ``threads``
    torch threads (default: this process's count) share this machine's cores: at most 1.
    """
    threads = torch.get_num_threads() if threads is None else threads
    return min(1.0, usable_cores() / max(1, ranks * threads))


# Half-precision dtypes whose matmul rate the local preset measures besides fp32's (planning a bf16
# or fp16 model needs its own figure: on CPUs they can be several times faster or slower than fp32).
HALF_DTYPES = ("bfloat16", "float16")


def measure_matmul(dtype: torch.dtype = torch.float32, n: int = 512) -> float:
    """FLOP/s of an ``n`` x ``n`` matmul in ``dtype`` in this process (median, :func:`median_time`)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return 2 * n**3 / median_time(lambda: torch.mm(a, b))


def measure_compute() -> tuple[float, float]:
    """(fp32 matmul FLOP/s, memory bandwidth in bytes/s) of this process at its torch thread count."""
    flops = measure_matmul(torch.float32)
    x = torch.empty(16 * 2**20 // 4)
    y = torch.empty_like(x)
    bw = 2 * x.nbytes / median_time(lambda: y.copy_(x))  # read + write
    return flops, bw


# The runtime's fixed costs the local preset measures (seconds; see Device).
OVERHEADS = ("action_overhead", "tensor_overhead", "step_overhead")
# Parameter tensors of the per-tensor probe.
_TENSORS = 64


def measure_overheads() -> dict[str, float]:
    """The runtime's fixed costs on this machine, by :data:`OVERHEADS` name (seconds, CPU time).

    - ``action_overhead``: what every compute action pays whatever its size
      (module calls, autograd's graph and engine start): half of one forward
      and backward of a one-element linear layer, plus the executor's own
      bookkeeping per action, taken as one whole such pair; so 1.5 pairs;
    - ``tensor_overhead``: per parameter tensor, an AdamW step, a gradient
      accumulation, a norm and a zeroing of ``_TENSORS`` one-element tensors,
      over their count (the per-tensor work of a step besides bytes);
    - ``step_overhead``: a step's fixed Python work besides its collectives:
      flattening and rebuilding a call's arguments and outputs, and one
      autograd backward through a scalar (the returned loss's).
    """
    import torch.utils._pytree as pytree

    layer = torch.nn.Linear(1, 1)
    x = torch.ones(1, 1)

    def action() -> None:
        layer(x.requires_grad_()).sum().backward()

    params = [torch.nn.Parameter(torch.zeros(1)) for _ in range(_TENSORS)]
    for prm in params:
        prm.grad = torch.ones(1)
    opt = torch.optim.AdamW(params)
    held = [torch.ones(1) for _ in params]

    def per_tensor() -> None:
        with torch.no_grad():
            for prm, g in zip(params, held):
                assert prm.grad is not None
                prm.grad.add_(g)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=False)

    call = ((torch.ones(2, 2),), {"input_ids": torch.ones(2, 2), "labels": torch.ones(2, 2)})
    loss = torch.ones((), requires_grad=True)

    def step() -> None:
        leaves, spec = pytree.tree_flatten(call)
        pytree.tree_unflatten(leaves, spec)
        (loss * 1.0).backward()

    return {"action_overhead": 1.5 * median_time(action, 20),
            "tensor_overhead": median_time(per_tensor, 10) / _TENSORS,
            "step_overhead": median_time(step, 20)}


class Messenger(Protocol):
    """How :func:`measure_link` moves bytes: ``post`` starts a nonblocking send (``send=True``) or
    receive of a uint8 array to or from ``peer`` with ``tag`` and returns something with ``wait()``."""

    def post(self, buf: np.ndarray, peer: int, tag: int, send: bool) -> Any: ...


@dataclass(frozen=True)
class MPIMessenger:
    """mpi4py's own nonblocking calls on ``comm``."""

    comm: Any

    def post(self, buf: np.ndarray, peer: int, tag: int, send: bool) -> Any:
        return self.comm.Isend(buf, dest=peer, tag=tag) if send else self.comm.Irecv(buf, source=peer, tag=tag)


def _pingpong(comm: Any, msg: Messenger, buf: np.ndarray, repeats: int) -> float:
    """One-way seconds of ``buf`` between ranks 0 and 1, from the fastest quarter of ``repeats``
    round trips (their median): a round trip another process delayed says nothing of the link.
    Other ranks only meet the barriers."""
    rank = comm.Get_rank()
    times = []
    for _ in range(repeats):
        comm.Barrier()
        t0 = time.perf_counter()
        if rank in (0, 1):
            peer = 1 - rank
            for send in ((True, False) if rank == 0 else (False, True)):
                msg.post(buf, peer, 0, send).wait()
        times.append((time.perf_counter() - t0) / 2)
    times.sort()
    return statistics.median(times[: max(1, len(times) // 4)])


# Messages posted per timing of the posting cost.
POSTS = 64


def _post_cost(comm: Any, msg: Messenger) -> float:
    """Seconds rank 0 spends posting one nonblocking send or receive to rank 1 (median of rounds)."""
    rank = comm.Get_rank()
    bufs = [np.zeros(8, dtype=np.uint8) for _ in range(POSTS)]
    half = POSTS // 2
    rounds = []
    for _ in range(5):
        comm.Barrier()
        reqs = []
        if rank in (0, 1):
            t0 = time.perf_counter()
            # rank 0 sends the first half and receives the second; rank 1 the other way round
            reqs = [msg.post(b, 1 - rank, k % half, (k < half) == (rank == 0)) for k, b in enumerate(bufs)]
            if rank == 0:
                rounds.append((time.perf_counter() - t0) / POSTS)
        for r in reqs:
            r.wait()
    return statistics.median(rounds) if rounds else 0.0


def measure_link(comm: Any, messenger: Messenger | None = None) -> Link:
    """Measure the link between ranks 0 and 1 of the mpi4py communicator ``comm`` (collective).

    Ranks 0 and 1 ping-pong messages of ``LINK_SIZES`` bytes (``LINK_REPEATS``
    round trips each, the fastest quarter kept); every other rank only joins
    the barriers. Latency is the smallest message's one-way time; bandwidth
    the slope between the smallest and the largest; the overhead is what
    rank 0 spends posting one of ``POSTS`` small messages.

    Args:
        comm: the communicator.
        messenger: how messages move; default mpi4py's calls
            (:class:`MPIMessenger`). The runtime passes its own engine's, so
            the figures are those its transfers see.
    Returns:
        The same :class:`Link` on every rank (broadcast from rank 0).
    Raises:
        ConfigError: ``comm`` has fewer than two ranks.
    """
    if comm.Get_size() < 2:
        raise ConfigError(f"measuring a link needs two ranks; the communicator has {comm.Get_size()}")
    msg = MPIMessenger(comm) if messenger is None else messenger
    times = [_pingpong(comm, msg, np.zeros(n, dtype=np.uint8), r) for n, r in zip(LINK_SIZES, LINK_REPEATS)]
    latency = times[0]
    bandwidth = (LINK_SIZES[-1] - LINK_SIZES[0]) / max(times[-1] - times[0], 1e-9)
    post = _post_cost(comm, msg)
    latency, bandwidth, post = comm.bcast((latency, bandwidth, post) if comm.Get_rank() == 0 else None, root=0)
    return Link(bandwidth, latency, post)


def measure_mpi(timeout: float = 120) -> Link:
    """The link between two local MPI ranks, from a nested ``mpiexec -n 2``.

    For use outside an MPI job; inside one use :func:`measure_link`.

    Raises:
        ConfigError: mpiexec is missing or the probe fails.
    """
    mpiexec = Path(sys.executable).parent / "mpiexec"
    exe = str(mpiexec) if mpiexec.exists() else shutil.which("mpiexec")
    if not exe:
        raise ConfigError("the 'local' preset measures MPI links but mpiexec was not found; "
                          "install MPI (pip install mpich mpi4py)")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # The probe measures through the runtime's communication engine, as a job's ranks do.
    cmd = [exe, "-n", "2", sys.executable, "-m", "rannc_py.runtime.link_probe"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, check=True)
    except (subprocess.SubprocessError, OSError) as e:
        raise ConfigError(f"MPI link probe failed ({e}); check that `{' '.join(cmd)}` runs") from e
    data = json.loads(out.stdout.strip().splitlines()[-1])
    return Link(float(data["bandwidth"]), float(data["latency"]), float(data["overhead"]))


def cached_link() -> Link | None:
    """The cached link figures of this host, or None when none were measured yet."""
    data = _read_cache()
    if "latency" not in data or "bandwidth" not in data:
        return None
    return Link(data["bandwidth"], data["latency"], data.get("message_overhead", 0.0))


def local_figures(ranks: int, link: Link | None = None) -> dict[str, float]:
    """This machine's figures for the ``local`` preset: ``flops`` (fp32), ``flops_bfloat16``,
    ``flops_float16``, ``memory_bandwidth``, the runtime's fixed costs
    (:data:`OVERHEADS`) and, when known, ``latency``, ``bandwidth`` and
    ``message_overhead`` of the link between two local ranks.

    Read from the cache; what is missing is measured and cached: the compute
    figures here, the link by a nested ``mpiexec`` probe (:func:`measure_mpi`)
    when ``ranks`` > 1. ``link``: figures measured by the caller (the job's
    own ranks, :func:`measure_link`), which replace the cached ones.

    Raises:
        ConfigError: the MPI probe fails.
    """
    with torch.random.fork_rng():  # measuring draws random numbers; the caller's stream stays as it was
        data, changed = _local_compute_figures()
    if link is None and ranks > 1 and ("latency" not in data or "bandwidth" not in data):
        link = measure_mpi()
    if link is not None:
        data["latency"], data["bandwidth"], data["message_overhead"] = link.latency, link.bandwidth, link.overhead
        changed = True
    if changed:
        _write_cache(data)
    return data


def _local_compute_figures() -> tuple[dict[str, float], bool]:
    """The cached figures with the missing compute ones measured; and whether any was."""
    data = _read_cache()
    changed = False
    if "flops" not in data or "memory_bandwidth" not in data:
        data["flops"], data["memory_bandwidth"] = measure_compute()
        changed = True
    for name in HALF_DTYPES:
        if f"flops_{name}" not in data:
            try:
                data[f"flops_{name}"] = measure_matmul(getattr(torch, name))
                changed = True
            except RuntimeError as e:  # a build without that matmul: plan with fp32's rate, said aloud
                warnings.warn(f"could not time a {name} matmul on this machine ({e}); the local preset "
                              f"plans {name} models with the fp32 rate", stacklevel=2)
    if any(k not in data for k in OVERHEADS):
        data.update(measure_overheads())
        changed = True
    return data, changed
