"""Split-backward and virtual-stage schedules: interleaved 1F1B, ZB-H1, ZB-V as data."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rannc_py.errors import ConfigError, PlanError
from rannc_py.schedule import (
    ActionKind,
    Schedule,
    StageCosts,
    by_name,
    in_flight_bound,
    interleaved,
    one_f_one_b,
    simulate,
    validate,
    zb_h1,
    zb_v,
)
from rannc_py.schedule.fast import step_time

K = ActionKind


def _shapes(name):
    for p in range(1, 9):
        for m in range(1, 33):
            if name == "interleaved":
                if m % p == 0:
                    yield from ((p, m, v) for v in (2, 3, 4))
            else:
                yield p, m, None


@pytest.mark.parametrize("name", ["interleaved", "zb-h1", "zb-v"])
def test_all_small_schedules_valid_and_within_memory(name):
    for p, m, v in _shapes(name):
        sched = by_name(name, p, m, v)
        assert sched.num_ranks == p and sched.num_stages == p * sched.chunks
        validate(sched)  # dependencies, no deadlock, in-flight bound
        held = simulate(sched).max_in_flight
        assert all(h <= b for h, b in zip(held, in_flight_bound(name, p, m, v)))


def test_zb_h1_memory_is_1f1b_peak():
    for p in (2, 4, 8):
        for m in (1, 3, 8, 32):
            assert simulate(zb_h1(p, m)).max_in_flight == (min(p, m),) * p


def test_placement():
    assert interleaved(3, 3, 2).stage_ranks == (0, 1, 2, 0, 1, 2)
    assert zb_v(3, 3).stage_ranks == (0, 1, 2, 2, 1, 0)
    assert zb_h1(3, 3).stage_ranks == ()
    sched = zb_v(2, 2)
    # The V's turn (stages 1 and 2, both on rank 1) passes no message.
    assert not [a for a in sched.actions[1] if a.kind is K.SEND_ACT and a.stage == 1]


def test_split_backward_json_round_trip():
    for sched in (zb_h1(3, 4), interleaved(2, 4, 3), zb_v(3, 5)):
        assert Schedule.from_json(sched.to_json()) == sched
    assert "stage_ranks" not in one_f_one_b(3, 4).to_dict()  # old schedules' JSON unchanged
    assert "3:F0" in zb_v(2, 1).to_dict()["actions"][0]
    assert "stage 2: RECV_F0 F0 I0 SEND_B0 W0" in str(zb_h1(3, 1))


def test_bad_chunks_and_sizes():
    with pytest.raises(ConfigError, match="multiple of the pipeline ranks"):
        interleaved(4, 6)
    with pytest.raises(ConfigError, match="chunk"):
        by_name("zb-v", 2, 2, chunks=3)
    with pytest.raises(ConfigError, match="chunk"):
        interleaved(2, 2, chunks=1)


def _swap(sched: Schedule, r: int, i: int, j: int) -> Schedule:
    lists = [list(acts) for acts in sched.actions]
    lists[r][i], lists[r][j] = lists[r][j], lists[r][i]
    return Schedule(sched.name, sched.num_stages, sched.num_microbatches, tuple(map(tuple, lists)),
                    sched.stage_ranks)


def test_weight_before_input_gradient_rejected():
    sched = zb_h1(1, 1)  # F0 I0 W0 ALLREDUCE
    with pytest.raises(PlanError, match="W0 comes before its I0"):
        validate(_swap(sched, 0, 1, 2))


def test_local_chunk_order_rejected():
    sched = zb_v(1, 1)  # one rank, stages 0 and 1: F0(s0) F0(s1) I0(s1) I0(s0) ...
    acts = [str(a) for a in sched.actions[0]]
    assert acts[:4] == ["F0", "F0", "I0", "I0"]
    with pytest.raises(PlanError, match="after stage 0's F0"):
        validate(_swap(sched, 0, 0, 1))
    with pytest.raises(PlanError, match="after stage 1's"):
        validate(_swap(sched, 0, 2, 3))


def test_memory_promise_checked():
    sched = zb_h1(2, 4)
    acts = list(sched.actions[0])
    # Move every W of rank 0 to just before its ALLREDUCE: more activations held than promised.
    ws = [a for a in acts if a.kind is K.BACKWARD_WEIGHT]
    rest = [a for a in acts if a.kind is not K.BACKWARD_WEIGHT]
    bad = Schedule(sched.name, 2, 4, (tuple(rest[:-1] + ws + rest[-1:]), sched.actions[1]))
    with pytest.raises(PlanError, match="promises"):
        validate(bad)


# ---- textbook bubbles on equal stages (no communication, no allreduce) ----

@pytest.mark.parametrize("p,m", [(2, 4), (4, 8), (4, 16), (8, 8), (8, 32)])
def test_interleaved_bubble(p, m):
    # Narayanan et al. 2021, Sec. 2.2.1: with v chunks the bubble shrinks by v:
    # step = (v m + p - 1) (t_f + t_b) / v, bubble fraction (p - 1) / (v m + p - 1).
    f, b = 1.0, 2.0
    for v in (1, 2, 3, 4):
        sched = one_f_one_b(p, m) if v == 1 else interleaved(p, m, v)
        t = simulate(sched, [StageCosts(f / v, b / v)] * (p * v))
        assert t.step_time == pytest.approx((v * m + p - 1) * (f + b) / v)
        bubble = 1 - m * (f + b) / t.step_time
        assert bubble == pytest.approx((p - 1) / (v * m + p - 1))


@pytest.mark.parametrize("p", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("m", [1, 2, 4, 8, 16, 32])
def test_zb_h1_bubble(p, m):
    # T_F = T_I = T_W = 1 (full backward 2): 1F1B takes 3(m + p - 1); ZB-H1 3m + p - 1 for m >= p
    # (a bubble of p - 1, a third of 1F1B's 3(p - 1)) and 2m + 2p - 1 for m < p (module docstring).
    costs = [StageCosts(1.0, 2.0, backward_weight=1.0)] * p
    t = simulate(zb_h1(p, m), costs).step_time
    assert t == (3 * m + p - 1 if m >= p else 2 * m + 2 * p - 1)
    assert simulate(one_f_one_b(p, m), costs).step_time == 3 * (m + p - 1)


def test_zb_v_bubble():
    # Unit chunk costs: each rank computes 6m units; the bubble is p - 1 units for p <= 4 (m >= p)
    # and at most p + 1 up to p = 8 (m >= 2p), against 1F1B's 6(p - 1) in the same units.
    for p in range(1, 9):
        for m in range(p, 33):
            t = simulate(zb_v(p, m), [StageCosts(1.0, 2.0, backward_weight=1.0)] * (2 * p)).step_time
            if p <= 4:
                assert t - 6 * m == p - 1
            elif m >= 2 * p:
                assert t - 6 * m <= p + 1


def test_no_split_known_costs_a_full_backward():
    # backward_weight 0 (old plans): I costs the whole backward, W nothing.
    costs = [StageCosts(1.0, 2.0)] * 3
    assert simulate(zb_h1(3, 6), costs).step_time == simulate(one_f_one_b(3, 6), costs).step_time


@settings(max_examples=80, deadline=None)
@given(
    name=st.sampled_from(["interleaved", "zb-h1", "zb-v", "1f1b"]),
    p=st.integers(1, 8),
    k=st.integers(1, 4),
    v=st.integers(2, 4),
    seed=st.integers(0, 2**31 - 1),
)
def test_fast_step_time_equals_simulator_split(name, p, k, v, seed):
    rnd = random.Random(seed)
    chunks = v if name == "interleaved" else None
    sched = by_name(name, p, p * k, chunks)

    def one() -> StageCosts:
        b = 2 * rnd.random()
        return StageCosts(rnd.random(), b, rnd.choice([0.0, 0.3, 3.0]) * rnd.random(),
                          rnd.choice([0.0, 0.3, 3.0]) * rnd.random(), rnd.choice([0.0, 5.0]) * rnd.random(),
                          rnd.random(), rnd.choice([0.0, 0.5, 1.0]) * b)

    costs = [one() for _ in range(sched.num_stages)]
    assert step_time(name, p * k, costs, chunks) == simulate(sched, costs).step_time
