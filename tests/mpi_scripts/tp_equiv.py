"""A model run by a tensor group of all ranks trains as eager PyTorch does.

Usage: tp_equiv.py MODEL[:clip] [...] (names of runtime_models.py; ``clip``:
``clip_grad_norm_`` to 0.1 before each step, the group's against torch's). Each rank
builds the model from one seed, wraps a copy in TensorParallelModule over
COMM_WORLD and trains both with AdamW for STEPS steps on the same batches:
the losses must match every step and every parameter (gathered) after the
last one. Tolerance rtol 1e-5, atol 1e-5 on parameters; AdamW's eps is 1e-6,
not 1e-8, because an attention key bias has a true gradient of zero (the
softmax ignores a shift common to a row), so its computed gradient is
rounding noise of ~1e-10 that differs with the summation order, and a
smaller eps lets Adam turn that noise into steps that differ between the
runs (with 1e-8, GPT's c_attn bias differs by 3e-5 after 5 steps).
"""

from __future__ import annotations

import copy
import functools

import torch
from runtime_models import build_model, call_kwargs, make_batch, run_checks

from rannc_py.runtime.tensor_group import TensorParallelModule

# isort: split
import sys

from mpi4py import MPI

STEPS, ROWS = 5, 4
comm = MPI.COMM_WORLD


def optimizer(params: object) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-2, eps=1e-6)  # type: ignore[arg-type]


def check(case: str) -> None:
    name, _, option = case.partition(":")
    torch.manual_seed(0)
    eager = build_model(name)
    extra = call_kwargs(name)
    tp = TensorParallelModule(copy.deepcopy(eager), (), {**make_batch(name, ROWS, 0), **extra}, comm=comm)
    assert tp.split.params, f"{name}: nothing was split"
    opt_eager, opt_tp = optimizer(eager.parameters()), optimizer(tp.parameters())
    for step in range(STEPS):
        batch = {**make_batch(name, ROWS, 100 + step), **extra}
        losses = []
        for model, opt in ((eager, opt_eager), (tp, opt_tp)):
            opt.zero_grad()
            loss = model(**batch)["loss"]
            loss.backward()
            if option == "clip":
                norm = tp.clip_grad_norm_(0.1) if model is tp else torch.nn.utils.clip_grad_norm_(eager.parameters(), 0.1)
                losses.append(norm.detach())
            opt.step()
            losses.append(loss.detach())
        half = len(losses) // 2
        assert option != "clip" or losses[0] > 0.1, f"{case}: the norm {losses[0]} is not clipped; lower max_norm"
        for want, got in zip(losses[:half], losses[half:]):  # the loss, and the gradient norm with clip
            assert torch.allclose(want, got, rtol=1e-5, atol=1e-6), f"{case} step {step}: {losses}"
    full = tp.full_parameters()
    for fqn, p in eager.named_parameters():
        got = full[fqn]
        assert torch.allclose(got, p.detach(), rtol=1e-5, atol=1e-5), (
            f"{name}: {fqn} differs by {(got - p.detach()).abs().max():.3g} after {STEPS} steps")


run_checks({f"check_{n}": functools.partial(check, n) for n in sys.argv[1:]}, sys.argv[1:])
