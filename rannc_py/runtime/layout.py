"""Turn the ``plan=`` argument of :class:`RaNNCModule` into a :class:`Plan`.

Accepted: a ``Plan``; a path to a plan saved with ``Plan.save``; or an
explicit layout ``dict(stages=S, tensor=T, replicas=[r0, ...], microbatches=M,
schedule="1f1b", chunks=1, recompute=False, shard_optimizer=0)`` (a schedule of
:data:`RUN_SCHEDULES`) whose stage boundaries are placed by balancing the
graph's FLOPs. With ``None`` the planner searches.

Model chunks: with ``schedule="interleaved"`` (``chunks`` v >= 2, default 2)
or ``"zb-v"`` (chunks 2, implied) each rank holds v of the S stages, on
``p = S / v`` pipeline positions: interleaved puts stage s on position
``s % p``, ZB-V stages s and ``2p - 1 - s`` on position s (a V). ``replicas``
then counts ranks per *position* (p counts; or S counts, one per stage, equal
for the stages of a position), and position j's ranks follow position j - 1's.
Interleaved needs M a multiple of p. Model chunks run with ``tensor=1`` and
``shard_optimizer=0`` (not run yet; refused with ConfigError).

``tensor`` is the tensor degree (default 1): an int for every stage, or one
per stage (RaNNCModule runs one degree for all stages, see
:mod:`rannc_py.runtime.tensor_stages`); stage s then has ``replicas[s] x
tensor`` ranks, replica j's tensor group being its ranks ``j*T..(j+1)*T-1``.
Whether the model's ops split at that degree is checked on the first call.

What needs neither the model nor the world size is checked when the module
is built (:func:`check_plan_arg`); the rest (the world size, the plan's ops
and graph fingerprint against the traced model) on the first call
(:func:`load_plan`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

from rannc_py.errors import ConfigError, PlanError
from rannc_py.graph.ir import Graph, TensorMeta
from rannc_py.graph.partition import balanced_assignment
from rannc_py.planner.options import EXPERIMENTAL_SCHEDULES, TRAINING_SCHEDULES, shard_levels
from rannc_py.planner.plan import Plan, StagePlan
from rannc_py.schedule.generators import chunks_of
from rannc_py.schedule.generators import stage_ranks as chunk_positions

_LAYOUT_KEYS = {"stages", "tensor", "replicas", "microbatches", "schedule", "chunks", "recompute", "shard_optimizer"}
CHUNKED_SCHEDULES: tuple[str, ...] = ("interleaved", "zb-v")
"""The schedules with several model chunks (stages) per rank."""
RUN_SCHEDULES: tuple[str, ...] = tuple(dict.fromkeys(TRAINING_SCHEDULES + EXPERIMENTAL_SCHEDULES + CHUNKED_SCHEDULES))
"""The schedules RaNNCModule trains with: the planner's defaults, the split-backward ``zb-h1`` and
the chunked ``interleaved`` and ``zb-v``. forward_only has no backward and no ALLREDUCE (a plan
with it would never learn)."""
# Batch sizes at which a plan's graph may have been traced (the CLI traces at 2) when the model's
# traced batch differs; see check_plan.
_TRACE_BATCHES = range(1, 65)

PlanArg = Plan | str | os.PathLike[str] | Mapping[str, Any]


def check_plan_arg(plan: PlanArg | None) -> Plan | Mapping[str, Any] | None:
    """Check ``plan=`` as far as neither the model nor the world size is needed; a path is read.

    Returns:
        None, a :class:`Plan` (read from the path when one was given) or the
        layout dict, unchanged.

    Raises:
        ConfigError: an argument of another type, or a layout dict with
            unknown keys or values that cannot be used (see :func:`check_layout`).
        PlanError: a plan file that is missing, unreadable or malformed, or a
            plan whose schedule does not train.
    """
    if plan is None:
        return None
    if isinstance(plan, Mapping):
        check_layout(plan)
        return plan
    if isinstance(plan, (str, os.PathLike)):
        plan = Plan.load(plan)
    if not isinstance(plan, Plan):
        raise ConfigError(f"plan= takes a Plan, a JSON path or a layout dict, got {type(plan).__name__}")
    _check_training_schedule(plan.schedule, "the plan's", PlanError)
    check_chunked(plan)
    return plan


def check_chunked(plan: Plan) -> None:
    """Raise ConfigError for a plan with several model chunks per rank that RaNNCModule cannot run yet:
    tensor degree > 1 or a sharded optimizer level."""
    if plan.chunks == 1:
        return
    what = f"schedule {plan.schedule!r} with chunks={plan.chunks}"
    if any(st.tensor > 1 for st in plan.stages):
        raise ConfigError(f"{what} and tensor > 1 is not supported yet (a rank's tensor group would serve "
                          "several stages); use tensor=1, or a schedule with one stage per rank")
    if any(st.shard_level for st in plan.stages):
        raise ConfigError(f"{what} and shard_optimizer > 0 is not supported yet (a rank's stages would share "
                          "one sharded optimizer); use shard_optimizer=0, or a schedule with one stage per rank")


def _positive_int(layout: Mapping[str, Any], key: str, default: int) -> int:
    value = layout.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"layout {key}={value!r} must be a positive integer (default {default})")
    return value


def _check_training_schedule(name: object, whose: str, error: type[Exception] = ConfigError) -> None:
    if name not in RUN_SCHEDULES:
        raise error(
            f"{whose} schedule {name!r} is not a training schedule; use one of {list(RUN_SCHEDULES)} "
            "(evaluation, model.eval() or torch.no_grad(), runs forward-only on any plan)"
        )


def check_layout(layout: Mapping[str, Any]) -> list[bool]:
    """Check a layout dict as far as the world size is not needed; return recompute per stage.

    Raises:
        ConfigError: unknown keys; stages or microbatches not positive
            integers; a schedule that does not train; a recompute value that
            is not a bool or one bool per stage; a tensor degree that is not
            a positive int or one per stage, or differs between stages.
    """
    unknown = set(layout) - _LAYOUT_KEYS
    if unknown:
        raise ConfigError(f"unknown layout keys {sorted(unknown)}; use {sorted(_LAYOUT_KEYS)}")
    stages = _positive_int(layout, "stages", 1)
    _positive_int(layout, "microbatches", 1)
    _check_training_schedule(layout.get("schedule", "1f1b"), "layout")
    _check_chunked_layout(layout, stages)
    recompute = layout.get("recompute", False)
    flags = [bool(recompute)] * stages if isinstance(recompute, bool) else [bool(r) for r in recompute]
    if len(flags) != stages:
        raise ConfigError(f"recompute={recompute!r} must be a bool or one bool per stage ({stages})")
    shard_levels(layout.get("shard_optimizer", 0), stages)  # checked here, used by explicit_plan
    tensor_degree(layout, stages)
    return flags


def _check_chunked_layout(layout: Mapping[str, Any], stages: int) -> None:
    """Raise ConfigError for a layout of several chunks per rank with what is not run yet with
    chunks (tensor > 1, shard_optimizer > 0), or whose chunks do not fit (:func:`layout_chunks`)."""
    v = layout_chunks(layout)
    if v == 1:
        return
    degree = tensor_degree(layout, stages)
    if degree > 1:
        raise ConfigError(f"layout tensor={degree} with schedule {layout.get('schedule')!r} (chunks={v}) is not "
                          "supported yet (a rank's tensor group would serve several stages); use tensor=1 or a "
                          "schedule with one stage per rank ('1f1b', 'gpipe', 'zb-h1')")
    if any(shard_levels(layout.get("shard_optimizer", 0), stages)):
        raise ConfigError(f"layout shard_optimizer={layout.get('shard_optimizer')!r} with schedule "
                          f"{layout.get('schedule')!r} (chunks={v}) is not supported yet (a rank's stages would "
                          "share one sharded optimizer); use shard_optimizer=0 or a schedule with one stage per "
                          "rank ('1f1b', 'gpipe', 'zb-h1')")


def layout_chunks(layout: Mapping[str, Any]) -> int:
    """The layout's model chunks per rank (key ``chunks``; default the schedule's own: 2 for
    interleaved and zb-v, else 1), checked against its stages and microbatches.

    Raises:
        ConfigError: a chunk count the schedule cannot use (interleaved >= 2, zb-v 2, the others
            1), stages that are not a multiple of it, or (interleaved) microbatches that are not
            a multiple of the pipeline positions ``stages / chunks``.
    """
    name = str(layout.get("schedule", "1f1b"))
    given = layout.get("chunks")
    try:
        v = chunks_of(name, given)
    except ConfigError as e:
        fix = ("chunks=2 (or leave chunks out)" if name == "zb-v" else
               "chunks >= 2" if name == "interleaved" else "leave chunks out (one stage per rank), or "
               "schedule='interleaved' for several")
        raise ConfigError(f"layout chunks={given!r}: {e}; use {fix}") from None
    stages = layout.get("stages", 1)
    if stages % v:
        raise ConfigError(f"layout stages={stages} with schedule {name!r} and chunks={v}: the stages must be a "
                          f"multiple of the chunks (each rank holds {v}); use stages={(stages // v + 1) * v}")
    m = layout.get("microbatches", 1)
    p = stages // v
    if name == "interleaved" and m % p:
        raise ConfigError(f"layout microbatches={m} with schedule 'interleaved' on {p} pipeline positions "
                          f"(stages={stages} / chunks={v}): microbatches must be a multiple of the positions; "
                          f"use microbatches={(m // p + 1) * p}")
    return v


def tensor_degree(layout: Mapping[str, Any], stages: int) -> int:
    """The layout's tensor degree (key ``tensor``: an int, or one int per stage, all equal; default 1).

    Raises:
        ConfigError: not a positive int or a list of ``stages`` of them, or
            different degrees per stage (not run yet).
    """
    value = layout.get("tensor", 1)
    degrees = [value] * stages if not isinstance(value, (list, tuple)) else list(value)
    if len(degrees) != stages or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in degrees):
        raise ConfigError(f"layout tensor={value!r} must be a positive int or one per stage ({stages}), e.g. tensor=2")
    if len(set(degrees)) > 1:
        raise ConfigError(
            f"layout tensor={value!r}: RaNNCModule runs one tensor degree for all stages (a split activation "
            "crosses from each tensor position to the same position of the next stage); give one degree, "
            f"e.g. tensor={max(degrees)}")
    return degrees[0]


def layout_stages(layout: Mapping[str, Any], world_size: int) -> tuple[int, list[int], list[bool]]:
    """Check a layout dict; return its ``(stages, replicas per stage, recompute per stage)``.

    Raises:
        ConfigError: what :func:`check_layout` raises, or replicas that are
            not positive or whose ranks (replicas x tensor) do not add up to
            the world size.
    """
    flags = check_layout(layout)
    stages = len(flags)
    t = tensor_degree(layout, stages)
    v = layout_chunks(layout)
    p = stages // v  # pipeline positions: ranks are shared out per position
    given = layout.get("replicas")
    if given is None:
        if world_size % (p * t):
            what = f"{stages} stages" if v == 1 else f"{p} pipeline positions ({stages} stages, {v} per rank)"
            raise ConfigError(
                f"{world_size} ranks cannot be shared equally by {what} of tensor degree {t}; "
                f"launch a multiple of {p * t} ranks or give replicas=[...]"
            )
        given = [world_size // (p * t)] * p
    if isinstance(given, int) and not isinstance(given, bool):
        given = [given] * p  # one count for every stage (position)
    counts = "one per stage" if v == 1 else f"one per pipeline position ({p}) or per stage ({stages})"
    if not isinstance(given, (list, tuple)) or any(isinstance(r, bool) or not isinstance(r, int) for r in given):
        raise ConfigError(f"replicas={given!r} must be an int or a list of ints, {counts}")
    replicas = [int(r) for r in given]
    if v > 1 and len(replicas) == stages:  # per stage: equal within each position
        positions = chunk_positions(str(layout.get("schedule")), p, v)
        per_position: dict[int, int] = {}
        for s, r in enumerate(replicas):
            if per_position.setdefault(positions[s], r) != r:
                raise ConfigError(
                    f"replicas={replicas}: stages {[q for q in range(stages) if positions[q] == positions[s]]} "
                    f"share pipeline position {positions[s]} (the same ranks) but are given different counts; "
                    f"give one count per position, e.g. replicas={[per_position.get(j, r) for j in range(p)]}")
        replicas = [per_position[j] for j in range(p)]
    if len(replicas) != p or sum(replicas) * t != world_size or min(replicas) < 1:
        per = "" if t == 1 else f" (each replica a tensor group of {t} ranks)"
        raise ConfigError(
            f"replicas={list(given)} must list {p if v == 1 else counts} positive counts whose ranks{per} add up "
            f"to the {world_size} ranks"
        )
    if v > 1:  # per stage, from its position
        positions = chunk_positions(str(layout.get("schedule")), p, v)
        replicas = [replicas[positions[s]] for s in range(stages)]
    return stages, replicas, flags


def explicit_plan(graph: Graph, layout: Mapping[str, Any], batch_size: int, world_size: int) -> Plan:
    """A plan for a hand-given layout (see the module docstring), FLOP-balanced split.

    Defaults: ``stages=1``, ``tensor=1``, ``replicas`` = an equal share of
    the ranks per stage (replicas x tensor ranks each; an int: that count
    for every stage), ``microbatches=1``, ``schedule="1f1b"``, ``recompute=False`` (a bool
    for every stage, or one per stage), ``shard_optimizer=0`` (as the planning
    option of :class:`~rannc_py.planner.options.PlanOptions`; stages with one
    replica run level 0).

    Raises:
        ConfigError: the layout cannot be used (see :func:`layout_stages`).
    """
    stages, replicas, flags = layout_stages(layout, world_size)
    t = tensor_degree(layout, stages)
    v = layout_chunks(layout)
    p = stages // v
    levels = shard_levels(layout.get("shard_optimizer", 0), stages)
    assignment = balanced_assignment(graph, stages)
    positions = chunk_positions(str(layout.get("schedule", "1f1b")), p, v) or tuple(range(stages))
    per_position = [0] * p
    for s in range(stages):
        per_position[positions[s]] = replicas[s]
    firsts = [sum(per_position[:j]) * t for j in range(p)]  # position j's ranks follow position j - 1's
    stage_plans = []
    for s in range(stages):
        ops = tuple(i for i, a in enumerate(assignment) if a == s)
        fqns = sorted({f for i in ops for f in (*graph.ops[i].params, *graph.ops[i].buffers)})
        first = firsts[positions[s]]
        ranks = tuple(range(first, first + replicas[s] * t))
        stage_plans.append(StagePlan(index=s, ops=ops, param_fqns=tuple(fqns), ranks=ranks, recompute=flags[s],
                                     predicted_compute_time=0.0, predicted_peak_memory=0,
                                     shard_level=levels[s] if replicas[s] > 1 else 0, tensor=t))
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
            chunks=v,
        )
    except PlanError as e:
        raise ConfigError(f"layout {dict(layout)} is not usable: {e}") from e


def load_plan(plan: PlanArg, graph: Graph, batch_size: int, world_size: int) -> Plan:
    """Resolve a user-given ``plan`` (Plan, JSON path or layout dict) and check it fits the traced model.

    Raises:
        ConfigError: an argument of another type, or a layout that cannot be used.
        PlanError: the plan was made for another world size or graph.
    """
    resolved = check_plan_arg(plan)
    if isinstance(resolved, Plan):
        check_plan(resolved, graph, world_size)
        return resolved
    assert resolved is not None
    return explicit_plan(graph, resolved, batch_size, world_size)


def _check_world(plan: Plan, world_size: int) -> None:
    if plan.world_size != world_size:
        raise PlanError(
            f"plan is for {plan.world_size} ranks but {world_size} are running; launch with "
            f"{plan.world_size} ranks or make a new plan"
        )


def check_plan(plan: Plan, graph: Graph, world_size: int) -> None:
    """Raise PlanError when ``plan`` does not match the world size, the graph's ops or its fingerprint.

    The fingerprint covers the batch size the graph was traced at. A plan is
    often made from a trace at another batch (the offline planner traces at
    2), so for a model whose stages run at any batch size the fingerprint is
    also compared at the batch sizes a plan's graph is commonly traced at
    (1 to 64, the plan's per-rank and global batch), rescaling every batched
    dimension.
    """
    _check_world(plan, world_size)
    n = sum(len(st.ops) for st in plan.stages)
    if n != len(graph.ops):
        raise PlanError(
            f"plan covers {n} ops but the traced model has {len(graph.ops)}; the plan was made "
            "for another model or input structure"
        )
    want = plan.graph_fingerprint
    if want == graph.fingerprint():
        return
    if graph.dynamic_batch:
        batches = {*_TRACE_BATCHES, plan.batch_size // max(world_size, 1), plan.batch_size}
        if any(b > 0 and _fingerprint_at(graph, b) == want for b in sorted(batches)):
            return
    raise PlanError(
        f"plan was made for a graph with fingerprint {want[:16]} but the traced model's is "
        f"{graph.fingerprint()[:16]}: it is for another model, another input structure or shapes; "
        "make a new plan for this model (or pass plan=None to let the planner search)"
    )


def _fingerprint_at(graph: Graph, batch: int) -> str:
    """``graph.fingerprint()`` as if traced at ``batch`` (every batched dimension rescaled)."""
    def at(t: TensorMeta) -> TensorMeta:
        if t.batch_dim is None:
            return t
        shape = list(t.shape)
        shape[t.batch_dim] = shape[t.batch_dim] // graph.batch_size * batch
        return dataclasses.replace(t, shape=tuple(shape), nbytes=t.nbytes // graph.batch_size * batch)

    ops = [dataclasses.replace(op, inputs=[at(t) for t in op.inputs], outputs=[at(t) for t in op.outputs])
           for op in graph.ops]
    return dataclasses.replace(graph, ops=ops, batch_size=batch).fingerprint()


def stage_ranks(plan: Plan) -> list[list[int]]:
    """``[ranks of stage 0, ranks of stage 1, ...]``."""
    return [list(st.ranks) for st in plan.stages]


def rank_stage(plan: Plan, rank: int) -> int:
    """The stage ``rank`` runs. Raises PlanError when the plan leaves it idle."""
    s = plan.stage_of_rank(rank)
    if s is None:
        raise PlanError(f"plan gives rank {rank} no stage; every rank must hold a stage replica")
    return s

