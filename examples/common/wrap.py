"""Wrap a model with ``rannc_py.RaNNCModule`` as the training flags say.

The usual path is the one-call API: ``RaNNCModule(model, optimizer,
cluster=..., memory_limit=...)`` traces, plans and partitions on the first
call. ``--stages`` (pin the pipeline depth) needs a plan made here instead:
rank 0 asks ``rannc_py.plan`` with ``num_stages`` and shares the plan, and
``RaNNCModule`` gets it via ``plan=``. Rank 0 also traces the model on its
first batch in any case, for the picture of the plan at the end.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch


def cluster_spec(args: argparse.Namespace, world_size: int) -> str:
    """The preset string to plan for: ``--cluster`` or this machine, with ``--memory-limit`` applied.

    Raises ``SystemExit`` when ``--cluster`` and ``--memory-limit`` both set the memory.
    """
    spec = args.cluster or f"local:ranks={world_size}"
    if args.memory_limit is not None:
        if "memory=" in spec:
            raise SystemExit(f"--cluster {spec!r} already sets memory=; drop --memory-limit or the memory= key")
        spec += ("," if ":" in spec else ":") + f"memory={args.memory_limit}"
    return spec


def make_plan(graph: Any, args: argparse.Namespace, comm: Any) -> Any:
    """Plan on rank 0 for ``--stages`` (on ``--cluster`` if given) and share the plan with every rank.

    Takes rank 0's traced graph (None elsewhere), the flags and the MPI
    communicator. Returns the :class:`rannc_py.Plan` on every rank. Raises
    ``SystemExit`` with the planner's message when no plan fits.
    """
    import rannc_py
    from rannc_py.errors import RaNNCError

    text, error = None, None
    if comm.Get_rank() == 0:
        try:
            # The graph is one rank's batch, as RaNNCModule traces; the plan is for the global batch.
            plan = rannc_py.plan(graph, batch_size=graph.batch_size * comm.Get_size(),
                                 cluster=cluster_spec(args, comm.Get_size()), num_stages=args.stages,
                                 microbatches=args.microbatches)
            text = plan.to_json()
        except RaNNCError as e:
            error = f"planning failed: {e}"
    text, error = comm.bcast((text, error), root=0)
    if error is not None:
        raise SystemExit(error)
    return rannc_py.Plan.from_json(text)


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
    elif args.stages is not None:
        kwargs["plan"] = make_plan(graph, args, comm)
    else:
        kwargs.update(cluster=args.cluster, memory_limit=args.memory_limit, microbatches=args.microbatches)
    if plan_file is not None and not plan_file.exists():
        kwargs["save_plan"] = str(plan_file)
    return rannc_py.RaNNCModule(model, opt, **kwargs), graph
