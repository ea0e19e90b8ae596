"""Peer: ``torch.distributed.pipelining`` training the benchmark GPT on 2 ranks (gloo).

Launched by ``benchmarks/runtime_bench.py`` under ``mpiexec -n 2`` (rank and
size come from the launcher's environment; the process group uses env init on
localhost). The two stage modules are built by hand from the GPT's own layers
(see :func:`benchmarks.peers.common.hand_stages`); each stage steps AdamW on
its parameters. Rank 0 prints one ``RESULT`` line with the median step time.

    mpiexec -n 2 python benchmarks/peers/pipelining_peer.py --boundary 3 --microbatches 4 --schedule 1f1b
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

# isort: split
# common is the module beside this script (its folder is sys.path[0]); the repository
# root stays off the path, so the installed rannc_py is the one measured.
from common import (
    build_gpt,
    emit,
    global_batch,
    hand_stages,
    launch_rank,
    lm_loss,
    median_step,
    worker_parser,
)

SCHEDULES = {"1f1b": Schedule1F1B, "gpipe": ScheduleGPipe}


def main() -> None:
    """Parse the flags, train, and print the result line on rank 0."""
    ap = worker_parser(__doc__.splitlines()[0])
    ap.add_argument("--boundary", type=int, default=3, help="blocks in stage 0; default 3")
    ap.add_argument("--schedule", choices=sorted(SCHEDULES), default="1f1b")
    ap.add_argument("--port", type=int, default=29511)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rank, world = launch_rank()
    if world != 2:
        raise SystemExit(f"this peer runs a 2-stage pipeline on 2 ranks, got {world}")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(args.port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    stages = hand_stages(build_gpt(args.layers, args.hidden, args.vocab), args.boundary)
    module = stages[rank]
    stage = PipelineStage(module, rank, world, torch.device("cpu"))
    sched = SCHEDULES[args.schedule](stage, args.microbatches, loss_fn=lm_loss)  # grads scaled by 1/m
    opt = torch.optim.AdamW(module.parameters(), lr=1e-4)
    losses: list[torch.Tensor] = []
    step_losses: list[float] = []

    def step(i: int) -> None:
        ids, labels = global_batch(args.batch, i, args.vocab)
        losses.clear()
        if rank == 0:
            sched.step(ids)
        else:
            sched.step(target=labels, losses=losses)
        opt.step()
        opt.zero_grad()
        if rank == 1:
            step_losses.append(float(torch.stack(losses).detach().mean()))

    med, times, busy = median_step(step, args.warmup, args.steps)
    # a step ends when both ranks have stepped: report the slower rank's median
    all_meds: list[float | None] = [None] * world
    dist.all_gather_object(all_meds, med)
    cpu: list[float | None] = [None] * world
    dist.all_gather_object(cpu, busy)
    got = [step_losses]
    dist.broadcast_object_list(got, src=1)
    if rank == 0:
        emit({"step": max(m for m in all_meds if m is not None), "times": times, "losses": got[0], "cpu": cpu})
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
