"""Torus reduce-scatter and allgather on 4 ranks, checked against the ring, and sharded training over them.

    comm_torus_gather.py collectives    2 x 2, 1 x 4, 4 x 1 and the default grid: reduce-scatter
                                        equal to the ring's (fp32 rounding), allgather identical,
                                        in place too; bad shapes refused, disagreeing ones at wait()
    comm_torus_gather.py training       GPT at dp4, sharding level 1, planned for a 4-node A64FX
                                        (a torus): the stage's algorithm is the torus, and 5 steps
                                        match eager (losses, parameters, optimizer state)
"""

from __future__ import annotations

import sys

import torch
from _expect import each_raises_config_error  # the scripts' folder is sys.path[0]
from runtime_equiv import parse_layout, step_gradients
from runtime_models import build_model, run_checks
from shard_equiv import assert_same_optimizer_state

import rannc_py
from rannc_py.comm import allgather, reduce_scatter
from rannc_py.errors import ConfigError

# isort: split
from mpi4py import MPI  # after rannc_py.comm, which sets the MPI thread level

comm = MPI.COMM_WORLD
rank, world = comm.Get_rank(), comm.Get_size()
assert world == 4, "run with 4 ranks"
SHAPES = [(2, 2), (1, 4), (4, 1), None]  # None: the default grid


def data(n: int, salt: int) -> torch.Tensor:
    # Positive values: no cancellation, so another summation order stays within rtol 1e-6.
    g = torch.Generator().manual_seed(salt * 1009 + rank)
    return torch.rand(n, generator=g) + 0.5


def check_collectives() -> None:
    for m in (0, 1, 5, 1000, 16411):
        full = data(world * m, m)
        keep = full.clone()
        ring = torch.empty(m)
        reduce_scatter(full, ring, comm, "ring").wait()
        mine = (torch.arange(m) * (rank + 1) + rank).to(torch.int16)
        want = torch.cat([(torch.arange(m) * (q + 1) + q).to(torch.int16) for q in range(world)])
        for shape in SHAPES:
            for seg in (1 << 20, 36):
                if seg < 1 << 20 and m > 1000:
                    continue  # tiny segments only where the messages stay few
                out = torch.full((m,), -1.0)
                reduce_scatter(full, out, comm, "torus", shape, segment_bytes=seg).wait()
                torch.testing.assert_close(out, ring, rtol=1e-6, atol=0, msg=lambda e, s=shape, m=m: f"{s} m={m}: {e}")
                assert torch.equal(full, keep), "reduce_scatter must leave its input intact"
                gathered = torch.empty(world * m, dtype=torch.int16)
                allgather(mine, gathered, comm, "torus", shape, segment_bytes=seg).wait()
                assert torch.equal(gathered, want), (shape, m)
                inplace = torch.zeros(world, m)
                inplace[rank] = ring
                allgather(inplace[rank], inplace.view(-1), comm, "torus", shape).wait()
                ring_gathered = torch.empty(world * m)
                allgather(ring, ring_gathered, comm, "ring").wait()
                assert torch.equal(inplace.view(-1), ring_gathered), (shape, m, "in place")
    check_bad_shapes()


def check_bad_shapes() -> None:
    each_raises_config_error([
        (lambda: reduce_scatter(torch.zeros(8), torch.zeros(2), comm, "torus", (3, 1)), "3 cells but"),
        (lambda: allgather(torch.zeros(2), torch.zeros(8), comm, "torus", (2, 0, 2)), "positive integers"),
        (lambda: allgather(torch.zeros(2), torch.zeros(8), comm, "ring", (2, 2)), "only used by algorithm='torus'"),
        (lambda: reduce_scatter(torch.zeros(8), torch.zeros(2), comm, "halving_doubling"), "unknown algorithm"),
    ])
    shape = (2, 2) if rank % 2 else (1, 4)
    for fn, args in ((reduce_scatter, (torch.ones(8), torch.zeros(2))), (allgather, (torch.ones(2), torch.zeros(8)))):
        try:
            fn(*args, comm, "torus", shape).wait()
        except ConfigError as e:
            assert "disagree on the torus shape" in str(e), e
        else:
            raise AssertionError(f"{fn.__name__}: mismatched torus shapes must raise ConfigError")
    x = torch.ones(8)
    out = torch.zeros(2)
    reduce_scatter(x, out, comm, "torus").wait()  # the communicator is still usable
    assert torch.equal(out, torch.full((2,), 4.0))


def check_training() -> None:
    layout = {**parse_layout("p1_r4_m1_1f1b"), "shard_optimizer": 1}
    torch.manual_seed(1234)
    model, ref = build_model("gpt"), build_model("gpt")
    ref.load_state_dict(model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01, eps=1e-6)
    ropt = torch.optim.AdamW(ref.parameters(), lr=1e-3, weight_decay=0.01, eps=1e-6)
    wrapped = rannc_py.RaNNCModule(model, opt, plan=layout, cluster="a64fx:nodes=4")
    for step in range(5):
        step_gradients(wrapped, ref, "gpt", {}, layout, 1, set(), step, "torus dp4")
        if step == 0:
            st = wrapped.plan.stages[0]
            assert (st.shard_level, st.allreduce) == (1, "torus"), wrapped.plan.summary()
            assert wrapped._sync.sharded[0][1] == "torus", wrapped._sync.sharded
        opt.step()
        opt.zero_grad()
        ropt.step()
        ropt.zero_grad()
    sd, osd = wrapped.state_dict(), wrapped.optimizer_state_dict()
    if rank == 0:
        for k, v in ref.state_dict().items():
            torch.testing.assert_close(sd[k], v, rtol=1e-5, atol=1e-6, msg=lambda e, k=k: f"{k}\n{e}")
        assert_same_optimizer_state(osd, ropt.state_dict(), "torus dp4")
    wrapped.close()


if __name__ == "__main__":
    run_checks(globals(), sys.argv[1:])
