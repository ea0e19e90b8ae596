"""A model run by a tensor group of all ranks trains as eager PyTorch does.

Usage: tp_equiv.py MODEL[:OPTION[+OPTION]] [...] (names of runtime_models.py; ``clip``:
``clip_grad_norm_`` to 0.1 before each step, the group's against torch's; ``drop``:
every dropout of the model at 0.1, each step of the group run from the generator
state eager's step started in and ending in the state eager's ended in, then one
evaluation (``eval()``, dropout off) compared as well; ``state``: state_dict /
load_state_dict, see :func:`check_state`; ``dp``: 4 ranks, tensor x data
parallelism, see :func:`check_data_parallel`). Each rank
builds the model from one seed, wraps a copy in TensorParallelModule over
COMM_WORLD and trains both with AdamW for STEPS steps on the same batches:
the losses must match every step and every parameter (gathered) after the
last one. Tolerance rtol 1e-5, atol 1e-5 on parameters; AdamW's eps is 1e-6,
not 1e-8, because an attention key bias has a true gradient of zero (the
softmax ignores a shift common to a row), so its computed gradient is
rounding noise of ~1e-10 that differs with the summation order, and a
smaller eps lets Adam turn that noise into steps that differ between the
runs (with 1e-8, GPT's c_attn bias differs by 3e-5 after 5 steps). With dropout
the masks zero many more gradient entries to near zero (an entry 1e-4 of the
largest carries rounding noise of 1e-3 of itself), and Adam's first steps
divide that noise by ~eps: with 1e-6, one of Llama's o_proj weights differs by
1.8e-5 after 2 steps, so dropout runs use eps 1e-5 (a wrong mask changes the
loss itself at the 1e-2 scale, which the per-step comparison catches).
"""

from __future__ import annotations

import copy
import functools

import torch
from runtime_models import build_model, call_kwargs, make_batch, run_checks

from rannc_py.errors import ConfigError
from rannc_py.runtime.tensor_group import TensorParallelModule

# isort: split
import sys

from mpi4py import MPI

STEPS, ROWS = 5, 4
comm = MPI.COMM_WORLD


def optimizer(params: object, eps: float = 1e-6) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-2, eps=eps)  # type: ignore[arg-type]


def check_eval(case: str, eager: torch.nn.Module, tp: TensorParallelModule, batch: dict[str, object]) -> None:
    """One evaluation of both after training: dropout off, no random number drawn."""
    eager.eval()
    tp.eval()
    start = torch.get_rng_state()
    with torch.no_grad():
        want, got = eager(**batch)["loss"], tp(**batch)["loss"]
    eager.train()
    tp.train()
    assert torch.equal(torch.get_rng_state(), start), f"{case}: evaluation drew random numbers"
    assert torch.allclose(want, got, rtol=1e-5, atol=1e-6), f"{case} eval: {want} != {got}"


def replica_rows(batch: dict[str, object], replica: tuple[int, int] | None) -> dict[str, object]:
    """Replica ``(index, count)``'s rows of a global batch (all of it for None)."""
    if replica is None:
        return batch
    return {k: v.chunk(replica[1])[replica[0]] if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def train_both(case: str, eager: torch.nn.Module, tp: TensorParallelModule, steps: range,
               replica: tuple[int, int] | None = None) -> None:
    """Train both on the same batches with fresh AdamW; losses (and norms with clip) equal each step.

    With ``replica`` the group trains on its rows of each batch, its gradients averaged over the
    replicas, and its loss is the replicas' mean."""
    clip = "clip" in options_of(case)
    extra = call_kwargs(case.partition(":")[0])
    eps = 1e-5 if "drop" in options_of(case) else 1e-6
    opt_eager, opt_tp = optimizer(eager.parameters(), eps), optimizer(tp.parameters(), eps)
    for step in steps:
        batch = {**make_batch(case.partition(":")[0], ROWS, 100 + step), **extra}
        losses, start = [], torch.get_rng_state()
        for model, opt in ((eager, opt_eager), (tp, opt_tp)):
            if model is tp:
                end = torch.get_rng_state()
                torch.set_rng_state(start)
            opt.zero_grad()
            loss = model(**(batch if model is eager else replica_rows(batch, replica)))["loss"]
            loss.backward()
            if model is tp and tp.replicas is not None:
                tp.average_gradients()
                loss = tp.replicas.all_reduce(loss.detach().reshape(1))[0] / tp.replicas.size
            if clip:
                norm = tp.clip_grad_norm_(0.1) if model is tp else torch.nn.utils.clip_grad_norm_(eager.parameters(), 0.1)
                losses.append(norm.detach())
            opt.step()
            losses.append(loss.detach())
        assert torch.equal(torch.get_rng_state(), end), f"{case} step {step}: the generator is not in eager's state"
        half = len(losses) // 2
        assert not clip or losses[0] > 0.1, f"{case}: the norm {losses[0]} is not clipped; lower max_norm"
        for want, got in zip(losses[:half], losses[half:]):  # the loss, and the gradient norm with clip
            assert torch.allclose(want, got, rtol=1e-5, atol=1e-6), f"{case} step {step}: {losses}"


def same_state(case: str, got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], exact: bool) -> None:
    """Equal keys and tensors (bitwise with ``exact``, else the parameters' tolerance)."""
    assert list(got) == list(want), f"{case}: state dict keys {list(got)} != {list(want)}"
    for key, w in want.items():
        same = torch.equal(got[key], w) if exact else torch.allclose(got[key], w, rtol=1e-5, atol=1e-5)
        assert same, f"{case}: {key} differs by {(got[key].double() - w.double()).abs().max():.3g}"


def check(case: str) -> None:
    name, options = case.partition(":")[0], options_of(case)
    torch.manual_seed(0)
    eager = build_model(name, dropout=0.1 if "drop" in options else 0.0)
    extra = call_kwargs(name)
    tp = TensorParallelModule(copy.deepcopy(eager), (), {**make_batch(name, ROWS, 0), **extra}, comm=comm)
    assert tp.split.params, f"{name}: nothing was split"
    train_both(case, eager, tp, range(STEPS))
    if "drop" in options:
        check_eval(case, eager, tp, {**make_batch(name, ROWS, 99), **extra})
    full = tp.full_parameters()
    for fqn, p in eager.named_parameters():
        got = full[fqn]
        assert torch.allclose(got, p.detach(), rtol=1e-5, atol=1e-5), (
            f"{name}: {fqn} differs by {(got - p.detach()).abs().max():.3g} after {STEPS} steps")
    same_state(case, tp.state_dict(), eager.state_dict(), exact=False)


def check_state(case: str) -> None:
    """Eager trains 2 steps; a group built from another initialisation loads its state dict (then
    holds it exactly) and both train 3 more steps alike; a third group loads the second's state dict
    exactly; a state dict without a key is refused."""
    name = case.partition(":")[0]
    example = {**make_batch(name, ROWS, 0), **call_kwargs(name)}
    torch.manual_seed(0)
    eager = build_model(name)
    opt = optimizer(eager.parameters())
    for step in range(2):
        opt.zero_grad()
        eager(**make_batch(name, ROWS, 100 + step), **call_kwargs(name))["loss"].backward()
        opt.step()
    groups = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        groups.append(TensorParallelModule(build_model(name), (), example, comm=comm))
    tp, other = groups
    tp.load_state_dict(eager.state_dict())
    same_state(case, tp.state_dict(), eager.state_dict(), exact=True)
    train_both(case, eager, tp, range(2, STEPS))
    same_state(case, tp.state_dict(), eager.state_dict(), exact=False)
    other.load_state_dict(tp.state_dict())
    same_state(case, other.state_dict(), tp.state_dict(), exact=True)
    partial = dict(eager.state_dict())
    partial.pop(next(iter(partial)))
    try:
        other.load_state_dict(partial)
    except ConfigError as e:
        assert "missing key" in str(e), e
    else:
        raise AssertionError(f"{case}: a state dict without a key was loaded")


def check_data_parallel(case: str) -> None:
    """4 ranks: tensor groups {0, 1} and {2, 3}, each a replica fed half the rows of every batch;
    trains as eager on the whole batch (losses each step, parameters after the last)."""
    name = case.partition(":")[0]
    world = comm.Get_size()
    assert world == 4, f"{case} needs 4 ranks, got {world}"
    tensor, data = comm.Split(comm.rank // 2, comm.rank), comm.Split(comm.rank % 2, comm.rank)
    replica = (comm.rank // 2, 2)
    torch.manual_seed(0)
    eager = build_model(name)
    example = replica_rows({**make_batch(name, ROWS, 0), **call_kwargs(name)}, replica)
    tp = TensorParallelModule(copy.deepcopy(eager), (), example, comm=tensor, data_comm=data)
    assert tp.split.params, f"{name}: nothing was split"
    train_both(case, eager, tp, range(STEPS), replica)
    same_state(case, tp.state_dict(), eager.state_dict(), exact=False)


def options_of(case: str) -> set[str]:
    """The options of ``MODEL:OPTION+OPTION``."""
    return set(case.partition(":")[2].split("+")) - {""}


def run(case: str) -> None:
    options = options_of(case)
    (check_state if "state" in options else check_data_parallel if "dp" in options else check)(case)


run_checks({f"check_{n}": functools.partial(run, n) for n in sys.argv[1:]}, sys.argv[1:])
