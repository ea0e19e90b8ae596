"""Torus reduce-scatter and allgather: the cost formulas, the planner's choice, and 4 ranks against the ring.

The multi-rank checks (tests/mpi_scripts/comm_torus_gather.py) compare the
torus reduce-scatter and allgather with the ring's on a 2 x 2, 1 x 4 and
4 x 1 grid, and train GPT sharded over 4 replicas planned for a 4-node
A64FX (a torus), whose stage then runs the torus pair, equal to eager.
"""

from __future__ import annotations

import pytest
from mpi_launch import REPO, run_mpi

from rannc_py.comm.cost import (
    GATHER_ALGORITHMS,
    allgather_time,
    allreduce_time,
    reduce_scatter_time,
)
from rannc_py.errors import ConfigError

A, B = 2e-6, 10e9


@pytest.mark.parametrize(("shape", "links"), [((2, 2), 1), ((4, 4, 4), 6), ((8, 1, 3), 2), ((5,), 1)])
def test_torus_reduce_scatter_and_allgather_are_the_halves_of_the_torus_allreduce(shape: tuple[int, ...],
                                                                                   links: int) -> None:
    p, n, gamma = 1, 3e8, 1e-11
    for d in shape:
        p *= d
    opts = {"alpha": A, "beta": B, "torus_shape": shape, "concurrent_links": links}
    rs = reduce_scatter_time(n, p, algorithm="torus", gamma=gamma, **opts)
    ag = allgather_time(n, p, algorithm="torus", **opts)
    assert rs + ag == pytest.approx(allreduce_time("torus", n, p, gamma=gamma, **opts))
    assert rs - ag == pytest.approx(allreduce_time("torus", n, p, gamma=gamma, **opts)
                                    - allreduce_time("torus", n, p, **opts))  # the sums are the reduce-scatter's


def test_a_one_dimensional_torus_is_the_ring() -> None:
    for fn in (reduce_scatter_time, allgather_time):
        assert fn(1e8, 6, alpha=A, beta=B, algorithm="torus", torus_shape=(6,)) == pytest.approx(
            fn(1e8, 6, alpha=A, beta=B, algorithm="ring"))


def test_torus_pair_beats_the_ring_on_a_grid() -> None:
    """Fewer latencies (sum of d - 1 against p - 1) and, with concurrent links, less time per byte."""
    for n in (1e3, 1e9):
        ring = reduce_scatter_time(n, 64, alpha=A, beta=B) + allgather_time(n, 64, alpha=A, beta=B)
        torus = sum(fn(n, 64, alpha=A, beta=B, algorithm="torus", torus_shape=(4, 4, 4), concurrent_links=6)
                    for fn in (reduce_scatter_time, allgather_time))
        assert torus < ring


def test_torus_formulas_check_their_shape() -> None:
    assert "torus" in GATHER_ALGORITHMS
    with pytest.raises(ConfigError, match="6 cells, expected ranks = 8"):
        reduce_scatter_time(1e6, 8, alpha=A, beta=B, algorithm="torus", torus_shape=(2, 3))
    with pytest.raises(ConfigError, match="unknown allgather algorithm 'halving_doubling'"):
        allgather_time(1e6, 8, alpha=A, beta=B, algorithm="halving_doubling")
    assert reduce_scatter_time(1e6, 1, alpha=A, beta=B, algorithm="torus") == 0.0


def test_planner_costs_the_torus_pair_on_a_torus_only() -> None:
    from test_plan_data import synthetic_chain

    from rannc_py.comm.cost import grid_shape
    from rannc_py.hardware.cluster import as_cluster
    from rannc_py.planner.cost import CostModel

    chain = synthetic_chain(4, tied=True)
    fugaku = as_cluster("a64fx:nodes=64")
    model = CostModel(chain, fugaku, 64, shard_optimizer=True)
    algo, seconds = model.gather_choice(1e9, 64)
    link = fugaku.link(64)
    opts = {"alpha": link.latency, "beta": link.bandwidth, "torus_shape": grid_shape(64),
            "concurrent_links": fugaku.concurrent_links}
    want = reduce_scatter_time(1e9, 64, algorithm="torus", **opts) + allgather_time(1e9, 64, algorithm="torus", **opts)
    assert algo == "torus" and seconds == pytest.approx(want)
    assert model.sharded_step(1e9, 0.0, 64)[0] == pytest.approx(want)
    gpus = CostModel(chain, as_cluster("a100-80g:gpus=8"), 64, shard_optimizer=True)
    assert gpus.gather_choice(1e9, 8)[0] != "torus"  # not a torus network: not offered


def test_torus_collectives_match_the_ring_on_four_ranks() -> None:
    out = run_mpi(4, REPO / "tests/mpi_scripts/comm_torus_gather.py", "collectives", "training", timeout=600).stdout
    assert out.count(": ok") == 2, out
