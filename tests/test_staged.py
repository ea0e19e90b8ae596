"""A StagedModule must give exactly the eager outputs, gradients and buffer updates."""

from __future__ import annotations

import copy
import functools
from typing import Any

import pytest
import torch
import torch.utils._pytree as pytree
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from models import CASES

from rannc_py import Graph, trace

TOL = {"rtol": 1e-5, "atol": 1e-6}


@functools.cache
def traced(name: str) -> tuple[torch.nn.Module, tuple[Any, ...], dict[str, Any], Graph]:
    model, args, kwargs = CASES[name]()
    return model, args, kwargs, trace(model, args, kwargs)


def _scalar(out: Any) -> torch.Tensor:
    # Back-propagate through every floating output, not only the loss.
    return sum(leaf.sum() for leaf in pytree.tree_leaves(out) if isinstance(leaf, torch.Tensor) and leaf.is_floating_point())


def assert_staged_matches_eager(name: str, stages: Any, args: Any = None, kwargs: Any = None) -> None:
    model, targs, tkwargs, graph = traced(name)
    args = targs if args is None else args
    kwargs = tkwargs if kwargs is None else kwargs
    staged = graph.split(stages)
    reference = copy.deepcopy(model)  # same parameters and buffers, separate storage
    model.zero_grad(set_to_none=True)
    reference.zero_grad(set_to_none=True)

    expected = reference(*args, **kwargs)
    _scalar(expected).backward()
    actual = staged(*args, **kwargs)
    _scalar(actual).backward()

    assert type(actual) is type(expected)
    exp_leaves, exp_spec = pytree.tree_flatten(expected)
    act_leaves, act_spec = pytree.tree_flatten(actual)
    assert act_spec == exp_spec
    for a, e in zip(act_leaves, exp_leaves):
        torch.testing.assert_close(a, e, **TOL)
    ref_params = dict(reference.named_parameters())
    for fqn, p in model.named_parameters():
        assert p.grad is not None, f"{name}: {fqn} got no gradient"
        torch.testing.assert_close(
            p.grad, ref_params[fqn].grad, **TOL, msg=lambda m, fqn=fqn: f"{name}: grad of {fqn}: {m}"
        )
    ref_buffers = dict(reference.named_buffers())
    for fqn, b in model.named_buffers():
        torch.testing.assert_close(
            b, ref_buffers[fqn], **TOL, msg=lambda m, fqn=fqn: f"{name}: buffer {fqn}: {m}"
        )


@pytest.mark.parametrize("num_stages", [1, 2, 3, 4])
@pytest.mark.parametrize("name", sorted(CASES))
def test_split_matches_eager(name: str, num_stages: int) -> None:
    assert_staged_matches_eager(name, num_stages)
    staged = traced(name)[3].split(num_stages)
    assert staged.num_stages == num_stages
    assert sorted(i for s in staged.stages for i in s.op_indices) == list(range(len(traced(name)[3].ops)))


def _convex(graph: Graph, draws: list[int]) -> list[int]:
    """Make random stage draws convex: an op goes no earlier than what it reads; then renumber densely."""
    stage: list[int] = []
    for op in graph.ops:
        stage.append(max([draws[op.index]] + [stage[i] for i in op.input_ops]))
    used = sorted(set(stage))
    return [used.index(s) for s in stage]


@pytest.mark.parametrize("name", sorted(CASES))
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_assignment_matches_eager(name: str, data: st.DataObject) -> None:
    graph = traced(name)[3]
    n = len(graph.ops)
    k = data.draw(st.integers(2, 5), label="stages drawn")
    draws = data.draw(st.lists(st.integers(0, k - 1), min_size=n, max_size=n), label="draws")
    assignment = _convex(graph, draws)
    # Also exercise the op-name dict form.
    by_name = {op.name: s for op, s in zip(graph.ops, assignment)}
    assert_staged_matches_eager(name, by_name)


@pytest.mark.parametrize("name", ["gpt", "hf_gpt2", "hf_llama", "cnn"])
@pytest.mark.parametrize("batch", [1, 3])
def test_stages_run_at_other_batch_sizes(name: str, batch: int) -> None:
    _, args, kwargs, graph = traced(name)
    assert graph.dynamic_batch
    cut = lambda t: t[:batch] if isinstance(t, torch.Tensor) and t.dim() > 0 else t
    assert_staged_matches_eager(name, 3, pytree.tree_map(cut, args), pytree.tree_map(cut, kwargs))


def test_tied_weights_in_different_stages_get_summed_gradient() -> None:
    graph = traced("hf_gpt2")[3]
    assert ["transformer.wte.weight", "lm_head.weight"] in graph.tied_params
    assert "lm_head.weight" not in graph.params  # uses of a tied weight go by its first name
    staged = graph.split(3)
    embedding = next(op for op in graph.ops if op.module_path == "transformer.wte")
    head = next(op for op in graph.ops if op.module_path == "lm_head")
    assert embedding.params == head.params == ["transformer.wte.weight"]
    assert staged.assignment[embedding.index] == 0 and staged.assignment[head.index] == 2
    assert [s.index for s in staged.stages if "transformer.wte.weight" in s.param_fqns] == [0, 2]
    assert_staged_matches_eager("hf_gpt2", 3)


def test_boundary_protocol_with_detached_activations() -> None:
    """Drive stages the way the runtime does: leaf activations, explicit backward per stage."""
    model, args, kwargs, graph = traced("gpt")
    staged = graph.split(3)
    reference = copy.deepcopy(model)
    model.zero_grad(set_to_none=True)
    expected = reference(*args, **kwargs)
    expected.loss.backward()

    inputs = graph.flatten_inputs(args, kwargs)
    received: list[list[torch.Tensor]] = []
    outputs: list[tuple[torch.Tensor, ...]] = []
    carry: list[torch.Tensor] = []
    for stage in staged.stages:
        assert len(carry) == len(stage.activation_inputs)
        leaves = [t.detach().requires_grad_(t.is_floating_point()) for t in carry]
        received.append(leaves)
        out = stage.module(*[inputs[n] for n in stage.user_inputs], *leaves)
        outputs.append(out)
        carry = list(out)
    final = graph.unflatten_outputs(list(outputs[-1]))
    torch.testing.assert_close(final.loss, expected.loss, **TOL)
    final.loss.backward()
    for s in range(len(staged.stages) - 2, -1, -1):
        grads = [leaf.grad for leaf in received[s + 1]]
        pairs = [(o, g) for o, g in zip(outputs[s], grads) if o.requires_grad and g is not None]
        assert pairs, f"stage {s} received no gradient"
        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
    ref = dict(reference.named_parameters())
    for fqn, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[fqn].grad, **TOL)


def test_module_with_binds_other_tensors() -> None:
    model, args, kwargs, graph = traced("cnn")
    staged = graph.split(2)
    params = {fqn: torch.nn.Parameter(p.detach().clone()) for fqn, p in model.named_parameters()}
    buffers = {fqn: b.detach().clone() for fqn, b in model.named_buffers()}
    modules = [s.module_with(params, buffers) for s in staged.stages]
    inputs = graph.flatten_inputs(args, kwargs)
    values = dict(inputs)
    for stage, module in zip(staged.stages, modules):
        out = module(*[values[n] for n in stage.input_names])
        values.update(zip(stage.output_names, out))
    values["loss"].backward()
    model.zero_grad(set_to_none=True)
    reference = copy.deepcopy(model)
    reference(*args, **kwargs)["loss"].backward()
    for fqn, p in reference.named_parameters():
        torch.testing.assert_close(params[fqn].grad, p.grad, **TOL)
        assert model.get_parameter(fqn).grad is None  # the traced model was not touched
    for fqn, b in reference.named_buffers():
        torch.testing.assert_close(buffers[fqn], b, **TOL)


def test_dropout_matches_eager_with_shared_rng_state() -> None:
    from rannc_py.models.gpt import GPT, gpt_config

    torch.manual_seed(0)
    model = GPT(gpt_config("tiny", vocab_size=97, block_size=16, n_embd=32, dropout=0.1))
    ids = torch.randint(0, 97, (4, 8))
    graph = trace(model, kwargs={"input_ids": ids, "labels": ids})
    assert any("dropout" in op.target for op in graph.ops)  # traced in training mode
    staged = graph.split(3)
    reference = copy.deepcopy(model)
    torch.manual_seed(1)
    expected = reference(input_ids=ids, labels=ids)
    expected.loss.backward()
    torch.manual_seed(1)
    actual = staged(input_ids=ids, labels=ids)
    actual.loss.backward()
    torch.testing.assert_close(actual.logits, expected.logits, **TOL)
    ref = dict(reference.named_parameters())
    for fqn, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[fqn].grad, **TOL)
