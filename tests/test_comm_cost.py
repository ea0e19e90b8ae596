"""The α-β cost formulas of rannc_py.comm.cost."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest

from rannc_py.comm.cost import (
    ALGORITHMS,
    allgather_time,
    allreduce_time,
    best_allreduce,
    grid_shape,
    p2p_time,
    reduce_scatter_time,
)

A, B = 2e-6, 10e9  # 2 us, 10 GB/s


@dataclass(frozen=True)
class Link:
    bandwidth: float
    latency: float


def test_p2p() -> None:
    assert p2p_time(1e6, A, B) == pytest.approx(A + 1e6 / B)


@pytest.mark.parametrize("p", [2, 3, 5, 8])
def test_ring_matches_closed_form(p: int) -> None:
    n = 1e8
    expect = 2 * (p - 1) * A + 2 * (p - 1) / p * n / B
    assert allreduce_time("ring", n, p, alpha=A, beta=B) == pytest.approx(expect)
    # A one-dimensional torus is the ring.
    assert allreduce_time("torus", n, p, alpha=A, beta=B, torus_shape=(p,)) == pytest.approx(expect)


def test_halving_doubling_power_of_two_and_fold() -> None:
    n = 1e8
    assert allreduce_time("halving_doubling", n, 8, alpha=A, beta=B) == pytest.approx(
        2 * 3 * A + 2 * 7 / 8 * n / B
    )
    assert allreduce_time("halving_doubling", n, 6, alpha=A, beta=B) == pytest.approx(
        2 * 2 * A + 2 * 3 / 4 * n / B + 2 * (A + n / B)
    )


def test_torus_dimensions_shrink_data() -> None:
    n = 1e8
    t = allreduce_time("torus", n, 8, alpha=A, beta=B, torus_shape=(2, 2, 2))
    expect = sum(2 * A + 2 * 0.5 * (n / 2**i) / B for i in range(3))
    assert t == pytest.approx(expect)
    faster = allreduce_time("torus", n, 8, alpha=A, beta=B, torus_shape=(2, 2, 2), concurrent_links=6)
    assert faster == pytest.approx(6 * A + (expect - 6 * A) / 3)


def test_mpi_is_the_better_of_ring_and_halving_doubling() -> None:
    for n in (1e2, 1e9):
        ring = allreduce_time("ring", n, 16, alpha=A, beta=B)
        hd = allreduce_time("halving_doubling", n, 16, alpha=A, beta=B)
        assert allreduce_time("mpi", n, 16, alpha=A, beta=B) == min(ring, hd)


def test_reduce_scatter_and_allgather_are_half_a_ring() -> None:
    n, p = 1e8, 4
    half = (p - 1) * A + (p - 1) / p * n / B
    assert reduce_scatter_time(n, p, alpha=A, beta=B) == pytest.approx(half)
    assert allgather_time(n, p, alpha=A, beta=B) == pytest.approx(half)
    assert allgather_time(n, p, alpha=A, beta=B, algorithm="mpi") <= half


def test_single_rank_costs_nothing() -> None:
    for a in ALGORITHMS:
        assert allreduce_time(a, 1e9, 1, alpha=A, beta=B) == 0.0


def test_tofu_like_torus_picks_torus_for_large_and_not_for_small() -> None:
    tofu = Link(bandwidth=6.8e9, latency=0.49e-6)
    shape = (4, 4, 4)
    algo, t = best_allreduce(256e6, 64, tofu, torus_shape=shape, concurrent_links=6)
    assert algo == "torus"
    assert t < allreduce_time("ring", 256e6, 64, alpha=0.49e-6, beta=6.8e9)
    small, _ = best_allreduce(1e3, 64, tofu, torus_shape=shape, concurrent_links=6)
    assert small != "torus"
    # Without a torus network, the torus algorithm is not offered.
    assert best_allreduce(256e6, 64, tofu)[0] != "torus"


def test_hop_distance_slows_halving_doubling_on_a_torus() -> None:
    flat = allreduce_time("halving_doubling", 1e8, 64, alpha=A, beta=B)
    on_torus = allreduce_time("halving_doubling", 1e8, 64, alpha=A, beta=B, torus_shape=(8, 8))
    assert on_torus > flat


def test_grid_shape() -> None:
    assert grid_shape(8) == (2, 2, 2)
    assert grid_shape(6) == (3, 2)
    assert grid_shape(7) == (7,)
    assert grid_shape(1) == (1,)
    assert grid_shape(64) == (4, 4, 4)
    for p in range(1, 50):
        assert math.prod(grid_shape(p)) == p


def test_errors() -> None:
    with pytest.raises(ValueError, match="unknown allreduce algorithm"):
        allreduce_time("tree", 1, 2, alpha=A, beta=B)
    with pytest.raises(ValueError, match="cells"):
        allreduce_time("torus", 1, 8, alpha=A, beta=B, torus_shape=(2, 3))
    with pytest.raises(ValueError, match="link"):
        best_allreduce(1, 2)
