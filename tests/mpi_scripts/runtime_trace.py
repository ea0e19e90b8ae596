"""The measured timeline (``RaNNCModule(trace=...)``) on any number of ranks (2 stages from 2 ranks).

Checks: the trace file is trace-event JSON with one named track per rank, every
rank's schedule actions of each recorded step in it, per-step totals that agree
with the step times the training loop measured, a PNG beside it; training with
tracing on equals training with it off; a trace written before all steps ran
(``close()``) holds the steps recorded so far.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from mpi4py import MPI
from runtime_models import build_model, local_slice, make_batch, run_checks, uneven_layout

import rannc_py
from rannc_py.runtime.trace import step_totals

comm = MPI.COMM_WORLD
rank, world = comm.Get_rank(), comm.Get_size()
LOCAL = 4
STEPS = 3
LAYOUT = uneven_layout(world) | {"microbatches": 4}


def _folder() -> Path:
    return Path(comm.bcast(tempfile.mkdtemp() if rank == 0 else None, root=0))


def _train(path: Path | None, steps: int, close: bool = False) -> tuple[list[float], list[float], dict]:
    torch.manual_seed(0)
    model = build_model("gpt")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    kwargs = {"trace": str(path), "trace_steps": STEPS} if path is not None else {}
    wrapped = rannc_py.RaNNCModule(model, opt, plan=LAYOUT, **kwargs)
    losses, times = [], []
    for step in range(steps):
        batch = make_batch("gpt", LOCAL * world, seed=step)
        comm.Barrier()  # every rank starts the step together, as the trace's first rank does
        t0 = time.perf_counter()
        loss = wrapped(**local_slice(batch, rank, LOCAL)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    if close:
        wrapped.close()
    return losses, times, wrapped.plan.to_json() if wrapped.plan is not None else ""


def check_trace_file() -> None:
    folder = _folder()
    path = folder / "run" / "trace.json"
    losses, times, _ = _train(path, 1 + STEPS + 1)  # the call after the last recorded step writes
    plain, _, _ = _train(None, 1 + STEPS + 1)
    assert losses == plain, (losses, plain)  # tracing changes nothing in the computation
    slowest = comm.gather(times, root=0)
    if rank != 0:
        return
    data = json.loads(path.read_text())
    events = data["traceEvents"]
    names = {e["tid"]: e["args"]["name"] for e in events if e.get("name") == "thread_name"}
    assert sorted(names) == list(range(world)), names
    spans = [e for e in events if e.get("ph") == "X"]
    for r in range(world):
        mine = [e for e in spans if e["tid"] == r]
        for step in range(2, 2 + STEPS):
            kinds = {e["cat"] for e in mine if e["args"]["step"] == step}
            assert {"F", "B", "step"} <= kinds, (r, step, kinds)
    totals = step_totals(events)
    assert len(totals) == STEPS, totals
    # the loop's step on the slowest rank, for the recorded steps (1 .. STEPS after the first)
    measured = [max(t[k] for t in slowest) for k in range(1, 1 + STEPS)]
    for got, want in zip(totals.values(), measured):
        assert abs(got - want) <= 0.1 * want + 2e-3, (list(totals.values()), measured)
    assert path.with_suffix(".png").stat().st_size > 0


def check_close_writes_what_was_recorded() -> None:
    folder = _folder()
    path = folder / "early.json"
    _train(path, 2, close=True)  # one step recorded of STEPS
    if rank == 0:
        totals = step_totals(json.loads(path.read_text())["traceEvents"])
        assert len(totals) == 1, totals


if __name__ == "__main__":
    run_checks(globals(), sys.argv[1:])
