"""Schedules as data: generators, validation, JSON and the simulator."""

from __future__ import annotations

import dataclasses
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rannc_py.errors import ConfigError, PlanError
from rannc_py.schedule import (
    Action,
    ActionKind,
    Schedule,
    StageCosts,
    by_name,
    forward_only,
    gpipe,
    one_f_one_b,
    simulate,
    validate,
)
from rannc_py.schedule.fast import step_time

K = ActionKind


@pytest.mark.parametrize("gen", [gpipe, one_f_one_b, forward_only])
def test_all_small_schedules_valid(gen):
    for p in range(1, 9):
        for m in range(1, 33):
            sched = gen(p, m)
            assert sched.num_stages == p and sched.num_microbatches == m
            validate(sched)


def test_in_flight_activations():
    for p in (1, 3, 8):
        for m in (1, 2, 5, 32):
            assert simulate(gpipe(p, m)).max_in_flight == (m,) * p
            assert simulate(one_f_one_b(p, m)).max_in_flight == tuple(min(p - s, m) for s in range(p))


@pytest.mark.parametrize("gen", [gpipe, one_f_one_b])
def test_step_time_matches_bubble_formula(gen):
    # No communication and uniform stages: (m + p - 1)(f + b) + allreduce.
    p, m, f, b, ar = 4, 7, 1.0, 2.0, 0.5
    t = simulate(gen(p, m), [StageCosts(f, b, allreduce=ar)] * p)
    assert t.step_time == pytest.approx((m + p - 1) * (f + b) + ar)
    assert t.busy == pytest.approx((m * (f + b) + ar,) * p)


def test_send_cost_delays_receiver():
    t = simulate(forward_only(2, 1), [StageCosts(1.0, 0.0, send_act=0.25), StageCosts(1.0, 0.0)])
    assert t.step_time == pytest.approx(2.25)


def test_json_round_trip_and_str():
    sched = one_f_one_b(3, 4)
    assert Schedule.from_json(sched.to_json()) == sched
    text = str(sched)
    assert "stage 2: RECV_F0 F0 B0 SEND_B0" in text
    assert str(Action(K.SEND_ACT, 0, 3)) == "SEND_F3"
    assert str(Action(K.ALLREDUCE, 1, None)) == "ALLREDUCE"


def test_by_name():
    assert by_name("1f1b", 2, 3) == one_f_one_b(2, 3)
    assert by_name("gpipe", 2, 3) == gpipe(2, 3)
    with pytest.raises(ConfigError, match="unknown schedule 'zb'"):
        by_name("zb", 2, 3)


@pytest.mark.parametrize("p,m", [(0, 1), (1, 0), (-2, 3), (2.0, 3)])
def test_bad_sizes(p, m):
    with pytest.raises(ConfigError, match="positive integer"):
        gpipe(p, m)


def _replace_stage(sched: Schedule, s: int, acts: list[Action]) -> Schedule:
    lists = list(sched.actions)
    lists[s] = tuple(acts)
    return dataclasses.replace(sched, actions=tuple(lists))


def test_backward_before_forward_rejected():
    sched = gpipe(1, 2)
    acts = list(sched.actions[0])  # F0 F1 B0 B1 ALLREDUCE
    acts[0], acts[2] = acts[2], acts[0]
    with pytest.raises(PlanError, match="B0 comes before its forward F0"):
        validate(_replace_stage(sched, 0, acts))


def test_missing_recv_rejected():
    sched = gpipe(2, 2)
    acts = [a for a in sched.actions[1] if not (a.kind is K.RECV_ACT and a.microbatch == 1)]
    with pytest.raises(PlanError, match="missing RECV_F1"):
        validate(_replace_stage(sched, 1, acts))


def test_unmatched_send_found_by_executor():
    sched = forward_only(2, 1)
    extra = _replace_stage(sched, 0, [*sched.actions[0], Action(K.SEND_ACT, 0, 0)])
    with pytest.raises(PlanError, match="more than once"):
        validate(extra)
    with pytest.raises(PlanError, match="never received"):
        simulate(extra)


def test_deadlock_detected():
    # Stage 0 waits for a gradient before it has sent the activation that produces it.
    sched = gpipe(2, 1)
    s0 = [Action(K.RECV_GRAD, 0, 0), Action(K.FORWARD, 0, 0), Action(K.SEND_ACT, 0, 0),
          Action(K.BACKWARD, 0, 0), Action(K.ALLREDUCE, 0, None)]
    bad = _replace_stage(sched, 0, s0)
    with pytest.raises(PlanError, match="deadlocks"):
        validate(bad)


def test_allreduce_placement():
    sched = gpipe(1, 1)
    acts = [Action(K.FORWARD, 0, 0), Action(K.ALLREDUCE, 0, None), Action(K.BACKWARD, 0, 0)]
    with pytest.raises(PlanError, match="ALLREDUCE"):
        validate(_replace_stage(sched, 0, acts))


def test_parse_errors():
    with pytest.raises(PlanError, match="cannot parse"):
        Schedule.from_json('{"name": "x", "num_stages": 1, "num_microbatches": 1, "actions": [["Q1"]]}')
    with pytest.raises(PlanError, match="malformed"):
        Schedule.from_json('{"name": "x"}')


@settings(max_examples=60, deadline=None)
@given(
    name=st.sampled_from(["1f1b", "gpipe", "forward_only"]),
    p=st.integers(1, 8),
    m=st.integers(1, 24),
    seed=st.integers(0, 2**31 - 1),
)
def test_fast_step_time_equals_simulator(name, p, m, seed):
    # The search ranks candidates with step_time; it must be the simulator's number, bit for bit.
    rnd = random.Random(seed)
    costs = [StageCosts(rnd.random(), 0.0 if name == "forward_only" else 2 * rnd.random(),
                        rnd.choice([0.0, 0.3, 3.0]) * rnd.random(), rnd.choice([0.0, 0.3, 3.0]) * rnd.random(),
                        0.0 if name == "forward_only" else rnd.choice([0.0, 5.0]) * rnd.random(),
                        0.0 if name == "forward_only" else rnd.choice([0.0, 1.0]) * rnd.random())
             for _ in range(p)]
    assert step_time(name, m, costs) == simulate(by_name(name, p, m), costs).step_time
