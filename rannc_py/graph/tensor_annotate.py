"""Make a traced graph's :class:`~rannc_py.graph.tensor_cost.TensorAnnotation` from its tensor splits.

:func:`tensor_annotation` runs :func:`~rannc_py.graph.tensor_split.find_tensor_split`
at each degree tried and turns each split that splits something into the
pure data the planner reads (see :mod:`rannc_py.graph.tensor_cost`). Names
are mapped to the Graph's op indices (a multi-output op's ``getitem``
aliases to that op); sizes come from the traced example's tensor metadata.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import fx

from rannc_py.errors import ConfigError
from rannc_py.graph.ir import Graph, TensorMeta
from rannc_py.graph.lowered import Program
from rannc_py.graph.tensor_cost import DegreeCosts, GroupCollective, TensorAnnotation
from rannc_py.graph.tensor_rules import args_of
from rannc_py.graph.tensor_split import TensorSplit, find_tensor_split

DEGREES: tuple[int, ...] = (2, 3, 4, 6, 8)
"""The tensor degrees tried by default."""


def tensor_annotation(traced: Any, degrees: Sequence[int] = DEGREES) -> TensorAnnotation:
    """The tensor-parallel cost annotation of a traced graph at each of ``degrees``.

    Takes the graph :func:`rannc_py.trace` returned (a
    :class:`~rannc_py.graph.traced.TracedGraph`: its program is read) and the
    degrees to try (ints >= 2). Returns the :class:`TensorAnnotation` with
    the degrees at which something splits. Raises ConfigError for a graph
    without its program or a degree below 2.
    """
    program = getattr(traced, "program", None)
    if not isinstance(traced, Graph) or not isinstance(program, Program):
        raise ConfigError("tensor_annotation needs the graph rannc_py.trace() returned (with its program), got "
                          f"{type(traced).__name__}; trace the model first")
    tried = tuple(sorted(set(degrees)))
    for t in tried:
        if isinstance(t, bool) or not isinstance(t, int) or t < 2:
            raise ConfigError(f"tensor degrees to try must be ints >= 2, got {list(degrees)!r}")
    out = []
    for t in tried:
        split = find_tensor_split(program, t)
        if any(op.mode != "gather" for op in split.ops.values()):
            out.append(degree_costs(traced, program, split))
    return TensorAnnotation(graph_fingerprint=traced.fingerprint(), degrees=tuple(out), tried=tried)


def annotate(graph: Any, tensor: int | None, degrees: Sequence[int] = DEGREES) -> TensorAnnotation | None:
    """The tensor annotation of ``graph`` for the planning option ``tensor``: None at a pinned
    degree 1 or for a graph without its program, else at the pinned degree (at every degree too
    when that one splits nothing, so that the planner's error names those allowed) or, searched
    (``tensor`` None), at each of ``degrees``."""
    if tensor == 1 or not isinstance(getattr(graph, "program", None), Program):
        return None
    if tensor is None:
        return tensor_annotation(graph, degrees) if degrees else None
    found = tensor_annotation(graph, (tensor,))
    return found if found.degrees else tensor_annotation(graph, sorted({*DEGREES, tensor}))


def degree_costs(graph: Graph, program: Program, split: TensorSplit) -> DegreeCosts:
    """One degree's :class:`DegreeCosts` from its split (see :mod:`rannc_py.graph.tensor_cost`)."""
    nodes = {n.name: n for n in program.gm.graph.nodes}

    def index(name: str) -> int | None:
        """The Graph op a node name belongs to (an alias: the op it picks from), or None."""
        while name not in graph.op_index:
            node = nodes.get(name)
            if node is None or program.kind.get(node) != "alias":
                return None
            src = args_of(node)[0]
            if not isinstance(src, fx.Node):
                return None
            name = src.name
        return graph.op_index[name]

    def sized(meta: TensorMeta) -> tuple[float, float]:
        if meta.batch_dim is None:
            return float(meta.nbytes), 0.0
        return 0.0, meta.nbytes / graph.batch_size

    def meta_of(name: str) -> TensorMeta:
        return program.tensor_meta(nodes[name].meta["val"])

    split_ops: set[int] = set()
    split_bytes: dict[int, int] = {}
    collectives: list[GroupCollective] = []
    readers: dict[str, int] = {}  # replicated value -> first op index reading it for a split op
    for name, op in split.ops.items():
        i = index(name)
        if op.mode != "gather" and i is not None:
            split_ops.add(i)
            if name in graph.op_index:
                outs = graph.ops[i].outputs
                nbytes = sum(o.nbytes for o, s in zip(outs, op.outputs) if s is not None)
                if nbytes:
                    split_bytes[i] = split_bytes.get(i, 0) + nbytes
        for src, act in op.inputs.items():
            if (act[0] == "copy" or (act[0] == "narrow" and act[3])) and i is not None:
                readers[src] = min(readers.get(src, i), i)
    last = len(graph.ops) - 1
    for kind, name in split.collectives():
        if kind == "grad_allreduce":
            fixed, ps = sized(meta_of(name))
            collectives.append(GroupCollective(kind=kind, op=readers.get(name, last), fixed_bytes=fixed,
                                               per_sample_bytes=ps))
        elif kind == "allreduce":
            i = index(name)
            assert i is not None
            fixed, ps = sized(graph.ops[i].outputs[0])
            collectives.append(GroupCollective(kind=kind, op=i, fixed_bytes=fixed, per_sample_bytes=ps))
        elif kind == "vocab_cross_entropy":  # a group max and two group sums of one value per row
            i = index(name)
            assert i is not None
            logits = args_of(nodes[name])[0]
            assert isinstance(logits, fx.Node)
            m = program.tensor_meta(logits.meta["val"])
            row_bytes = 3 * m.shape[0] * m.dtype.itemsize
            collectives.append(GroupCollective(kind=kind, op=i, fixed_bytes=0.0,
                                               per_sample_bytes=row_bytes / graph.batch_size, messages=3))
        else:  # allgather of the split model outputs, after the op that makes each
            for src in split.ops[name].inputs:
                i = index(src)
                fixed, ps = sized(meta_of(src))
                collectives.append(GroupCollective(kind="allgather", op=last if i is None else i,
                                                   fixed_bytes=fixed, per_sample_bytes=ps))
    return DegreeCosts(degree=split.degree, split_ops=tuple(sorted(split_ops)),
                       split_bytes=tuple(sorted(split_bytes.items())), collectives=tuple(collectives),
                       sharded_params=tuple(sorted(split.params)))
