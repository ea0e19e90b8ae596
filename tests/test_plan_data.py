"""Plan: JSON round-trip, atomic save/load, assignment, rank lookup, summary, checks, recorded timeline."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from rannc_py.errors import PlanError
from rannc_py.frontend import plan
from rannc_py.graph.trace import trace
from rannc_py.hardware.cluster import as_cluster
from rannc_py.planner.api import build_space, layout_to_plan, model_output_bytes, search_chain
from rannc_py.planner.chain import Block, Chain
from rannc_py.planner.cost import CostModel
from rannc_py.planner.options import PlanOptions
from rannc_py.planner.plan import Plan, StagePlan, split_sizes
from rannc_py.schedule import StageCosts


def sample_plan(**over) -> Plan:
    stages = (
        StagePlan(index=0, ops=(0, 1, 2), param_fqns=("emb.weight", "h.0.w"), ranks=(0, 1), recompute=False,
                  predicted_compute_time=0.1234567890123, predicted_peak_memory=1000, allreduce="torus"),
        StagePlan(index=1, ops=(3, 4), param_fqns=("h.1.w", "emb.weight"), ranks=(2,), recompute=True,
                  predicted_compute_time=1 / 3, predicted_peak_memory=2**31 + 7),
    )
    kw = {"batch_size": 8, "microbatches": 2, "schedule": "1f1b", "stages": stages, "world_size": 3,
          "graph_fingerprint": "abc", "cluster": "local:ranks=3", "step_time": 0.1 + 0.2,
          "peak_memory_per_rank": (1000, 1000, 2**31 + 7), "samples_per_second": 8 / 0.3, "mfu": 0.123,
          "search_time": 0.01}
    kw.update(over)
    return Plan(**kw)


def test_round_trip_exact(tmp_path):
    p = sample_plan()
    assert Plan.from_json(p.to_json()) == p
    path = tmp_path / "plan.json"
    p.save(path)
    assert Plan.load(path) == p
    assert [f.name for f in tmp_path.iterdir()] == ["plan.json"]  # no temp file left behind


def test_allreduce_field_defaults_to_mpi_in_older_plans():
    import json

    p = sample_plan()
    d = json.loads(p.to_json())
    assert [s["allreduce"] for s in d["stages"]] == ["torus", "mpi"]
    for s in d["stages"]:
        del s["allreduce"]  # a plan written before the field existed
    assert [s.allreduce for s in Plan.from_dict(d).stages] == ["mpi", "mpi"]
    with pytest.raises(PlanError, match="unknown allreduce algorithm 'tree'"):
        dataclasses.replace(p, stages=(dataclasses.replace(p.stages[0], allreduce="tree"), p.stages[1]))


def test_queries():
    p = sample_plan()
    assert p.assignment() == [0, 0, 0, 1, 1]
    assert [p.stage_of_rank(r) for r in range(4)] == [0, 0, 1, None]
    assert p.replica_of_rank(1) == 1 and p.replica_of_rank(2) == 0
    assert p.make_schedule().num_stages == 2 and p.make_schedule().num_microbatches == 2
    text = p.summary()
    assert "0-1 (x2)" in text and "1f1b" in text and "yes" in text and "torus" in text


def test_tensor_groups_round_trip_and_queries():
    import json

    base = sample_plan()
    st0 = dataclasses.replace(base.stages[0], ranks=(0, 1, 2, 3), tensor=2, tensor_collectives=0.25)
    st1 = dataclasses.replace(base.stages[1], ranks=(4, 5), tensor=2)
    p = sample_plan(stages=(st0, st1), world_size=6, peak_memory_per_rank=(1000,) * 6)
    assert Plan.from_json(p.to_json()) == p
    d = json.loads(p.to_json())
    assert [s["tensor"] for s in d["stages"]] == [2, 2]
    assert "tensor" not in json.loads(base.to_json())["stages"][0]  # degree 1 writes as before
    assert st0.replicas == 2 and st0.tensor_groups() == [(0, 1), (2, 3)] and st0.replica_ranks(1) == (1, 3)
    assert [p.replica_of_rank(r) for r in range(6)] == [0, 0, 1, 1, 0, 0]
    assert [p.tensor_rank_of(r) for r in range(6)] == [0, 1, 0, 1, 0, 1]
    assert "250 ms" in p.summary()  # the group collectives per microbatch
    with pytest.raises(PlanError, match="tensor degree 3 for 4 ranks"):
        dataclasses.replace(p, stages=(dataclasses.replace(st0, tensor=3), st1))


def test_split_sizes():
    assert split_sizes(10, 3) == [4, 3, 3]
    assert split_sizes(4, 4) == [1, 1, 1, 1]


@pytest.mark.parametrize(
    "over,match",
    [
        ({"microbatches": 3}, "multiple of microbatches"),
        ({"world_size": 4, "peak_memory_per_rank": (0,) * 4}, "uses 3 ranks but world_size is 4"),
        ({"schedule": "zb"}, "unknown schedule"),
        ({"batch_size": 2}, "every replica needs at least one"),
    ],
)
def test_invalid_plans(over, match):
    with pytest.raises(PlanError, match=match):
        sample_plan(**over)


def test_overlapping_ranks_and_bad_ops():
    p = sample_plan()
    bad = dataclasses.replace(p.stages[1], ranks=(1,))
    with pytest.raises(PlanError, match="held by another stage"):
        dataclasses.replace(p, stages=(p.stages[0], bad))
    gap = dataclasses.replace(p.stages[1], ops=(3, 5))
    with pytest.raises(PlanError, match="op 5"):
        dataclasses.replace(p, stages=(p.stages[0], gap)).assignment()


def test_malformed_json():
    with pytest.raises(PlanError, match="does not parse"):
        Plan.from_json("{")
    with pytest.raises(PlanError, match="malformed plan"):
        Plan.from_json('{"batch_size": 1}')


# --- the planner's timeline, recorded in the plan -------------------------------------------------

def synthetic_chain(n: int, tied: bool) -> Chain:
    """n blocks with growing costs; with ``tied``, the first and last block read one shared weight."""
    blocks = []
    for k in range(n):
        params = ((f"w{k}", 4_000_000 * (k + 1)),)
        if tied and k in (0, n - 1):
            params += (("emb", 8_000_000),)
        blocks.append(Block(ops=(k,), fwd_fixed=1e-5, fwd_per_sample=1e-4 * (1 + k % 3), bwd_fixed=2e-5,
                            bwd_per_sample=2e-4 * (1 + k % 3), act_bytes=2e6, out_bytes=5e5, params=params, flops=1e8))
    return Chain(blocks=tuple(blocks), input_bytes=1e3,
                 param_names=tuple(tuple(name for name, _ in b.params) for b in blocks), output_bytes=4e4)


def searched_plan(chain: Chain, cluster: str, batch: int, **pins) -> tuple[Plan, int]:
    """The planner's plan of a chain (as rannc_py.plan makes it) and its whole-pipeline copy count."""
    cl = as_cluster(cluster)
    cost = CostModel(chain, cl, batch)
    space = build_space(chain, cl, batch, PlanOptions(**pins))
    lay, step = search_chain(cost, space)
    return layout_to_plan(cost, lay, step, "fp", torch.float32, 0.0), lay.d


# (chain blocks, tied weight, cluster, batch, pins, least whole-pipeline copies expected)
TIMELINE_CASES = [
    (6, True, "h100:nodes=2", 256, {"num_stages": 2}, 2),
    (8, False, "a100-80g:gpus=24", 192, {"num_stages": 3}, 2),
    (6, True, "a100-40g:gpus=8", 64, {"num_stages": 4, "recompute": True}, 1),
    (5, False, "a64fx:nodes=12", 48, {"num_stages": 3, "microbatches": 4}, 1),
    (4, True, "local:ranks=2,memory=1GiB", 8, {}, 1),
]


@pytest.mark.parametrize("n,tied,cluster,batch,pins,copies", TIMELINE_CASES)
def test_timeline_replays_the_planned_step(n, tied, cluster, batch, pins, copies, tmp_path):
    p, d = searched_plan(synthetic_chain(n, tied), cluster, batch, **pins)
    assert d >= copies
    if "num_stages" in pins:
        assert p.num_stages == pins["num_stages"]
    tl = p.timeline()
    assert tl.step_time == pytest.approx(p.step_time, rel=1e-9)
    assert len(tl.busy) == p.num_stages
    # The recorded costs are what the plan's other predictions were computed from.
    for st in p.stages:
        assert st.costs is not None
        per_step = p.microbatches * (st.costs.forward + st.costs.backward)
        assert st.predicted_compute_time == pytest.approx(per_step)
    if pins.get("recompute"):  # backward includes the re-run forward
        assert all(st.costs.backward > st.costs.forward for st in p.stages)
    path = tmp_path / "plan.json"
    p.save(path)
    back = Plan.load(path)
    assert back == p
    assert back.timeline().step_time == tl.step_time


def test_timeline_of_a_traced_model():
    from rannc_py.models.gpt import GPT, gpt_config

    ids = torch.zeros(2, 16, dtype=torch.long)
    graph = trace(GPT(gpt_config("tiny", n_layer=2)), (ids,), {"labels": ids})
    p = plan(graph, batch_size=16, cluster="a64fx:nodes=4", num_stages=2)
    assert p.timeline().step_time == pytest.approx(p.step_time, rel=1e-9)
    assert Plan.from_json(p.to_json()).timeline().step_time == p.timeline().step_time


def test_plans_without_costs_load_but_have_no_timeline():
    import json

    p, _ = searched_plan(synthetic_chain(4, False), "a64fx:nodes=2", 8)
    d = json.loads(p.to_json())
    assert all("costs" in s for s in d["stages"])
    for s in d["stages"]:
        del s["costs"]  # a plan saved before the field existed
    old = Plan.from_dict(d)
    assert all(st.costs is None for st in old.stages) and old.step_time == p.step_time
    with pytest.raises(PlanError, match="Re-plan with rannc_py.plan"):
        old.timeline()
    with pytest.raises(PlanError, match=r"stage\(s\) \[0, 1\]"):
        sample_plan().timeline()  # a hand-written layout


def test_costs_are_checked():
    p, _ = searched_plan(synthetic_chain(4, False), "a64fx:nodes=2", 8)
    bad = dataclasses.replace(p.stages[0], costs=StageCosts(1.0, -1.0))
    with pytest.raises(PlanError, match="every cost must be a finite number"):
        dataclasses.replace(p, stages=(bad, *p.stages[1:]))
    d = p.to_dict()
    d["stages"][0]["costs"] = {"forward": 1.0}
    with pytest.raises(PlanError, match="malformed plan"):
        Plan.from_dict(d)


def test_output_metas_and_output_bytes():
    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x):
            a, b = self.lin(x).split(2, dim=1)
            return {"a": a, "b": b, "x": x, "loss": a.sum()}

    graph = trace(Net(), (torch.randn(3, 4),))
    metas = graph.output_metas()
    assert graph.output_names == ["a", "b", "x", "loss"]
    assert [(m.shape, m.batch_dim) for m in metas] == [((3, 2), 0), ((3, 2), 0), ((3, 4), 0), ((), None)]
    # fp32 elements per sample of a, b and x; the loss does not scale with the batch
    assert model_output_bytes(graph) == (6 + 6 + 12) * 4 / 3
