"""The planner and the experimental schedules: opt-in only, memory per schedule, plan data."""

from __future__ import annotations

import numpy as np
import pytest

from rannc_py.errors import ConfigError, PlanError
from rannc_py.planner.api import build_space, plan_chain
from rannc_py.planner.cost import CostModel
from rannc_py.planner.options import EXPERIMENTAL_SCHEDULES, TRAINING_SCHEDULES, PlanOptions
from rannc_py.planner.plan import Plan, StagePlan
from rannc_py.planner.search import (
    enumerate_layouts,
    in_flight,
    layout_step_time,
    simulate_layout,
    stage_costs,
)
from tests.test_planner_search import make_chain, make_cluster, uniform_chain


def test_experimental_schedules_only_when_named():
    assert PlanOptions().schedules == TRAINING_SCHEDULES == ("1f1b", "gpipe")
    assert not set(EXPERIMENTAL_SCHEDULES) & set(TRAINING_SCHEDULES)
    assert PlanOptions(schedules=("zb-h1",)).schedules == ("zb-h1",)
    with pytest.raises(ConfigError, match="experimental"):
        PlanOptions(schedules=("zb-v3",))


def test_zb_h1_memory_follows_its_activations_in_flight():
    # Every ZB-H1 stage holds min(p, m) microbatches until their W: the cost model counts that.
    chain = uniform_chain()
    cost = CostModel(chain, make_cluster(4), 16)
    space = build_space(chain, cost.cluster, 16, PlanOptions(schedules=("zb-h1", "1f1b")))
    lays = enumerate_layouts(cost, space)
    assert {lay.schedule for lay in lays} == {"zb-h1", "1f1b"}
    for lay in lays[:40]:
        tl = simulate_layout(cost, lay)
        p = lay.num_stages
        assert tl.max_in_flight == tuple(in_flight(lay.schedule, p - 1 - s, lay.m, p) for s in range(p))
        assert layout_step_time(cost, lay) == tl.step_time


def test_zb_h1_plan_is_data_and_not_slower():
    chain = make_chain([(1e-3, 2e-3, 1e5, 1e4, 10**6)] * 8)
    cl = make_cluster(4, per_node=4)
    zb = plan_chain(chain, cl, 32, num_stages=4, replicas=(1, 1, 1, 1), microbatches=8, schedules=("zb-h1",))
    base = plan_chain(chain, cl, 32, num_stages=4, replicas=(1, 1, 1, 1), microbatches=8, schedules=("1f1b",))
    assert zb.schedule == "zb-h1" and base.schedule == "1f1b"
    assert zb.step_time < base.step_time  # W fills the drain
    assert all(st.costs is not None and 0 < st.costs.backward_weight < st.costs.backward for st in zb.stages)
    assert all(st.costs is not None and st.costs.backward_weight == 0.0 for st in base.stages)
    assert Plan.from_json(zb.to_json()) == zb
    assert zb.timeline().step_time == pytest.approx(zb.step_time, rel=1e-12)
    # Default plans write no new keys.
    d = base.to_dict()
    assert "chunks" not in d and all("backward_weight" not in s["costs"] for s in d["stages"])


def test_weight_share_is_estimated_from_parameter_blocks():
    chain = uniform_chain(4)
    cost = CostModel(chain, make_cluster(2), 8)
    space = build_space(chain, cost.cluster, 8, PlanOptions(schedules=("zb-h1",), num_stages=2))
    lay = enumerate_layouts(cost, space)[0]
    for c in stage_costs(cost, lay):
        assert np.isclose(c.backward_weight, c.forward)  # every block reads parameters: W = its forward


def chunked_plan(schedule: str, ranks: tuple[tuple[int, ...], ...], positions: tuple[int, ...],
                 microbatches: int = 4) -> Plan:
    """A hand-written plan whose stage s runs on ``ranks[positions[s]]``."""
    stages = tuple(StagePlan(index=s, ops=(s,), param_fqns=(), ranks=ranks[pos], recompute=False,
                             predicted_compute_time=0.0, predicted_peak_memory=0)
                   for s, pos in enumerate(positions))
    world = sum(len(r) for r in ranks)
    return Plan(batch_size=8, microbatches=microbatches, schedule=schedule, stages=stages, world_size=world,
                graph_fingerprint="", cluster="local", step_time=0.0, peak_memory_per_rank=(0,) * world,
                samples_per_second=0.0, mfu=0.0, search_time=0.0, chunks=2)


def test_plan_chunks_checked():
    chain = uniform_chain(4)
    p = plan_chain(chain, make_cluster(2), 8, num_stages=2)
    d = p.to_dict() | {"chunks": 2}
    with pytest.raises(PlanError, match="chunks"):  # 1f1b holds one stage per rank
        Plan.from_dict(d)
    # Interleaved: stage s on position s % p; the stages of a position list the same ranks.
    il = chunked_plan("interleaved", ((0, 1), (2,)), (0, 1, 0, 1))
    assert il.num_stages == 4 and il.num_positions == 2
    assert [il.position_of_stage(s) for s in range(4)] == [0, 1, 0, 1]
    assert il.stages_of_rank(1) == (0, 2) and il.stages_of_rank(2) == (1, 3) and il.stage_of_rank(2) == 1
    assert il.replica_of_rank(1) == 1
    assert il.make_schedule().num_ranks == 2 and il.make_schedule().num_stages == 4
    assert Plan.from_json(il.to_json()) == il and il.to_dict()["chunks"] == 2
    assert "2 per rank on 2 positions" in il.summary()
    # ZB-V: the V, rank 0 holds the first and the last stage.
    zv = chunked_plan("zb-v", ((0,), (1,)), (0, 1, 1, 0))
    assert zv.stages_of_rank(0) == (0, 3) and zv.stages_of_rank(1) == (1, 2)
    with pytest.raises(PlanError, match="share pipeline position"):
        chunked_plan("interleaved", ((0,), (1,)), (0, 1, 1, 0))  # stage 2 is on position 0, not 1
    with pytest.raises(PlanError, match="multiple of its chunks"):
        chunked_plan("interleaved", ((0,), (1,)), (0, 1, 0))
    with pytest.raises(PlanError, match="multiple of the positions"):
        chunked_plan("interleaved", ((0,), (1,)), (0, 1, 0, 1), microbatches=1)
