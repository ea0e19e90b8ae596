"""Turn the ``plan=`` argument of :class:`RaNNCModule` into a :class:`Plan`.

Accepted: a ``Plan``; a path to a plan saved with ``Plan.save``; or an
explicit layout ``dict(stages=S, replicas=[r0, ...], microbatches=M,
schedule="1f1b", recompute=False)`` whose stage boundaries are placed by
balancing the graph's FLOPs. With ``None`` the planner searches.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from rannc_py.errors import ConfigError, PlanError
from rannc_py.graph.ir import Graph
from rannc_py.graph.partition import balanced_assignment
from rannc_py.planner.plan import Plan, StagePlan

_LAYOUT_KEYS = {"stages", "replicas", "microbatches", "schedule", "recompute"}


def explicit_plan(graph: Graph, layout: Mapping[str, Any], batch_size: int, world_size: int) -> Plan:
    """A plan for a hand-given layout (see the module docstring), FLOP-balanced split.

    Defaults: ``stages=1``, ``replicas`` = an equal share of the ranks per
    stage, ``microbatches=1``, ``schedule="1f1b"``, ``recompute=False`` (a bool
    for every stage, or one per stage).

    Raises:
        ConfigError: unknown keys, or replicas that do not add up to the world size.
    """
    unknown = set(layout) - _LAYOUT_KEYS
    if unknown:
        raise ConfigError(f"unknown layout keys {sorted(unknown)}; use {sorted(_LAYOUT_KEYS)}")
    stages = int(layout.get("stages", 1))
    replicas = layout.get("replicas")
    if replicas is None:
        if world_size % stages:
            raise ConfigError(
                f"{world_size} ranks cannot be shared equally by {stages} stages; give replicas=[...]"
            )
        replicas = [world_size // stages] * stages
    replicas = [int(r) for r in replicas]
    if len(replicas) != stages or sum(replicas) != world_size or min(replicas) < 1:
        raise ConfigError(
            f"replicas={replicas} must list {stages} positive counts adding up to the {world_size} ranks"
        )
    recompute = layout.get("recompute", False)
    flags = [bool(recompute)] * stages if isinstance(recompute, bool) else [bool(r) for r in recompute]
    if len(flags) != stages:
        raise ConfigError(f"recompute={recompute!r} must be a bool or one bool per stage ({stages})")
    assignment = balanced_assignment(graph, stages)
    first = 0
    stage_plans = []
    for s in range(stages):
        ops = tuple(i for i, a in enumerate(assignment) if a == s)
        fqns = sorted({f for i in ops for f in (*graph.ops[i].params, *graph.ops[i].buffers)})
        ranks = tuple(range(first, first + replicas[s]))
        first += replicas[s]
        stage_plans.append(StagePlan(index=s, ops=ops, param_fqns=tuple(fqns), ranks=ranks, recompute=flags[s],
                                     predicted_compute_time=0.0, predicted_peak_memory=0))
    try:
        return Plan(
            batch_size=batch_size,
            microbatches=int(layout.get("microbatches", 1)),
            schedule=str(layout.get("schedule", "1f1b")),
            stages=tuple(stage_plans),
            world_size=world_size,
            graph_fingerprint=graph.fingerprint(),
            cluster="explicit layout",
            step_time=0.0,
            peak_memory_per_rank=(0,) * world_size,
            samples_per_second=0.0,
            mfu=0.0,
            search_time=0.0,
        )
    except PlanError as e:
        raise ConfigError(f"layout {dict(layout)} is not usable: {e}") from e


def load_plan(plan: Plan | str | os.PathLike[str] | Mapping[str, Any], graph: Graph, batch_size: int,
              world_size: int) -> Plan:
    """Resolve a user-given ``plan`` (Plan, JSON path or layout dict) and check it fits.

    Raises:
        ConfigError: an argument of another type.
        PlanError: the plan was made for another world size or graph.
    """
    if isinstance(plan, Mapping):
        return explicit_plan(graph, plan, batch_size, world_size)
    if isinstance(plan, (str, os.PathLike)):
        plan = Plan.load(plan)
    if not isinstance(plan, Plan):
        raise ConfigError(f"plan= takes a Plan, a JSON path or a layout dict, got {type(plan).__name__}")
    check_plan(plan, graph, world_size)
    return plan


def check_plan(plan: Plan, graph: Graph, world_size: int) -> None:
    """Raise PlanError when ``plan`` does not match the world size or the graph's ops."""
    if plan.world_size != world_size:
        raise PlanError(
            f"plan is for {plan.world_size} ranks but {world_size} are running; launch with "
            f"{plan.world_size} ranks or make a new plan"
        )
    n = sum(len(st.ops) for st in plan.stages)
    if n != len(graph.ops):
        raise PlanError(
            f"plan covers {n} ops but the traced model has {len(graph.ops)}; the plan was made "
            "for another model or input structure"
        )


def stage_ranks(plan: Plan) -> list[list[int]]:
    """``[ranks of stage 0, ranks of stage 1, ...]``."""
    return [list(st.ranks) for st in plan.stages]


def rank_stage(plan: Plan, rank: int) -> int:
    """The stage ``rank`` runs. Raises PlanError when the plan leaves it idle."""
    s = plan.stage_of_rank(rank)
    if s is None:
        raise PlanError(f"plan gives rank {rank} no stage; every rank must hold a stage replica")
    return s

