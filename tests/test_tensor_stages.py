"""Rank programs cut into pipeline stages (graph.tensor_program.rank_program_ir + graph.staged):
the stages of every rank, chained in one process over a simulated group, equal the model.

Each of the ``t`` simulated ranks builds the whole program's rank program, cuts it into stages
by a FLOP-balanced assignment and runs them one after another (a split activation crosses a
boundary as the rank's part, a replicated one whole), then backward from the loss. Tolerance as
tests/test_tensor_program.py (rtol 1e-5; gradients atol 1e-5 of the largest gradient): the
row-parallel sums change the fp32 summation order; a wrong shard or a missing sum is off at the
1e-2 scale (the last test).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from models import CASES
from tp_models import gpt2_vocab96, llama_kv, mixed_mlp
from tp_sim import run_ranks

from rannc_py import trace
from rannc_py.graph.partition import balanced_assignment
from rannc_py.graph.staged import build_stages
from rannc_py.graph.tensor_program import rank_program_ir, shard_parameters
from rannc_py.graph.tensor_rules import unshard
from rannc_py.graph.tensor_split import find_tensor_split

MODELS = {"gpt": CASES["gpt"], "hf_gpt2_tied": gpt2_vocab96, "hf_llama_gqa": lambda: llama_kv(2, vocab=96),
          "hf_bert": CASES["hf_bert"], "mixed_mlp": mixed_mlp}


def staged_mismatches(name: str, degree: int, stages: int, reduce: bool = True) -> list[str]:
    model, args, kwargs = MODELS[name]()
    graph = trace(model, args, kwargs)
    split = find_tensor_split(graph.program, degree)
    assignment = balanced_assignment(graph.data(), stages)
    inputs = graph.flatten_inputs(args, kwargs)
    ref = graph.program.outputs.flatten(model(*args, **kwargs))
    ref[0].backward()

    def rank(r: int, group: Any) -> tuple[list[torch.Tensor], dict[str, torch.Tensor | None], list[list[str]]]:
        params = {f: torch.nn.Parameter(t) for f, t in shard_parameters(graph.program, split, r).items()}
        program = rank_program_ir(graph.program, split, group, part_of=lambda i: assignment[i])
        built = build_stages(program, assignment)
        values = dict(inputs)
        outs: tuple[torch.Tensor, ...] = ()
        for st in built:
            buffers = {f: graph.model.get_buffer(f) for f in st.buffer_fqns}
            module = st.module_with({f: params[f] for f in st.param_fqns}, buffers)
            outs = module(*[values[n] for n in st.input_names])
            values.update(zip(st.output_names, outs))
        outs[0].backward()
        return [o.detach() for o in outs], {f: p.grad for f, p in params.items()}, [st.activation_inputs for st in built]

    results = run_ranks(degree, rank, reduce=reduce)
    bad = []
    for r, (outs, _, _) in enumerate(results):
        for n, got, want in zip(graph.output_names, outs, ref):
            if not torch.allclose(got, want.detach(), rtol=1e-5, atol=1e-6):
                bad.append(f"rank {r} output {n}: max diff {(got - want).abs().max():.3g}")
    scale = max(graph.model.get_parameter(f).grad.abs().max().item() for f in graph.params)
    for fqn in graph.params:
        want = graph.model.get_parameter(fqn).grad
        parts = [grads[fqn] for _, grads, _ in results]
        for got in [unshard(parts, split.params[fqn])] if fqn in split.params else parts:
            if got is None or not torch.allclose(got, want, rtol=1e-5, atol=1e-5 * scale):
                bad.append(f"grad {fqn}")
    assert all(b > 0 for b in (len(results[0][2][1:]),)) or stages == 1
    return bad


@pytest.mark.parametrize("name", sorted(MODELS))
def test_staged_rank_programs_equal_the_model(name: str) -> None:
    assert staged_mismatches(name, 2, 2) == []


def test_three_stages_degree_four() -> None:
    assert staged_mismatches("hf_llama_gqa", 4, 3) == []


def test_a_missing_allreduce_fails_the_staged_comparison() -> None:
    assert staged_mismatches("gpt", 2, 2, reduce=False) != []
