"""The layout search on synthetic block chains: DP optimality, memory limits, determinism."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rannc_py.errors import ConfigError, NoFeasiblePlanError
from rannc_py.hardware.cluster import Cluster, Device, Link
from rannc_py.planner.api import build_space, plan_chain
from rannc_py.planner.chain import Block, Chain
from rannc_py.planner.cost import CostModel
from rannc_py.planner.options import PlanOptions
from rannc_py.planner.search import (
    enumerate_layouts,
    in_flight,
    microbatch_candidates,
    pick_best,
    search_config,
    simulate_layout,
)

GiB = 2**30


def make_cluster(devices: int, memory: int = 16 * GiB, per_node: int = 2) -> Cluster:
    dev = Device(name="test", peak_flops=(("float32", 1e12),), memory=memory, memory_bandwidth=1e11)
    return Cluster(name="test", device=dev, num_devices=devices, devices_per_node=min(per_node, devices),
                   intra_node=Link(1e10, 1e-6), inter_node=Link(1e9, 5e-6), topology="switched")


def make_chain(specs: list[tuple[float, float, float, float, int]]) -> Chain:
    """specs: (fwd per sample, bwd per sample, act bytes, out bytes, param bytes) per block."""
    blocks = tuple(
        Block(ops=(k,), fwd_fixed=1e-5, fwd_per_sample=f, bwd_fixed=2e-5, bwd_per_sample=b, act_bytes=act,
              out_bytes=out, params=((f"w{k}", pb),), flops=1e6)
        for k, (f, b, act, out, pb) in enumerate(specs)
    )
    return Chain(blocks=blocks, input_bytes=1e3, param_names=tuple((f"w{k}",) for k in range(len(specs))))


def brute_force(cost: CostModel, space, weight) -> float:
    """Smallest T_w (w = weight(m)) over every partition, replica choice, d, m and
    schedule, by enumeration."""
    n = cost.chain.n
    D = cost.cluster.num_devices
    best = math.inf
    for d in space.pipelines:
        P = D // d
        for m in microbatch_candidates(space, d, cost.batch_size):
            rvals = tuple(r for r in space.rvals if r <= P and r * d <= cost.batch_size // m)
            if not rvals:
                continue
            for sched in space.schedules:
                Q = min(space.max_stages, P, n)
                tabs = cost.stage_tables(d, m, rvals, tuple(range(1, m + 1)), space.recompute, P)
                for p in range(1, Q + 1):
                    for cuts in itertools.combinations(range(1, n), p - 1):
                        bounds = (0, *cuts, n)
                        for reps in itertools.product(range(len(rvals)), repeat=p):
                            if sum(rvals[r] for r in reps) != P:
                                continue
                            worst = max(
                                tabs[in_flight(sched, p - 1 - s, m)].c[bounds[s], bounds[s + 1], reps[s]]
                                + tabs[in_flight(sched, p - 1 - s, m)].ar[bounds[s], bounds[s + 1], reps[s]]
                                * weight(m)
                                for s in range(p)
                            )
                            best = min(best, (m + p - 1) * worst)
    return best


block_spec = st.tuples(
    st.floats(1e-4, 1e-2), st.floats(1e-4, 2e-2), st.floats(1e5, 1e7), st.floats(1e3, 1e6), st.integers(1e6, 4e8)
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    specs=st.lists(block_spec, min_size=1, max_size=5),
    devices=st.sampled_from([1, 2, 3, 4, 6]),
    batch=st.sampled_from([6, 8, 12]),
    memory_gib=st.floats(1.0, 12.0),
    recompute=st.sampled_from([None, True, False]),
    extra=st.sampled_from([0, 3]),
)
def test_dp_matches_brute_force(specs, devices, batch, memory_gib, recompute, extra):
    # The DP pass with allreduce weight w = 1 / (m + extra) is exact for its T_w.
    chain = make_chain(specs)
    cost = CostModel(chain, make_cluster(devices, int(memory_gib * GiB)), batch, "adam", 0.1)
    space = build_space(chain, cost.cluster, batch, PlanOptions(recompute=recompute))
    def weight(m):
        return 1.0 / (m + extra)

    layouts = [
        lay
        for d in space.pipelines
        for m in microbatch_candidates(space, d, batch)
        for sched in space.schedules
        for lay in search_config(cost, space, d, m, sched, weights=(weight(m),))
    ]
    expected = brute_force(cost, space, weight)
    got = min((lay.dp_objective for lay in layouts), default=math.inf)
    if math.isinf(expected):
        assert not layouts
    else:
        assert got == pytest.approx(expected, rel=1e-12)
        for lay in layouts:  # every layout the DP returns fits and uses every device
            assert max(lay.memory) <= cost.limit
            assert sum(lay.replicas) == devices


def uniform_chain(n: int = 8) -> Chain:
    return make_chain([(1e-3, 2e-3, 4e6, 1e5, 2 * 10**8)] * n)


def test_plan_fits_and_minimum_memory_is_exact():
    chain = uniform_chain()
    big = make_cluster(4, 64 * GiB)
    plan = plan_chain(chain, big, 16)
    limit = big.device.memory * 0.9
    assert max(plan.peak_memory_per_rank) <= limit
    assert plan.world_size == 4 and sum(s.replicas for s in plan.stages) == 4
    tiny = make_cluster(4, 1 * GiB)
    with pytest.raises(NoFeasiblePlanError) as e:
        plan_chain(chain, tiny, 16)
    need = float(str(e.value).split("fits is ")[1].split(" bytes")[0])
    assert e.value.required_memory == math.ceil(need)
    ok = plan_chain(chain, make_cluster(4, math.ceil(need) + 1), 16)
    assert max(ok.peak_memory_per_rank) <= (math.ceil(need) + 1) * 0.9
    with pytest.raises(NoFeasiblePlanError, match=f"fits is {need:.0f} bytes"):
        plan_chain(chain, make_cluster(4, math.floor(need) - 1), 16)


def test_deterministic_and_simulated_step_time():
    chain = make_chain([(1e-3 * (1 + k % 3), 2e-3, 3e6, 1e5, 10**8) for k in range(10)])
    cl = make_cluster(6)
    a = plan_chain(chain, cl, 24)
    b = plan_chain(chain, cl, 24)
    assert a.to_dict() | {"search_time": 0} == b.to_dict() | {"search_time": 0}
    assert a.assignment() == sorted(a.assignment())


def test_pins_are_respected():
    chain = uniform_chain()
    cl = make_cluster(4)
    p = plan_chain(chain, cl, 16, replicas=[1, 3], microbatches=4, recompute=True, schedules=("gpipe",))
    assert [s.replicas for s in p.stages] == [1, 3]
    assert p.microbatches == 4 and p.schedule == "gpipe" and all(s.recompute for s in p.stages)
    p2 = plan_chain(chain, cl, 16, num_stages=4)
    assert p2.num_stages == 4
    p3 = plan_chain(chain, cl, 16, replicas=[3, 1])
    assert [s.replicas for s in p3.stages] == [3, 1] and 16 // p3.microbatches >= 3


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"microbatches": 3}, "not divisible by microbatches=3"),
        ({"replicas": [1, 1]}, "use 2 devices but the cluster has 4"),
        ({"replicas": [4], "microbatches": 8}, "needs microbatches of at least that many rows"),
        ({"num_stages": 0}, "positive integer"),
        ({"num_stages": 99}, "exceeds the 8 blocks"),
        ({"schedules": ("zb",)}, "schedules must be"),
        ({"optimizer": "lion"}, "unknown optimizer"),
        ({"memory_margin": 1.5}, "memory_margin"),
    ],
)
def test_bad_pins(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        plan_chain(uniform_chain(), make_cluster(4), 16, **kwargs)


@pytest.mark.parametrize("batch", [0, -4, 2.5, True])
def test_bad_batch(batch):
    with pytest.raises(ConfigError, match="batch_size must be a positive integer"):
        plan_chain(uniform_chain(), make_cluster(4), batch)


def test_simulated_memory_counts_match_cost_model():
    # The in-flight counts the cost model assumes are the ones the schedule really has.
    chain = uniform_chain()
    cost = CostModel(chain, make_cluster(4), 16)
    space = build_space(chain, cost.cluster, 16, PlanOptions())
    for lay in enumerate_layouts(cost, space)[:20]:
        tl = simulate_layout(cost, lay)
        p = lay.num_stages
        assert tl.max_in_flight == tuple(in_flight(lay.schedule, p - 1 - s, lay.m) for s in range(p))
        assert np.isfinite(tl.step_time)


def test_returned_outputs_are_counted_only_when_returned():
    base = uniform_chain()
    # 1 MB of logits per sample: returning them to every rank costs the last stage m microbatches of them.
    chain = Chain(blocks=base.blocks, input_bytes=base.input_bytes, param_names=base.param_names, output_bytes=1e6)
    kw = {"num_stages": 2, "replicas": [2, 2], "microbatches": 4, "schedules": ("1f1b",), "recompute": False}
    cl = make_cluster(4, 64 * GiB)
    kept = plan_chain(chain, cl, 16, **kw)
    loss_only = plan_chain(chain, cl, 16, return_outputs=False, **kw)
    plain = plan_chain(base, cl, 16, **kw)
    rows = 16 // 4 // 2  # per replica per microbatch
    last = kept.stages[-1].predicted_peak_memory - loss_only.stages[-1].predicted_peak_memory
    # the other 3 microbatches' outputs on the last stage, plus this rank's rows of the returned outputs
    assert last == pytest.approx(1e6 * (3 * rows + 16 / 4))
    assert loss_only.stages[-1].predicted_peak_memory == pytest.approx(
        plain.stages[-1].predicted_peak_memory + 1e6 * rows)


def test_pick_best_of_nothing_is_a_config_error():
    cost = CostModel(make_chain([(1e-3, 2e-3, 1e6, 1e4, 10**6)] * 2), make_cluster(2), 8, "adam", 0.1)
    with pytest.raises(ConfigError, match="no layouts"):
        pick_best(cost, [], extra=[])
