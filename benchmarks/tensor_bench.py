"""Tensor-parallel training throughput: rannc_py against torch's DTensor tensor parallelism and eager PyTorch.

Run from the repository root (it launches ``mpiexec`` itself):

    python benchmarks/tensor_bench.py [--steps 3] [--warmup 2] [--rounds 2] [--tensor 2]
        [--out benchmarks/results/runtime-tensor.md]

Model: Hugging Face ``LlamaForCausalLM`` from a config, 6 layers x 512
hidden, 8 heads over 4 key/value heads (grouped-query attention), SwiGLU
1376, seq 128, vocab 8192, head untied, AdamW; global batch 8; 1 torch thread
per rank (see ``benchmarks/peers/tensor_worker.py``). Configurations, each in
its own process(es), ``--rounds`` times in interleaved rounds:

  * eager, 1 process, 1 thread and 2 threads;
  * rannc_py, 2 ranks, one stage split over a tensor group of ``--tensor``
    ranks (the explicit layout ``plan=dict(stages=1, tensor=2)``): the split is
    found in the traced graph;
  * torch DTensor tensor parallelism at the same degree and batch with the
    hand-written Megatron plan (``ColwiseParallel`` on q/k/v/gate/up,
    ``RowwiseParallel`` on o/down; gloo);
  * rannc_py, 2 ranks, the planner free (it may choose tensor, pipeline or
    data parallelism).

Reports samples/s, rannc_py's speed-up over DTensor (target >= 1.0x) and
over 1-rank eager, and predicted / measured step time (target within 15 %).
A launch's step is the slowest rank's median of ``--steps`` timed steps,
a configuration's the median over its launches. Writes ``--out``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # runtime_bench beside this script
from runtime_bench import Bench, fx, ratio, throughput_rows

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    """Parse flags, run every configuration, print and write the results."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3, help="timed steps per configuration and round; default 3")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first; default 2 (at least 1)")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds; default 2")
    ap.add_argument("--tensor", type=int, default=2, help="tensor degree (and ranks); default 2")
    ap.add_argument("--out", default="benchmarks/results/runtime-tensor.md", help="results file")
    args = ap.parse_args()
    if args.warmup < 1:
        ap.error("--warmup must be at least 1 (rannc_py's first call traces and plans)")
    # Bench passes the model shape and batch to every worker: the Llama's
    args.batch, args.layers, args.hidden, args.vocab = 8, 6, 512, 8192
    b = Bench(args)
    t = str(args.tensor)
    labels = {
        "eager1": "eager, 1 process, 1 thread",
        "eager2": "eager, 1 process, 2 threads",
        "ours": f"rannc_py, {t} ranks, tensor degree {t} (found in the graph)",
        "dtensor": f"torch DTensor, {t} ranks, Megatron plan by hand (gloo)",
        "free": f"rannc_py, {t} ranks, planner free",
    }
    configs: list[tuple[str, int, list[str], dict[str, Any]]] = [
        (labels["eager1"], 1, ["eager"], {}),
        (labels["eager2"], 1, ["eager", "--threads", "2"], {"threads": 2}),
        (labels["ours"], args.tensor, ["rannc", "--tensor", t], {}),
        (labels["dtensor"], args.tensor, ["dtensor"], {}),
        (labels["free"], args.tensor, ["rannc", "--tensor", "0"], {}),
    ]
    load0 = os.getloadavg()
    for rnd in range(args.rounds):
        print(f"-- round {rnd + 1} of {args.rounds}", flush=True)
        for label, ranks, flags, kw in configs:
            b.run(label, ranks, "", "tensor_worker.py", flags, **kw)
    load1 = os.getloadavg()
    lines = report(args, b, labels, (load0, load1))
    print("\n".join(lines))
    out = REPO / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    failed = [label for label, (_, _, r) in b.rows.items() if "step" not in r]
    if failed:
        raise SystemExit(f"could not run: {', '.join(failed)}; their messages are above and in the results file")


def report(args: argparse.Namespace, b: Bench, labels: dict[str, str],
           loads: tuple[tuple[float, ...], tuple[float, ...]]) -> list[str]:
    """The markdown of the results file."""
    cmd = " ".join(["python benchmarks/tensor_bench.py", *[f"--{k} {v}" for k, v, d in (
        ("steps", args.steps, 3), ("warmup", args.warmup, 2), ("rounds", args.rounds, 2),
        ("tensor", args.tensor, 2)) if v != d]])
    L = ["# Tensor-parallel runtime benchmark", "",
         ("Hugging Face LlamaForCausalLM from a config: 6 layers x 512 hidden, 8 heads over 4 key/value heads, "
          "SwiGLU 1376, seq 128, vocab 8192, head untied, AdamW; global batch 8; 1 torch thread per rank unless "
          f"stated; {args.rounds} interleaved rounds of {args.warmup} warm-up + {args.steps} timed steps; a "
          "launch's step = the slowest rank's median, a configuration's = the median over launches. "
          f"Command: `{cmd}`."), "",
         ("**Caveat: this machine has 2 cores shared with other work.** Load average (1/5/15 min) "
          f"{'/'.join(f'{x:.1f}' for x in loads[0])} at the start, {'/'.join(f'{x:.1f}' for x in loads[1])} "
          "at the end."), ""]
    L += throughput_rows(b)
    ours, dt, e1 = b.get(labels["ours"]), b.get(labels["dtensor"]), b.get(labels["eager1"])
    L += ["", ("Every configuration trains the same weights on the same batches: the loss of step 1 (before any "
               "update) must agree."), "",
          "| comparison | speed-up | target |", "|---|---|---|",
          f"| rannc_py tensor degree {args.tensor} vs DTensor, same degree and batch | {fx(ratio(ours, dt))} | >= 1.0x |",
          f"| rannc_py tensor degree {args.tensor} vs eager, 1 rank 1 thread | {fx(ratio(ours, e1))} | |",
          f"| DTensor vs eager, 1 rank 1 thread | {fx(ratio(dt, e1))} | |",
          f"| rannc_py planner free vs eager, 1 rank 1 thread | {fx(ratio(b.get(labels['free']), e1))} | |"]
    return L


if __name__ == "__main__":
    main()
