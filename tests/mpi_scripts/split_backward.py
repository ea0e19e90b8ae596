"""Split backward (zb-h1) in the runtime, on any number of ranks >= 2.

Checks:
- ``bitwise``: the same model under 1f1b and zb-h1 (two stages, replicas
  [world - 1, 1]; with and without recompute, with dropout) gives bitwise the
  same losses and parameter gradients: I then W is one full backward.
- ``overlap``: the gradient sums of the replicated stage start while the
  step's last W runs, not at its last I or after the schedule.
- ``trace``: the measured trace holds every rank's I and W actions.
- ``planned``: a plan the planner made with zb-h1 trains equal to eager.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch
from mpi4py import MPI
from runtime_equiv import eager_pair, train_like_eager
from runtime_models import build_model, call_kwargs, local_slice, make_batch, run_checks, uneven_layout

import rannc_py

comm = MPI.COMM_WORLD
rank, world = comm.Get_rank(), comm.Get_size()
LOCAL = 4


def _grads(name: str, schedule: str, recompute: bool) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = build_model(name, dropout=0.1)
    layout = uneven_layout(world) | {"microbatches": 4, "schedule": schedule, "recompute": recompute}
    losses = []
    with rannc_py.RaNNCModule(model, torch.optim.SGD(model.parameters(), lr=0.1), plan=layout) as wrapped:
        for step in range(2):
            torch.manual_seed(10 + step)  # the same dropout masks under both schedules
            out = wrapped(**local_slice(make_batch(name, LOCAL * world, seed=step), rank, LOCAL),
                          **call_kwargs(name))
            out["loss"].backward()
            losses.append(out["loss"].detach())
        grads = {f: p.grad.clone() for f, p in wrapped.named_parameters() if p.grad is not None}
    return losses, grads


def check_bitwise() -> None:
    for name in ("gpt", "hf_llama"):
        for recompute in (False, True):
            want_losses, want = _grads(name, "1f1b", recompute)
            got_losses, got = _grads(name, "zb-h1", recompute)
            assert all(torch.equal(a, b) for a, b in zip(got_losses, want_losses)), (got_losses, want_losses)
            assert got.keys() == want.keys() and got, (sorted(got), sorted(want))
            differ = [f for f in want if not torch.equal(got[f], want[f])]
            assert not differ, f"{name} recompute={recompute}: gradients of {differ} differ"


def check_overlap() -> None:
    torch.manual_seed(0)
    model = build_model("gpt")
    layout = uneven_layout(world) | {"microbatches": 4, "schedule": "zb-h1"}
    wrapped = rannc_py.RaNNCModule(model, torch.optim.SGD(model.parameters(), lr=0.1), plan=layout,
                                   bucket_bytes=16 * 1024)
    wrapped(**local_slice(make_batch("gpt", LOCAL * world, seed=0), rank, LOCAL))  # builds the stage
    calls: list[tuple[str, int]] = []
    sync = wrapped._sync
    arm, start = sync.arm, sync.start
    accumulated = [0]  # weight gradients of the microbatches so far, of one parameter of this stage
    next(iter(wrapped._params.values())).register_post_accumulate_grad_hook(lambda p: accumulated.__setitem__(
        0, accumulated[0] + 1))
    sync.arm = lambda: (calls.append(("arm", accumulated[0])), arm())[1]  # type: ignore[method-assign]
    sync.start = lambda: (calls.append(("start", accumulated[0])), start())[1]  # type: ignore[method-assign]
    wrapped(**local_slice(make_batch("gpt", LOCAL * world, seed=0), rank, LOCAL)).loss.backward()
    # armed before the last microbatch's W (three of four accumulated), the rest started at ALLREDUCE
    assert calls == [("arm", 3), ("start", 4)], calls
    total = sum(len(b) for _, b in sync._groups)
    assert sync.started_in_backward >= total - 1, (sync.started_in_backward, total)
    if world > 2 and rank < world - 1:  # the first stage's replicas: several buckets
        assert total >= 3, total


def check_trace() -> None:
    folder = Path(comm.bcast(tempfile.mkdtemp() if rank == 0 else None, root=0))
    path = folder / "trace.json"
    torch.manual_seed(0)
    model = build_model("gpt")
    layout = uneven_layout(world) | {"microbatches": 4, "schedule": "zb-h1"}
    with rannc_py.RaNNCModule(model, torch.optim.SGD(model.parameters(), lr=0.1), plan=layout,
                              trace=str(path), trace_steps=1) as wrapped:
        for step in range(3):
            wrapped(**local_slice(make_batch("gpt", LOCAL * world, seed=step), rank, LOCAL)).loss.backward()
    if rank == 0:
        spans = [e for e in json.loads(path.read_text())["traceEvents"] if e.get("ph") == "X"]
        for r in range(world):
            names = {e["name"] for e in spans if e["tid"] == r}
            assert {f"{k}{i}" for k in "FIW" for i in range(4)} <= names, (r, sorted(names))
            assert not any(n.startswith("B") for n in names), sorted(names)


def check_planned() -> None:
    model, opt, ref, ropt = eager_pair("gpt")
    wrapped = rannc_py.RaNNCModule(model, opt, cluster=f"a64fx:nodes={world}", schedules=("zb-h1",),
                                   num_stages=2, microbatches=4, recompute=False)
    wrapped(**local_slice(make_batch("gpt", LOCAL * world, seed=99), rank, LOCAL))  # plans; no backward
    opt.zero_grad()
    plan = wrapped.plan
    assert plan is not None and plan.schedule == "zb-h1", plan
    layout = {"microbatches": plan.microbatches, "replicas": [st.replicas for st in plan.stages]}
    train_like_eager(wrapped, opt, ref, ropt, "gpt", layout, "planned", set(), steps=3)


if __name__ == "__main__":
    run_checks(globals(), sys.argv[1:])
