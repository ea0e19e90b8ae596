"""Ask the planner for a layout of the traced model on this job's ranks (run on rank 0)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rannc_py.planner.plan import Plan


def search_plan(
    graph: Any,
    batch: int,
    world_size: int,
    *,
    microbatches: int | None,
    schedules: Sequence[str],
    recompute: bool | None,
    memory_limit: int | str | None,
    memory_margin: float,
) -> Plan:
    """The planner's layout of ``graph`` at global batch ``batch`` on ``world_size`` ranks of this machine.

    ``memory_limit`` (bytes or a size string) caps each rank's memory; None
    lets the planner use the machine's memory divided by the ranks.
    """
    from rannc_py.planner.api import plan

    cluster = f"local:ranks={world_size}"
    if memory_limit is not None:
        cluster += f",memory={memory_limit}"
    return plan(
        graph,
        batch_size=batch,
        cluster=cluster,
        memory_margin=memory_margin,
        schedules=tuple(schedules),
        microbatches=microbatches,
        recompute=recompute,
    )
