"""The runtime with the planner in the loop, on 4 ranks.

Checks:
- ``calibrate``: with an empty calibration cache and the nested ``mpiexec``
  probe disabled, the default ``local`` cluster is calibrated by the job's own
  ranks (0 and 1 ping-pong, 2 and 3 wait), rank 0 caches the figures, and a
  second module plans from the cache without measuring again.
- ``torus``: on ``a64fx:nodes=4`` with one stage of 4 replicas the planner
  picks the torus allreduce; the runtime sums gradients with it, and losses
  and parameters after 3 AdamW steps equal eager training.
"""

from __future__ import annotations

import sys

import torch
from mpi4py import MPI
from runtime_equiv import eager_loss_scaled
from runtime_models import build_model, local_slice, make_batch

import rannc_py
from rannc_py.comm import collectives
from rannc_py.hardware import calibrate

comm = MPI.COMM_WORLD
rank, world = comm.Get_rank(), comm.Get_size()
LOCAL = 4


def _no_nested_probe(*args, **kwargs):
    raise AssertionError("measured again: the nested mpiexec probe, or the job's ranks with figures cached")


def check_calibrate() -> None:
    assert calibrate.cached_link() is None, "the test needs an empty RANNC_CACHE_DIR"
    calibrate.measure_mpi = _no_nested_probe
    torch.manual_seed(0)
    model = build_model("gpt")
    wrapped = rannc_py.RaNNCModule(model, torch.optim.SGD(model.parameters(), lr=0.1))
    batch = make_batch("gpt", LOCAL * world, seed=0)
    wrapped(**local_slice(batch, rank, LOCAL)).loss.backward()
    if rank == 0:
        link = calibrate.cached_link()
        assert link is not None and link.latency > 0 and link.bandwidth > 0, link
        assert wrapped.plan is not None and wrapped.plan.cluster.startswith("local:ranks=4"), wrapped.plan.cluster
    # Cached now: a second module plans without measuring.
    calibrate.measure_link = _no_nested_probe
    model = build_model("gpt")
    again = rannc_py.RaNNCModule(model, torch.optim.SGD(model.parameters(), lr=0.1))
    again(**local_slice(batch, rank, LOCAL)).loss.backward()
    if rank == 0:
        print("calibrate: ok", flush=True)


def check_torus() -> None:
    torch.manual_seed(1234)
    model = build_model("gpt")
    ref = build_model("gpt")
    ref.load_state_dict(model.state_dict())
    batch = make_batch("gpt", LOCAL * world, seed=0)
    graph = rannc_py.trace(model, (), local_slice(batch, rank, LOCAL))
    plan = rannc_py.plan(graph, batch_size=LOCAL * world, cluster=f"a64fx:nodes={world}", replicas=[world],
                         microbatches=2)
    assert plan.stages[0].allreduce == "torus", plan.summary()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01, eps=1e-6)
    ropt = torch.optim.AdamW(ref.parameters(), lr=1e-3, weight_decay=0.01, eps=1e-6)
    wrapped = rannc_py.RaNNCModule(model, opt, plan=plan)
    used = set()
    start = collectives.allreduce

    def recording(t, sub, algorithm="mpi"):
        used.add(algorithm)
        return start(t, sub, algorithm)

    collectives.allreduce = recording
    layout = {"microbatches": 2, "replicas": [world]}
    for step in range(3):
        batch = make_batch("gpt", LOCAL * world, seed=step)
        out = wrapped(**local_slice(batch, rank, LOCAL))
        out.loss.backward()
        want = eager_loss_scaled(ref, batch, {}, layout, 1)
        torch.testing.assert_close(out.loss.detach(), want, rtol=1e-5, atol=1e-6)
        opt.step(), ropt.step(), opt.zero_grad(), ropt.zero_grad()
    assert used == {"torus"}, used
    sd = wrapped.state_dict()
    if rank == 0:
        for k, v in ref.state_dict().items():
            torch.testing.assert_close(sd[k], v, rtol=1e-5, atol=1e-6, msg=lambda e, k=k: f"{k}\n{e}")
        print("torus: ok", flush=True)


if __name__ == "__main__":
    checks = {"calibrate": check_calibrate, "torus": check_torus}
    try:
        for name in sys.argv[1:]:
            checks[name]()
    except BaseException:  # noqa: BLE001 - any failure must abort every rank
        import traceback

        traceback.print_exc()
        sys.stderr.flush()
        comm.Abort(1)
