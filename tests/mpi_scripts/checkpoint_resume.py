"""Checkpoints across layouts: write, resume, and a save killed part-way.

    checkpoint_resume.py write CKPT REF          train 2 steps, save CKPT, train 2 more, rank 0 writes REF
    checkpoint_resume.py resume CKPT REF LAYOUT WHEN [bitwise]
                                                 wrap, load CKPT (WHEN: "before" the first call, or
                                                 "after" a no-grad call), train 2 steps, compare with REF
    checkpoint_resume.py kill CKPT               load CKPT, train a step, save CKPT again: the test
                                                 sets RANNC_TEST_CHECKPOINT_KILL so the save dies

LAYOUT is ``stages x replicas`` of a hand-written plan, e.g. ``2x2`` (pp2 x dp2), ``1x2`` (dp2),
``2x1`` (pp2), ``1x1``. The model is the project's tiny GPT (tied head) with AdamW; the global batch
is the same on every layout (each rank feeds its rows of it), so losses and parameters match the
uninterrupted run: bitwise on the writer's layout, to fp32 tolerance elsewhere.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from mpi4py import MPI
from runtime_models import build_model, make_batch
from safetensors.torch import load_file, save_file

import rannc_py

comm = MPI.COMM_WORLD
rank, world = comm.Get_rank(), comm.Get_size()
ROWS = 8  # global batch


def wrapped(layout: str) -> tuple[rannc_py.RaNNCModule, torch.optim.Optimizer]:
    stages, replicas = (int(x) for x in layout.split("x"))
    assert stages * replicas == world, (layout, world)
    torch.manual_seed(0)
    model = build_model("gpt")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01, eps=1e-6)  # as runtime_equiv.py
    plan = {"stages": stages, "replicas": [replicas] * stages, "microbatches": 2}
    return rannc_py.RaNNCModule(model, opt, plan=plan), opt


def local_batch(step: int) -> dict:
    rows = ROWS // world
    return {k: v[rank * rows:(rank + 1) * rows] for k, v in make_batch("gpt", ROWS, seed=100 + step).items()}


def train(model: rannc_py.RaNNCModule, opt: torch.optim.Optimizer, steps: range) -> list[float]:
    losses = []
    for step in steps:
        loss = model(**local_batch(step)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return losses


def write(ckpt: str, ref: str) -> None:
    model, opt = wrapped("2x2")
    train(model, opt, range(2))
    rannc_py.save_checkpoint(ckpt, model, opt, extra={"step": 2})
    losses = train(model, opt, range(2, 4))
    state = model.state_dict()
    if rank == 0:
        Path(ref).mkdir(parents=True, exist_ok=True)
        save_file({k: v.clone() for k, v in state.items()}, f"{ref}/state.safetensors")
        save_file({"losses": torch.tensor(losses, dtype=torch.float64)}, f"{ref}/losses.safetensors")
    print(f"rank {rank} wrote", flush=True)


def resume(ckpt: str, ref: str, layout: str, when: str, bitwise: bool) -> None:
    model, opt = wrapped(layout)
    if when == "after":
        with torch.no_grad():
            model(**local_batch(0))  # partitions the model; no step is taken
    extra = rannc_py.load_checkpoint(ckpt, model, opt)
    assert extra == {"step": 2}, extra
    losses = torch.tensor(train(model, opt, range(2, 4)), dtype=torch.float64)
    state = model.state_dict()
    want = load_file(f"{ref}/losses.safetensors")["losses"]
    tol = {"rtol": 0, "atol": 0} if bitwise else {"rtol": 1e-5, "atol": 1e-6}
    torch.testing.assert_close(losses, want, **tol)
    if rank == 0:
        ref_state = load_file(f"{ref}/state.safetensors")
        assert set(state) == set(ref_state), set(state) ^ set(ref_state)
        for k, v in ref_state.items():
            torch.testing.assert_close(state[k], v, **tol, msg=lambda m, k=k: f"{k}: {m}")
    print(f"rank {rank} resumed {layout} {when} {'bitwise' if bitwise else 'close'}", flush=True)


def kill(ckpt: str) -> None:
    model, opt = wrapped("2x1")
    rannc_py.load_checkpoint(ckpt, model, opt)
    train(model, opt, range(2, 3))
    rannc_py.save_checkpoint(ckpt, model, opt, extra={"step": 3})
    print(f"rank {rank} saved without being killed", flush=True)


if __name__ == "__main__":
    mode, *rest = sys.argv[1:]
    if mode == "write":
        write(*rest)
    elif mode == "resume":
        resume(rest[0], rest[1], rest[2], rest[3], rest[4:] == ["bitwise"])
    else:
        kill(*rest)
