"""Sharded optimizer steps (levels 1 and 2): shards, the element-wise probe, options, plans, multi-rank equivalence.

The multi-rank cases (tests/mpi_scripts/shard_equiv.py) train against an
eager reference for 5 steps: dp2, dp4, replicas [2, 1] and [1, 3], pp2 x
dp2; AdamW, Adam with two param groups and a LambdaLR scheduler, SGD with
momentum, FusedAdamW, a non-element-wise optimizer that falls back; with
clip_grad_norm_, gradient accumulation, an optimizer factory, and GPT-2's
tied embedding split across stages; a grouped-query-attention Llama and
BERT besides GPT.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from mpi_launch import run_mpi
from torch import nn

from rannc_py.errors import ConfigError, PlanError
from rannc_py.optim import FusedAdamW, FusedSGD
from rannc_py.planner.options import PlanOptions, shard_levels
from rannc_py.planner.plan import Plan
from rannc_py.runtime.sharding import ALIGN, BucketShard, elementwise_problem, shard_size, slice_state

REPO = Path(__file__).resolve().parents[1]
EQUIV = REPO / "tests/mpi_scripts/shard_equiv.py"


def params(*shapes: tuple[int, ...]) -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    return [nn.Parameter(torch.randn(*s, generator=gen)) for s in shapes]


def test_shard_size_is_aligned_and_covers_the_bucket() -> None:
    for numel in (1, 15, 16, 17, 100, 4096, 4097):
        for ranks in (1, 2, 3, 4):
            m = shard_size(numel, ranks)
            assert m % ALIGN == 0 and ranks * m >= numel and (ranks * (m - ALIGN) < numel)
    assert shard_size(0, 3) == 0


@pytest.mark.parametrize("ranks", [2, 3])
def test_pieces_cover_every_element_once_and_alias_the_parameters(ranks: int) -> None:
    ps = params((5, 7), (3,), (40,), (2, 2))
    values = [p.detach().clone() for p in ps]
    seen = {id(p): torch.zeros(p.numel(), dtype=torch.int32) for p in ps}
    for k in range(ranks):
        copies = [nn.Parameter(v.clone()) for v in values]
        bucket = BucketShard(copies, ranks, k, level=1)
        for p, v in zip(copies, values):
            assert torch.equal(p.detach(), v)  # values moved into the flat buffer unchanged
        for pc in bucket.pieces:
            j = next(i for i, c in enumerate(copies) if c is pc.param)
            seen[id(ps[j])][pc.lo : pc.hi] += 1
            with torch.no_grad():
                pc.shard.add_(1.0)  # a step on the piece is a step on the parameter
            assert torch.equal(pc.param.detach().reshape(-1)[pc.lo : pc.hi], pc.shard.detach())
        assert bucket.own_block().numel() == bucket.block
        assert (bucket.own_block().data_ptr() - bucket.flat.data_ptr()) % (ALIGN * 4) == 0
    assert all(bool((s == 1).all()) for s in seen.values())


def test_take_grads_zero_fills_and_level_two_keeps_no_buffer() -> None:
    ps = params((3, 3), (4,))
    ps[0].grad = torch.ones(3, 3)
    one = BucketShard(ps, 2, 0, level=1)
    flat = one.take_grads()
    assert flat.numel() == 2 * one.block and float(flat.sum()) == 9.0 and ps[0].grad is None
    assert one.take_grads() is flat  # level 1 reuses its buffer
    two = BucketShard(params((3, 3)), 2, 1, level=2)
    assert two.take_grads() is not two.take_grads()
    summed = torch.arange(one.block, dtype=torch.float32)
    one.set_grads(summed)
    for pc in one.pieces:
        assert torch.equal(pc.shard.grad, summed[pc.at : pc.at + pc.hi - pc.lo])


class PerTensor(torch.optim.Optimizer):
    """A normalised step per tensor: not element-wise."""

    def __init__(self, ps, lr: float = 0.1) -> None:
        super().__init__(ps, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                p.add_(p.grad / p.grad.norm(), alpha=-group["lr"])


class NeedsArgs(torch.optim.SGD):
    def __init__(self, ps, lr: float, tag: str) -> None:
        super().__init__(ps, lr=lr)


@pytest.mark.parametrize("make", [
    lambda ps: torch.optim.AdamW(ps, lr=0.0),  # lr 0 (a warmup's start) still probes a real update
    lambda ps: torch.optim.Adam([{"params": ps[:1]}, {"params": ps[1:], "lr": 0.5, "weight_decay": 0.1}]),
    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True),
    lambda ps: FusedAdamW(ps), lambda ps: FusedSGD(ps, momentum=0.5),
    lambda ps: torch.optim.Adagrad(ps), lambda ps: torch.optim.RMSprop(ps, momentum=0.1),
])
def test_elementwise_optimizers_pass_the_probe(make) -> None:
    assert elementwise_problem(make(params((2, 2), (3,)))) is None


@pytest.mark.parametrize("make, reason", [
    (lambda ps: PerTensor(ps), "not element-wise"),
    (lambda ps: torch.optim.Adafactor(ps), "not element-wise"),
    (lambda ps: NeedsArgs(ps, lr=0.1, tag="x"), "could not be rebuilt"),
])
def test_other_optimizers_fail_the_probe_with_a_reason(make, reason) -> None:
    problem = elementwise_problem(make(params((2, 2))))
    assert problem is not None and reason in problem and type(make(params((1,)))).__name__ in problem


def test_slice_state_cuts_param_shaped_tensors_only() -> None:
    p = params((4, 5))[0]
    bucket = BucketShard([p], 2, 1, level=1)
    (pc,) = bucket.pieces
    state = {"step": torch.tensor(3.0), "exp_avg": torch.arange(20.0).reshape(4, 5), "note": "x"}
    cut = slice_state(state, p.shape, pc.lo, pc.hi)
    assert torch.equal(cut["exp_avg"], torch.arange(16.0, 20.0)) and float(cut["step"]) == 3.0
    assert cut["note"] == "x" and cut["step"] is not state["step"]


def test_shard_optimizer_option_values() -> None:
    assert PlanOptions().shard_optimizer is False and PlanOptions(shard_optimizer=None).shard_optimizer is None
    assert PlanOptions(shard_optimizer=2).shard_optimizer == 2
    with pytest.raises(ConfigError, match="explicit layout"):
        PlanOptions(shard_optimizer=[0, 2])
    assert shard_levels(True, 3) == (1, 1, 1) and shard_levels(False, 2) == (0, 0) and shard_levels(2, 1) == (2,)
    for bad in ("yes", 3, -1, [1, 5], [], [True]):
        with pytest.raises(ConfigError, match="shard_optimizer"):
            PlanOptions(shard_optimizer=bad)
        with pytest.raises(ConfigError, match="shard_optimizer"):
            shard_levels(bad, 2)
    with pytest.raises(ConfigError, match="one level per stage"):
        shard_levels((1, 2), 3)


def test_layout_dict_takes_shard_optimizer() -> None:
    from rannc_py.graph.trace import trace
    from rannc_py.runtime.layout import check_layout, explicit_plan

    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    graph = trace(model, (torch.randn(4, 4),))
    p = explicit_plan(graph, {"stages": 2, "replicas": [2, 1], "shard_optimizer": True}, 8, 3)
    assert [st.shard_level for st in p.stages] == [1, 0]  # one replica: nothing to shard
    p = explicit_plan(graph, {"stages": 2, "replicas": [2, 2], "shard_optimizer": [2, 1]}, 8, 4)
    assert [st.shard_level for st in p.stages] == [2, 1]
    with pytest.raises(ConfigError, match="shard_optimizer"):
        check_layout({"stages": 2, "shard_optimizer": [1]})


def test_plan_records_the_level_per_stage() -> None:
    from test_plan_data import sample_plan

    p = sample_plan()
    sharded = dataclasses.replace(p, stages=(dataclasses.replace(p.stages[0], shard_level=2), p.stages[1]))
    assert Plan.from_json(sharded.to_json()) == sharded
    assert "shard_level" not in p.to_json()  # level 0 writes as plans did before the field
    assert Plan.from_json(p.to_json()).stages[0].shard_level == 0
    header, row0 = sharded.summary().splitlines()[2:4]
    assert header.split()[-1] == "shard" and row0.split()[-1] == "2"
    with pytest.raises(PlanError, match="shard_level"):
        dataclasses.replace(p, stages=(dataclasses.replace(p.stages[0], shard_level=3), p.stages[1]))


# ------------------------------------------------------------------ the planner
def planned(chain, cluster: str, batch: int, **options):
    """The plan rannc_py.plan makes of ``chain`` with ``options``, and its cost model."""
    from rannc_py.hardware.cluster import as_cluster
    from rannc_py.planner.api import build_space, layout_to_plan, search_chain
    from rannc_py.planner.cost import CostModel

    cl = as_cluster(cluster)
    opts = PlanOptions(**options)
    cost = CostModel(chain, cl, batch, shard_optimizer=opts.shard_optimizer)
    lay, step = search_chain(cost, build_space(chain, cl, batch, opts))
    return layout_to_plan(cost, lay, step, "fp", torch.float32, 0.0), cost


def test_cost_model_charges_state_over_replicas_and_step_over_them() -> None:
    from test_plan_data import synthetic_chain

    from rannc_py.hardware.cluster import as_cluster
    from rannc_py.planner.cost import CostModel

    chain = synthetic_chain(4, tied=True)
    cl = as_cluster("a100-80g:gpus=8")
    plain, sharded = (CostModel(chain, cl, 64, shard_optimizer=v) for v in (False, True))
    tp, ts = (c.stage_tables(1, 2, (4,), (1,), False, 4)[1] for c in (plain, sharded))
    t = plain.t
    for i, j in ((0, 1), (1, 3), (0, 4)):
        P, T = t.param_bytes[i, j], t.tied_bytes[i, j]
        own = P - T
        assert tp.mem[i, j, 0] - ts.mem[i, j, 0] == pytest.approx(P * 4 - (2 * P + own * 3 / 4 + T * 2))
        assert ts.shard[i, j, 0] == 1 and tp.shard[i, j, 0] == 0
        gather, update = sharded.sharded_step(P, T, 4)
        assert update == pytest.approx((own / 4 + T) * plain.update_cost) and gather > 0
        assert sharded.state_bytes(P, T, 4, 1) == pytest.approx((own / 4 + T) * 2)
        assert plain.state_bytes(P, T, 4, 0) == pytest.approx(P * 2)
    assert ts.ar[0, 4, 0] < tp.ar[0, 4, 0]  # the step on a quarter of the parameters
    # None: the faster level per entry, the same arrays as forcing it where sharding wins
    free = CostModel(chain, cl, 64, shard_optimizer=None).stage_tables(1, 2, (4,), (1,), False, 4)[1]
    assert np.array_equal(free.ar, np.minimum(tp.ar, ts.ar))
    with pytest.raises(ConfigError, match="explicit layout"):
        CostModel(chain, cl, 64, shard_optimizer=(1, 0))


def test_plans_record_and_simulate_the_levels_they_chose() -> None:
    from test_plan_data import synthetic_chain

    from rannc_py.planner.api import NoFeasiblePlanError

    chain = synthetic_chain(6, tied=True)
    plan, _ = planned(chain, "a100-80g:gpus=8", 64, shard_optimizer=None, replicas=(4, 4))
    assert [st.shard_level for st in plan.stages] == [1, 1]
    assert plan.timeline().step_time == pytest.approx(plan.step_time, rel=1e-9)  # simulated with the levels
    assert all(st.allreduce in ("mpi", "ring") for st in plan.stages)
    assert Plan.from_json(plan.to_json()) == plan and "shard" in plan.summary()
    forced, _ = planned(chain, "a100-80g:gpus=8", 64, shard_optimizer=2, replicas=(4, 4))
    assert [st.shard_level for st in forced.stages] == [2, 2]
    unsharded, _ = planned(chain, "a100-80g:gpus=8", 64, replicas=(4, 4))
    assert [st.shard_level for st in unsharded.stages] == [0, 0]
    assert unsharded.step_time > plan.step_time
    # On Tofu's torus the sharded stage's reduce-scatter + allgather are the torus allreduce's own halves
    # (the same bytes), so sharding wins there too by its smaller optimizer step.
    torus, _ = planned(chain, "a64fx:nodes=8", 64, shard_optimizer=None, replicas=(4, 4))
    whole, _ = planned(chain, "a64fx:nodes=8", 64, replicas=(4, 4))
    assert [st.shard_level for st in torus.stages] == [1, 1]
    assert [st.allreduce for st in torus.stages] == ["torus", "torus"] and torus.step_time < whole.step_time
    sharded, _ = planned(chain, "a64fx:nodes=8", 64, shard_optimizer=True, replicas=(4, 4))
    assert max(sharded.peak_memory_per_rank) < max(whole.peak_memory_per_rank)
    # parameters dominate (activations cannot be recomputed away): only the sharded state fits
    heavy = param_heavy_chain()
    sharded, _ = planned(heavy, "a64fx:nodes=8", 64, shard_optimizer=True, replicas=(4, 4))
    limit = int(max(sharded.peak_memory_per_rank) * 1.01 / 0.9)
    fit, _ = planned(heavy, f"a64fx:nodes=8,memory={limit}", 64, shard_optimizer=None, replicas=(4, 4))
    assert [st.shard_level for st in fit.stages] == [1, 1] and max(fit.peak_memory_per_rank) <= limit * 0.9
    with pytest.raises(NoFeasiblePlanError):
        planned(heavy, f"a64fx:nodes=8,memory={limit}", 64, replicas=(4, 4))


def param_heavy_chain():
    """Four blocks of 400 MB of parameters each and next to no activations."""
    from rannc_py.planner.chain import Block, Chain

    blocks = tuple(Block(ops=(k,), fwd_fixed=1e-5, fwd_per_sample=1e-4, bwd_fixed=2e-5, bwd_per_sample=2e-4,
                         act_bytes=1e3, out_bytes=1e3, params=((f"w{k}", 400_000_000),), flops=1e8) for k in range(4))
    return Chain(blocks=blocks, input_bytes=1e3, param_names=tuple((f"w{k}",) for k in range(4)), output_bytes=1e3)


SHARD_MATRIX = {
    2: ["gpt:p1_r2_m1_1f1b:1:adamw", "gpt:p1_r2_m2_gpipe:2:adam2:accum,clip", "gpt:p1_r2_m1_1f1b:1:sgdm:clip",
        "gpt:p1_r2_m2_1f1b:2:fused:accum", "gpt:p1_r2_m1_1f1b:1:normsgd"],
    3: ["gpt:p2_r2x1_m2_1f1b:1:adamw:clip", "hf_gpt2:p2_r2x1_m2_gpipe:2:adam2:accum", "bert:p2_r2x1_m2_1f1b:2:sgdm"],
    4: ["gpt:p1_r4_m1_gpipe:2:adamw:clip", "gpt:p2_r2x2_m2_1f1b:2:adam2:accum,clip", "gpt:p2_r1x3_m2_1f1b:1:sgdm",
        "hf_gpt2:p2_r1x3_m2_1f1b:2:fused:clip", "gpt:p2_r2x2_m2_gpipe:1:factory-adamw",
        "hf_llama:p2_r2x2_m2_1f1b:1:adamw", "gpt:p1_r4_m1_1f1b:1:normsgd"],
}


@pytest.mark.parametrize("ranks", sorted(SHARD_MATRIX))
def test_sharded_training_matches_eager(ranks: int) -> None:
    cases = SHARD_MATRIX[ranks]
    out = run_mpi(ranks, EQUIV, *cases, timeout=600).stdout
    assert out.count(": ok") == len(cases), out


def test_optimizer_state_dict_on_one_process_is_torchs_for_the_unwrapped_model() -> None:
    """Keyed as torch numbers the unwrapped model's parameters; load checks the groups and shapes."""
    import sys

    import rannc_py

    sys.path.insert(0, str(REPO / "tests/mpi_scripts"))
    from runtime_models import build_model, make_batch

    torch.manual_seed(0)
    model, ref = build_model("gpt"), build_model("gpt")
    ref.load_state_dict(model.state_dict())
    groups = lambda m: [{"params": [p for p in m.parameters() if p.dim() > 1]},
                        {"params": [p for p in m.parameters() if p.dim() <= 1], "lr": 2e-3}]
    opt, ropt = torch.optim.Adam(groups(model)), torch.optim.Adam(groups(ref))
    factory = rannc_py.RaNNCModule(build_model("gpt"), lambda ps: torch.optim.SGD(ps))
    with pytest.raises(ConfigError, match="needs the optimizer"):
        factory.optimizer_state_dict()
    wrapped = rannc_py.RaNNCModule(model, opt, plan={"stages": 1, "shard_optimizer": 1})
    assert wrapped.optimizer_state_dict() == opt.state_dict()  # before the first call: the optimizer's own
    batch = make_batch("gpt", 4, seed=0)
    wrapped(**batch).loss.backward()
    ref(**batch).loss.backward()
    opt.step()
    ropt.step()
    got, want = wrapped.optimizer_state_dict(), ropt.state_dict()
    assert got["param_groups"] == want["param_groups"] and sorted(got["state"]) == sorted(want["state"])
    for i, st in want["state"].items():
        for k, v in st.items():
            torch.testing.assert_close(got["state"][i][k], v)
    wrapped.load_optimizer_state_dict(want)
    with pytest.raises(ConfigError, match="param groups hold"):
        wrapped.load_optimizer_state_dict({"state": {}, "param_groups": want["param_groups"][:1]})
    bad = {"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": want["param_groups"]}
    with pytest.raises(ConfigError, match="has shape"):
        wrapped.load_optimizer_state_dict(bad)
    with pytest.raises(ConfigError, match="'state' and 'param_groups'"):
        wrapped.load_optimizer_state_dict({"x": 1})
    wrapped.close()


def test_optimizer_state_moves_between_layouts_and_matches_the_plan() -> None:
    checks = ["pp2_level0", "uneven_level2", "eager", "planned_state"]  # checkpoints: test_checkpoint_sharded.py
    out = run_mpi(4, REPO / "tests/mpi_scripts/shard_resume.py", *checks, timeout=600).stdout
    assert out.count(": ok") == len(checks), out


def test_level_one_backward_accumulates_into_the_kept_buffer() -> None:
    ps = params((4, 5), (3,))
    bucket = BucketShard(ps, 2, 0, level=1)
    bucket.prepare()
    grads = bucket._grads  # the kept buffer
    ((ps[0] ** 2).sum() + ps[1].sum()).backward()
    (ps[0] ** 2).sum().backward()  # a second microbatch adds in place
    assert ps[0].grad.data_ptr() == grads.data_ptr()
    flat = bucket.take_grads()
    assert flat is grads and ps[0].grad is None
    torch.testing.assert_close(flat[:20], 4 * ps[0].detach().reshape(-1))
    assert torch.equal(flat[20:23], torch.ones(3)) and not flat[23:].any()
