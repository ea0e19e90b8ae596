"""The runtime's fixed costs in the cost model: per action, per posted message, per parameter
tensor and per step; measured on ``local``, assumed in presets; and the prediction of a layout
given by hand."""

from __future__ import annotations

import dataclasses
import math
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import rannc_py
from rannc_py.hardware import calibrate
from rannc_py.hardware.cluster import Cluster, Device, Link, parse_cluster
from rannc_py.planner.api import plan_graph, predict_plan
from rannc_py.planner.chain import Block, Chain
from rannc_py.planner.cost import STEP_COLLECTIVES, CostModel
from rannc_py.planner.options import PlanOptions
from rannc_py.planner.search import Layout, layout_step_time, stage_costs
from rannc_py.runtime.layout import explicit_plan
from rannc_py.schedule import StageCosts, by_name, simulate
from rannc_py.schedule.fast import step_time

GiB = 2**30


def _cluster(devices: int, action: float = 0.0, tensor: float = 0.0, step: float = 0.0, post: float = 0.0) -> Cluster:
    dev = Device(name="test", peak_flops=(("float32", 1e12),), memory=16 * GiB, memory_bandwidth=1e11,
                 action_overhead=action, tensor_overhead=tensor, step_overhead=step)
    link = Link(1e10, 1e-6, post)
    return Cluster(name="test", device=dev, num_devices=devices, devices_per_node=devices, intra_node=link,
                   inter_node=link, topology="switched")


def _chain(n: int = 4) -> Chain:
    blocks = tuple(Block(ops=(k,), fwd_fixed=1e-4, fwd_per_sample=1e-4, bwd_fixed=2e-4, bwd_per_sample=2e-4,
                         act_bytes=1e4, out_bytes=1e4, params=((f"w{k}", 4096), (f"b{k}", 64)), flops=1e6)
                   for k in range(n))
    return Chain(blocks=blocks, input_bytes=0.0, output_bytes=512.0)


LAY = Layout(d=1, m=4, schedule="1f1b", bounds=(0, 2, 4), replicas=(1, 1), recompute=(False, False), objective=0.0,
             memory=(0.0, 0.0))


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(["gpipe", "1f1b", "interleaved", "zb-h1", "zb-v"]), p=st.integers(1, 4),
       k=st.integers(1, 3), seed=st.integers(0, 2**31 - 1))
def test_fast_path_equals_simulator_with_posts_and_fixed_costs(name, p, k, seed):
    rnd = random.Random(seed)
    sched = by_name(name, p, p * k)  # interleaved and ZB-V need a multiple of p microbatches

    def one() -> StageCosts:
        b = 2 * rnd.random()
        return StageCosts(forward=rnd.random(), backward=b, send_act=rnd.random(), send_grad=rnd.random(),
                          allreduce=rnd.random(), update=rnd.random(), backward_weight=rnd.random() * b,
                          post=rnd.choice([0.0, 0.1, 1.0]) * rnd.random(), fixed=rnd.random())

    costs = [one() for _ in range(sched.num_stages)]
    assert step_time(name, p * k, costs) == simulate(sched, costs).step_time


def test_posting_takes_the_ranks_own_time():
    # 2 stages, 1 microbatch, nothing costs but posting (1 s) and the step's fixed work (0.5 s):
    # F0, SEND_F (t=1) | RECV_F (1), F, B, SEND_B (2) | RECV_B (2), B, ALLREDUCE + fixed (2.5)
    costs = [StageCosts(forward=0.0, backward=0.0, post=1.0, fixed=0.5)] * 2
    tl = simulate(by_name("1f1b", 2, 1), costs)
    assert tl.step_time == 2.5
    assert step_time("1f1b", 1, costs) == 2.5


def test_stage_costs_charge_every_fixed_cost():
    bare = CostModel(_chain(), _cluster(2), 8)
    full = CostModel(_chain(), _cluster(2, action=1e-3, tensor=1e-4, step=2e-3, post=5e-5), 8)
    a, b = stage_costs(bare, LAY), stage_costs(full, LAY)
    for s in range(2):
        assert b[s].forward - a[s].forward == pytest.approx(1e-3)
        assert b[s].backward - a[s].backward == pytest.approx(1e-3)
        assert b[s].post == 5e-5 and a[s].post == 0.0
        assert b[s].update == a[s].update  # the optimizer's byte cost is unchanged
        # 4 parameter tensors per stage; the step's work: bookkeeping + STEP_COLLECTIVES rounds + the outputs
        link = full.cluster.link(2)
        step = 2e-3 + STEP_COLLECTIVES * (link.latency + 2 * 5e-5) + 0.5 * 512.0 * 8 / link.bandwidth
        assert b[s].fixed == pytest.approx(4 * 1e-4 + step, rel=1e-12)
        assert a[s].fixed == pytest.approx(STEP_COLLECTIVES * link.latency + 0.5 * 512.0 * 8 / link.bandwidth)
    assert layout_step_time(full, LAY) > layout_step_time(bare, LAY)


def test_split_backward_pays_two_actions():
    full = CostModel(_chain(), _cluster(2, action=1e-3), 8)
    zb = dataclasses.replace(LAY, schedule="zb-h1")
    one, two = stage_costs(full, LAY)[0], stage_costs(full, zb)[0]
    assert two.backward - one.backward == pytest.approx(1e-3)  # I and W each pay one action
    assert two.backward_weight >= 1e-3


def test_search_tables_charge_the_same_fixed_costs():
    # the DP's per-microbatch time and per-step sync include the fixed costs as the simulator's do
    bare = CostModel(_chain(), _cluster(2), 8)
    full = CostModel(_chain(), _cluster(2, action=1e-3, tensor=1e-4, step=2e-3, post=5e-5), 8)
    tb, tf = (c.stage_tables(1, 4, (1,), (1,), False, 2)[1] for c in (bare, full))
    # stage [0, 2): first stage, so it posts SEND_F and RECV_B per microbatch
    assert tf.c[0, 2, 0] - tb.c[0, 2, 0] == pytest.approx(2 * 1e-3 + 2 * 5e-5)
    # stage [2, 4): last stage, RECV_F and SEND_B
    assert tf.c[2, 4, 0] - tb.c[2, 4, 0] == pytest.approx(2 * 1e-3 + 2 * 5e-5)
    # stage [0, 4) alone posts nothing
    assert tf.c[0, 4, 0] - tb.c[0, 4, 0] == pytest.approx(2 * 1e-3)
    sc = stage_costs(full, LAY)[0]
    assert tf.ar[0, 2, 0] - tb.ar[0, 2, 0] == pytest.approx(sc.fixed - stage_costs(bare, LAY)[0].fixed)


def test_presets_state_their_assumed_fixed_costs():
    for spec in ("a64fx:nodes=2", "a100-80g:gpus=8", "h100:gpus=8"):
        c = parse_cluster(spec)
        assert c.device.action_overhead > 0 and c.device.tensor_overhead > 0 and c.device.step_overhead > 0
        assert c.intra_node.overhead > 0 and c.inter_node.overhead > 0


def test_bad_fixed_costs_are_config_errors():
    with pytest.raises(rannc_py.ConfigError, match="action_overhead"):
        Device(name="x", peak_flops=(("float32", 1.0),), memory=1, memory_bandwidth=1.0, action_overhead=-1.0)
    with pytest.raises(rannc_py.ConfigError, match="overhead"):
        Link(1.0, 0.0, math.inf)


def test_local_preset_measures_its_fixed_costs(tmp_path, monkeypatch):
    monkeypatch.setenv("RANNC_CACHE_DIR", str(tmp_path))
    torch.manual_seed(5)
    expect = torch.rand(3)
    torch.manual_seed(5)
    c = parse_cluster("local:ranks=1")
    assert torch.equal(torch.rand(3), expect)  # measuring left the caller's random stream as it was
    for name in calibrate.OVERHEADS:
        value = getattr(c.device, name)
        assert 0 < value < 0.1, (name, value)
    # cached: the same figures next time, without measuring
    monkeypatch.setattr(calibrate, "measure_overheads", lambda: pytest.fail("measured again"))
    assert parse_cluster("local:ranks=1").device == c.device


@pytest.fixture(scope="module")
def gpt():
    from rannc_py.models.gpt import GPT, gpt_config

    torch.manual_seed(0)
    model = GPT(gpt_config("tiny", n_layer=3))
    ids = torch.randint(0, 256, (4, 16))
    return rannc_py.trace(model, (ids,), {"labels": ids})


def test_a_given_layout_is_predicted_as_a_searched_one(gpt):
    opts = PlanOptions(cluster="a64fx:nodes=2", num_stages=2, microbatches=4, schedules=("1f1b",))
    searched = plan_graph(gpt.data(), 8, opts)
    # the same stages, given by hand: same costs, step time, memory and allreduce choice
    hand = explicit_plan(gpt.data(), {"stages": 2, "replicas": [1, 1], "microbatches": 4}, 8, 2)
    hand = dataclasses.replace(hand, stages=tuple(dataclasses.replace(h, ops=s.ops, param_fqns=s.param_fqns)
                                                  for h, s in zip(hand.stages, searched.stages)))
    got = predict_plan(gpt.data(), hand, opts)
    assert got.step_time == pytest.approx(searched.step_time, rel=1e-9)
    assert got.peak_memory_per_rank == searched.peak_memory_per_rank
    for g, s in zip(got.stages, searched.stages):
        assert g.allreduce == s.allreduce and g.ops == s.ops
        assert dataclasses.astuple(g.costs) == pytest.approx(dataclasses.astuple(s.costs), rel=1e-9)
    assert got.timeline().step_time == got.step_time


@pytest.mark.parametrize("schedule", ["interleaved", "zb-v"])
def test_a_given_chunked_layout_is_predicted_as_a_searched_one(gpt, schedule):
    opts = PlanOptions(cluster="a64fx:nodes=2", num_stages=2, microbatches=4, schedules=(schedule,))
    searched = plan_graph(gpt.data(), 8, opts)
    assert searched.chunks == 2 and searched.schedule == schedule
    hand = explicit_plan(gpt.data(), {"stages": 4, "schedule": schedule, "chunks": 2, "microbatches": 4}, 8, 2)
    hand = dataclasses.replace(hand, stages=tuple(dataclasses.replace(h, ops=s.ops, param_fqns=s.param_fqns,
                                                                      recompute=s.recompute)
                                                  for h, s in zip(hand.stages, searched.stages)))
    assert [st.ranks for st in hand.stages] == [st.ranks for st in searched.stages]
    got = predict_plan(gpt.data(), hand, opts)
    # zb-v's W share is estimated from the parameter-reading blocks, and a given layout's blocks are its
    # stages (the search's are finer): a stage whose blocks do not all read parameters differs slightly
    assert got.step_time == pytest.approx(searched.step_time, rel=1e-9 if schedule == "interleaved" else 1e-3)
    assert got.peak_memory_per_rank == pytest.approx(searched.peak_memory_per_rank, rel=1e-9)
    assert got.timeline().step_time == got.step_time and got.chunks == 2


def test_a_flop_balanced_layout_gets_a_prediction(gpt):
    opts = PlanOptions(cluster="a64fx:nodes=2")
    hand = explicit_plan(gpt.data(), {"stages": 2, "replicas": [1, 1], "microbatches": 2}, 8, 2)
    got = predict_plan(gpt.data(), hand, opts)
    assert got.step_time > 0 and got.samples_per_second > 0 and min(got.peak_memory_per_rank) > 0
    assert [s.ops for s in got.stages] == [s.ops for s in hand.stages]
    assert "0 ns" not in got.summary()
    with pytest.raises(rannc_py.PlanError, match="blocks"):
        from rannc_py.profiling.api import profile

        predict_plan(gpt.data(), hand, opts, profile=profile(gpt, 4, device="a64fx"))


def test_the_users_optimizer_sets_the_per_tensor_cost_on_local():
    from rannc_py.runtime.autoplan import job_tensor_overhead

    model = torch.nn.Linear(2, 2)
    adamw = job_tensor_overhead(torch.optim.AdamW(model.parameters()), None, 1)
    assert adamw is not None and 0 < adamw < 0.01
    assert job_tensor_overhead(lambda ps: torch.optim.SGD(ps, lr=0.1), "local:ranks=1", 1) > 0
    assert job_tensor_overhead(None, None, 1) is None
    assert job_tensor_overhead(torch.optim.AdamW(model.parameters()), "a64fx:nodes=1", 1) is None
    before = [p.detach().clone() for p in model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # the user's model is untouched


def test_a_given_layout_keeps_its_sharding_level_in_the_prediction(gpt):
    opts = PlanOptions(cluster="a64fx:nodes=2")
    whole = explicit_plan(gpt.data(), {"stages": 1, "replicas": [2], "microbatches": 2}, 8, 2)
    sharded = explicit_plan(gpt.data(), {"stages": 1, "replicas": [2], "microbatches": 2, "shard_optimizer": 1}, 8, 2)
    a, b = predict_plan(gpt.data(), whole, opts), predict_plan(gpt.data(), sharded, opts)
    assert [s.shard_level for s in a.stages] == [0] and [s.shard_level for s in b.stages] == [1]
    assert b.peak_memory_per_rank[0] < a.peak_memory_per_rank[0]  # the optimizer state is split over 2
    assert b.timeline().step_time == b.step_time > 0


def test_a_measured_profile_records_the_weight_gradient_share(tmp_path, monkeypatch):
    import json

    from rannc_py.models.gpt import GPT, gpt_config
    from rannc_py.profiling.api import profile
    from rannc_py.profiling.record import Profile

    monkeypatch.setenv("RANNC_CACHE_DIR", str(tmp_path))
    torch.manual_seed(0)
    ids = torch.randint(0, 256, (4, 16))
    gpt = rannc_py.trace(GPT(gpt_config("tiny", n_layer=2)), (ids,), {"labels": ids})
    prof = profile(gpt, 4, inputs=gpt.flatten_inputs((ids,), {"labels": ids}))
    assert len(prof.bwd_weight_fraction) == len(prof.blocks)
    assert all(0.0 <= f <= 1.0 for f in prof.bwd_weight_fraction)
    for f, nbytes in zip(prof.bwd_weight_fraction, prof.param_bytes):
        if nbytes == 0:
            assert f == 0.0  # nothing to differentiate but the inputs
    assert max(prof.bwd_weight_fraction) > 0.2  # the layers' matmuls have weight gradients
    assert Profile.from_json(prof.to_json()) == prof
    old = json.loads(prof.to_json())
    del old["bwd_weight_fraction"]
    assert Profile.from_json(json.dumps(old)).bwd_weight_fraction == ()  # saved before: unknown
    assert profile(gpt, 4, device="a64fx").bwd_weight_fraction == ()  # analytic: estimated instead


def test_split_backward_uses_the_measured_share():
    from rannc_py.planner.search import weight_grad_time

    chain = _chain()
    measured = Chain(blocks=tuple(dataclasses.replace(b, weight_fraction=0.25) for b in chain.blocks),
                     input_bytes=0.0, output_bytes=512.0)
    cost, est = CostModel(measured, _cluster(2), 8), CostModel(chain, _cluster(2), 8)
    bwd = 2 * (2e-4 + 2e-4 * 4)  # blocks 0 and 1 at 4 rows
    assert weight_grad_time(cost, 0, 2, 4, 1.0) == pytest.approx(0.25 * bwd)
    # without a measurement: each parameter block's forward time
    assert weight_grad_time(est, 0, 2, 4, 1.0) == pytest.approx(2 * (1e-4 + 1e-4 * 4))
