"""The demo: train a GPT on 4 MPI ranks under a memory limit that forces a split.

    mpiexec -n 4 python examples/demo.py        # or: bash examples/demo.sh

The limit is set below the model's training state (weights, gradients and
two AdamW moments), so no rank can hold the whole model: rannc_py must cut it
into pipeline stages, and with ranks to spare it replicates the stages for
data parallelism. The run ends with the plan chosen, predicted against
measured step time, peak memory per rank, the loss and the pictures' paths.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import torch

from examples.gpt.model import GPT, gpt_config
from examples.gpt.train import run

SIZE = "small"
SEQ_LEN = 64
# Bytes of training state per parameter: fp32 weight, gradient, two AdamW moments.
STATE_BYTES_PER_PARAM = 16
# Fraction of the whole model's training state one rank may hold: below 1, so
# at least two stages are needed.
LIMIT_FRACTION = 0.6


def memory_limit() -> int:
    """The per-rank memory limit in bytes: ``LIMIT_FRACTION`` of the model's training state."""
    with torch.device("meta"):
        params = GPT(gpt_config(SIZE, block_size=SEQ_LEN)).num_parameters()
    return int(LIMIT_FRACTION * STATE_BYTES_PER_PARAM * params)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200, help="optimizer steps")
    p.add_argument("--out", default="runs/demo", help="folder for the pictures and logs")
    args = p.parse_args()
    limit = memory_limit()
    summary = run([
        "--size", SIZE, "--seq-len", str(SEQ_LEN), "--batch-size", "32", "--steps", str(args.steps),
        "--memory-limit", str(limit), "--out", args.out,
    ])
    if not summary:  # ranks other than 0
        return
    mib = ", ".join(f"{b / 2**20:.0f}" for b in summary["peak_rss_per_rank"])
    print(
        "\n== rannc_py demo summary ==\n"
        f"{summary['plan']}\n"
        f"memory limit per rank: {limit / 2**20:.1f} MiB (model state {limit / LIMIT_FRACTION / 2**20:.1f} MiB)\n"
        f"step time: predicted {summary['predicted_step_time'] * 1e3:.1f} ms, "
        f"measured {summary['measured_step_time'] * 1e3:.1f} ms (median)\n"
        f"peak memory (RSS, incl. Python and PyTorch) per rank, MiB: {mib}\n"
        f"loss: {summary['first_loss']:.3f} at step 1 -> {summary['final_loss']:.3f} at step {summary['steps']}\n"
        f"pictures: {summary['loss_curve']}, {summary['timeline']}",
        flush=True,
    )


if __name__ == "__main__":
    main()
