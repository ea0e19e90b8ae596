"""Split backward (I then W, zero-bubble schedules): bitwise one full backward, and zb-h1 in the runtime.

One process: every stage of a 3-stage split of several models (own GPT and
BERT, HF GPT-2 and Llama, a residual CNN with BatchNorm) gives bitwise the
input and parameter gradients of ``torch.autograd.backward`` when its
backward is split, runs each matmul once, and leaves ``.grad`` untouched
until W; RaNNCModule on one rank trains bitwise alike under 1f1b and zb-h1.
Multi-rank: zb-h1 against eager (tests/mpi_scripts/runtime_equiv.py, as the
1F1B matrix of test_runtime.py) and the split-specific checks of
tests/mpi_scripts/split_backward.py.
"""

from __future__ import annotations

import collections
import functools
import sys
from typing import Any

import pytest
import torch
from mpi_launch import REPO, run_mpi
from torch.utils._python_dispatch import TorchDispatchMode

import rannc_py
from rannc_py.runtime.backward import backward_input, backward_weight

sys.path.insert(0, str(REPO / "tests/mpi_scripts"))
from runtime_models import build_model, call_kwargs, make_batch

EQUIV = REPO / "tests/mpi_scripts/runtime_equiv.py"
SPLIT = REPO / "tests/mpi_scripts/split_backward.py"
SHARD = REPO / "tests/mpi_scripts/shard_equiv.py"
MATMULS = ("aten.mm", "aten.bmm", "aten.addmm")


class _CountOps(TorchDispatchMode):
    """Counts the aten ops that run under it, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.counts[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


@functools.cache
def _staged(name: str) -> tuple[Any, dict[str, Any]]:
    torch.manual_seed(0)
    model = build_model(name)
    batch = {**make_batch(name, 4, seed=0), **call_kwargs(name)}
    return rannc_py.trace(model, kwargs=batch).split(3), batch


def _stage_inputs(staged: Any, batch: dict[str, Any], s: int) -> dict[str, Any]:
    """Stage ``s``'s inputs, the activations as fresh leaves that need a gradient."""
    values = dict(staged.program.flatten_inputs((), batch))
    for st in staged.stages[:s]:
        values.update(zip(st.output_names, st.module(*[values[n] for n in st.input_names])))
    acts = staged.stages[s].activation_inputs
    return {n: values[n].detach().requires_grad_(values[n].is_floating_point()) if n in acts else values[n]
            for n in staged.stages[s].input_names}


def _backward(stage: Any, values: dict[str, Any], split: bool) -> tuple[list[Any], collections.Counter[str]]:
    """Gradients of the inputs and parameters of one forward and backward of ``stage``, and the ops
    the backward ran."""
    params = [p for p in stage.module.parameters() if p.requires_grad]
    inputs = [values[n] for n in stage.activation_inputs if values[n].is_floating_point()]
    for t in [*params, *inputs]:
        t.grad = None
    outs = [t for t in stage.module(*[values[n] for n in stage.input_names]) if t.requires_grad]
    g = torch.Generator().manual_seed(5)
    grads = [torch.ones_like(t) if t.dim() == 0 else torch.randn(t.shape, generator=g, dtype=t.dtype) for t in outs]
    with _CountOps() as ops:
        if split:
            found, work = backward_input(outs, grads, inputs, params)
            assert all(p.grad is None for p in params)  # weight gradients wait for W
            backward_weight(work)
        else:
            torch.autograd.backward(outs, grads)
            found = [t.grad for t in inputs]
    return [*found, *(p.grad for p in params)], ops.counts


@pytest.mark.parametrize("name", ["gpt", "hf_gpt2", "hf_llama", "bert", "cnn"])
@pytest.mark.parametrize("s", [0, 1, 2])
def test_input_then_weight_is_one_backward_bitwise(name: str, s: int) -> None:
    staged, batch = _staged(name)
    values = _stage_inputs(staged, batch, s)
    want, want_ops = _backward(staged.stages[s], values, split=False)
    got, got_ops = _backward(staged.stages[s], values, split=True)
    assert [g is None for g in got] == [w is None for w in want]
    assert all(g is None or torch.equal(g, w) for g, w in zip(got, want))
    assert any(g is not None for g in got)
    # nothing computed twice: every matmul once, as in one backward (a kernel with input and weight
    # outputs, a layer norm's or a convolution's backward, runs in I and in W for different outputs)
    assert {k: got_ops[k] for k in MATMULS} == {k: want_ops[k] for k in MATMULS}


def test_weight_read_twice_on_the_input_path_is_exact() -> None:
    # w's two uses lie on one path to x: this group is not split (I computes w's gradient, W
    # accumulates it); b's is.
    torch.manual_seed(0)
    w, b = torch.randn(4, 4, requires_grad=True), torch.randn(4, requires_grad=True)
    x = torch.randn(3, 4, requires_grad=True)
    g = torch.randn(3, 4)
    torch.tanh(torch.tanh(x @ w + b) @ w).backward(g)
    want = [x.grad, w.grad, b.grad]
    w.grad = b.grad = None
    found, work = backward_input([torch.tanh(torch.tanh(x @ w + b) @ w)], [g], [x], [w, b])
    assert w.grad is None and b.grad is None
    backward_weight(work)
    assert all(torch.equal(a, b) for a, b in zip([found[0], w.grad, b.grad], want))


def _one_rank_grads(name: str, schedule: str, recompute: bool) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = build_model(name, dropout=0.1)
    plan = {"stages": 1, "microbatches": 2, "schedule": schedule, "recompute": recompute}
    with rannc_py.RaNNCModule(model, torch.optim.SGD(model.parameters(), lr=0.1), plan=plan) as wrapped:
        torch.manual_seed(1)  # the same dropout masks under both schedules
        out = wrapped(**make_batch(name, 4, seed=0), **call_kwargs(name))
        out["loss"].backward()
        return [out["loss"].detach(), *(p.grad for p in wrapped.parameters())]


@pytest.mark.parametrize("name", ["gpt", "hf_gpt2"])
@pytest.mark.parametrize("recompute", [False, True])
def test_zb_h1_on_one_rank_equals_1f1b_bitwise(name: str, recompute: bool) -> None:
    got, want = _one_rank_grads(name, "zb-h1", recompute), _one_rank_grads(name, "1f1b", recompute)
    assert len(got) == len(want) > 1
    assert all(torch.equal(g, w) for g, w in zip(got, want))


# zb-h1 against eager (losses every step and all parameters after 5 AdamW steps, fp32 rtol 1e-5):
# own GPT, HF GPT-2 and Llama, own BERT; pp 2-4 with m below, equal to and above the depth;
# with recompute, replicas on one stage, gradient accumulation and clip_grad_norm_; a residual CNN
# with BatchNorm under recompute.
MATRIX = {
    2: [
        "gpt:p2_r1x1_m4_zb-h1",
        "gpt:p2_r1x1_m4_zb-h1:rc,accum,clip",
        "hf_gpt2:p2_r1x1_m2_zb-h1:rc",
        "hf_llama:p2_r1x1_m4_zb-h1:rc,clip",
        "bert:p2_r1x1_m2_zb-h1",
        "cnn:p2_r1x1_m2_zb-h1:rc",
    ],
    3: [
        "gpt:p3_r1x1x1_m4_zb-h1:clip",
        "gpt:p2_r2x1_m2_zb-h1:rc,accum",
        "hf_gpt2:p2_r1x2_m2_zb-h1:clip",
        "hf_llama:p2_r2x1_m2_zb-h1:rc,accum",
    ],
    4: [
        "gpt:p4_r1x1x1x1_m4_zb-h1:rc",
        "gpt:p4_r1x1x1x1_m2_zb-h1",
        "gpt:p2_r2x2_m2_zb-h1:accum,clip",
        "hf_gpt2:p3_r2x1x1_m4_zb-h1:rc",
        "hf_llama:p4_r1x1x1x1_m8_zb-h1:clip",
    ],
}


@pytest.mark.parametrize("ranks", sorted(MATRIX))
def test_zb_h1_equals_eager(ranks: int) -> None:
    cases = MATRIX[ranks]
    out = run_mpi(ranks, EQUIV, *cases, timeout=1200).stdout
    assert out.count(": ok") == len(cases), out


@pytest.mark.parametrize("ranks,checks", [(2, ["bitwise", "overlap", "trace"]), (3, ["bitwise", "overlap", "planned"])])
def test_split_backward_in_the_runtime(ranks: int, checks: list[str]) -> None:
    out = run_mpi(ranks, SPLIT, *checks, timeout=1200).stdout
    assert out.count(": ok") == len(checks), out


def test_zb_h1_with_sharded_optimizer_state() -> None:
    # the replicated first stage's gradients reduce-scattered from the last W (levels 1 and 2)
    cases = ["gpt:p2_r2x1_m2_zb-h1:1:adamw:accum,clip", "gpt:p2_r2x1_m4_zb-h1:2:adam2"]
    out = run_mpi(3, SHARD, *cases, timeout=1200).stdout
    assert out.count(": ok") == len(cases), out
