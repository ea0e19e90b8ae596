"""The demo: train a GPT on 4 MPI ranks under a memory limit that forces a split.

    mpiexec -n 4 python examples/demo.py        # or: bash examples/demo.sh

The limit is set below the model's training state (weights, gradients and
two AdamW moments), so no rank can hold the whole model: rannc_py must cut it
into pipeline stages, and with ranks to spare it replicates stages for data
parallelism. The demo checks that the plan has both, then ends with the plan
chosen, predicted against measured step time, peak memory per rank, the
loss and the pictures' paths.
"""

from __future__ import annotations

import argparse

import torch

from rannc_py.models.gpt import GPT, gpt_config

# isort: split
# From this script's own folder (sys.path[0]); the repository root stays off the path, so the
# installed rannc_py is used rather than a checkout's beside it.
from common.trainer import summary_lines
from gpt.train import run

SIZE = "small"
SEQ_LEN = 64
BATCH = 16
# Bytes of training state per parameter: fp32 weight, gradient, two AdamW moments.
STATE_BYTES_PER_PARAM = 16
# Fraction of the whole model's training state one rank may hold: below 1, so
# at least two stages are needed, and above 1/2, so two stages fit and the
# other two ranks can hold replicas.
LIMIT_FRACTION = 0.9


def memory_limit() -> int:
    """The per-rank memory limit in bytes: ``LIMIT_FRACTION`` of the model's training state."""
    with torch.device("meta"):
        params = GPT(gpt_config(SIZE, block_size=SEQ_LEN)).num_parameters()
    return int(LIMIT_FRACTION * STATE_BYTES_PER_PARAM * params)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=150, help="optimizer steps")
    p.add_argument("--out", default="out/demo", help="folder for the pictures and logs")
    args = p.parse_args()
    limit = memory_limit()
    summary = run([
        "--size", SIZE, "--seq-len", str(SEQ_LEN), "--batch-size", str(BATCH), "--steps", str(args.steps),
        "--memory-limit", str(limit), "--out", args.out,
    ])
    if not summary:  # ranks other than 0
        return
    replicas = summary["stages"]
    state = limit / LIMIT_FRACTION / 2**20
    lines = [
        "",
        "== rannc_py demo summary ==",
        (f"memory limit per rank: {limit / 2**20:.1f} MiB; the whole model's training state "
         f"(weights, grads, AdamW moments) is {state:.1f} MiB"),
        *summary_lines(summary),
    ]
    print("\n".join(lines), flush=True)
    if len(replicas) < 2 or max(replicas) < 2:
        raise SystemExit(f"the demo expected pipeline stages with data-parallel replicas, but the plan has "
                         f"replicas {replicas} per stage; check the planner's choice above")
    if summary["final_loss"] > summary["first_loss"] - 1.0:
        raise SystemExit(f"the loss did not fall by at least 1 ({summary['first_loss']:.3f} -> "
                         f"{summary['final_loss']:.3f}); run more --steps")


if __name__ == "__main__":
    main()
