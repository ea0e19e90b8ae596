"""Optimizer state out of one layout and into another: training continues as one uninterrupted eager run.

Run on 4 ranks. GPT with Adam over two param groups trains SPLIT steps on
data parallelism over 4 ranks at sharding level 1, and hands its state
dict and optimizer state dict (both gathered on every rank) to:

- ``pp2_level0``: 2 stages x 2 replicas unsharded, loaded before the first call;
- ``uneven_level2``: replicas [1, 3] at level 2, loaded after a first
  (evaluation) call has placed the model;
- ``eager``: the unwrapped model and ``torch.optim.Adam`` on every rank;

each trains the remaining steps and must match the eager reference that
trained every step without interruption.

``planned_state``: the planner (``shard_optimizer=True``, 2 stages x 2
replicas on an A64FX preset) places GPT with its tied embedding split; each
rank's measured optimizer-state bytes equal the cost model's prediction (to
the shards' alignment; the stage's total exactly).
"""

from __future__ import annotations

import copy

import torch
from mpi4py import MPI
from runtime_equiv import eager_loss_scaled, parse_layout
from runtime_models import build_model, local_slice, make_batch, run_checks
from shard_equiv import make_optimizer

import rannc_py

STEPS, SPLIT, LOCAL = 5, 3, 4
comm = MPI.COMM_WORLD
rank, world = comm.Get_rank(), comm.Get_size()


def fresh(seed: int):
    torch.manual_seed(seed)
    model = build_model("gpt")
    return model, make_optimizer("adam2", model)[0]


def train(wrapped, opt, ref, ropt, layout, steps) -> None:
    for step in steps:
        batch = make_batch("gpt", LOCAL * world, seed=step)
        out = wrapped(**local_slice(batch, rank, LOCAL)) if wrapped is not ref else None
        if out is not None:
            out["loss"].backward()
        want = eager_loss_scaled(ref, batch, {}, layout, 1)
        if out is not None:
            torch.testing.assert_close(out["loss"].detach(), want, rtol=1e-5, atol=1e-6)
        opt.step()
        opt.zero_grad()
        if ropt is not opt:
            ropt.step()
            ropt.zero_grad()


REFERENCE: dict = {}


def reference() -> tuple[dict, dict, dict, dict]:
    """(state, optimizer state) after SPLIT steps on dp4 level 1, and eager's after STEPS steps."""
    if not REFERENCE:
        model, opt = fresh(1)
        ref, ropt = fresh(1)
        layout = {**parse_layout("p1_r4_m1_1f1b"), "shard_optimizer": 1}
        wrapped = rannc_py.RaNNCModule(model, opt, plan=layout)
        train(wrapped, opt, ref, ropt, layout, range(SPLIT))
        REFERENCE["saved"] = (wrapped.state_dict(rank0_only=False), wrapped.optimizer_state_dict(rank0_only=False))
        wrapped.close()
        train(ref, ropt, ref, ropt, layout, range(SPLIT, STEPS))
        REFERENCE["final"] = (ref.state_dict(), ropt.state_dict())
    return (*REFERENCE["saved"], *REFERENCE["final"])


def continue_on(layout: dict, load_first: bool) -> None:
    sd, osd, want, _ = reference()
    model, opt = fresh(2)  # other initial values: only the loaded state may matter
    ref, ropt = fresh(2)
    ref.load_state_dict(sd)
    ropt.load_state_dict(copy.deepcopy(osd))  # torch's load keeps the dict's tensors: no sharing with opt's
    wrapped = rannc_py.RaNNCModule(model, opt, plan=layout)
    if load_first:
        wrapped.load_state_dict(sd)
        wrapped.load_optimizer_state_dict(osd)
    else:
        wrapped.eval()
        with torch.no_grad():
            wrapped(**local_slice(make_batch("gpt", LOCAL * world, seed=99), rank, LOCAL))
        wrapped.train()
        wrapped.load_state_dict(sd)
        wrapped.load_optimizer_state_dict(osd)
    train(wrapped, opt, ref, ropt, layout, range(SPLIT, STEPS))
    got = wrapped.state_dict(rank0_only=False)
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6, msg=lambda e, k=k: f"{layout}: {k}\n{e}")
    wrapped.close()


def check_pp2_level0() -> None:
    continue_on({**parse_layout("p2_r2x2_m2_1f1b"), "shard_optimizer": 0}, load_first=True)


def check_uneven_level2() -> None:
    continue_on({**parse_layout("p2_r1x3_m2_1f1b"), "shard_optimizer": 2}, load_first=False)


def check_eager() -> None:
    sd, osd, want, want_opt = reference()
    model, opt = fresh(2)
    model.load_state_dict(sd)
    opt.load_state_dict(osd)  # the gathered state dict is torch's, for the unwrapped model
    layout = parse_layout("p1_r4_m1_1f1b")
    train(model, opt, model, opt, layout, range(SPLIT, STEPS))
    for k, v in want.items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=1e-5, atol=1e-6)
    assert len(opt.state_dict()["state"]) == len(want_opt["state"])


def check_planned_state() -> None:
    from shard_equiv import state_bytes

    from rannc_py.planner.cost import optimizer_state_bytes
    from rannc_py.runtime.sharding import ALIGN

    model, _ = fresh(3)
    sizes = {n: p.numel() * 4 for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    wrapped = rannc_py.RaNNCModule(model, opt, cluster="a64fx:nodes=4", shard_optimizer=True, replicas=(2, 2))
    wrapped(**local_slice(make_batch("gpt", LOCAL * world, seed=0), rank, LOCAL)).loss.backward()
    opt.step()
    plan = wrapped.plan
    st = plan.stages[plan.stage_of_rank(rank)]
    assert st.shard_level == 1 and all(s.shard_level == 1 for s in plan.stages), plan.summary()
    mine = {f for f in st.param_fqns if f in sizes}
    others = {f for s in plan.stages if s is not st for f in s.param_fqns}
    tied = sum(sizes[f] for f in mine & others)
    assert tied > 0, "the embedding should be read by both stages"
    want = optimizer_state_bytes(sum(sizes[f] for f in mine), tied, st.replicas, st.shard_level, 2)
    got = state_bytes(opt)
    sub = comm.Split(st.index, rank)
    assert sub.allreduce(got) == st.replicas * want, (sub.allreduce(got), st.replicas * want)
    assert abs(got - want) <= 2 * 4 * ALIGN * st.replicas, (rank, got, want)
    sub.Free()
    wrapped.close()


if __name__ == "__main__":
    import sys

    run_checks(globals(), sys.argv[1:])
