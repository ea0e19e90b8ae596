"""The search against the classic split rules on the same cost model, and tied-weight costs."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_planner_search import make_chain, make_cluster

from rannc_py.errors import ConfigError, NoFeasiblePlanError
from rannc_py.planner.api import build_space, plan_chain
from rannc_py.planner.baselines import RULES, balanced_bounds, baseline_picks, rule_weights
from rannc_py.planner.chain import Chain
from rannc_py.planner.cost import CostModel
from rannc_py.planner.options import PlanOptions
from rannc_py.planner.search import Layout, stage_costs

GiB = 2**30

block_spec = st.tuples(
    st.floats(1e-4, 1e-2), st.floats(1e-4, 2e-2), st.floats(1e5, 1e7), st.floats(1e3, 1e6), st.integers(1e6, 4e8)
)


def tie_ends(chain: Chain) -> Chain:
    """The same chain with the last block also reading block 0's weight (an LM head tied to the embedding)."""
    first, last = chain.blocks[0], chain.blocks[-1]
    tied = dataclasses.replace(last, params=tuple(sorted(last.params + first.params)))
    return Chain(blocks=chain.blocks[:-1] + (tied,), input_bytes=chain.input_bytes, param_names=chain.param_names)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    specs=st.lists(block_spec, min_size=2, max_size=8),
    devices=st.sampled_from([2, 4, 6, 8, 12]),
    batch=st.sampled_from([8, 12, 24]),
    memory_gib=st.floats(2.0, 16.0),
    tied=st.booleans(),
)
def test_search_never_slower_than_split_rules(specs, devices, batch, memory_gib, tied):
    chain = make_chain(specs)
    if tied:
        chain = tie_ends(chain)
    cluster = make_cluster(devices, int(memory_gib * GiB))
    cost = CostModel(chain, cluster, batch)
    space = build_space(chain, cluster, batch, PlanOptions())
    picks = baseline_picks(cost, space)
    try:
        plan = plan_chain(chain, cluster, batch)
    except NoFeasiblePlanError:
        assert all(pk is None for pk in picks.values()), "a split rule fits where the search found nothing"
        return
    for rule in RULES:
        if picks[rule] is not None:
            assert plan.step_time <= picks[rule][1], f"{rule} split is faster"


def test_balanced_bounds():
    assert balanced_bounds(np.array([1.0, 1.0, 1.0, 1.0]), 2) == (0, 2, 4)
    assert balanced_bounds(np.array([3.0, 1.0, 1.0, 1.0]), 2) == (0, 1, 4)
    assert balanced_bounds(np.array([1.0, 2.0]), 3) is None


def test_tied_weight_counted_in_each_stage_and_synced():
    base = make_chain([(1e-3, 2e-3, 1e6, 1e4, 10**8)] * 4)
    chain = tie_ends(base)
    t = chain.tables()
    w = 10**8
    assert t.param_bytes[0, 1] == w and t.param_bytes[3, 4] == 2 * w  # the head's stage holds the tied weight too
    assert t.param_bytes[0, 4] == 4 * w  # counted once when one stage holds both readers
    assert t.tied_bytes[0, 1] == w and t.tied_bytes[3, 4] == w and t.tied_bytes[0, 4] == 0
    assert t.tied_bytes[1, 3] == 0
    cost = CostModel(chain, make_cluster(4), 16)
    untied = CostModel(base, make_cluster(4), 16)
    lay = Layout(d=1, m=4, schedule="1f1b", bounds=(0, 2, 4), replicas=(2, 2), recompute=(False, False), objective=0.0,
                 memory=(0.0, 0.0))
    # Stage 0 syncs its own gradients over its 2 replicas plus the tied weight over all 4 ranks.
    expected = cost.allreduce(2 * w, 2) + cost.allreduce(w, 4)
    assert stage_costs(cost, lay)[0].allreduce == pytest.approx(expected, rel=1e-12)
    assert stage_costs(untied, lay)[0].allreduce == pytest.approx(cost.allreduce(2 * w, 2), rel=1e-12)
    # Then it steps its 2w bytes of parameters (every replica all of them).
    assert stage_costs(cost, lay)[0].update == pytest.approx(2 * w * cost.update_cost, rel=1e-12)
    # The DP's per-stage table charges the sync and the step too (partner assumed to have as many replicas),
    # and the step's fixed work (per-tensor and per-step runtime costs) as the simulator's costs do.
    tabs = cost.stage_tables(1, 4, (2,), (1,), False, 4)
    fixed = stage_costs(cost, lay)[0].fixed
    assert fixed > 0
    assert tabs[1].ar[0, 2, 0] == pytest.approx(expected + 2 * w * cost.update_cost + fixed, rel=1e-9)


def test_unknown_split_rule_is_a_config_error():
    chain = make_chain([(1e-3, 2e-3, 1e6, 1e4, 10**6)] * 3)
    with pytest.raises(ConfigError, match="'median'"):
        rule_weights(chain, "median")
