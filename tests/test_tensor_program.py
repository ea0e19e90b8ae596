"""Tensor-parallel rank programs equal the model: outputs and gradients, in one process.

The ``t`` rank programs of a split run in lockstep threads with a simulated
group (tests/tp_sim.py). Outputs of every rank are compared with the eager
model's; the gradients of split parameters are joined from the ranks' shards
(``unshard``), those of replicated parameters compared on every rank.

Tolerance, fp32: rtol 1e-5, atol 1e-6 (outputs) / 1e-5 relative to the
largest gradient of the tensor's model (gradients). A row-parallel matmul
sums ``t`` partial products instead of one dot product, and a backward
allreduce sums ``t`` partial gradients, so the summation order changes;
observed differences are below 1e-6 relative on these models. A misplaced
collective or a wrong shard changes values at the 1e-2 scale, which the
last tests show fails the same comparison.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from models import CASES
from tp_models import Case, dropout_case, gpt2_vocab96, gpt_vocab96, llama_kv, mixed_mlp
from tp_sim import run_ranks

from rannc_py import trace
from rannc_py.graph.tensor_program import build_rank_program, shard_parameters, unshard
from rannc_py.graph.tensor_random import RandomOp, dropout_noise
from rannc_py.graph.tensor_split import Shard, TensorSplit, find_tensor_split


def run_split(case: Case, degree: int, split: TensorSplit | None = None, reduce: bool = True,
              train: bool = True) -> dict[str, Any]:
    """Eager reference and the ``degree`` rank programs on one batch; backward from the loss.

    Each rank draws from a generator of its own, started in the state eager's forward
    started in (threads share torch's default one); ``states`` are eager's final state and
    each rank's. ``train``: the model and the rank programs in train or eval mode."""
    model, args, kwargs = case
    graph = trace(model, args, kwargs)
    split = split or find_tensor_split(graph.program, degree)
    inputs = graph.flatten_inputs(args, kwargs)
    model.train(train)
    start = torch.get_rng_state()
    ref_outs = graph.program.outputs.flatten(model(*args, **kwargs))
    ref_outs[0].backward()
    states = [torch.get_rng_state()]

    def rank(r: int, group: Any) -> tuple[list[torch.Tensor], dict[str, torch.Tensor | None]]:
        params = shard_parameters(graph.program, split, r)
        generator = torch.Generator()
        generator.set_state(start)
        outs = build_rank_program(graph.program, split, group, generator).train(train)(params, inputs)
        outs[0].backward()
        states.append(generator.get_state())
        return [o.detach() for o in outs], {k: p.grad for k, p in params.items()}

    results = run_ranks(degree, rank, reduce=reduce)
    return {"graph": graph, "split": split, "ref": [o.detach() for o in ref_outs], "ranks": results,
            "states": states}


def mismatches(run: dict[str, Any]) -> list[str]:
    """What differs from eager beyond the tolerance (empty: equal)."""
    graph, split, bad = run["graph"], run["split"], []
    for r, (outs, grads) in enumerate(run["ranks"]):
        for name, got, want in zip(graph.output_names, outs, run["ref"]):
            if not torch.allclose(got, want, rtol=1e-5, atol=1e-6):
                bad.append(f"rank {r} output {name}: max diff {(got - want).abs().max():.3g}")
    scale = max(graph.model.get_parameter(f).grad.abs().max().item() for f in graph.params)
    for fqn in graph.params:
        want = graph.model.get_parameter(fqn).grad
        parts = [grads[fqn] for _, grads in run["ranks"]]
        candidates = [unshard(parts, split.params[fqn])] if fqn in split.params else parts
        for got in candidates:
            if not torch.allclose(got, want, rtol=1e-5, atol=1e-5 * scale):
                bad.append(f"grad {fqn}: max diff {(got - want).abs().max():.3g} (largest grad {scale:.3g})")
    return bad


MODELS = {
    "gpt": CASES["gpt"],
    "hf_gpt2": CASES["hf_gpt2"],
    "hf_llama_gqa": CASES["hf_llama"],
    "hf_bert": CASES["hf_bert"],
    "bert": CASES["bert"],
    "mixed_mlp": mixed_mlp,
    "gpt_vocab96": gpt_vocab96,
    "hf_gpt2_vocab96": gpt2_vocab96,
    "hf_llama_mqa_vocab96": lambda: llama_kv(1, vocab=96),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_rank_programs_equal_the_model(name: str) -> None:
    run = run_split(MODELS[name](), 2)
    assert run["split"].params, "something must be split"
    assert mismatches(run) == []


@pytest.mark.parametrize(("name", "degree"), [("gpt_vocab96", 4), ("gpt_vocab96", 3), ("hf_llama_gqa", 4)])
def test_degrees_above_two(name: str, degree: int) -> None:
    run = run_split(MODELS[name](), degree)
    assert run["split"].params
    assert mismatches(run) == []


def test_a_missing_allreduce_fails_the_comparison() -> None:
    """The same comparison catches a group whose sum allreduce does nothing (row-parallel partial
    sums left incomplete, backward copies not summed)."""
    run = run_split(CASES["gpt"](), 2, reduce=False)
    assert any("output loss" in m for m in mismatches(run))


def test_a_contiguous_fused_shard_fails_the_comparison() -> None:
    """GPT's fused q, k, v projection split contiguously (rank 0: q and half of k) instead of by
    blocks gives wrong attention, and the comparison says so."""
    model, args, kwargs = case = CASES["gpt"]()
    split = find_tensor_split(trace(model, args, kwargs).program, 2)
    wrong = dict(split.params)
    for fqn, shard in split.params.items():
        if len(shard.blocks) > 1:
            wrong[fqn] = Shard(dim=shard.dim, blocks=(sum(shard.blocks),))
    assert wrong != split.params
    bad = TensorSplit(degree=2, ops=split.ops, params=wrong, rejected=split.rejected)
    assert any("output loss" in m for m in mismatches(run_split(case, 2, split=bad)))


def test_rank_programs_run_at_another_batch_size() -> None:
    """Traced with 4 rows, run with 2: the split keeps the traced program's symbolic batch."""
    model, args, kwargs = gpt_vocab96()
    graph = trace(model, args, kwargs)
    split = find_tensor_split(graph.program, 2)
    small = {k: v[:2] for k, v in kwargs.items()}
    want = model(**small).loss

    def rank(r: int, group: Any) -> torch.Tensor:
        outs = build_rank_program(graph.program, split, group)(shard_parameters(graph.program, split, r),
                                                               graph.flatten_inputs((), small))
        return outs[0].detach()

    for got in run_ranks(2, rank):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["gpt", "hf_gpt2", "hf_llama", "hf_bert"])
def test_dropout_draws_what_eager_draws(name: str) -> None:
    """Dropout 0.1 everywhere (attention too): every rank draws eager's masks, its part of them in
    split regions, so outputs and gradients equal eager's, and each rank's generator ends in
    eager's state."""
    run = run_split(dropout_case(name), 2)
    assert any(run["split"].mode(op) == "split" for op in run["split"].ops if "dropout" in op or "attention" in op)
    assert mismatches(run) == []
    assert all(torch.equal(s, run["states"][0]) for s in run["states"][1:])


def test_local_masks_fail_the_comparison() -> None:
    """A rank drawing a mask over its own part only (not its part of eager's) differs from
    eager: the comparison above catches dropout that is not eager's."""
    model, args, kwargs = case = dropout_case("gpt")
    split = find_tensor_split(trace(model, args, kwargs).program, 2)
    real = RandomOp.noise
    try:
        RandomOp.noise = lambda self, like, p: dropout_noise(like.shape, like, p, self.generator)  # type: ignore[method-assign]
        assert any("output loss" in m for m in mismatches(run_split(case, 2, split=split)))
    finally:
        RandomOp.noise = real  # type: ignore[method-assign]


@pytest.mark.parametrize("name", ["gpt", "hf_gpt2"])
def test_eval_mode_draws_nothing(name: str) -> None:
    """In eval mode the rank programs run without dropout, as eager's model.eval()."""
    run = run_split(dropout_case(name), 2, train=False)
    assert mismatches(run) == []
    assert all(torch.equal(s, run["states"][0]) for s in run["states"])
