"""Memory benchmark: a GPT larger than one rank's memory limit trains as a pipeline, each rank under the limit.

Run from the repository root (it launches ``mpiexec`` itself):

    python benchmarks/memory_bench.py [--limit 512MiB] [--hidden 512] [--steps 2]

Models are the project's GPT (``rannc_py.models.gpt``; seq 128, vocab 256,
``--hidden`` wide, 8 heads) built on the ``meta`` device, so a rank only
allocates the parameters of its own stage; AdamW is given as a factory. Each
rank's *training state* is params + grads + Adam's two moments = 16 bytes per
fp32 parameter, which is what the planner counts against
``memory_limit`` (with activations and buffers).

Two parts:

1. Oversized model: the smallest size in the list whose state is at least 3x
   ``--limit`` trains ``--steps`` steps on 4 ranks with
   ``RaNNCModule(..., memory_limit=--limit)``.
2. Largest model per rank count (1, 2, 4) under the same limit: the planner
   screens the sizes (cheap: no training), the largest feasible one is
   trained, and if it fails the next smaller one is tried.

RSS accounting: every rank records its resident set after importing torch,
mpi4py and the rannc_py modules the runtime uses (tracer, planner, runtime:
they pull in ``torch.export``) and initialising MPI (the *baseline*, which
holds no model state), then trains; its peak RSS (``getrusage`` maxrss, gathered to rank 0)
minus that baseline is compared with the limit, since the limit applies to
the model state the planner counts, not to the Python/torch runtime. Raw
peak RSS is reported too. Writes ``benchmarks/results/memory.md``.

``--shard``: the planner may shard each stage's optimizer state over its
replicas (``shard_optimizer=None``, :mod:`rannc_py.runtime.sharding`), so
data-parallel layouts keep params + grads + (Adam moments and the gradient shard) / R,
8 + 12 / R bytes per parameter rather than 16; writes ``benchmarks/results/memory_sharded.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
MPIEXEC = str(Path(sys.executable).parent / "mpiexec")
STATE_BYTES_PER_PARAM = 16  # fp32 param + grad + Adam exp_avg + exp_avg_sq
LAYERS = (2, 4, 6, 8, 12, 16, 20, 24, 28, 32, 36, 40)


def config(layers: int, hidden: int) -> Any:
    """The benchmark GPT's config (seq 128, vocab 256, 8 heads, no dropout, tied head)."""
    from rannc_py.models.gpt import GPTConfig

    return GPTConfig(vocab_size=256, block_size=128, n_layer=layers, n_head=8, n_embd=hidden, dropout=0.0)


def num_params(layers: int, hidden: int) -> int:
    """Distinct parameters of the GPT (tied head counted once), counted on the meta device."""
    import torch

    from rannc_py.models.gpt import GPT

    with torch.device("meta"):
        return GPT(config(layers, hidden)).num_parameters()


def peak_rss() -> int:
    """This process's peak resident set in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(args: argparse.Namespace) -> None:
    """One rank: build on meta, train ``--steps`` steps under ``--limit``, gather the RSS figures to rank 0."""
    import torch
    from mpi4py import MPI

    import rannc_py
    import rannc_py.graph.trace
    import rannc_py.planner.api
    import rannc_py.runtime.module  # code the runtime loads belongs to the baseline
    from rannc_py.models.gpt import GPT

    torch.set_num_threads(1)
    comm = MPI.COMM_WORLD
    rank, world = comm.Get_rank(), comm.Get_size()
    baseline = peak_rss()
    torch.manual_seed(0)
    with torch.device("meta"):
        model = GPT(config(args.layers, args.hidden))
    wrapped = rannc_py.RaNNCModule(model, lambda ps: torch.optim.AdamW(ps, lr=1e-4), memory_limit=args.limit,
                                   return_outputs=False, shard_optimizer=None if args.shard else False)
    rows = args.batch // world
    losses = []
    for step in range(args.steps):
        g = torch.Generator().manual_seed(step)
        ids = torch.randint(0, 256, (args.batch, 128), generator=g)[rank * rows:(rank + 1) * rows]
        loss = wrapped(input_ids=ids, labels=ids).loss
        loss.backward()
        wrapped.optimizer.step()
        wrapped.optimizer.zero_grad()
        losses.append(float(loss.detach()))
    plan = wrapped.plan
    held = sum(p.numel() for _, p in wrapped.named_parameters())
    mine = {"rank": rank, "stage": plan.stage_of_rank(rank), "params": held, "baseline": baseline,
            "peak": peak_rss(), "predicted": plan.peak_memory_per_rank[rank]}
    ranks = comm.gather(mine, root=0)
    if rank == 0:
        print("RESULT " + json.dumps({"ranks": ranks, "losses": losses, "plan": plan.summary()}), flush=True)


def train(layers: int, ranks: int, args: argparse.Namespace) -> dict[str, Any]:
    """Launch the worker on ``ranks`` ranks; its result, or ``{"error": ...}``."""
    cmd = [MPIEXEC, "-n", str(ranks), sys.executable, __file__, "--worker", "--layers", str(layers),
           "--hidden", str(args.hidden), "--limit", args.limit, "--steps", str(args.steps),
           "--batch", str(args.batch), *(["--shard"] if args.shard else [])]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=1200, check=False)
    except subprocess.TimeoutExpired:
        return {"error": "timed out after 1200 s"}
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    tail = "\n".join((out.stdout + out.stderr).strip().splitlines()[-8:])
    return {"error": f"exit {out.returncode}: {tail}"}


_GRAPHS: dict[int, Any] = {}


def feasible(layers: int, ranks: int, args: argparse.Namespace) -> bool:
    """Whether the planner finds a layout of this size on ``ranks`` ranks under the limit (no training)."""
    import torch

    import rannc_py
    from rannc_py.errors import NoFeasiblePlanError
    from rannc_py.models.gpt import GPT

    if layers not in _GRAPHS:  # traced once per size (batch dimension dynamic), planned per rank count
        with torch.device("meta"):
            model = GPT(config(layers, args.hidden))
        ids = torch.zeros(2, 128, dtype=torch.long)
        _GRAPHS[layers] = rannc_py.trace(model, (), {"input_ids": ids, "labels": ids})
    graph = _GRAPHS[layers]
    try:
        rannc_py.plan(graph, batch_size=args.batch, cluster=f"local:ranks={ranks},memory={args.limit}",
                      shard_optimizer=None if args.shard else False)
    except NoFeasiblePlanError:
        return False
    return True


def verdict(r: dict[str, Any], limit: int) -> bool:
    """Trained, and every rank's peak RSS above its baseline is under the limit."""
    return "ranks" in r and all(x["peak"] - x["baseline"] < limit for x in r["ranks"])


def mib(n: float) -> str:
    """Bytes in MiB, one decimal."""
    return f"{n / 2**20:.1f}"


def main() -> None:
    """Run both parts, print and write the results."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", default="512MiB", help="memory_limit per rank; default 512MiB")
    ap.add_argument("--hidden", type=int, default=512, help="GPT width; default 512")
    ap.add_argument("--batch", type=int, default=8, help="global batch (rows of 128 tokens); default 8")
    ap.add_argument("--steps", type=int, default=2, help="training steps (Adam state exists after the first); default 2")
    ap.add_argument("--shard", action="store_true", help="let the planner shard optimizer state over replicas")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--layers", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    from rannc_py.hardware.cluster import parse_size

    limit = parse_size(args.limit)
    state = {n: num_params(n, args.hidden) * STATE_BYTES_PER_PARAM for n in LAYERS}
    runs: dict[tuple[int, int], dict[str, Any]] = {}

    def run(layers: int, ranks: int) -> dict[str, Any]:
        if (layers, ranks) not in runs:
            r = train(layers, ranks, args)
            runs[layers, ranks] = r
            head = f"{layers:3d} layers on {ranks} ranks: state {mib(state[layers])} MiB"
            if "error" in r:  # a run that did not finish has no measurement to show
                print(f"{head}: could not run:\n{r['error']}", flush=True)
                return r
            ok = "ok" if verdict(r, limit) else "over the limit"
            peak = max(x["peak"] - x["baseline"] for x in r["ranks"])
            print(f"{head}, max peak RSS - baseline {mib(peak)} MiB: {ok}", flush=True)
        return runs[layers, ranks]

    big = next(n for n in LAYERS if state[n] >= 3 * limit)
    run(big, 4)
    largest: dict[int, tuple[int, dict[str, Any]] | None] = {}
    for ranks in (1, 2, 4):
        fits = []
        for n in LAYERS:  # feasibility is monotone in depth: stop at the first size that does not fit
            if not feasible(n, ranks, args):
                break
            fits.append(n)
        largest[ranks] = None
        for n in sorted(fits, reverse=True):
            r = run(n, ranks)
            if verdict(r, limit):
                largest[ranks] = (n, r)
                break
    write(args, limit, state, big, runs, largest)
    failed = [key for key, r in runs.items() if "error" in r]
    if failed:
        raise SystemExit(f"{len(failed)} of {len(runs)} training runs could not run (layers, ranks: {failed}); "
                         "their messages are above")


def write(args: argparse.Namespace, limit: int, state: dict[int, int], big: int,
          runs: dict[tuple[int, int], dict[str, Any]], largest: dict[int, tuple[int, dict[str, Any]] | None]) -> None:
    """Print the tables and write ``benchmarks/results/memory.md``."""
    flags = [f"--{k} {v}" for k, v, d in (("limit", args.limit, "512MiB"), ("hidden", args.hidden, 512),
                                          ("batch", args.batch, 8), ("steps", args.steps, 2)) if v != d]
    L = ["# Memory benchmark", "",
         f"GPT, {args.hidden} hidden, 8 heads, seq 128, vocab 256 (head tied), built on the meta device, AdamW; "
         f"`memory_limit={args.limit}` per rank ({limit} bytes), default margin 0.1; global batch {args.batch}; "
         f"{args.steps} training steps; 1 torch thread per rank. Training state = 16 bytes per parameter "
         "(param + grad + 2 Adam moments). Command: `" + " ".join(["python benchmarks/memory_bench.py", *flags]) + "`.",
         "",
         ("RSS accounting: *baseline* = a rank's peak RSS after importing torch, mpi4py and the rannc_py "
         "modules the runtime uses (tracer, planner, runtime, which load torch.export) and initialising MPI, "
         "before the model exists (the Python/torch runtime, which the limit does not cover); "
         "*peak* = its peak RSS (getrusage maxrss) at the end of training; the check is peak - baseline < limit. "
         "*predicted* is the plan's peak memory for that rank."), ""]
    r = runs[big, 4]
    L += [(f"## Oversized model on 4 ranks: {big} layers, state {mib(state[big])} MiB = "
          f"{state[big] / limit:.2f}x the limit"), ""]
    L += rank_table(r, limit)
    L += ["", "## Largest model trained per rank count (same limit)", "",
          "Sizes tried: layers in " + ", ".join(map(str, LAYERS)) + "; the planner screens them, the largest "
          "feasible one is trained (the next smaller one if it fails).", "",
          ("| ranks | largest layers | parameters | training state (MiB) | state / limit | "
          "max peak - baseline (MiB) | max raw peak RSS (MiB) |"), "|---|---|---|---|---|---|---|"]
    for ranks, got in largest.items():
        if got is None:
            L.append(f"| {ranks} | none fits | | | | | |")
            continue
        n, res = got
        d = max(x["peak"] - x["baseline"] for x in res["ranks"])
        raw = max(x["peak"] for x in res["ranks"])
        L.append(f"| {ranks} | {n} | {state[n] // STATE_BYTES_PER_PARAM:,} | {mib(state[n])} | "
                 f"{state[n] / limit:.2f}x | {mib(d)} | {mib(raw)} |")
    L += ["", "## Every training run", ""]
    for (n, ranks), res in sorted(runs.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        L += [f"### {n} layers on {ranks} ranks", ""] + rank_table(res, limit) + [""]
    text = "\n".join(L) + "\n"
    print(text)
    out = REPO / f"benchmarks/results/memory{'_sharded' if args.shard else ''}.md"
    out.write_text(text)
    print(f"wrote {out.relative_to(REPO)}")


def rank_table(r: dict[str, Any], limit: int) -> list[str]:
    """Per-rank rows of one run (or its error)."""
    if "ranks" not in r:
        return ["Could not run: `" + r.get("error", "?").replace("\n", " ")[-600:] + "`"]
    L = [("| rank | stage | params held | baseline RSS (MiB) | peak RSS (MiB) | peak - baseline (MiB) | "
         "predicted (MiB) | under limit |"), "|---|---|---|---|---|---|---|---|"]
    for x in r["ranks"]:
        d = x["peak"] - x["baseline"]
        L.append(f"| {x['rank']} | {x['stage']} | {x['params']:,} | {mib(x['baseline'])} | {mib(x['peak'])} | "
                 f"{mib(d)} | {mib(x['predicted'])} | {'yes' if d < limit else 'NO'} |")
    L += ["", "Losses: " + ", ".join(f"{v:.4f}" for v in r["losses"]), "", "```", r["plan"], "```"]
    return L


if __name__ == "__main__":
    main()
