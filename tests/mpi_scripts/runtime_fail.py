"""Rank 1 passes a batch of another shape on the second call; every rank must end promptly."""

import torch
from mpi4py import MPI
from runtime_models import build_model, make_batch

import rannc_py

rank = MPI.COMM_WORLD.Get_rank()
torch.manual_seed(0)
model = rannc_py.RaNNCModule(build_model("gpt"), None, plan={"stages": 2, "microbatches": 2})
batch = make_batch("gpt", 4, seed=0)
model(**batch)
if rank == 1:
    batch = make_batch("gpt", 2, seed=0)
model(**batch)
print("unreachable", flush=True)
