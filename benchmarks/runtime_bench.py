"""Training throughput of RaNNCModule against single-process eager PyTorch.

Run from the repository root:

    python benchmarks/runtime_bench.py [--steps 5] [--batch 8]

It launches each configuration in its own process(es) (``mpiexec`` for the
multi-rank ones, 1 torch thread per rank), measures samples/s over ``--steps``
steps after 2 warm-up steps, prints a table and writes
``benchmarks/results/runtime.md``. Model: GPT, 6 layers x 512 hidden, seq 128,
vocab 256, AdamW.

Configurations: eager with 2 threads; eager with 1 thread; rannc_py on 1
rank; rannc_py on 2 ranks with the hand layout (2 stages split in the middle
by FLOPs, 4 microbatches, 1F1B); rannc_py on 2 ranks with the planner's
layout. Predicted step times come from the plan.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def build():
    import torch

    from examples.gpt.model import GPT, GPTConfig

    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=256, block_size=128, n_layer=6, n_head=8, n_embd=512))


def batch(rows: int, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (rows, 128), generator=g)
    return {"input_ids": ids, "labels": ids}


def worker(kind: str, steps: int, global_batch: int, threads: int) -> None:
    """Run one configuration in this process (under mpiexec for multi-rank) and print JSON on rank 0."""
    import torch

    torch.set_num_threads(threads)
    model = build()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    if kind == "eager":
        rank, world, predicted, where = 0, 1, None, "-"

        def step_fn(b):
            model(**b).loss.backward()
            opt.step()
            opt.zero_grad()
    else:
        from mpi4py import MPI

        import rannc_py

        rank, world = MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size()
        plan_arg = {"stages": 2, "microbatches": 4, "schedule": "1f1b"} if kind == "hand" else None
        wrapped = rannc_py.RaNNCModule(model, opt, plan=plan_arg)

        def step_fn(b):
            wrapped(**b).loss.backward()
            opt.step()
            opt.zero_grad()

    local = global_batch // world
    times = []
    for s in range(steps + 2):
        b = batch(global_batch, s)
        b = {k: v[rank * local : (rank + 1) * local] for k, v in b.items()}
        t0 = time.perf_counter()
        step_fn(b)
        times.append(time.perf_counter() - t0)
    if kind != "eager":
        plan = wrapped.plan
        predicted = plan.step_time if plan.step_time > 0 else None
        where = "; ".join(f"stage {st.index}: ops {st.ops[0]}-{st.ops[-1]} x{st.replicas}" for st in plan.stages)
        where += f"; m={plan.microbatches} {plan.schedule}"
    if rank == 0:
        step = sorted(times[2:])[len(times[2:]) // 2]  # median
        print("RESULT " + json.dumps({"step": step, "predicted": predicted, "layout": where}), flush=True)


def launch(kind: str, ranks: int, threads: int, args: argparse.Namespace) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(REPO))
    cmd = [sys.executable, __file__, "--worker", kind, "--steps", str(args.steps), "--batch", str(args.batch),
           "--threads", str(threads)]
    if kind != "eager":
        cmd = [str(Path(sys.executable).parent / "mpiexec"), "-n", str(ranks), *cmd]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=1800, check=False)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{kind} on {ranks} ranks failed:\n{out.stdout}\n{out.stderr}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5, help="timed steps (after 2 warm-up steps); default 5")
    ap.add_argument("--batch", type=int, default=8, help="global batch (rows of 128 tokens); default 8")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.steps, args.batch, args.threads)
        return
    rows = [
        ("eager, 1 process, 2 threads", "eager", 1, 2),
        ("eager, 1 process, 1 thread", "eager", 1, 1),
        ("rannc_py, 1 rank (planner)", "auto", 1, 1),
        ("rannc_py, 2 ranks, hand layout (2 stages, m=4, 1F1B)", "hand", 2, 1),
        ("rannc_py, 2 ranks, planner layout", "auto", 2, 1),
    ]
    results = []
    for label, kind, ranks, threads in rows:
        r = launch(kind, ranks, threads, args)
        r["samples"] = args.batch / r["step"]
        results.append((label, ranks, r))
        pred = f"{r['predicted'] * 1e3:.0f} ms" if r["predicted"] else "-"
        print(f"{label:55s} {r['step'] * 1e3:8.0f} ms/step {r['samples']:7.2f} samples/s  predicted {pred}  {r['layout']}")
    lines = [
        "# Runtime benchmark",
        "",
        f"GPT 6 layers x 512 hidden, seq 128, vocab 256, AdamW; global batch {args.batch}; "
        f"median of {args.steps} steps after 2 warm-up steps; 1 torch thread per rank. "
        "Command: `python benchmarks/runtime_bench.py"
        + (f" --steps {args.steps} --batch {args.batch}" if (args.steps, args.batch) != (5, 8) else "") + "`.",
        "",
        "| configuration | ranks | step (ms) | samples/s | predicted step (ms) | layout |",
        "|---|---|---|---|---|---|",
    ]
    for label, ranks, r in results:
        pred = f"{r['predicted'] * 1e3:.0f}" if r["predicted"] else "-"
        lines.append(f"| {label} | {ranks} | {r['step'] * 1e3:.0f} | {r['samples']:.2f} | {pred} | {r['layout']} |")
    out = REPO / "benchmarks/results/runtime.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
