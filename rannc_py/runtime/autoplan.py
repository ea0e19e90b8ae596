"""Ask the planner for a layout of the traced model on this job's ranks."""

from __future__ import annotations

from typing import Any

from rannc_py.planner.plan import Plan


def search_plan(graph: Any, batch: int, world_size: int, **options: Any) -> Plan:
    """Run the planner for ``graph`` at global batch ``batch`` on ``world_size`` local ranks."""
    import rannc_py

    return rannc_py.plan(graph, batch_size=batch, cluster=f"local:ranks={world_size}", **options)
