"""The training loop shared by the GPT and BERT scripts.

It wraps the model with ``rannc_py.RaNNCModule`` (or not, with ``--eager``),
feeds each rank its shard of every global batch, shows progress on rank 0,
and at the end writes the loss curve, the plan's timeline, a JSON summary and,
with ``--save``, a checkpoint that ``--resume`` continues exactly.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from .loader import Dataset, ShardedLoader
from .plots import plot_losses, plot_timeline
from .timeline import planned_timeline
from .wrap import wrap


def world() -> tuple[Any, int, int]:
    """The MPI world communicator, this rank and the number of ranks (1 without mpiexec)."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    return comm, comm.Get_rank(), comm.Get_size()


def _batches(loader: ShardedLoader, start_step: int) -> Iterator[dict[str, torch.Tensor]]:
    """Endless batches from global step ``start_step`` on, so a resumed run sees the same data."""
    per_epoch = len(loader)
    epoch, skip = divmod(start_step, per_epoch)
    while True:
        loader.set_epoch(epoch)
        yield from loader.batches(start=skip)
        epoch, skip = epoch + 1, 0


def learning_rate(step: int, args: argparse.Namespace) -> float:
    """The learning rate of global step ``step``: linear warm-up over ``--warmup`` steps, then ``--lr``.

    A function of the step alone (not of ``--steps``), so a run saved early
    and resumed follows the same schedule as one uninterrupted run.
    """
    return args.lr * min(1.0, (step + 1) / args.warmup) if args.warmup > 0 else args.lr


def _resume(folder: str, model: torch.nn.Module, opt: torch.optim.Optimizer) -> tuple[int, list[float]]:
    """Load the checkpoint ``--save`` wrote (by any number of ranks, any layout); return (step, losses).

    Loaded into the unwrapped model and its optimizer before wrapping:
    ``RaNNCModule`` then carries both to each rank's share on its first call.
    """
    import rannc_py

    extra = rannc_py.load_checkpoint(folder, model, opt)
    return extra["step"], extra["losses"]


def _save(folder: str, model: torch.nn.Module, opt: torch.optim.Optimizer, step: int, losses: list[float]) -> None:
    """Write a checkpoint atomically (collective): each rank its own part, as safetensors."""
    import rannc_py

    rannc_py.save_checkpoint(folder, model, opt, extra={"step": step, "losses": losses})


def train(args: argparse.Namespace, model: torch.nn.Module, dataset: Dataset, name: str) -> dict[str, Any]:
    """Train ``model`` on ``dataset`` as the flags in ``args`` say (see ``training_parser``).

    Takes the parsed flags, the model, the dataset and the script's name (for
    the output folder). Returns the summary dict that rank 0 also writes to
    ``<out>/summary.json``. Raises ``SystemExit`` when ``--eager`` is used on
    more than one rank.
    """
    comm, rank, size = world()
    if args.eager and size > 1:
        raise SystemExit(f"--eager trains on one process; it was started on {size} ranks")
    out = Path(args.out or f"out/{name}")
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)

    start, losses = _resume(args.resume, model, opt) if args.resume else (0, [])

    loader = ShardedLoader(dataset, args.batch_size, rank=rank, world_size=size, seed=args.seed)
    batches = _batches(loader, start)
    batch = next(batches)
    graph = None
    if not args.eager:
        model, graph = wrap(model, opt, batch, args, comm)
    step_times: list[float] = []
    bar = tqdm(range(start, args.steps), disable=rank != 0, desc=name, initial=start, total=args.steps)
    for step in bar:
        if step > start:
            batch = next(batches)
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, args)
        t0 = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        if args.clip > 0:  # rannc_py's norm spans every stage, counting replicas and tied weights once
            if args.eager:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            else:
                model.clip_grad_norm_(args.clip)
        opt.step()
        opt.zero_grad()
        step_times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
        if step == start and rank == 0 and not args.eager:
            tqdm.write(model.plan.summary())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", samples_s=f"{args.batch_size / step_times[-1]:.1f}")

    if args.save:
        _save(args.save, model, opt, args.steps, losses)
    if args.trace and not args.eager:
        model.write_trace()  # collective; a no-op when the steps were recorded and written already

    # ru_maxrss is in KiB on Linux: the process's peak resident memory.
    peak = comm.gather(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, root=0)
    if rank != 0:
        return {}
    # The first step of a run also traces, profiles and plans.
    measured = statistics.median(step_times[1:] or step_times) if step_times else None
    summary: dict[str, Any] = {
        "ranks": size, "steps": args.steps, "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None, "measured_step_time": measured,
        "peak_rss_per_rank": peak, "loss_curve": str(plot_losses(losses, out / "loss.png", f"{name} loss")),
    }
    if not args.eager:
        plan = model.plan
        summary.update(plan=plan.summary(), plan_cluster=plan.cluster, stages=[st.replicas for st in plan.stages],
                       microbatches=plan.microbatches, predicted_step_time=plan.step_time,
                       predicted_peak_memory_per_rank=list(plan.peak_memory_per_rank))
        if plan.step_time > 0:  # a hand-written layout carries no predictions to draw
            timeline = planned_timeline(plan, graph)  # the plan's fingerprint checks it is the same trace
            summary["simulated_step_time"] = timeline.step_time  # equals the prediction: the same simulation
            summary["timeline"] = str(plot_timeline(plan, timeline, out / "timeline.png", f"{name} plan"))
    if args.trace and not args.eager:
        summary["trace"] = str(args.trace)
    (out / "losses.json").write_text(json.dumps(losses))
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """The end-of-run summary that :func:`train` returned on rank 0, as printable lines."""
    mib = ", ".join(f"{b / 2**20:.0f}" for b in summary["peak_rss_per_rank"])
    lines = []
    if "stages" in summary:
        replicas = summary["stages"]
        lines.append(f"plan: {len(replicas)} pipeline stages with {replicas} replicas, "
                     f"{summary['microbatches']} microbatches per step")
    lines.append(f"loss: {summary['first_loss']:.4f} at step 1 -> {summary['final_loss']:.4f} "
                 f"at step {summary['steps']}")
    if summary["measured_step_time"] is not None:
        line = f"step time: measured {summary['measured_step_time'] * 1e3:.1f} ms (median)"
        if summary.get("predicted_step_time"):  # 0 for a hand-written layout
            where = summary["plan_cluster"].partition(": ")[0]
            line += f", predicted {summary['predicted_step_time'] * 1e3:.1f} ms (for {where})"
        lines.append(line)
    lines.append(f"peak memory per rank, MiB: measured (process RSS) {mib}")
    if any(summary.get("predicted_peak_memory_per_rank", [])):
        planned = ", ".join(f"{b / 2**20:.1f}" for b in summary["predicted_peak_memory_per_rank"])
        lines[-1] += f"; planned (model state + activations) {planned}"
    lines.append(f"pictures: {summary['loss_curve']}" + (f", {summary['timeline']}" if "timeline" in summary else ""))
    if "trace" in summary:
        png = str(Path(summary["trace"]).with_suffix(".png"))
        lines.append(f"measured timeline: {summary['trace']} (Perfetto, chrome://tracing), {png} (above the predicted)")
    return lines


def print_summary(summary: dict[str, Any]) -> None:
    """Print :func:`summary_lines` of rank 0's summary (nothing on other ranks, whose summary is empty)."""
    if summary:
        print("\n".join(summary_lines(summary)), flush=True)
