"""Peer: DeepSpeed ``PipelineModule`` training the benchmark GPT on 2 ranks (CPU accelerator, gloo).

Launched by ``benchmarks/runtime_bench.py`` under ``mpiexec -n 2`` with
``DS_ACCELERATOR=cpu``. The GPT is given to DeepSpeed as its layer list
``[embed, block 0..L-1, head]`` and cut with ``partition_method="uniform"``
(equal layer counts: embed + the first half of the blocks | the rest + head,
the same middle split as the other peer). DeepSpeed's ``TrainSchedule`` is
its 1F1B order; microbatches are its gradient-accumulation steps. Rank 0
prints one ``RESULT`` line with the median step time.

    DS_ACCELERATOR=cpu mpiexec -n 2 python benchmarks/peers/deepspeed_peer.py --microbatches 4
"""

from __future__ import annotations

import logging
import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch

# isort: split
# common is the module beside this script (its folder is sys.path[0]); the repository
# root stays off the path, so the installed rannc_py is the one measured.
from common import (
    build_gpt,
    emit,
    global_batch,
    gpt_layers,
    launch_rank,
    lm_loss,
    median_step,
    worker_parser,
)


def main() -> None:
    """Parse the flags, train, and print the result line on rank 0."""
    ap = worker_parser(__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=29512)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rank, world = launch_rank()
    if world != 2:
        raise SystemExit(f"this peer runs a 2-stage pipeline on 2 ranks, got {world}")
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port))
    import deepspeed
    from deepspeed.pipe import PipelineModule
    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING)
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    layers = gpt_layers(build_gpt(args.layers, args.hidden, args.vocab))
    net = PipelineModule(layers=layers, num_stages=world, loss_fn=lm_loss, partition_method="uniform",
                         activation_checkpoint_interval=0)
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4)
    config = {
        "train_batch_size": args.batch,
        "train_micro_batch_size_per_gpu": args.batch // args.microbatches,
        "gradient_accumulation_steps": args.microbatches,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    engine, _, _, _ = deepspeed.initialize(model=net, optimizer=opt, config=config)
    losses: list[float] = []

    def step(i: int) -> None:
        ids, labels = global_batch(args.batch, i, args.vocab)
        mb = args.batch // args.microbatches
        it = iter([(ids[k * mb:(k + 1) * mb], labels[k * mb:(k + 1) * mb]) for k in range(args.microbatches)])
        losses.append(float(engine.train_batch(data_iter=it)))  # mean over microbatches

    med, times, busy = median_step(step, args.warmup, args.steps)
    meds = [None] * world
    torch.distributed.all_gather_object(meds, med)
    cpu = [None] * world
    torch.distributed.all_gather_object(cpu, busy)
    if rank == 0:
        emit({"step": max(meds), "times": times, "losses": losses, "cpu": cpu,
              "parts": [int(x) for x in net.parts]})


if __name__ == "__main__":
    main()
