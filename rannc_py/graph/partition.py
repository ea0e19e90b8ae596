"""Check op-to-stage assignments and make FLOP-balanced ones.

An assignment gives each op (by index) a stage. It is valid when the stages
are 0..S-1, none is empty, and it is *convex*: no edge goes from a later
stage to an earlier one, so the stages can run one after another.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from rannc_py.errors import PartitionError
from rannc_py.graph.ir import Graph


def balanced_assignment(graph: Graph, num_stages: int) -> list[int]:
    """Cut the ops, in order, into ``num_stages`` contiguous runs of about equal FLOPs.

    Ops without FLOPs (element-wise, views) still weigh a little, so a model
    with few matrix products is split by op count. Every stage gets at least
    one op. Raises PartitionError if ``num_stages`` is not in 1..len(ops).
    """
    n = len(graph.ops)
    if isinstance(num_stages, bool) or not isinstance(num_stages, int) or not 1 <= num_stages <= n:
        raise PartitionError(
            f"num_stages must be an integer in 1..{n} (the graph has {n} ops), got {num_stages!r}"
        )
    total_flops = graph.total_flops
    # Weight of an op: its FLOPs plus a floor of 1/n of the mean, so zero-FLOP ops count.
    floor = total_flops / n / n if total_flops > 0 else 1.0
    weights = [op.flops + floor for op in graph.ops]
    total = sum(weights)
    assignment: list[int] = []
    stage, acc = 0, 0.0
    for i, w in enumerate(weights):
        if assignment and stage < num_stages - 1:
            has_share = acc + w / 2 > total * (stage + 1) / num_stages
            # The later stages need every op that is left.
            must = n - i <= num_stages - 1 - stage
            if has_share or must:
                stage += 1
        assignment.append(stage)
        acc += w
    if stage != num_stages - 1:  # pragma: no cover - the loop above always reaches the last stage
        raise PartitionError(f"internal error: split into {stage + 1} stages instead of {num_stages}")
    return assignment


def resolve_assignment(graph: Graph, stages: int | Sequence[int] | Mapping[str, int]) -> list[int]:
    """Turn a stage count, per-op list or op-name dict into a validated per-op stage list.

    Raises PartitionError naming the problem: a missing or unknown op, a stage
    index out of range, an empty stage, or an edge that goes backwards.
    """
    n = len(graph.ops)
    if isinstance(stages, int) and not isinstance(stages, bool):
        return balanced_assignment(graph, stages)
    if isinstance(stages, Mapping):
        unknown = [name for name in stages if name not in graph.op_index]
        if unknown:
            raise PartitionError(f"assignment names {len(unknown)} op(s) not in the graph, e.g. {unknown[:3]}")
        missing = [op.name for op in graph.ops if op.name not in stages]
        if missing:
            raise PartitionError(
                f"assignment misses {len(missing)} of {n} ops, e.g. {missing[:3]}; give every op a stage"
            )
        assignment = [stages[op.name] for op in graph.ops]
    elif isinstance(stages, Sequence) and not isinstance(stages, str):
        assignment = list(stages)
        if len(assignment) != n:
            raise PartitionError(f"assignment has {len(assignment)} entries but the graph has {n} ops")
    else:
        raise PartitionError(
            f"split() takes a stage count, a list of stages per op or a dict op name -> stage; got {type(stages).__name__}"
        )
    for i, s in enumerate(assignment):
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise PartitionError(f"op {i} ({graph.ops[i].name}) has stage {s!r}; stages are integers >= 0")
    num_stages = max(assignment) + 1
    empty = sorted(set(range(num_stages)) - set(assignment))
    if empty:
        raise PartitionError(f"stages {empty} have no ops (stages used: 0..{num_stages - 1}); number stages densely")
    for op in graph.ops:
        for src in op.input_ops:
            if assignment[src] > assignment[op.index]:
                raise PartitionError(
                    f"edge {graph.ops[src].name} (op {src}, stage {assignment[src]}) -> {op.name} "
                    f"(op {op.index}, stage {assignment[op.index]}) goes backwards; every op must be in the "
                    "same or a later stage than the ops it reads"
                )
    return assignment
