"""RaNNCModule.close(), its context manager, and the communicators freed at exit.

Checks, on any number of ranks (one stage, data parallel, so the gradient
sums have their own sub-communicator):
- a ``with`` block trains, then frees the runtime's communicator and the
  gradient sub-communicators; a second close() is harmless; a forward after
  close raises ConfigError saying the module was closed;
- close() before the first call frees the communicator, twice is harmless;
- a module left open is closed at interpreter exit: a hook registered before
  rannc_py is imported runs after rannc_py's own and finds its communicators
  freed (prints ``rank R freed at exit``).
"""

from __future__ import annotations

import atexit
import sys

left_open: list = []  # (module, its communicators) left for the exit hook


def check_freed_at_exit() -> None:
    from mpi4py import MPI

    if not left_open:
        return
    module, comms = left_open[0]
    assert not MPI.Is_finalized()
    assert module._closed and all(c == MPI.COMM_NULL for c in comms), comms
    print(f"rank {MPI.COMM_WORLD.Get_rank()} freed at exit", flush=True)


atexit.register(check_freed_at_exit)  # before rannc_py registers its hook, so it runs after it

import torch
from mpi4py import MPI
from runtime_models import build_model, make_batch, run_checks

import rannc_py

comm = MPI.COMM_WORLD
rank, world = comm.Get_rank(), comm.Get_size()
LOCAL = 2
LAYOUT = {"stages": 1, "replicas": [world], "microbatches": 1}


def local_batch(step: int) -> dict:
    batch = make_batch("gpt", LOCAL * world, seed=step)
    return {k: v[rank * LOCAL : (rank + 1) * LOCAL] for k, v in batch.items()}


def communicators(module: rannc_py.RaNNCModule) -> list:
    subs = [sub for sub, _ in module._sync._groups] if module._ready else []
    return [module._comm, *subs]


def check_close() -> None:
    torch.manual_seed(0)
    model = build_model("gpt")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with rannc_py.RaNNCModule(model, opt, plan=LAYOUT) as wrapped:
        for step in range(2):
            wrapped(**local_batch(step)).loss.backward()
            opt.step()
            opt.zero_grad()
        comms = communicators(wrapped)
        assert len(comms) >= 2 or world == 1, comms  # the world's duplicate and a replica group
    assert all(c == MPI.COMM_NULL for c in comms), comms
    wrapped.close()  # a second close does nothing
    try:
        wrapped(**local_batch(0))
    except rannc_py.ConfigError as e:
        assert "closed" in str(e), e
    else:
        raise AssertionError("a forward after close() did not raise")
    assert all(torch.isfinite(p).all() for p in wrapped.parameters())  # parameters stay readable


def check_close_before_first_call() -> None:
    wrapped = rannc_py.RaNNCModule(build_model("gpt"), None, plan=LAYOUT)
    comms = communicators(wrapped)
    wrapped.close()
    wrapped.close()
    assert all(c == MPI.COMM_NULL for c in comms), comms


def check_open_at_exit() -> None:
    torch.manual_seed(0)
    wrapped = rannc_py.RaNNCModule(build_model("gpt"), None, plan=LAYOUT)
    wrapped(**local_batch(0))
    left_open.append((wrapped, communicators(wrapped)))


if __name__ == "__main__":
    run_checks(globals(), sys.argv[1:])
