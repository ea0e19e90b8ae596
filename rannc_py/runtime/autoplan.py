"""Ask the planner for a layout of the traced model on this job's ranks (run on rank 0)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from rannc_py.errors import ConfigError
from rannc_py.planner.cluster import Cluster, as_cluster, parse_size
from rannc_py.planner.plan import Plan


def job_cluster(cluster: Cluster | str | None, world_size: int, memory_limit: int | str | None) -> Cluster:
    """The cluster the planner plans for: ``cluster`` (a Cluster or preset string),
    or by default ``"local:ranks=<world_size>"`` (this machine, calibrated).

    ``memory_limit`` (bytes or a size string such as ``"8GiB"``) replaces the
    per-rank memory of the device.

    Raises:
        ConfigError: an unknown preset, or a cluster of another size than the job.
    """
    if cluster is None:
        cluster = f"local:ranks={world_size}"
    found = as_cluster(cluster)
    if found.num_devices != world_size:
        raise ConfigError(
            f"cluster {found.name!r} has {found.num_devices} devices but the job runs {world_size} ranks; "
            "describe the job's ranks (e.g. a preset with the matching ranks/nodes/gpus)"
        )
    if memory_limit is not None:
        limit = memory_limit if isinstance(memory_limit, int) else parse_size(memory_limit)
        found = dataclasses.replace(found, device=dataclasses.replace(found.device, memory=limit))
    return found


def search_plan(
    graph: Any,
    batch: int,
    cluster: Cluster,
    *,
    microbatches: int | None,
    schedules: Sequence[str],
    recompute: bool | None,
    memory_margin: float,
) -> Plan:
    """The planner's layout of ``graph`` at global batch ``batch`` on ``cluster``."""
    from rannc_py.planner.api import plan

    return plan(
        graph,
        batch_size=batch,
        cluster=cluster,
        memory_margin=memory_margin,
        schedules=tuple(schedules),
        microbatches=microbatches,
        recompute=recompute,
    )
