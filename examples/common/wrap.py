"""Wrap a model with ``rannc_py.RaNNCModule`` as the training flags say.

One call: ``RaNNCModule(model, optimizer, cluster=..., memory_limit=...,
num_stages=..., microbatches=...)`` traces, measures (on this machine), plans
and partitions on the first call; ``--plan`` reuses a saved plan or saves the
one made. Rank 0 also traces the model on its first batch, for the picture of
the plan at the end.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch


def wrap(model: torch.nn.Module, opt: torch.optim.Optimizer, first_batch: dict[str, torch.Tensor],
         args: argparse.Namespace, comm: Any) -> tuple[torch.nn.Module, Any]:
    """Wrap ``model`` in ``RaNNCModule`` (see the module docstring).

    Takes the model, its optimizer, this rank's first batch, the flags and
    the MPI communicator. Returns ``(wrapped model, graph)``: ``graph`` is
    rank 0's trace of the model on its first batch (the trace RaNNCModule
    makes too; the plan's picture needs it), None on other ranks.
    """
    import rannc_py

    # Traced before wrapping: afterwards this rank holds only its stage's weights.
    graph = rannc_py.trace(model, (), first_batch) if comm.Get_rank() == 0 else None
    kwargs: dict[str, Any] = {}
    plan_file = Path(args.plan) if args.plan is not None else None
    if plan_file is not None and plan_file.exists():
        kwargs["plan"] = str(plan_file)
    else:
        kwargs.update(cluster=args.cluster, memory_limit=args.memory_limit, microbatches=args.microbatches,
                      num_stages=args.stages)
    if plan_file is not None and not plan_file.exists():
        kwargs["save_plan"] = str(plan_file)
    if args.trace is not None:
        kwargs.update(trace=args.trace, trace_steps=args.trace_steps)
    return rannc_py.RaNNCModule(model, opt, **kwargs), graph
