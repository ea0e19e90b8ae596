"""Trace time and op count of GPT models on the meta device.

Builds the project's GPT (``rannc_py.models.gpt``) with the published 175B
widths and 12 to 96 layers on the ``meta`` device (nothing is allocated),
traces each with ``rannc_py.trace`` and prints a table; the table is also
written to ``benchmarks/results/trace.md``.

    python benchmarks/trace_bench.py [--layers 12 24 48 96] [--size 175b] [--batch 8] [--seq 2048]
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import time
from pathlib import Path

import torch

from rannc_py import trace
from rannc_py.models.gpt import GPT, gpt_config

REPO = Path(__file__).resolve().parents[1]


def bench(size: str, layers: int, batch: int, seq: int) -> dict[str, float | int | bool]:
    """Trace one GPT of ``size`` widths with ``layers`` layers; return its figures."""
    with torch.device("meta"):
        model = GPT(gpt_config(size, n_layer=layers))
    ids = torch.zeros(batch, seq, dtype=torch.long, device="meta")
    start, cpu_start = time.perf_counter(), time.process_time()
    graph = trace(model, kwargs={"input_ids": ids, "labels": ids})
    seconds = time.perf_counter() - start
    # CPU time as well: wall time inflates when other processes share the cores.
    cpu_seconds = time.process_time() - cpu_start
    return {
        "layers": layers,
        "params_b": model.num_parameters() / 1e9,
        "ops": len(graph.ops),
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "tflop": graph.total_flops / 1e12,
        "dynamic": graph.dynamic_batch,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[12, 24, 48, 96])
    parser.add_argument("--size", default="175b", help="GPT size whose widths to use (default 175b)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "trace.md"))
    args = parser.parse_args()

    rows = [bench(args.size, n, args.batch, args.seq) for n in args.layers]
    header = "| layers | params (B) | ops | trace wall (s) | trace CPU (s) | fwd TFLOP/batch | dynamic batch |"
    lines = [header, "|---:|---:|---:|---:|---:|---:|:---:|"]
    for r in rows:
        lines.append(
            f"| {r['layers']} | {r['params_b']:.1f} | {r['ops']} | {r['seconds']:.2f} | {r['cpu_seconds']:.2f} | {r['tflop']:.1f} | "
            f"{'yes' if r['dynamic'] else 'no'} |"
        )
    table = "\n".join(lines)
    print(table)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    text = (
        "# Trace benchmark\n\n"
        f"GPT with `{args.size}` widths on the meta device, batch {args.batch} x seq {args.seq}; "
        f"torch {torch.__version__}, {platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch threads {torch.get_num_threads()}; load average {os.getloadavg()[0]:.1f} at the end "
        f"(CPU time is the figure that does not depend on other load); peak RSS {peak:.0f} MiB.\n\n"
        f"Command: `{' '.join(['python benchmarks/trace_bench.py', *sys.argv[1:]])}`\n\n{table}\n"
    )
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
