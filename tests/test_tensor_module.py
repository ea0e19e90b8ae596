"""RaNNCModule with stages split over tensor groups (runtime.tensor_stages).

Multi-rank runs (tests/mpi_scripts/tp_module.py; its docstring gives the checks and the
tolerance) train as eager PyTorch does: losses every step, replicated parameters' gradients
equal across each group, every parameter after 5 AdamW steps. In-process: the explicit layout's
``tensor`` key and its errors, and the error for a degree the model cannot split.
"""

from __future__ import annotations

import pytest
from models import CASES
from mpi_launch import REPO, run_mpi

from rannc_py import trace
from rannc_py.errors import ConfigError
from rannc_py.graph.tensor_split import find_tensor_split
from rannc_py.runtime.layout import check_layout, explicit_plan
from rannc_py.runtime.tensor_stages import check_split, plan_degree, position_ranks

SCRIPT = REPO / "tests/mpi_scripts/tp_module.py"


def _run(ranks: int, cases: list[str]) -> None:
    out = run_mpi(ranks, SCRIPT, *cases, timeout=900).stdout
    for case in cases:
        assert f"case {case}: ok" in out, out


def test_two_ranks_tensor_degree_two_trains_like_eager() -> None:
    """tp2 alone on GPT-2 (tied head, clip, then an eval call), Llama (GQA; GPipe with
    recompute), both BERTs, the project's GPT (state dict round trip into tp1), a model with a
    region no split crosses, GPT built on meta (one module's full split parameters at a time), BLOOM
(batch x heads merged, an ALiBi bias cut per sample; clip, eval);
    and the same check failing when the group's sums are left undone."""
    _run(2, ["gpt:t2_p1_r1_m2_1f1b:meta", "hf_gpt2_tied:t2_p1_r1_m2_1f1b:clip,eval", "hf_llama:t2_p1_r1_m2_gpipe:rc", "hf_bert:t2_p1_r1_m1_1f1b",
             "bert:t2_p1_r1_m2_1f1b", "mixed:t2_p1_r1_m2_1f1b", "gpt:t2_p1_r1_m2_1f1b:state",
             "gpt:t2_p1_r1_m1_1f1b:wrong", "hf_bloom:t2_p1_r1_m2_1f1b:clip,eval"])


def test_four_ranks_tensor_with_pipeline_and_data_parallelism() -> None:
    """tp2 x pp2 (a split activation crosses Llama's stage boundary; GPT-2's tied weight is sharded
    in both stages, also built on meta), tp2 x dp2 (with clip), tp4 on GPT-2 (4 heads), BLOOM tp2 x pp2 with recompute; tp2 x dp2 with the optimizer state sharded over
each position's replicas (levels 1 and 2; clip, optimizer state gathered and loaded); the
split-backward zb-h1 schedule on tp2 x pp2 (Llama with recompute and clip, GPT-2 tied, BERT); optimizer and
    model state gathered and loaded on tp2 x pp2 and tp2 x dp2."""
    _run(4, ["hf_gpt2_tied:t2_p2_r1_m2_1f1b:meta", "gpt:t2_p2_r1_m2_1f1b:rc", "hf_gpt2_tied:t2_p2_r1_m4_gpipe:rc,clip", "hf_llama:t2_p2_r1_m2_1f1b:state",
             "gpt:t2_p1_r2_m2_1f1b:clip,state", "hf_llama:t2_p1_r2_m2_gpipe:eval", "hf_gpt2_tied:t4_p1_r1_m2_1f1b",
             "hf_bloom:t2_p2_r1_m2_1f1b:rc", "gpt:t2_p1_r2_m2_1f1b:z1,clip,state",
             "hf_gpt2_tied:t2_p1_r2_m2_1f1b:z2,clip,state", "hf_llama:t2_p2_r1_m4_zb-h1:rc,clip",
             "hf_gpt2_tied:t2_p2_r1_m4_zb-h1:clip", "bert:t2_p2_r1_m2_zb-h1"])


def test_layout_tensor_key_builds_tensor_groups() -> None:
    gpt = trace(*_gpt())
    plan = explicit_plan(gpt.data(), {"stages": 2, "tensor": 2, "replicas": [2, 1], "microbatches": 2}, 8, 6)
    assert [st.tensor for st in plan.stages] == [2, 2]
    assert [st.ranks for st in plan.stages] == [(0, 1, 2, 3), (4, 5)]
    assert plan.stages[0].tensor_groups() == [(0, 1), (2, 3)]
    assert position_ranks(plan) == [[[0, 2], [1, 3]], [[4], [5]]]
    assert plan_degree(plan) == 2
    assert [st.tensor for st in explicit_plan(gpt.data(), {"stages": 2, "tensor": [2, 2]}, 8, 4).stages] == [2, 2]
    assert [len(st.ranks) for st in explicit_plan(gpt.data(), {"stages": 1, "tensor": 2}, 8, 4).stages] == [4]


@pytest.mark.parametrize(("layout", "world", "words"), [
    ({"stages": 2, "tensor": [2, 1]}, 3, "one tensor degree for all stages"),
    ({"stages": 1, "tensor": 0}, 2, "positive int"),
    ({"stages": 2, "tensor": [2]}, 4, "one per stage"),
    ({"stages": 2, "tensor": 2}, 6, "multiple of 4"),
    ({"stages": 1, "tensor": 2, "replicas": [2]}, 2, "tensor group of 2"),
])
def test_layout_tensor_errors(layout: dict[str, object], world: int, words: str) -> None:
    with pytest.raises(ConfigError, match=words.replace("(", r"\(")):
        check_layout(layout)
        explicit_plan(trace(*_gpt()).data(), layout, 8, world)


def test_a_degree_the_model_cannot_split_names_the_ones_it_can() -> None:
    """The tiny GPT (32 features, 2 heads, vocabulary 64) has nothing that divides by 3."""
    graph = trace(*_gpt())
    split = find_tensor_split(graph.program, 3)
    with pytest.raises(ConfigError, match=r"tensor=3.*stage 0 splits at tensor degree \[2, 4"):
        check_split(graph, split, [0] * len(graph.ops))
    check_split(graph, find_tensor_split(graph.program, 2), [0] * len(graph.ops))  # splits: no error


def _gpt() -> tuple[object, tuple[object, ...], dict[str, object]]:
    model, args, kwargs = CASES["gpt"]()
    return model, args, kwargs


def test_tensor_degrees_are_searched_with_a_sharded_optimizer_and_zb_h1() -> None:
    from rannc_py.planner.options import PlanOptions
    from rannc_py.runtime.autoplan import job_tensor_annotation

    graph = trace(*_gpt())
    sharded = job_tensor_annotation(graph, PlanOptions(shard_optimizer=True), 4)
    assert sharded is not None and sharded.tried == (2, 4) and 2 in sharded.allowed  # degrees dividing 4
    with_zb = job_tensor_annotation(graph, PlanOptions(schedules=("1f1b", "zb-h1")), 4)
    assert with_zb is not None and with_zb.tried == (2, 4)
