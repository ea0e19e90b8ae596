"""RaNNCModule on plans with several model chunks per rank (interleaved 1F1B, ZB-V).

Multi-rank (tests/mpi_scripts/chunks.py, runtime_equiv's harness): losses every step and every
parameter after AdamW steps equal eager PyTorch (fp32 rtol 1e-5) for interleaved with 2 and 3
chunks and for zb-v, on 1 to 4 ranks, for the own GPT, HF GPT-2 (tied embedding and LM head: ZB-V's
rank 0 holds both), HF Llama (GQA) and a model with a keyword argument; with recompute, replicas on
one position, gradient accumulation, clip_grad_norm_, an eval and a no_grad call in between, state and
optimizer state dict round trips, a meta-built model and the measured trace.

One process: the layout dict's chunk forms and errors, the chunked forward-only order, the message
tags of different chunks, and the refusals (tensor > 1, sharded optimizer, checkpoints).
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from pathlib import Path

import pytest
import torch
from mpi_launch import REPO, run_mpi

import rannc_py
from rannc_py.errors import ConfigError
from rannc_py.graph.ir import Graph
from rannc_py.runtime.layout import check_layout, check_plan_arg, explicit_plan
from rannc_py.runtime.routing import META_TAG, message_tag, meta_tag
from rannc_py.schedule import validate
from rannc_py.schedule.generators import forward_only_on

sys.path.insert(0, str(REPO / "tests/mpi_scripts"))
from runtime_models import build_model, make_batch

CHUNKS = REPO / "tests/mpi_scripts/chunks.py"

MATRIX = {
    1: [
        "gpt:s2_r1_m2_zb-v:rc,clip",
        "hf_gpt2:s2_r1_m2_interleaved:accum",
    ],
    2: [
        "gpt:s4_r1x1_m4_interleaved:rc,accum,clip",
        "gpt:s4_r1x1_m4_zb-v:rc,accum,clip,trace",
        "hf_gpt2:s4_r1x1_m4_zb-v:eval,sd",
        "hf_llama:s4_r1x1_m2_interleaved:rc,clip",
        "hf_llama:s4_r1x1_m4_zb-v:rcmix",
        "kw:s4_r1x1_m4_interleaved:accum,eval",
        "gpt6:s6_r1x1_m4_interleaved_c3:rc,sd",
    ],
    3: [
        "gpt:s4_r2x1_m2_zb-v:rc,accum",
        "hf_gpt2:s4_r1x2_m4_interleaved:clip,eval",
        "hf_llama:s6_r1x1x1_m3_interleaved:rc",
        "hf_llama:s4_r1x2_m4_zb-v:accum,clip",
        "gpt:s6_r1x1x1_m2_zb-v:sd",
    ],
    4: [
        "gpt:s8_r1x1x1x1_m4_interleaved:clip",
        "hf_llama:s8_r1x1x1x1_m4_zb-v:rc,accum",
        "gpt:s4_r2x2_m2_zb-v:accum,clip",
        "hf_gpt2:s4_r3x1_m2_interleaved:rc,sd",
        "gpt:s4_r2x2_m4_interleaved:meta",
    ],
}


@pytest.mark.parametrize("ranks", sorted(MATRIX))
def test_chunked_schedules_equal_eager(ranks: int) -> None:
    cases = MATRIX[ranks]
    out = run_mpi(ranks, CHUNKS, *cases, timeout=1200).stdout
    assert out.count(": ok") == len(cases), out


# ------------------------------------------------------------------ layouts
@functools.cache
def _gpt_graph() -> Graph:
    torch.manual_seed(0)
    return rannc_py.trace(build_model("gpt"), kwargs=make_batch("gpt", 4, seed=0)).data()


def test_layout_places_interleaved_stages_round_robin() -> None:
    plan = explicit_plan(_gpt_graph(), {"stages": 4, "schedule": "interleaved", "microbatches": 4}, 8, 2)
    assert plan.chunks == 2 and plan.num_positions == 2
    assert [st.ranks for st in plan.stages] == [(0,), (1,), (0,), (1,)]
    assert plan.stages_of_rank(0) == (0, 2) and plan.stages_of_rank(1) == (1, 3)


@pytest.mark.parametrize("replicas", [[2, 1], [2, 1, 1, 2]])
def test_layout_places_zb_v_with_replicas_per_position(replicas: list[int]) -> None:
    # per position, or per stage (equal for the stages of a position: 0 and 3 share position 0)
    layout = {"stages": 4, "schedule": "zb-v", "microbatches": 2, "replicas": replicas}
    plan = explicit_plan(_gpt_graph(), layout, 12, 3)
    assert [st.ranks for st in plan.stages] == [(0, 1), (2,), (2,), (0, 1)]
    assert plan.stages_of_rank(0) == (0, 3) and plan.stages_of_rank(2) == (1, 2)


@pytest.mark.parametrize("layout,words", [
    ({"stages": 4, "schedule": "zb-v", "chunks": 3}, "chunks=2 (or leave chunks out)"),
    ({"stages": 4, "schedule": "interleaved", "chunks": 1}, "chunks >= 2"),
    ({"stages": 4, "schedule": "1f1b", "chunks": 2}, "schedule='interleaved'"),
    ({"stages": 4, "schedule": "interleaved", "microbatches": 3}, "use microbatches=4"),
    ({"stages": 5, "schedule": "zb-v", "microbatches": 2}, "use stages=6"),
    ({"stages": 4, "schedule": "interleaved", "microbatches": 2, "tensor": 2}, "use tensor=1"),
    ({"stages": 4, "schedule": "zb-v", "shard_optimizer": 1}, "use shard_optimizer=0"),
])
def test_bad_chunked_layouts_name_the_fix(layout: dict, words: str) -> None:
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
        check_layout(layout)


def test_replicas_of_one_position_must_agree() -> None:
    layout = {"stages": 4, "schedule": "zb-v", "microbatches": 2, "replicas": [2, 1, 1, 1]}
    with pytest.raises(ConfigError, match=r"share pipeline position 0.*replicas=\[2, 1\]"):
        explicit_plan(_gpt_graph(), layout, 12, 3)


def test_module_refuses_a_bad_chunked_layout_when_built() -> None:
    with pytest.raises(ConfigError, match="use microbatches=4"):
        rannc_py.RaNNCModule(torch.nn.Linear(2, 2), plan={"stages": 4, "schedule": "interleaved", "microbatches": 3})


def test_chunked_plan_with_tensor_groups_is_refused() -> None:
    plan = explicit_plan(_gpt_graph(), {"stages": 4, "schedule": "interleaved", "microbatches": 2}, 8, 4)
    split = dataclasses.replace(plan, stages=tuple(dataclasses.replace(st, tensor=2) for st in plan.stages))
    with pytest.raises(ConfigError, match="tensor > 1 is not supported yet"):
        check_plan_arg(split)


# ------------------------------------------------------------- schedules
@pytest.mark.parametrize("name,p,m,v", [("interleaved", 2, 4, 2), ("interleaved", 3, 3, 3), ("zb-v", 2, 3, None),
                                        ("zb-v", 4, 2, None)])
def test_chunked_forward_only_order_is_valid(name: str, p: int, m: int, v: int | None) -> None:
    sched = forward_only_on(name, p, m, v)
    validate(sched)
    assert sched.num_stages == p * (v or 2)
    for r, acts in enumerate(sched.actions):
        stages = [a.stage for a in acts if a.kind.value == "F"]
        assert stages == sorted(stages) and len(stages) == m * (v or 2), (r, stages)


def test_message_tags_of_chunks_differ_and_stay_below_the_meta_tags() -> None:
    tags = {message_tag(kind, mb, k, chunk) for kind in range(3) for mb in range(64) for k in range(32)
            for chunk in range(4)}
    assert len(tags) == 3 * 64 * 32 * 4
    metas = {meta_tag(c) for c in range(4)}
    assert len(metas) == 4 and max(tags) < min(metas) <= max(metas) == META_TAG


def test_checkpoints_of_chunked_plans_are_refused(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model("gpt")
    opt = torch.optim.AdamW(model.parameters())
    with rannc_py.RaNNCModule(model, opt, plan={"stages": 2, "schedule": "zb-v", "microbatches": 2}) as wrapped:
        wrapped(**make_batch("gpt", 4, seed=0)).loss.backward()
        assert wrapped.plan is not None and wrapped.plan.stages_of_rank(0) == (0, 1)
        with pytest.raises(ConfigError, match="several model chunks per rank"):
            rannc_py.save_checkpoint(tmp_path / "ck", wrapped, opt)
