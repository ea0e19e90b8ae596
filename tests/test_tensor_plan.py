"""Tensor parallelism in the planner: the graph's tensor annotation, the cost of a tensor-parallel
stage, the search over tensor degrees, pinned and bad degrees, and tp plans' JSON and simulation."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import tp_models

import rannc_py
from rannc_py.comm.cost import best_allreduce
from rannc_py.errors import ConfigError, NoFeasiblePlanError
from rannc_py.graph.tensor_annotate import tensor_annotation
from rannc_py.graph.tensor_cost import DegreeCosts, TensorAnnotation
from rannc_py.hardware.cluster import Link, parse_cluster
from rannc_py.planner.api import chain_from_graph, plan_graph, predict_plan
from rannc_py.planner.cost import CostModel
from rannc_py.planner.options import PlanOptions
from rannc_py.planner.plan import Plan
from rannc_py.planner.search import SearchSpace, enumerate_layouts, layout_step_time, simulate_layout
from rannc_py.planner.tensor import group_link, tensor_chain
from rannc_py.profiling.analytic import analytic_profile


def _traced(case):
    model, args, kwargs = case()
    return rannc_py.trace(model, args, kwargs)


@pytest.fixture(scope="module")
def gpt():
    g = _traced(tp_models.gpt_vocab96)
    return g, tensor_annotation(g)


class WideMLP(torch.nn.Module):
    """One wide MLP (column then row matmul) and a loss: every matmul splits."""

    def __init__(self, width: int = 64, hidden: int = 1024) -> None:
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(width, hidden), torch.nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.mse_loss(self.fc2(torch.relu(self.fc1(x))), target)


@pytest.fixture(scope="module")
def mlp():
    torch.manual_seed(0)
    g = rannc_py.trace(WideMLP(), (torch.randn(8, 64), torch.randn(8, 64)))
    return g, tensor_annotation(g, (2, 4))


def _names(graph, ops):
    return {graph.ops[i].name for i in ops}


def test_annotation_of_gpt(gpt):
    g, ann = gpt
    assert ann.allowed == (2, 3, 4, 6, 8) and ann.graph_fingerprint == g.fingerprint()
    d2 = ann.at(2)
    kinds = [c.kind for c in d2.collectives]
    # per layer: one allreduce after attention's and one after the MLP's row matmul; the vocab
    # embedding's allreduce; the vocab-parallel cross-entropy; the gathered logits
    layers = g.program.model.config.n_layer
    assert kinds.count("allreduce") == 2 * layers + 1
    assert kinds.count("vocab_cross_entropy") == 1 and kinds.count("allgather") == 1
    assert kinds.count("grad_allreduce") >= 2 * layers  # Megatron's f before each column matmul
    ce = next(c for c in d2.collectives if c.kind == "vocab_cross_entropy")
    # max, sum and target logit of each row: SEQ - 1 rows per sample (the labels are shifted by one)
    assert ce.messages == 3 and ce.per_sample_bytes == 3 * 4 * (tp_models.SEQ - 1)
    assert "transformer.wte.weight" in d2.sharded_params  # vocab-parallel embedding (tied head)
    assert all(any(f"h.{k}." in p for p in d2.sharded_params) for k in range(layers))
    row = next(c for c in d2.collectives if c.kind == "allreduce" and g.ops[c.op].target.endswith("linear.default"))
    assert row.per_sample_bytes == g.ops[row.op].outputs[0].nbytes / g.batch_size and row.fixed_bytes == 0
    assert TensorAnnotation.from_dict(json.loads(json.dumps(ann.to_dict()))) == ann


def test_annotation_of_hf_gpt2_blocked_c_attn():
    g = _traced(tp_models.gpt2_vocab96)
    ann = tensor_annotation(g, (2,))
    d2 = ann.at(2)
    assert any(p.endswith("attn.c_attn.weight") for p in d2.sharded_params)
    assert any(p.endswith("mlp.c_fc.weight") for p in d2.sharded_params)
    assert any(g.ops[i].target.endswith("addmm.default") for i in d2.split_ops)


def test_annotation_of_llama_gqa():
    g = _traced(lambda: tp_models.llama_kv(2, vocab=96))
    ann = tensor_annotation(g, (2, 4))
    assert ann.allowed == (2, 4)
    two, four = set(ann.at(2).sharded_params), set(ann.at(4).sharded_params)
    assert "model.layers.0.self_attn.q_proj.weight" in two and "model.layers.0.self_attn.k_proj.weight" in two
    # 2 KV heads do not divide by 4: keys and values stay replicated, queries and the MLP split
    assert "model.layers.0.self_attn.q_proj.weight" in four
    assert "model.layers.0.mlp.gate_proj.weight" in four
    assert "model.layers.0.self_attn.k_proj.weight" not in four


def test_annotation_of_a_region_that_cannot_split():
    g = _traced(tp_models.mixed_mlp)
    d2 = tensor_annotation(g, (2,)).at(2)
    split = _names(g, d2.split_ops)
    by_module = {op.module_path: op.name for op in g.ops if op.target.endswith("linear.default")}
    softmax = next(op.name for op in g.ops if "softmax" in op.target)
    assert by_module["fc1"] in split and by_module["fc2"] in split
    # a softmax over the features mixes them: up's matmul, the softmax and the product stay replicated
    assert by_module["up"] not in split and softmax not in split
    assert "fc1.weight" in d2.sharded_params and "up.weight" not in d2.sharded_params
    # the replicated region's cost is not divided: per-op blocks, each op's time kept or halved
    dev = parse_cluster("a64fx:nodes=2").device
    prof = analytic_profile(g, [[i] for i in range(len(g.ops))], g.batch_size, dev)
    chain = chain_from_graph(g, prof)
    tc = tensor_chain(g, chain, d2, dev)
    for i, (full, mine) in enumerate(zip(chain.blocks, tc.chain.blocks)):
        expect = full.fwd_per_sample / 2 if i in d2.split_ops else full.fwd_per_sample
        assert mine.fwd_per_sample == pytest.approx(expect, rel=1e-12), g.ops[i].name


def test_bad_degrees(gpt, mlp):
    g, ann = gpt
    with pytest.raises(ConfigError, match="allowed degrees are"):
        ann.at(5)
    with pytest.raises(ConfigError, match=">= 2"):
        tensor_annotation(g, (1,))
    with pytest.raises(ConfigError, match="rannc_py.trace"):
        tensor_annotation(g.data(), (2,))
    with pytest.raises(ConfigError, match="tensor degree >= 1"):
        PlanOptions(tensor=0)
    with pytest.raises(ConfigError, match="tensor degree >= 1"):
        PlanOptions(tensor=True)
    data = g.data()
    with pytest.raises(ConfigError, match="splits nothing.*allowed degrees are \\[1, 2, 3, 4, 6, 8\\]"):
        plan_graph(data, 8, PlanOptions(cluster="a64fx:nodes=10", tensor=5), tensor=ann)
    with pytest.raises(ConfigError, match="does not divide the cluster's 4 devices.*\\[1, 2, 4\\]"):
        plan_graph(data, 8, PlanOptions(cluster="a64fx:nodes=4", tensor=3), tensor=ann)
    with pytest.raises(ConfigError, match="needs the graph's tensor annotation"):
        plan_graph(data, 8, PlanOptions(cluster="a64fx:nodes=4", tensor=2))
    with pytest.raises(ConfigError, match="splits nothing"):  # the frontend names the allowed degrees too
        rannc_py.plan(g, batch_size=8, cluster="a64fx:nodes=10", tensor=5)
    _, ann2 = mlp
    with pytest.raises(rannc_py.PlanError, match="different graph"):
        plan_graph(data, 8, PlanOptions(cluster="a64fx:nodes=4"), tensor=ann2)


def test_cost_of_a_tp_stage_by_hand(mlp):
    """Every op of the MLP splits (hand-made costs: f = 1): a stage's F and B are halved, plus the
    row matmul's allreduce (F) and the gradient allreduce of the column matmul's input (B);
    parameters, gradients and Adam state take half."""
    g, ann = mlp
    real = ann.at(2)
    costs = DegreeCosts(degree=2, split_ops=tuple(range(len(g.ops))),
                        split_bytes=tuple((i, op.output_bytes) for i, op in enumerate(g.ops)),
                        collectives=real.collectives, sharded_params=tuple(sorted(g.params)))
    assert [c.kind for c in real.collectives] == ["grad_allreduce", "allreduce"]
    cl = parse_cluster("a100-80g:gpus=2")
    prof = analytic_profile(g, [list(range(len(g.ops)))], g.batch_size, cl.device)
    chain = chain_from_graph(g, prof)
    tc = tensor_chain(g, chain, costs, cl.device)
    one = CostModel(chain, cl, 8, "adam", return_outputs=False)
    two = CostModel(tc.chain, cl, 8, "adam", return_outputs=False, tensor=tc)
    assert two.devices == 1 and two.group_link == cl.intra_node and group_link(cl, 2) == cl.intra_node
    m, b = 2, 4  # 8 rows in 2 microbatches on one tensor group
    tab1 = one.stage_tables(1, m, (2,), (1,), False, 2)[1]
    tab2 = two.stage_tables(1, m, (1,), (1,), False, 1)[1]
    blk = chain.blocks[0]
    link = cl.intra_node
    act = 64 * 4  # bytes per sample of the fc2 output (allreduced) and of x (its gradient allreduced)
    coll = 2 * (best_allreduce(act * b, 2, alpha=link.latency, beta=link.bandwidth)[1] + 2 * link.overhead)
    compute = (blk.fwd_fixed + blk.bwd_fixed + (blk.fwd_per_sample + blk.bwd_per_sample) * b) / 2
    fixed = 2 * cl.device.action_overhead
    assert float(tab2.c[0, 1, 0]) == pytest.approx(compute + coll + fixed, rel=1e-12)
    assert float(two.group_tables(b)[0][0, 1] + two.group_tables(b)[1][0, 1]) == pytest.approx(coll, rel=1e-12)
    # model state: 16 bytes per parameter (weights, gradient, two Adam buffers), halved by the shards
    p_bytes = sum(p.nbytes for p in g.params.values())
    assert two.t.param_bytes[0, 1] == pytest.approx(p_bytes / 2, abs=4)
    state1 = one._shard_candidates(1)[0][1][0, 1]
    state2 = two._shard_candidates(1)[0][1][0, 1]
    assert state1 == 4 * p_bytes and state2 == pytest.approx(state1 / 2, abs=16)
    assert two.t.act[0, 1] == pytest.approx(one.t.act[0, 1] / 2)
    assert float(tab2.mem[0, 1, 0]) < float(tab1.mem[0, 1, 0])


def _fast_cluster(spec: str, latency: float, bandwidth: float):
    cl = parse_cluster(spec)
    link = Link(bandwidth=bandwidth, latency=latency)
    return dataclasses.replace(cl, intra_node=link, inter_node=link)


def test_search_picks_tp_when_memory_forces_it_and_not_when_links_are_slow(mlp):
    g, ann = mlp
    data = g.data()
    base = {"cluster": "a100-80g:gpus=2", "max_stages": 1, "return_outputs": False}
    need1 = None
    try:
        plan_graph(data, 8, PlanOptions(**base, tensor=1, memory_limit=100_000), tensor=ann)
    except NoFeasiblePlanError as e:
        need1 = e.required_memory
    assert need1 is not None
    p2 = plan_graph(data, 8, PlanOptions(**base, tensor=2, memory_limit=need1), tensor=ann)
    assert max(p2.peak_memory_per_rank) < 0.8 * need1 * 0.9
    limit = int(need1 * 0.8)  # t = 1 does not fit, t = 2 does
    picked = plan_graph(data, 8, PlanOptions(**base, memory_limit=limit), tensor=ann)
    assert picked.stages[0].tensor == 2 and picked.stages[0].replicas == 1
    assert picked.stages[0].tensor_collectives > 0
    assert picked.stages[0].ranks == (0, 1) and picked.peak_memory_per_rank[0] <= limit * 0.9
    # memory to spare, a slow link and a large batch: data parallelism (one allreduce of the
    # 0.5 MB of gradients per step) beats the group's collectives (2 x 1 MiB of activations per
    # step); the plan equals the one made without an annotation
    slow = _fast_cluster("a100-80g:gpus=2", latency=1e-3, bandwidth=1e8)
    opts = PlanOptions(**{**base, "cluster": slow})
    chosen = plan_graph(data, 4096, opts, cluster=slow, tensor=ann)
    plain = plan_graph(data, 4096, opts, cluster=slow)
    assert chosen.stages[0].tensor == 1
    assert dataclasses.replace(chosen, search_time=0.0) == dataclasses.replace(plain, search_time=0.0)


def test_pinned_tensor_plan_json_and_simulation(gpt):
    g, ann = gpt
    data = g.data()
    plan = plan_graph(data, 16, PlanOptions(cluster="a64fx:nodes=8", tensor=4), tensor=ann)
    assert {st.tensor for st in plan.stages} == {4}
    assert sum(len(st.ranks) for st in plan.stages) == 8 and plan.world_size == 8
    for st in plan.stages:
        assert list(st.ranks) == list(range(st.ranks[0], st.ranks[0] + len(st.ranks)))
        assert st.tensor_groups() == [st.ranks[j * 4:(j + 1) * 4] for j in range(st.replicas)]
        assert st.tensor_collectives > 0
    back = Plan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert back == plan and json.loads(plan.to_json())["stages"][0]["tensor"] == 4
    assert plan.timeline().step_time == plan.step_time  # the simulator replays the fast path's figure
    summary = plan.summary()
    assert "tensor" in summary and "tp comm/mb" in summary
    # the simulator and the fast path agree bit for bit on every tp layout the search considers
    tc = tensor_chain(data, chain_from_graph(data, analytic_profile(data, _blocks(data), data.batch_size,
                                                                    parse_cluster("a64fx:nodes=8").device)),
                      ann.at(2), parse_cluster("a64fx:nodes=8").device)
    cost = CostModel(tc.chain, parse_cluster("a64fx:nodes=8"), 16, tensor=tc)
    space = SearchSpace(pipelines=(1, 2), microbatches=(1, 2, 4, 8), schedules=("1f1b", "gpipe", "zb-h1"),
                        recompute=None, max_stages=4, rvals=(1, 2, 4))
    lays = enumerate_layouts(cost, space)
    assert lays and all(lay.tensor == 2 for lay in lays)
    for lay in lays:
        assert simulate_layout(cost, lay).step_time == layout_step_time(cost, lay)


def _blocks(graph):
    from rannc_py.profiling.coarsen import coarsen

    return coarsen(graph)


def test_frontend_searches_degrees(gpt, tmp_path):
    g, _ = gpt
    with pytest.raises(NoFeasiblePlanError) as e:
        rannc_py.plan(g, batch_size=8, cluster="a64fx:nodes=4", memory_limit="16KiB", return_outputs=False, tensor=1)
    need1 = e.value.required_memory
    assert need1 is not None
    # a device that no stage of degree 1 fits: the search splits the stages over tensor groups
    plan = rannc_py.plan(g, batch_size=8, cluster="a64fx:nodes=4", memory_limit=int(need1 * 0.8),
                         return_outputs=False)
    assert plan.stages[0].tensor > 1
    plain = rannc_py.plan(g.data(), batch_size=8, cluster="a64fx:nodes=4", return_outputs=False)
    assert {st.tensor for st in plain.stages} == {1}
    from rannc_py.planner.viz import draw_plan

    out = draw_plan(plan, tmp_path / "tp.png", title="tp")
    assert out.exists() and out.stat().st_size > 0


def test_hand_layout_predicted():
    """A Fugaku-LLM-shaped hand layout (TP 6 x PP 8 x DP 288, m = 7, recompute on stages 0-3), one
    13B-wide layer per stage, priced by the same cost model and simulator."""
    from rannc_py.cli import build_model
    from rannc_py.graph.partition import balanced_assignment

    model, args, kwargs = build_model("gpt:13b,n_layer=8", 2048)
    g = rannc_py.trace(model, args, kwargs)
    ann = tensor_annotation(g, (6,))
    data = g.data()
    plan = hand_plan(data, balanced_assignment(data, 8), tensor=6, replicas=288, microbatches=7,
                     recompute=[True] * 4 + [False] * 4, batch_size=2016)
    opts = PlanOptions(cluster="a64fx:nodes=13824", return_outputs=False)
    got = predict_plan(data, plan, opts, tensor=ann)
    assert [st.ranks for st in got.stages] == [st.ranks for st in plan.stages]
    assert all(st.tensor == 6 and st.replicas == 288 and st.tensor_collectives > 0 for st in got.stages)
    assert got.timeline().step_time == got.step_time > 0
    assert 0 < max(got.peak_memory_per_rank) < 32 * 2**30
    # recompute re-runs the forward and its collectives
    assert got.stages[1].costs.backward > got.stages[5].costs.backward
    with pytest.raises(ConfigError, match="needs the graph's tensor annotation"):
        predict_plan(data, plan, opts)


def hand_plan(graph, assignment, *, tensor, replicas, microbatches, recompute, batch_size):
    """A Plan for a hand layout: the stages of ``assignment``, each ``replicas`` groups of ``tensor`` ranks."""
    from rannc_py.planner.plan import StagePlan

    stages, first = [], 0
    for s in range(max(assignment) + 1):
        ops = tuple(i for i, a in enumerate(assignment) if a == s)
        fqns = sorted({f for i in ops for f in (*graph.ops[i].params, *graph.ops[i].buffers)})
        ranks = tuple(range(first, first + replicas * tensor))
        first += len(ranks)
        stages.append(StagePlan(index=s, ops=ops, param_fqns=tuple(fqns), ranks=ranks, recompute=recompute[s],
                                predicted_compute_time=0.0, predicted_peak_memory=0, tensor=tensor))
    return Plan(batch_size=batch_size, microbatches=microbatches, schedule="1f1b", stages=tuple(stages),
                world_size=first, graph_fingerprint=graph.fingerprint(), cluster="hand", step_time=0.0,
                peak_memory_per_rank=(0,) * first, samples_per_second=0.0, mfu=0.0, search_time=0.0)


def test_cli_tensor(capsys):
    from rannc_py.cli import main

    rc = main(["plan", "--model", "gpt:tiny,n_layer=2,vocab_size=96", "--seq", "16", "--batch", "8",
               "--cluster", "a64fx:nodes=4", "--tensor", "2"])
    out = capsys.readouterr().out
    assert rc == 0 and "tp comm/mb" in out and "tensor splits" in out
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit() and "(x" in line]
    assert rows and all(r[5] == "2" for r in rows), out
