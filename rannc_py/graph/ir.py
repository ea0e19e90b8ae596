"""The Graph IR: a traced model as a list of tensor ops with metadata.

A :class:`Graph` is what :func:`rannc_py.trace` returns and what the profiler,
the planner and the runtime read. Ops are kept in topological order (the
order the model ran them); an op's index is its position in ``Graph.ops``.

Only ops that produce tensors are listed. Symbolic integers (shapes) are not
ops: every stage recomputes the ones it needs, so they never cross a stage
boundary. Multi-output ops (``split``, a higher-order op) are one op whose
``outputs`` lists every tensor it returns.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import networkx as nx
import torch

from rannc_py.errors import ConfigError

if TYPE_CHECKING:
    from rannc_py.graph.lowered import Lowered
    from rannc_py.graph.staged import StagedModule


@dataclass(frozen=True)
class TensorMeta:
    """Shape and size of one tensor at the traced batch size.

    ``batch_dim`` is the dimension that scales with the batch (None when the
    tensor does not depend on the batch size, e.g. a positional table). For a
    batch-carrying tensor, ``nbytes / Graph.batch_size`` is its size per sample.
    """

    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int
    batch_dim: int | None


@dataclass(frozen=True)
class ParamInfo:
    """Shape, dtype and byte size of a parameter or buffer."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int


@dataclass
class Op:
    """One tensor op of the graph.

    ``inputs`` are the activation and user-input tensors it reads (parameters
    and buffers are named in ``params`` / ``buffers`` instead), ``outputs``
    every tensor it returns. ``input_ops`` / ``output_ops`` are the indices of
    the ops it reads from / that read it; ``user_inputs`` the model inputs it
    reads directly. ``flops`` is the forward estimate at the traced batch.
    """

    index: int
    name: str
    target: str
    module_path: str
    inputs: list[TensorMeta] = field(default_factory=list)
    outputs: list[TensorMeta] = field(default_factory=list)
    params: list[str] = field(default_factory=list)
    buffers: list[str] = field(default_factory=list)
    flops: float = 0.0
    input_ops: list[int] = field(default_factory=list)
    output_ops: list[int] = field(default_factory=list)
    user_inputs: list[str] = field(default_factory=list)

    @property
    def output_bytes(self) -> int:
        """Total bytes of the tensors this op returns, at the traced batch."""
        return sum(t.nbytes for t in self.outputs)


class Graph:
    """A traced model: ops in topological order plus parameter metadata.

    Built by :func:`rannc_py.trace`; not meant to be constructed directly.

    Attributes:
        ops: tensor ops, topological order, ``ops[i].index == i``.
        batch_size: the batch size the model was traced with.
        params: every parameter FQN the graph reads -> :class:`ParamInfo`. A
            tied parameter appears once, under its first name (the one
            ``model.named_parameters()`` yields); ops and stages use that name.
        buffers: every buffer FQN the graph reads -> :class:`ParamInfo`.
        tied_params: groups of parameter FQNs that are one tensor, first name
            first (e.g. GPT-2's ``["transformer.wte.weight", "lm_head.weight"]``).
            When several stages read it, each holds a copy and the gradients
            must be summed across those stages.
        input_names: names of the model's tensor inputs, flattened ("input_ids",
            "labels", "arg0", nested ones as "arg0.1" / "batch.mask").
        output_names: names of the model's tensor outputs, flattened ("loss", "logits").
        dynamic_batch: True when the stages run at any batch size; False when
            the model could only be traced with a fixed batch size.
    """

    def __init__(
        self,
        ops: list[Op],
        batch_size: int,
        params: dict[str, ParamInfo],
        buffers: dict[str, ParamInfo],
        tied_params: list[list[str]],
        input_names: list[str],
        output_names: list[str],
        dynamic_batch: bool,
        lowered: Lowered,
    ) -> None:
        self.ops = ops
        self.batch_size = batch_size
        self.params = params
        self.buffers = buffers
        self.tied_params = tied_params
        self.input_names = input_names
        self.output_names = output_names
        self.dynamic_batch = dynamic_batch
        self._lowered = lowered

    def __repr__(self) -> str:
        return (
            f"Graph(ops={len(self.ops)}, params={len(self.params)}, batch_size={self.batch_size}, "
            f"dynamic_batch={self.dynamic_batch}, inputs={self.input_names}, outputs={self.output_names})"
        )

    @property
    def total_flops(self) -> float:
        """Sum of the ops' forward FLOPs at the traced batch."""
        return sum(op.flops for op in self.ops)

    @property
    def param_bytes(self) -> int:
        """Bytes of all parameters the graph reads (tied ones counted once)."""
        return sum(p.nbytes for p in self.params.values())

    def output_metas(self) -> list[TensorMeta]:
        """Metadata of the model's tensor outputs, flattened, in ``output_names`` order.

        Takes nothing; returns one :class:`TensorMeta` per output at the traced
        batch size (``batch_dim`` None for an output that does not scale with
        the batch, e.g. a scalar loss). Raises nothing.
        """
        from rannc_py.graph.lowered import _meta

        low = self._lowered
        # The batch symbol as the tracer chose it: dim 0 of the first user input whose dim 0 is symbolic.
        batch_sym = None
        for node, kind in low.kind.items():
            size = next(iter(getattr(node.meta.get("val"), "shape", ())), None)
            if kind == "input" and isinstance(size, torch.SymInt) and size.node.expr.is_Symbol:
                batch_sym = size.node.expr
                break
        return [_meta(node.meta["val"], batch_sym, self.batch_size, self.dynamic_batch)
                for node in low.user_outputs]

    def op_by_name(self, name: str) -> Op:
        """Return the op named ``name``; raises ConfigError if there is none."""
        index = self._lowered.op_index_by_name.get(name)
        if index is None:
            raise ConfigError(f"no op named {name!r} in the graph ({len(self.ops)} ops); see Graph.ops")
        return self.ops[index]

    def to_networkx(self) -> nx.DiGraph:
        """Return the op graph as an ``nx.DiGraph``.

        Nodes are op indices with attributes ``name``, ``target``,
        ``module_path``, ``flops`` and ``output_bytes``; an edge u -> v means v
        reads a tensor u produces, with attribute ``bytes`` (what crosses the
        edge at the traced batch, each tensor counted once).
        """
        g = nx.DiGraph()
        for op in self.ops:
            g.add_node(
                op.index,
                name=op.name,
                target=op.target,
                module_path=op.module_path,
                flops=op.flops,
                output_bytes=op.output_bytes,
            )
        for (u, v), nbytes in self._lowered.edge_bytes.items():
            g.add_edge(u, v, bytes=nbytes)
        return g

    def fingerprint(self) -> str:
        """A stable hex digest of the graph's structure, shapes and dtypes.

        Equal for two traces of the same model at the same input shapes,
        whatever the parameter values; use it as a profile-cache key.
        """
        h = hashlib.sha256()
        h.update(f"batch={self.batch_size};dynamic={self.dynamic_batch};".encode())
        for op in self.ops:
            h.update(f"{op.target}|{op.module_path}|{op.input_ops}|{op.params}|{op.buffers}|".encode())
            for t in (*op.inputs, *op.outputs):
                h.update(f"{t.shape}{t.dtype}{t.batch_dim};".encode())
        for fqn, p in self.params.items():
            h.update(f"{fqn}{p.shape}{p.dtype};".encode())
        h.update(repr((self.input_names, self.output_names, self.tied_params)).encode())
        return h.hexdigest()

    def flatten_inputs(self, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None) -> dict[str, torch.Tensor]:
        """Flatten a call's ``args``/``kwargs`` into ``{input name: tensor}``.

        The structure and the non-tensor values (e.g. ``use_cache=False``) must
        match the traced call; raises ConfigError if they do not.
        """
        return self._lowered.inputs.flatten(tuple(args), dict(kwargs or {}))

    def unflatten_outputs(self, values: Sequence[torch.Tensor]) -> Any:
        """Rebuild the model's output (tensor, tuple, dict, ModelOutput...) from
        its flattened tensors, given in ``output_names`` order. Raises
        ConfigError on a wrong count."""
        return self._lowered.outputs.unflatten(list(values))

    def split(self, stages: int | Sequence[int] | Mapping[str, int]) -> StagedModule:
        """Split the graph into pipeline stages that run in this process.

        Takes a stage count (ops are cut into that many contiguous runs with
        balanced FLOPs), a sequence giving the stage of each op by index, or a
        dict op name -> stage. Stage indices must be 0..S-1, each used, and
        every edge must go from a stage to the same or a later one.

        Returns a :class:`StagedModule` bound to the traced model's own
        parameters. Raises PartitionError for an invalid split, naming the
        offending edge or value.
        """
        from rannc_py.graph.partition import resolve_assignment
        from rannc_py.graph.staged import StagedModule

        assignment = resolve_assignment(self, stages)
        return StagedModule(self, assignment)

    def summary(self, top: int = 10) -> str:
        """A readable summary: op/param counts, FLOPs, and the ``top``
        module paths by FLOPs."""
        distinct = sum(math.prod(p.shape) for p in self.params.values())
        by_module: dict[str, float] = {}
        for op in self.ops:
            by_module[op.module_path] = by_module.get(op.module_path, 0.0) + op.flops
        lines = [
            (
                f"Graph: {len(self.ops)} ops, batch size {self.batch_size} "
                f"({'dynamic' if self.dynamic_batch else 'static'} batch)"
            ),
            f"  inputs:  {', '.join(self.input_names)}",
            f"  outputs: {', '.join(self.output_names)}",
            (
                f"  params:  {distinct:,} elements in {len(self.params)} tensors "
                f"({self.param_bytes / 2**20:.1f} MiB)"
                + (f", {len(self.tied_params)} tied group(s)" if self.tied_params else "")
            ),
            f"  forward: {self.total_flops / 1e9:.3f} GFLOP at batch {self.batch_size}",
            "  top modules by FLOPs:",
        ]
        for path, flops in sorted(by_module.items(), key=lambda kv: (-kv[1], kv[0]))[:top]:
            lines.append(f"    {flops / 1e9:10.4f} GFLOP  {path or '<top>'}")
        return "\n".join(lines)
