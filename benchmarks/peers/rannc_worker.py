"""Worker of the runtime benchmark for the local configurations: eager PyTorch, rannc_py, stage timing.

Launched by ``benchmarks/runtime_bench.py`` (``mpiexec -n N`` for rannc_py).
Prints one ``RESULT {json}`` line (rank 0).

Kinds:
  eager       single-process eager training (``--threads`` torch threads).
  rannc       ``RaNNCModule`` with ``--plan``: ``auto`` (the planner chooses
              everything), ``pinned`` (the planner with the stage count, one
              replica per stage, the microbatches and the schedule pinned: it
              places the boundary), ``middle`` (the pinned layout with the
              boundary forced before block ``--layers // 2``, the peers' split).
  stagetime   per-stage forward+backward time of one microbatch for the
              pinned plan's split (2 ranks) and for the middle split, in this process.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

# isort: split
# common is the module beside this script (its folder is sys.path[0]); the repository
# root stays off the path, so the installed rannc_py is the one measured.
from common import (
    build_gpt,
    emit,
    global_batch,
    median_step,
    worker_parser,
)


def middle_assignment(graph: Any, block: int) -> list[int]:
    """Stage of every op when stage 1 starts at GPT block ``block`` (the first op under ``transformer.h.<block>``)."""
    first = next(i for i, op in enumerate(graph.ops) if op.module_path.startswith(f"transformer.h.{block}"))
    return [0] * first + [1] * (len(graph.ops) - first)


def describe_boundary(graph: Any, assignment: list[int]) -> str:
    """Where stage 1 starts, as the module path of its first op (e.g. ``transformer.h.3.ln_1``)."""
    first = assignment.index(1) if 1 in assignment else len(assignment)
    return f"op {first} ({graph.ops[first].module_path or 'top level'})" if first < len(assignment) else "-"


def forced_plan(pinned: Any, graph: Any, assignment: list[int]) -> Any:
    """``pinned`` with its two stages' ops replaced by ``assignment`` (no prediction: step_time 0)."""
    from dataclasses import replace

    stages = []
    for st in pinned.stages:
        ops = tuple(i for i, a in enumerate(assignment) if a == st.index)
        fqns = sorted({f for i in ops for f in (*graph.ops[i].params, *graph.ops[i].buffers)})
        stages.append(replace(st, ops=ops, param_fqns=tuple(fqns), predicted_compute_time=0.0))
    return replace(pinned, stages=tuple(stages), step_time=0.0, samples_per_second=0.0)


def pinned_plan(graph: Any, args: argparse.Namespace, ranks: int, inputs: dict[str, torch.Tensor]) -> Any:
    """The planner's plan with 2 stages x 1 replica, ``--microbatches`` and ``--schedule`` pinned
    (a comma-separated list: the planner picks the fastest of them).

    The same search the runtime runs by default (the model's measured
    profile on the local device and the optimizer's measured step, see
    :func:`rannc_py.runtime.autoplan.job_profile` and ``job_optimizer``);
    with ``--plan middle`` the boundary is then moved to the middle block.
    """
    import rannc_py
    from rannc_py.runtime.autoplan import job_optimizer, job_profile

    cluster = f"local:ranks={ranks}"
    optimizer, update_cost = job_optimizer(lambda ps: torch.optim.AdamW(ps, lr=1e-4), cluster, ranks)
    plan = rannc_py.plan(graph, batch_size=args.batch, cluster=cluster, num_stages=2,
                         replicas=[1] * 2, microbatches=args.microbatches, schedules=tuple(args.schedule.split(",")),
                         optimizer=optimizer, update_cost=update_cost,
                         profile=job_profile(graph, graph.flatten_inputs((), inputs), cluster, ranks, False))
    if args.plan == "middle":
        plan = forced_plan(plan, graph, middle_assignment(graph, args.layers // 2))
    return plan


def rannc_plan(args: argparse.Namespace, model: torch.nn.Module, local: dict[str, torch.Tensor], comm: Any) -> Any:
    """The ``plan=`` argument for ``--plan`` (None for auto); planned on rank 0 and broadcast."""
    import rannc_py
    from rannc_py.planner.plan import Plan
    from rannc_py.runtime.autoplan import quiet_bcast

    if args.plan == "auto":
        return None
    text = pinned_plan(rannc_py.trace(model, (), local), args, comm.Get_size(), local).to_json() \
        if comm.Get_rank() == 0 else None
    return Plan.from_json(quiet_bcast(text, comm))  # the other ranks sleep while rank 0 profiles


def run_rannc(args: argparse.Namespace) -> None:
    """Train with RaNNCModule; rank 0 emits the slowest rank's median step, the plan and the losses."""
    from mpi4py import MPI

    import rannc_py
    from rannc_py.graph.trace import trace  # noqa: F401  (import cost outside the timed steps)

    comm = MPI.COMM_WORLD
    rank, world = comm.Get_rank(), comm.Get_size()
    model = build_gpt(args.layers, args.hidden, args.vocab)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    rows = args.batch // world

    def local(i: int) -> dict[str, torch.Tensor]:
        ids, labels = global_batch(args.batch, i, args.vocab)
        return {"input_ids": ids[rank * rows:(rank + 1) * rows], "labels": labels[rank * rows:(rank + 1) * rows]}

    plan = rannc_plan(args, model, local(0), comm)
    # the measured trace of the warm-up and timed steps (the first call is left out), read back for each
    # step's span from the first rank's start to the last rank's end
    folder = comm.bcast(tempfile.mkdtemp(prefix="rannc_bench_") if rank == 0 else None, root=0)
    wrapped = rannc_py.RaNNCModule(model, opt, plan=plan, return_outputs=False,
                                   trace=str(Path(folder) / "trace.json"), trace_steps=args.warmup - 1 + args.steps)
    losses: list[float] = []

    def step(i: int) -> None:
        loss = wrapped(**local(i)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))

    t0 = time.perf_counter()
    step(0)  # the first call traces, plans and places parameters: timed apart
    setup = time.perf_counter() - t0
    med, times, busy = median_step(lambda i: step(i + 1), args.warmup - 1, args.steps)
    meds = comm.gather(med, root=0)
    cpu = comm.gather(busy, root=0)
    written = wrapped.write_trace()  # collective
    if rank == 0:
        from rannc_py.runtime.trace import step_totals

        assert written is not None
        totals = list(step_totals(json.loads(Path(written).read_text())["traceEvents"]).values())[-args.steps:]
        shutil.rmtree(folder, ignore_errors=True)
        p = wrapped.plan
        layout = "; ".join(f"stage {st.index}: ops {st.ops[0]}-{st.ops[-1]} x{st.replicas}" for st in p.stages)
        emit({"step": max(meds), "times": times, "losses": losses, "first_call": setup, "cpu": cpu,
              "trace_step": statistics.median(totals),
              "predicted": p.step_time or None, "layout": f"{layout}; m={p.microbatches} {p.schedule}",
              "plan": p.to_json(), "boundary": _boundary(p)})


def _boundary(plan: Any) -> int | None:
    """First op of stage 1 (None for one stage)."""
    return plan.stages[1].ops[0] if plan.num_stages > 1 else None


def run_eager(args: argparse.Namespace) -> None:
    """Single-process eager training on the global batch."""
    model = build_gpt(args.layers, args.hidden, args.vocab)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    losses: list[float] = []

    def step(i: int) -> None:
        ids, labels = global_batch(args.batch, i, args.vocab)
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))

    med, times, busy = median_step(step, args.warmup, args.steps)
    emit({"step": med, "times": times, "losses": losses, "cpu": [busy]})


def stage_times(graph: Any, assignment: list[int], inputs: dict[str, torch.Tensor], reps: int) -> list[float]:
    """Median forward+backward seconds of each stage on ``inputs`` (one microbatch), stage by stage.

    Stage s+1 gets stage s's outputs detached (as a pipeline receives them);
    the backward of stage s is timed with the gradients stage s+1 returned.
    """
    staged = graph.split(assignment)
    per: list[list[float]] = [[] for _ in staged.stages]
    for _ in range(reps + 1):
        values = dict(inputs)
        fwd, outs_of, ins_of = [], [], []
        for st in staged.stages:
            acts = {n: values[n].detach().requires_grad_(values[n].is_floating_point()) for n in st.activation_inputs}
            t0 = time.perf_counter()
            outs = st.module(*[acts.get(n, values.get(n)) for n in st.input_names])
            fwd.append(time.perf_counter() - t0)
            values.update(zip(st.output_names, outs))
            outs_of.append(outs)
            ins_of.append(acts)
        grads: dict[str, torch.Tensor] = {}
        for s in reversed(range(len(staged.stages))):
            st = staged.stages[s]
            outs = outs_of[s]
            t0 = time.perf_counter()
            if s == len(staged.stages) - 1:
                loss = next(o for o in outs if o.dim() == 0)  # the model's scalar loss
                loss.backward()
            else:
                pairs = [(o, grads[n]) for n, o in zip(st.output_names, outs) if n in grads]
                torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
            bwd = time.perf_counter() - t0
            grads.update({n: a.grad for n, a in ins_of[s].items() if a.grad is not None})
            per[s].append(fwd[s] + bwd)
        for p in graph_params(staged):
            p.grad = None
    return [statistics.median(t[1:]) for t in per]


def graph_params(staged: Any) -> list[torch.nn.Parameter]:
    """Every parameter of the staged model (to clear gradients between repetitions)."""
    return [p for m in staged.stage_modules for p in m.parameters()]


def run_stagetime(args: argparse.Namespace) -> None:
    """Per-stage time of one microbatch for the saved plan's split and the middle split."""
    import rannc_py

    model = build_gpt(args.layers, args.hidden, args.vocab)
    rows = args.batch // args.microbatches
    ids, labels = global_batch(args.batch, 0, args.vocab)
    inputs = {"input_ids": ids[:rows], "labels": labels[:rows]}
    graph = rannc_py.trace(model, (), inputs)
    flat = graph.flatten_inputs((), inputs)
    out = {}
    splits = {"middle": middle_assignment(graph, args.layers // 2)}
    args.plan = "pinned"
    planned = pinned_plan(graph, args, 2, inputs).assignment()
    if planned != splits["middle"]:
        splits["planner"] = planned
    for name, assignment in splits.items():
        out[name] = {"times": stage_times(graph, assignment, flat, args.steps),
                     "boundary": describe_boundary(graph, assignment), "first_op": assignment.index(1)}
    emit(out)


def main() -> None:
    """Parse the flags and run one kind."""
    ap = worker_parser(__doc__.splitlines()[0])
    ap.add_argument("kind", choices=("eager", "rannc", "stagetime"))
    ap.add_argument("--schedule", default="1f1b",
                    help="with --plan pinned/middle: the schedule, or a comma-separated list to choose from")
    ap.add_argument("--plan", choices=("auto", "pinned", "middle"), default="auto")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    {"eager": run_eager, "rannc": run_rannc, "stagetime": run_stagetime}[args.kind](args)


if __name__ == "__main__":
    main()
