"""Train with RaNNCModule under many layouts and compare with eager PyTorch in-process.

Usage: runtime_equiv.py CASE [CASE ...], each CASE ``model:layout[:option,...]``,
e.g. ``gpt:p2_r1x1_m2_1f1b:rc,accum,clip`` (models: see runtime_models.MODELS;
options: ``rc`` recompute, ``accum`` two calls per step with ``(loss / 2)
.backward()``, ``clip`` ``clip_grad_norm_``). Every rank builds the same model
and the same global batches (fixed seeds), trains its local slice for STEPS
AdamW steps, and compares losses (every rank) and the gathered state dict
(rank 0) with an eager reference. The reference is DDP's loss: the mean over
microbatches of the model's per-microbatch loss, each replica's chunk weighted
by its rows (the eager model runs the same chunks in the same order).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from mpi4py import MPI
from runtime_models import build_model, call_kwargs, local_slice, make_batch, rows_slice

import rannc_py
from rannc_py.runtime.routing import chunks

STEPS = 5
LOCAL = 4  # rows per rank per call
comm = MPI.COMM_WORLD
rank, world = comm.Get_rank(), comm.Get_size()


def parse_layout(text: str) -> dict:
    """``p2_r2x1_m4_1f1b`` -> 2 stages with replicas [2, 1], 4 microbatches, schedule 1f1b."""
    p, r, m, sched = text.split("_")
    return {"stages": int(p[1:]), "replicas": [int(x) for x in r[1:].split("x")], "microbatches": int(m[1:]),
            "schedule": sched}


def run_case(case: str) -> None:
    name, layout_text, *opts = case.split(":")
    opts = set(opts[0].split(",")) if opts else set()
    layout = parse_layout(layout_text)
    layout["recompute"] = "rc" in opts
    model, opt, ref, ropt = eager_pair(name)
    wrapped = rannc_py.RaNNCModule(model, opt, plan=layout)
    train_like_eager(wrapped, opt, ref, ropt, name, layout, case, opts)
    if rank == 0:
        print(f"case {case}: ok", flush=True)


def eager_pair(name: str) -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.nn.Module, torch.optim.Optimizer]:
    """A model and an equal eager reference (fixed seed), each with its AdamW."""
    torch.manual_seed(1234)
    model = build_model(name, dropout=0.0)
    ref = build_model(name, dropout=0.0)
    ref.load_state_dict(model.state_dict())
    # eps well above rounding noise: some gradients (e.g. an attention key bias) are exactly
    # zero in exact arithmetic, and Adam would otherwise scale their rounding noise up to lr.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01, eps=1e-6)
    ropt = torch.optim.AdamW(ref.parameters(), lr=1e-3, weight_decay=0.01, eps=1e-6)
    return model, opt, ref, ropt


def train_like_eager(wrapped, opt, ref, ropt, name, layout, case, opts, steps=STEPS) -> None:
    """``steps`` AdamW steps of ``wrapped`` and of the eager ``ref`` (options as in the module
    docstring); losses compared every step, the gathered state dict at the end (rank 0)."""
    const = call_kwargs(name)
    calls = 2 if "accum" in opts else 1
    for step in range(steps):
        step_gradients(wrapped, ref, name, const, layout, calls, opts, step, case)
        opt.step()
        opt.zero_grad()
        ropt.step()
        ropt.zero_grad()
    sd = wrapped.state_dict()
    if rank == 0:
        for k, v in ref.state_dict().items():
            torch.testing.assert_close(sd[k], v, rtol=1e-5, atol=1e-6, msg=lambda e, k=k: f"{case}: {k}\n{e}")


def step_gradients(wrapped, ref, name, const, layout, calls, opts, step, case) -> None:
    """One step's ``calls`` forward calls and backwards on ``wrapped`` and on the eager ``ref``, the
    losses compared; with ``clip`` in ``opts`` both clipped and the norms compared."""
    for c in range(calls):
        batch = make_batch(name, LOCAL * world, seed=100 * step + c)
        out = wrapped(**local_slice(batch, rank, LOCAL), **const)
        (out["loss"] / calls).backward()
        want = eager_loss_scaled(ref, batch, const, layout, calls)
        torch.testing.assert_close(out["loss"].detach(), want, rtol=1e-5, atol=1e-6, msg=lambda e: f"{case} step {step} loss\n{e}")
    if "clip" in opts:
        norm = wrapped.clip_grad_norm_(0.05)
        rnorm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
        torch.testing.assert_close(norm, rnorm, rtol=1e-5, atol=1e-6, msg=lambda e: f"{case} step {step} norm\n{e}")


def eager_loss_scaled(ref, batch, const, layout, calls) -> torch.Tensor:
    g = next(iter(batch.values())).shape[0]
    m, r = layout["microbatches"], layout["replicas"][-1]
    rows = g // m
    total = torch.zeros(())
    for i in range(m):
        for lo, hi in chunks(rows, r):
            loss = ref(**rows_slice(batch, i * rows + lo, i * rows + hi), **const)["loss"] * ((hi - lo) / g)
            (loss / calls).backward()
            total += loss.detach()
    return total


def run_cases(run: Callable[[str], None], cases: list[str]) -> None:
    """``run(case)`` for each case; a failure prints its traceback and aborts every rank."""
    for case in cases:
        try:
            run(case)
        except BaseException:  # noqa: BLE001 - any failure must abort every rank
            # One rank's mismatch must end the job, not leave the others waiting.
            import traceback

            traceback.print_exc()
            sys.stderr.flush()
            comm.Abort(1)


if __name__ == "__main__":
    run_cases(run_case, sys.argv[1:])
