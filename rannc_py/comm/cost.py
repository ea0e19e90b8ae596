"""α-β cost formulas of the communication operations, for the planner.

Pure Python with no MPI import, so a plan can be made offline. Units: bytes,
seconds, and ``beta`` as a bandwidth in bytes per second per direction of one
link; ``alpha`` is the per-message latency. ``gamma`` (seconds per byte
summed, default 0) charges the local reduction when it matters.

Formulas (n bytes, p ranks; Thakur, Rabenseifner & Gropp 2005; Patarasuk &
Yuan 2009):

- ring allreduce: ``2(p−1)·α + 2(p−1)/p · n/β``;
- recursive halving-doubling: ``2·log2(q)·α + 2(q−1)/q · n/β`` with q the
  largest power of two ≤ p, plus ``2(α + n/β)`` to fold the p − q extra ranks
  in and out. On a torus (``torus_shape`` given: the ranks' row-major layout
  on the network), the partner of a step may be h hops away, and every rank
  exchanging at that distance loads each link h times: that step's
  bandwidth term is multiplied by h;
- dimension-wise torus over ``d1 × … × dk``: for each dimension, a ring of
  side d on the part left by the previous dimensions, ``2(d−1)·α +
  2(d−1)/d · n_i/β`` with ``n_i = n / (d1·…·d(i−1))``. With
  ``concurrent_links = c > 1`` (Tofu-D drives six links at once) the buffer
  is modelled as split into ``min(c, k)`` parts that walk the dimensions in
  rotated order at the same time, dividing the bandwidth terms by ``min(c, k)``;
- ``"mpi"`` (the library's MPI_Allreduce): the faster of ring and
  halving-doubling, since MPI libraries choose between them by size.

A reduce-scatter and an allgather are each one half of the same algorithm's
allreduce (ring, recursive halving / doubling, dimension-wise torus), the
reduction's ``gamma`` all in the reduce-scatter.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from rannc_py._util import grid_shape
from rannc_py.errors import ConfigError

ALGORITHMS: tuple[str, ...] = ("mpi", "ring", "halving_doubling", "torus")
"""Allreduce algorithms of :func:`rannc_py.comm.allreduce`."""

GATHER_ALGORITHMS: tuple[str, ...] = ("mpi", "ring", "torus")
"""Algorithms of :func:`rannc_py.comm.reduce_scatter` and :func:`rannc_py.comm.allgather`."""

_HOP_SAMPLES = 1024  # ranks sampled when measuring a step's hop distance on a torus


def p2p_time(nbytes: float, alpha: float, beta: float) -> float:
    """Time of one message: ``alpha + nbytes / beta`` seconds."""
    return alpha + nbytes / beta


def _check(nbytes: float, ranks: int, alpha: float, beta: float) -> None:
    if ranks < 1:
        raise ConfigError(f"ranks must be >= 1, got {ranks}")
    if nbytes < 0 or alpha < 0 or beta <= 0:
        raise ConfigError(f"need nbytes >= 0, alpha >= 0, beta > 0; got {nbytes}, {alpha}, {beta}")


def _ring(nbytes: float, p: int, alpha: float, beta: float, gamma: float) -> float:
    frac = (p - 1) / p
    return 2 * (p - 1) * alpha + 2 * frac * nbytes / beta + gamma * frac * nbytes


@lru_cache(maxsize=4096)
def _hops(shape: tuple[int, ...], dist: int) -> int:
    """Largest torus distance between rank v and v XOR dist, over sampled v."""
    total = math.prod(shape)
    step = max(1, total // _HOP_SAMPLES)
    worst = 1
    for v in range(0, total, step):
        w = v ^ dist
        if w >= total:
            continue
        hops = 0
        for side in reversed(shape):
            a, b = v % side, w % side
            v, w = v // side, w // side
            hops += min(abs(a - b), side - abs(a - b))
        worst = max(worst, hops)
    return worst


def _halving_doubling(
    nbytes: float, p: int, alpha: float, beta: float, gamma: float, torus_shape: tuple[int, ...] | None
) -> float:
    q = 1 << (p.bit_length() - 1)
    t = 0.0
    dist = q // 2
    while dist >= 1:
        part = nbytes * dist / q  # bytes exchanged at this step, halving and doubling alike
        hops = _hops(torus_shape, dist) if torus_shape and math.prod(torus_shape) == p else 1
        t += 2 * (alpha + hops * part / beta) + gamma * part
        dist //= 2
    if q != p:
        t += 2 * (alpha + nbytes / beta) + gamma * nbytes
    return t


def _torus_half(
    nbytes: float, shape: Sequence[int], alpha: float, beta: float, gamma: float, concurrent_links: int
) -> float:
    """One half of the dimension-wise torus allreduce: its reduce-scatter (``gamma`` charging the
    sums) or its allgather (``gamma`` 0); the module docstring's per-dimension terms, halved."""
    dims = [d for d in shape if d > 1]
    if not dims:
        return 0.0
    lanes = max(1, min(concurrent_links, len(dims)))
    t, n = 0.0, float(nbytes)
    for d in dims:
        frac = (d - 1) / d
        t += (d - 1) * alpha + frac * n / (beta * lanes) + gamma * frac * n
        n /= d
    return t


def _torus(
    nbytes: float, shape: Sequence[int], alpha: float, beta: float, gamma: float, concurrent_links: int
) -> float:
    return (_torus_half(nbytes, shape, alpha, beta, gamma, concurrent_links)
            + _torus_half(nbytes, shape, alpha, beta, 0.0, concurrent_links))


def _grid(torus_shape: Sequence[int] | None, ranks: int) -> tuple[int, ...] | None:
    """``torus_shape`` as a tuple, checked against ``ranks``."""
    shape = tuple(torus_shape) if torus_shape is not None else None
    if shape is not None and math.prod(shape) != ranks:
        raise ConfigError(f"torus_shape {shape} has {math.prod(shape)} cells, expected ranks = {ranks}")
    return shape


def allreduce_time(
    algorithm: str,
    nbytes: float,
    ranks: int,
    *,
    alpha: float,
    beta: float,
    torus_shape: Sequence[int] | None = None,
    concurrent_links: int = 1,
    gamma: float = 0.0,
) -> float:
    """Predicted seconds of an allreduce of ``nbytes`` per rank over ``ranks`` ranks.

    Takes: an algorithm from ``ALGORITHMS``; ``alpha`` (s), ``beta`` (bytes/s);
    ``torus_shape``: the ranks' grid on the network (the torus algorithm's grid;
    default :func:`grid_shape` for it; charges hop distances to
    halving-doubling); ``concurrent_links``: links driven at once by the torus
    algorithm; ``gamma``: seconds per byte summed.
    Returns: seconds (0 for one rank).
    Raises: ConfigError for an unknown algorithm, bad numbers, or a torus shape
    whose product is not ``ranks``.
    """
    _check(nbytes, ranks, alpha, beta)
    shape = _grid(torus_shape, ranks)
    if ranks == 1:
        return 0.0
    if algorithm == "ring":
        return _ring(nbytes, ranks, alpha, beta, gamma)
    if algorithm == "halving_doubling":
        return _halving_doubling(nbytes, ranks, alpha, beta, gamma, shape)
    if algorithm == "torus":
        return _torus(nbytes, shape or grid_shape(ranks), alpha, beta, gamma, concurrent_links)
    if algorithm == "mpi":
        return min(_ring(nbytes, ranks, alpha, beta, gamma), _halving_doubling(nbytes, ranks, alpha, beta, gamma, shape))
    raise ConfigError(f"unknown allreduce algorithm {algorithm!r}; choose one of {list(ALGORITHMS)}")


def reduce_scatter_time(
    nbytes: float,
    ranks: int,
    *,
    alpha: float,
    beta: float,
    algorithm: str = "ring",
    gamma: float = 0.0,
    torus_shape: Sequence[int] | None = None,
    concurrent_links: int = 1,
) -> float:
    """Predicted seconds of a reduce-scatter of ``nbytes`` of input per rank (output nbytes/ranks).

    Ring: ``(p−1)·α + (p−1)/p · n/β``; ``"mpi"``: the faster of that and
    recursive halving (half of the halving-doubling allreduce, hop distances
    charged on ``torus_shape`` as there); ``"torus"``: the torus allreduce's
    reduce-scatter half, ``Σ_i (d_i−1)·α + (d_i−1)/d_i · n_i/β`` over the
    dimensions of ``torus_shape`` (default :func:`grid_shape`), the bandwidth
    terms divided by ``min(concurrent_links, k)`` as for the allreduce. The
    sums cost ``gamma`` per byte reduced.
    Raises: ConfigError for an unknown algorithm, bad numbers, or a torus
    shape whose product is not ``ranks``.
    """
    _check(nbytes, ranks, alpha, beta)
    shape = _grid(torus_shape, ranks)
    if ranks == 1:
        return 0.0
    ring = _ring(nbytes, ranks, alpha, beta, gamma) / 2 + gamma * (ranks - 1) / ranks * nbytes / 2
    if algorithm == "ring":
        return ring
    if algorithm == "mpi":
        return min(ring, _halving_doubling(nbytes, ranks, alpha, beta, 2 * gamma, shape) / 2)
    if algorithm == "torus":
        return _torus_half(nbytes, shape or grid_shape(ranks), alpha, beta, gamma, concurrent_links)
    raise ConfigError(f"unknown reduce_scatter algorithm {algorithm!r}; choose one of {list(GATHER_ALGORITHMS)}")


def allgather_time(
    nbytes: float,
    ranks: int,
    *,
    alpha: float,
    beta: float,
    algorithm: str = "ring",
    torus_shape: Sequence[int] | None = None,
    concurrent_links: int = 1,
) -> float:
    """Predicted seconds of an allgather producing ``nbytes`` per rank (input nbytes/ranks).

    Ring: ``(p−1)·α + (p−1)/p · n/β``; ``"mpi"``: the faster of that and
    recursive doubling; ``"torus"``: the torus allreduce's allgather half
    (the same terms as :func:`reduce_scatter_time`'s, without the sums).
    Raises: ConfigError for an unknown algorithm, bad numbers, or a torus
    shape whose product is not ``ranks``.
    """
    _check(nbytes, ranks, alpha, beta)
    shape = _grid(torus_shape, ranks)
    if ranks == 1:
        return 0.0
    ring = _ring(nbytes, ranks, alpha, beta, 0.0) / 2
    if algorithm == "ring":
        return ring
    if algorithm == "mpi":
        return min(ring, _halving_doubling(nbytes, ranks, alpha, beta, 0.0, shape) / 2)
    if algorithm == "torus":
        return _torus_half(nbytes, shape or grid_shape(ranks), alpha, beta, 0.0, concurrent_links)
    raise ConfigError(f"unknown allgather algorithm {algorithm!r}; choose one of {list(GATHER_ALGORITHMS)}")


def best_allreduce(
    nbytes: float,
    ranks: int,
    link: Any = None,
    *,
    alpha: float | None = None,
    beta: float | None = None,
    torus_shape: Sequence[int] | None = None,
    concurrent_links: int = 1,
    gamma: float = 0.0,
    algorithms: Sequence[str] = ALGORITHMS,
) -> tuple[str, float]:
    """The fastest allreduce algorithm for this size and group, and its predicted seconds.

    Takes: ``link``, an object with ``latency`` (s) and ``bandwidth``
    (bytes/s) attributes (the planner's ``Link``), or ``alpha`` and ``beta``
    given directly; the other options as in :func:`allreduce_time`.
    ``"torus"`` is considered only when ``torus_shape`` is given (a network
    that is a torus). Ties go to the earlier name in ``algorithms``.
    Returns: ``(algorithm, seconds)``.
    Raises: ConfigError if neither a link nor alpha and beta are given, or no
    algorithm is left to choose from.
    """
    if link is not None:
        alpha, beta = float(link.latency), float(link.bandwidth)
    if alpha is None or beta is None:
        raise ConfigError("best_allreduce needs a link, or both alpha and beta")
    candidates = [a for a in algorithms if a != "torus" or torus_shape is not None]
    if not candidates:
        raise ConfigError(f"no allreduce algorithm to choose from in {list(algorithms)}")
    timed = [
        (
            allreduce_time(
                a, nbytes, ranks, alpha=alpha, beta=beta, torus_shape=torus_shape,
                concurrent_links=concurrent_links, gamma=gamma,
            ),
            i,
            a,
        )
        for i, a in enumerate(candidates)
    ]
    t, _, a = min(timed)
    return a, t
