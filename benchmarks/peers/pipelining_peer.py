"""Peer: ``torch.distributed.pipelining`` training the benchmark GPT on 2 ranks (gloo).

Launched by ``benchmarks/runtime_bench.py`` under ``mpiexec -n 2`` (rank and
size come from the launcher's environment; the process group uses env init on
localhost). The two stage modules are built by hand from the GPT's own layers
(see :func:`benchmarks.peers.common.hand_stages`); each stage steps AdamW on
its parameters. Rank 0 prints one ``RESULT`` line with the median step time.

The schedules with several stages per rank (interleaved 1F1B, interleaved
zero-bubble, ZB-V) cut the GPT into ``2 x ranks`` stages of whole layers
(:func:`benchmarks.peers.common.chunk_stages`) placed as each schedule
expects: round-robin for the interleaved ones, a V for ZB-V (rank 0 holds the
first and the last stage).

    mpiexec -n 2 python benchmarks/peers/pipelining_peer.py --boundary 3 --microbatches 4 --schedule 1f1b
    mpiexec -n 2 python benchmarks/peers/pipelining_peer.py --microbatches 4 --schedule zbv
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
    ScheduleZBVZeroBubble,
)

# isort: split
# common is the module beside this script (its folder is sys.path[0]); the repository
# root stays off the path, so the installed rannc_py is the one measured.
from common import (
    build_gpt,
    chunk_stages,
    emit,
    global_batch,
    hand_stages,
    launch_rank,
    lm_loss,
    median_step,
    worker_parser,
)

SCHEDULES = {"1f1b": Schedule1F1B, "gpipe": ScheduleGPipe}
# Schedules of two stages per rank, and the ranks holding stages 0..3 (2 ranks).
MULTI = {"interleaved-1f1b": (ScheduleInterleaved1F1B, (0, 1, 0, 1)),
         "interleaved-zb": (ScheduleInterleavedZeroBubble, (0, 1, 0, 1)),
         "zbv": (ScheduleZBVZeroBubble, (0, 1, 1, 0))}


def main() -> None:
    """Parse the flags, train, and print the result line on rank 0."""
    ap = worker_parser(__doc__.splitlines()[0])
    ap.add_argument("--boundary", type=int, default=3, help="blocks in stage 0; default 3")
    ap.add_argument("--schedule", choices=sorted(SCHEDULES) + sorted(MULTI), default="1f1b")
    ap.add_argument("--port", type=int, default=29511)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rank, world = launch_rank()
    if world != 2:
        raise SystemExit(f"this peer runs a 2-stage pipeline on 2 ranks, got {world}")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(args.port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    gpt = build_gpt(args.layers, args.hidden, args.vocab)
    if args.schedule in SCHEDULES:
        module = hand_stages(gpt, args.boundary)[rank]
        sched = SCHEDULES[args.schedule](PipelineStage(module, rank, world, torch.device("cpu")),
                                         args.microbatches, loss_fn=lm_loss)  # grads scaled by 1/m
        first, last = rank == 0, rank == world - 1
    else:
        cls, holders = MULTI[args.schedule]
        chunks = chunk_stages(gpt, len(holders))
        mine = [i for i, r in enumerate(holders) if r == rank]
        module = torch.nn.ModuleList(chunks[i] for i in mine)
        sched = cls([PipelineStage(chunks[i], i, len(holders), torch.device("cpu")) for i in mine],
                    args.microbatches, loss_fn=lm_loss)
        first, last = 0 in mine, len(holders) - 1 in mine
    opt = torch.optim.AdamW(module.parameters(), lr=1e-4)
    loss_rank = torch.tensor([rank if last else 0])
    dist.all_reduce(loss_rank)
    losses: list[torch.Tensor] = []
    step_losses: list[float] = []

    def step(i: int) -> None:
        ids, labels = global_batch(args.batch, i, args.vocab)
        losses.clear()
        if first and last:
            sched.step(ids, target=labels, losses=losses)
        elif first:
            sched.step(ids)
        elif last:
            sched.step(target=labels, losses=losses)
        else:
            sched.step()
        opt.step()
        opt.zero_grad()
        if last:
            step_losses.append(float(torch.stack(losses).detach().mean()))

    med, times, busy = median_step(step, args.warmup, args.steps)
    # a step ends when both ranks have stepped: report the slower rank's median
    all_meds: list[float | None] = [None] * world
    dist.all_gather_object(all_meds, med)
    cpu: list[float | None] = [None] * world
    dist.all_gather_object(cpu, busy)
    got = [step_losses]
    dist.broadcast_object_list(got, src=int(loss_rank))
    if rank == 0:
        emit({"step": max(m for m in all_meds if m is not None), "times": times, "losses": got[0], "cpu": cpu})
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
