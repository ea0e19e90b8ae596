"""The planner and the experimental schedules: opt-in only, memory per schedule, plan data."""

from __future__ import annotations

import numpy as np
import pytest

from rannc_py.errors import ConfigError, PlanError
from rannc_py.planner.api import build_space, plan_chain
from rannc_py.planner.cost import CostModel
from rannc_py.planner.options import EXPERIMENTAL_SCHEDULES, TRAINING_SCHEDULES, PlanOptions
from rannc_py.planner.plan import Plan
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


def test_plan_chunks_checked():
    chain = uniform_chain(4)
    p = plan_chain(chain, make_cluster(2), 8, num_stages=2)
    d = p.to_dict() | {"chunks": 2}
    with pytest.raises(PlanError, match="chunks"):
        Plan.from_dict(d)
