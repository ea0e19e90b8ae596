"""Checkpoints of sharded optimizer state: each replica writes its shard; any layout and level resumes.

    shard_checkpoint.py write CKPT                4 ranks, dp4 at sharding level 1: train SPLIT steps,
                                                  save CKPT; each rank's file holds exactly the state
                                                  its optimizer keeps (its shard), all together every
                                                  element once
    shard_checkpoint.py resume CKPT LAYOUT LEVEL WHEN [AGAIN]
                                                  wrap at LAYOUT (runtime_equiv's ``p2_r2x2_m2_1f1b``
                                                  form) and sharding LEVEL, load CKPT (WHEN: "before"
                                                  the first call, or "after" an evaluation call), train
                                                  to STEPS: losses and parameters equal the eager run
                                                  that trained every step uninterrupted; with AGAIN,
                                                  save there and load that into a fresh wrapping of the
                                                  same layout: state and optimizer state identical
    shard_checkpoint.py kill CKPT                 4 ranks, dp4 level 1: load CKPT, train a step, save
                                                  CKPT again (the test makes a rank die in the save)

The model is the project's tiny GPT (tied head), the optimizer Adam over two
param groups (matrices with weight decay, the rest at twice the learning
rate). The global batch is the same on every layout (each rank feeds its rows).
"""

from __future__ import annotations

import sys

import torch
from mpi4py import MPI
from runtime_equiv import eager_loss_scaled, parse_layout
from runtime_models import local_slice, make_batch
from safetensors import safe_open
from shard_equiv import state_bytes
from shard_resume import fresh  # GPT and Adam over two param groups, from a seed

import rannc_py
from rannc_py.runtime.checkpoint import read_index

STEPS, SPLIT, ROWS = 5, 3, 16
WRITER = "p1_r4_m1_1f1b"
comm = MPI.COMM_WORLD
rank, world = comm.Get_rank(), comm.Get_size()


def wrapped(layout_text: str, level: int, seed: int = 2):
    model, opt = fresh(seed)  # other initial values than the writer's: only the loaded state may matter
    layout = {**parse_layout(layout_text), "shard_optimizer": level}
    assert sum(layout["replicas"]) == world, (layout, world)
    return rannc_py.RaNNCModule(model, opt, plan=layout), opt, layout


def step(model, opt, ref, ropt, layout, i: int) -> None:
    """Step ``i`` on the wrapped ``model`` (None: only the eager ``ref``), losses compared."""
    batch = make_batch("gpt", ROWS, seed=i)
    want = eager_loss_scaled(ref, batch, {}, layout, 1)
    ropt.step()
    ropt.zero_grad()
    if model is None:
        return
    loss = model(**local_slice(batch, rank, ROWS // world)).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    torch.testing.assert_close(loss.detach(), want, rtol=1e-5, atol=1e-6, msg=lambda e: f"step {i} loss\n{e}")


def write(ckpt: str) -> None:
    model, opt, layout = wrapped(WRITER, 1, seed=1)
    ref, ropt = fresh(1)
    for i in range(SPLIT):
        step(model, opt, ref, ropt, layout, i)
    assert model._shards.shard_params(), "the writer's stage must be sharded"
    rannc_py.save_checkpoint(ckpt, model, opt, extra={"step": SPLIT})
    with safe_open(f"{ckpt}/rank{rank:05d}.safetensors", framework="pt") as f:
        keys = f.keys()  # safe_open's handle is not iterable
        written = sum(f.get_tensor(k).numel() * 4 for k in keys if k.startswith("optimizer/"))
    held = state_bytes(opt)
    whole = sum(v.numel() * 4 for st in ropt.state.values() for v in st.values() if v.dim() > 0)
    assert written == held < whole, (rank, written, held, whole)  # its shard, no more
    assert comm.allreduce(written) == whole, (comm.allreduce(written), whole)  # every element once
    index = read_index(ckpt)
    saved = index["optimizer"]["state"]
    assert all(st["exp_avg"]["shape"] == list(ref.get_parameter(n).shape) for n, st in saved.items())
    split = [n for n, st in saved.items() if len({sh["file"] for sh in st["exp_avg"]["shards"]}) > 1]
    assert split, "some parameter's state should be split over the replicas' files"
    model.close()
    print(f"rank {rank} wrote", flush=True)


def resume(ckpt: str, layout_text: str, level: str, when: str, again: bool) -> None:
    model, opt, layout = wrapped(layout_text, int(level))
    ref, ropt = fresh(1)
    for i in range(SPLIT):
        step(None, None, ref, ropt, layout, i)
    if when == "after":
        place(model)
    assert rannc_py.load_checkpoint(ckpt, model, opt) == {"step": SPLIT}
    for i in range(SPLIT, STEPS):
        step(model, opt, ref, ropt, layout, i)
    got = model.state_dict(rank0_only=False)
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6, msg=lambda e, k=k: f"{k}\n{e}")
    if again:
        save_again(ckpt, model, opt, layout_text, int(level))
    model.close()
    print(f"rank {rank} resumed {layout_text} level {level} {when}", flush=True)


def save_again(ckpt: str, model, opt, layout_text: str, level: int) -> None:
    """This layout's own checkpoint loads back into it exactly."""
    again = f"{ckpt}-{layout_text}-{level}"
    rannc_py.save_checkpoint(again, model, opt, extra={"step": STEPS})
    state, ostate = model.state_dict(rank0_only=False), model.optimizer_state_dict(rank0_only=False)
    other, oopt, _ = wrapped(layout_text, level, seed=3)
    assert rannc_py.load_checkpoint(again, other, oopt) == {"step": STEPS}
    place(other)  # the loaded state to each rank's share
    got, ogot = other.state_dict(rank0_only=False), other.optimizer_state_dict(rank0_only=False)
    assert all(torch.equal(got[k], v) for k, v in state.items())
    assert ogot["param_groups"] == ostate["param_groups"]
    for i, st in ostate["state"].items():
        for k, v in st.items():
            assert torch.equal(ogot["state"][i][k], v), (i, k)
    other.close()


def place(model) -> None:
    """The first call, an evaluation one: the model is partitioned, no step is taken."""
    model.eval()
    with torch.no_grad():
        model(**local_slice(make_batch("gpt", ROWS, seed=99), rank, ROWS // world))
    model.train()


def kill(ckpt: str) -> None:
    model, opt, _ = wrapped(WRITER, 1)
    rannc_py.load_checkpoint(ckpt, model, opt)
    loss = model(**local_slice(make_batch("gpt", ROWS, seed=SPLIT), rank, ROWS // world)).loss
    loss.backward()
    opt.step()
    rannc_py.save_checkpoint(ckpt, model, opt, extra={"step": SPLIT + 1})
    print(f"rank {rank} saved without being killed", flush=True)


if __name__ == "__main__":
    mode, *rest = sys.argv[1:]
    try:
        if mode == "write":
            write(*rest)
        elif mode == "resume":
            resume(rest[0], rest[1], rest[2], rest[3], rest[4:] == ["again"])
        else:
            kill(*rest)
    except BaseException:  # noqa: BLE001 - one rank's failure must end every rank
        import traceback

        traceback.print_exc()
        sys.stderr.flush()
        comm.Abort(1)
