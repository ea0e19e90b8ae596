"""The planner with several model chunks per rank: interleaved 1F1B and ZB-V searched, costed and written."""

from __future__ import annotations

import dataclasses

import pytest

from rannc_py.cli import main
from rannc_py.errors import NoFeasiblePlanError
from rannc_py.planner.api import build_space, plan_chain
from rannc_py.planner.cost import CostModel
from rannc_py.planner.options import EXPERIMENTAL_SCHEDULES, PlanOptions
from rannc_py.planner.plan import Plan
from rannc_py.planner.search import CHUNKED, enumerate_layouts, held_counts, layout_step_time, simulate_layout
from rannc_py.schedule import ActionKind, in_flight_bound
from rannc_py.schedule.generators import rank_orders
from tests.test_planner_search import make_chain, make_cluster, uniform_chain

P, M = 4, 8


def pinned(chain, schedule: str, **kw) -> Plan:
    """The best plan of ``schedule`` on 4 positions of one rank each, 8 microbatches, no optimizer step time
    (so the step is the pipeline's: fill, steady state, drain)."""
    opts = {"num_stages": P, "replicas": (1,) * P, "microbatches": M, "schedules": (schedule,),
            "update_cost": 0.0} | kw
    return plan_chain(chain, make_cluster(P, per_node=P), 32, **opts)


def test_chunked_schedules_only_when_named():
    assert {"interleaved", "zb-v"} <= set(EXPERIMENTAL_SCHEDULES) and set(CHUNKED) == {"interleaved", "zb-v"}
    chain = uniform_chain(16)
    cost = CostModel(chain, make_cluster(4), 32)
    default = enumerate_layouts(cost, build_space(chain, cost.cluster, 32, PlanOptions()))
    assert default and all(lay.chunks == 1 for lay in default)
    assert plan_chain(chain, make_cluster(4), 32).chunks == 1
    named = enumerate_layouts(cost, build_space(chain, cost.cluster, 32, PlanOptions(
        schedules=("1f1b", "interleaved", "zb-v"))))
    assert {(lay.schedule, lay.chunks) for lay in named if lay.chunks > 1} >= {("interleaved", 2), ("zb-v", 2)}


def test_interleaved_beats_1f1b_by_the_textbook_bubble():
    # Equal blocks: 1F1B's step is (m + p - 1) rank-times of F + B, interleaved's (m + (p - 1) / v).
    chain = uniform_chain(16)
    base, il = pinned(chain, "1f1b"), pinned(chain, "interleaved")
    assert base.chunks == 1 and il.schedule == "interleaved"
    v = il.chunks
    assert v == 4  # 16 equal blocks: the most chunks, the smallest bubble
    assert il.num_stages == P * v and il.num_positions == P
    assert il.step_time / base.step_time == pytest.approx((M + (P - 1) / v) / (M + P - 1), rel=5e-3)
    # Each rank holds v one-block stages: r, r + p, ...
    for r in range(P):
        assert il.stages_of_rank(r) == tuple(range(r, P * v, P))


def test_zb_v_beats_zb_h1_and_1f1b_by_the_textbook_bubble():
    # F = I = W per chunk here (the weight gradients cost a forward): 1F1B (m + p - 1) * 3u,
    # ZB-H1 (3m + p - 1) u, ZB-V (3m + (p - 1) / 2) u for u a rank's forward per microbatch.
    chain = uniform_chain(8)
    base, h1, zv = pinned(chain, "1f1b"), pinned(chain, "zb-h1"), pinned(chain, "zb-v")
    assert zv.chunks == 2 and zv.step_time < h1.step_time < base.step_time
    assert h1.step_time / base.step_time == pytest.approx((3 * M + P - 1) / (3 * (M + P - 1)), rel=5e-3)
    assert zv.step_time / base.step_time == pytest.approx((3 * M + (P - 1) / 2) / (3 * (M + P - 1)), rel=5e-3)
    assert [zv.stages_of_rank(r) for r in range(P)] == [(r, 2 * P - 1 - r) for r in range(P)]
    # The V's turn (stages p - 1 and p) is on one rank: no message; interleaved's wrap-around is one.
    turn, after = zv.stages[P - 1].costs, zv.stages[P].costs
    assert turn is not None and after is not None and turn.send_act == 0.0 and after.send_grad == 0.0
    il = pinned(chain, "interleaved")
    wrap = il.stages[P - 1].costs
    assert il.chunks == 2 and wrap is not None and wrap.send_act > 0.0


def walk_peaks(schedule: str, p: int, m: int, v: int) -> list[set[tuple[int, ...]]]:
    """Per rank, the in-flight counts of its stages just before each backward or W, from the generated order."""
    ranks, orders = rank_orders(schedule, p, m, v)
    out = []
    for r, ops in enumerate(orders):
        mine = [s for s in range(p * v) if ranks[s] == r]
        cur, peaks = [0] * v, set()
        for kind, s, _ in ops:
            if kind is ActionKind.FORWARD:
                cur[mine.index(s)] += 1
            elif kind in (ActionKind.BACKWARD, ActionKind.BACKWARD_WEIGHT):
                peaks.add(tuple(cur))
                cur[mine.index(s)] -= 1
        out.append(peaks)
    return out


def test_held_counts_follow_the_schedules_order():
    # Interleaved: the closed form is the generated order's peaks exactly.
    for p in (1, 2, 3, 4, 5, 8):
        for v in (2, 3, 4):
            for m in (p, 2 * p, 3 * p, 5 * p):
                walked = walk_peaks("interleaved", p, m, v)
                got = held_counts("interleaved", p, m, v)
                for r in range(p):
                    top = {vec for vec in walked[r] if not any(
                        o != vec and all(a <= b for a, b in zip(vec, o)) for o in walked[r])}
                    assert top <= set(got[r]) <= walked[r]
    # ZB-V: every moment of the generated order lies under the corners.
    for p in range(1, 9):
        for m in (*range(1, 2 * p + 2), 3 * p, 5 * p + 1):
            got = held_counts("zb-v", p, m, 2)
            for r, peaks in enumerate(walk_peaks("zb-v", p, m, 2)):
                first, second = max(c[0] for c in got[r]), max(c[1] for c in got[r])
                assert all(a <= first and b <= second and a + b <= min(2 * p, 2 * m) for a, b in peaks)


def expected_rank_memory(plan: Plan, chain, rank: int) -> tuple[float, float]:
    """A rank's peak bytes from the plan's timeline, computed here: each of its stages' parameters,
    gradients and Adam state (4 copies), send/receive buffers, the largest parameter's temporary once,
    the last stage's one microbatch of outputs, and the activations its forwards hold until their
    backward (or W) frees them, at their peak over the step; and (second) the same with ZB-V's bound
    on the activations: at most min(2p, 2m) chunk-microbatches, min(max(2p - 1 - r, p + 1), m) of
    them on the rank's first stage and min(p, m) on its second."""
    t = chain.tables()
    rows = plan.batch_size // plan.microbatches  # one replica per position
    bounds = {st.index: (min(st.ops), max(st.ops) + 1) for st in plan.stages}  # one op per block
    mine = plan.stages_of_rank(rank)
    static = sum(4 * t.param_bytes[i, j] + 2 * (t.cut[i] + t.cut[j]) * rows for i, j in map(bounds.get, mine))
    static += max(t.max_param[i, j] for i, j in map(bounds.get, mine))
    if plan.num_stages - 1 in mine:
        static += rows * t.out
    held, peak = 0.0, 0.0
    row = plan.make_schedule().rank_of(mine[0])
    for e in plan.timeline().events:
        if e.stage != row:
            continue
        i, j = bounds[e.action.stage]
        if e.action.kind is ActionKind.FORWARD:
            held += t.act[i, j] * rows
            peak = max(peak, held)
        elif e.action.kind in (ActionKind.BACKWARD, ActionKind.BACKWARD_WEIGHT):
            held -= t.act[i, j] * rows
    p, m = plan.num_positions, plan.microbatches
    cap, w = min(2 * p, 2 * m), [t.act[bounds[s]] * rows for s in mine]
    a, b = min(max(2 * p - 1 - rank, p + 1), m, cap), min(p, m, cap)
    bound = max(a * w[0] + min(cap - a, b) * w[-1], min(cap - b, a) * w[0] + b * w[-1])
    return float(static + peak), float(static + bound)


@pytest.mark.parametrize("schedule", ["interleaved", "zb-v"])
def test_chunked_plan_is_data_and_its_memory_is_per_rank(schedule):
    # Blocks of unequal activations and parameters, so which chunks a rank holds matters.
    chain = make_chain([(1e-3, 2e-3, 1e5 * (1 + k % 3), 1e4, 10**6 * (1 + k % 4)) for k in range(8)])
    plan = pinned(chain, schedule, return_outputs=False)
    assert plan.schedule == schedule and plan.chunks == 2 and plan.num_stages == 2 * P
    assert Plan.from_json(plan.to_json()) == plan and plan.to_dict()["chunks"] == 2
    assert plan.timeline().step_time == plan.step_time
    assert "2 per rank on 4 positions" in plan.summary()
    for s, st in enumerate(plan.stages):
        assert st.ranks == plan.stages[plan.position_of_stage(s)].ranks == (plan.position_of_stage(s),)
    for r in range(P):
        exact, bound = expected_rank_memory(plan, chain, r)
        if schedule == "interleaved":  # its order's peak, exactly
            assert plan.peak_memory_per_rank[r] == pytest.approx(exact, abs=1.0)
        else:  # ZB-V's bound, above what its order holds
            assert plan.peak_memory_per_rank[r] == pytest.approx(bound, abs=1.0) and bound >= exact
        for s in plan.stages_of_rank(r):
            assert plan.stages[s].predicted_peak_memory == plan.peak_memory_per_rank[r]
    # On equal chunks the schedule's own bound is the simulator's count.
    uni = pinned(uniform_chain(8), schedule)
    assert uni.timeline().max_in_flight == in_flight_bound(schedule, P, M, 2)


def test_chunk_counts_skipped_without_blocks_or_microbatches():
    cl = make_cluster(4, per_node=4)
    chain = uniform_chain(8)
    cost = CostModel(chain, cl, 32, update_cost=0.0)

    def chunks(**kw):
        space = build_space(chain, cl, 32, PlanOptions(num_stages=4, replicas=(1,) * 4,
                                                       schedules=("interleaved", "zb-v"), **kw))
        return {(lay.schedule, lay.chunks) for lay in enumerate_layouts(cost, space)}

    assert chunks(microbatches=8) == {("interleaved", 2), ("zb-v", 2)}  # 8 blocks: 3 or 4 chunks need 12, 16
    assert chunks(microbatches=2) == {("zb-v", 2)}  # interleaved needs m a multiple of the 4 positions
    few = uniform_chain(4)  # fewer blocks than 2 * 4 stages: nothing chunked; 1f1b still plans
    plan = plan_chain(few, cl, 32, num_stages=4, replicas=(1,) * 4, microbatches=8,
                      schedules=("1f1b", "interleaved", "zb-v"))
    assert plan.schedule == "1f1b" and plan.chunks == 1
    with pytest.raises(NoFeasiblePlanError, match="zb-v need at least 2 pipeline positions"):
        plan_chain(chain, make_cluster(1), 8, schedules=("zb-v",))  # one device: one position


def test_searched_chunked_layouts_simulate_as_costed():
    # Free search (replicas, depth, microbatches) over every schedule family.
    chain = make_chain([(1e-3 * (1 + k % 3), 2e-3, 3e6, 1e5, 10**8) for k in range(12)])
    cost = CostModel(chain, make_cluster(8), 64)
    space = build_space(chain, cost.cluster, 64, PlanOptions(schedules=("1f1b", "gpipe", "interleaved", "zb-v")))
    lays = [lay for lay in enumerate_layouts(cost, space) if lay.chunks > 1]
    assert lays
    for lay in lays[:12]:
        tl = simulate_layout(cost, lay)
        assert tl.step_time == layout_step_time(cost, lay)
        assert len(lay.bounds) == lay.num_positions * lay.chunks + 1
        for s in range(lay.num_stages):  # a position's stages share replicas and sharding level
            first = [lay.position_of(x) for x in range(lay.num_stages)].index(lay.position_of(s))
            assert lay.replicas[s] == lay.replicas[first] and lay.shard[s] == lay.shard[first]
        assert max(lay.memory) <= cost.limit
    plan = plan_chain(chain, cost.cluster, 64, schedules=("1f1b", "gpipe", "interleaved", "zb-v"))
    base = plan_chain(chain, cost.cluster, 64)
    assert plan.step_time <= base.step_time and plan.timeline().step_time == plan.step_time
    assert dataclasses.replace(plan, search_time=0.0) == dataclasses.replace(
        plan_chain(chain, cost.cluster, 64, schedules=("1f1b", "gpipe", "interleaved", "zb-v")), search_time=0.0)


def test_cli_plans_with_chunked_schedules(tmp_path, capsys):
    out, png = tmp_path / "plan.json", tmp_path / "plan.png"
    rc = main(["plan", "--model", "gpt:tiny,n_layer=8", "--seq", "32", "--batch", "16", "--tensor", "1",
               "--cluster", "a64fx:nodes=4", "--schedules", "interleaved,zb-v", "--json", str(out), "--png", str(png)])
    assert rc == 0
    plan = Plan.load(out)
    assert plan.schedule in ("interleaved", "zb-v") and plan.chunks >= 2
    assert f"{plan.chunks} per rank" in capsys.readouterr().out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["plan", "--model", "gpt:tiny", "--seq", "16", "--batch", "8", "--cluster", "a64fx:nodes=2",
                 "--schedules", "zb-v3"]) == 2
    assert "experimental" in capsys.readouterr().err


def test_timeline_picture_has_a_row_per_rank_naming_its_stages():
    import matplotlib.pyplot as plt

    from rannc_py.planner.viz import plan_figure

    plan = pinned(uniform_chain(8), "zb-v", microbatches=4)  # bars wide enough to be numbered
    fig = plan_figure(plan)
    try:
        gantt, memory = fig.axes[:2]
        labels = [t.get_text() for t in gantt.get_yticklabels()]
        assert labels == [f"stages {r},{2 * P - 1 - r} (rank {r})" for r in range(P)]
        assert "2 per rank on 4 positions" in gantt.get_title(loc="left")
        legend = [t.get_text() for t in gantt.get_legend().get_texts()]
        assert "backward, weight gradients (W)" in legend and "numbers: stage.microbatch" in legend
        texts = {t.get_text() for t in gantt.texts}
        assert texts == {f"{s}.{i}" for s in range(2 * P) for i in range(4)}  # stage.microbatch on every F, I, W
        assert [t.get_text() for t in memory.get_xticklabels()] == [f"{r}\nstages {r},{2 * P - 1 - r}"
                                                                    for r in range(P)]
    finally:
        plt.close(fig)
