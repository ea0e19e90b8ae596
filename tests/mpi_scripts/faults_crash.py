"""One rank fails in one way; every rank must end promptly with that rank's message first.

Usage: ``faults_crash.py MODE RANK DIR`` with MODE one of

- ``between``: the user's code raises between two steps;
- ``loss``: the user's own loss function (on the returned logits) raises;
- ``SIGKILL`` / ``SIGTERM``: the rank kills itself between two steps;
- ``hang``: the rank stops calling the module (it sleeps); ``timeout=`` must end the job;
- ``state_dict``: only this rank calls the collective ``state_dict()``; ``timeout=`` must end the job.

Each rank writes its process id to ``DIR/rank<R>.pid`` first, so the test can
tell whose process mpiexec reports.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from mpi4py import MPI
from runtime_models import build_model, make_batch

import rannc_py

mode, bad, out_dir = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
rank = MPI.COMM_WORLD.Get_rank()
(out_dir / f"rank{rank}.pid").write_text(str(os.getpid()))
torch.manual_seed(0)
timeout = 8 if mode in ("hang", "state_dict") else None
model = rannc_py.RaNNCModule(build_model("gpt"), None, plan={"stages": 2, "microbatches": 2}, timeout=timeout)
batch = make_batch("gpt", 2, seed=0)


def failing() -> None:
    """Note the moment this rank fails (wall clock), so the test can time how fast every rank ends."""
    (out_dir / "failed_at").write_text(repr(time.time()))


def custom_loss(loss: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """The model's loss plus a (zero-weighted) penalty on the logits, failing on the bad rank."""
    if rank == bad:
        failing()
        raise ValueError(f"custom loss failed on rank {rank}")
    return loss + 0.0 * F.relu(logits).mean()


for step in range(4):
    out = model(**batch)
    if mode == "loss" and step == 1:
        custom_loss(out.loss, out.logits).backward()
    else:
        out.loss.backward()
    if step == 1 and rank == bad:
        if mode in ("between", "SIGKILL", "SIGTERM"):
            failing()
        if mode == "between":
            raise RuntimeError(f"user code failed on rank {rank} between steps")
        if mode in ("SIGKILL", "SIGTERM"):
            os.kill(os.getpid(), getattr(signal, mode))
        if mode == "hang":
            time.sleep(600)
        if mode == "state_dict":
            model.state_dict()
print(f"rank {rank} unreachable", flush=True)
