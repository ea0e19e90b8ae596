"""The Graph IR: a traced model as a list of tensor ops with metadata.

A :class:`Graph` is what the profiler and the planner read, and what
:func:`rannc_py.trace` returns (as a :class:`~rannc_py.graph.traced.TracedGraph`,
which also carries the program that runs it). Ops are kept in topological
order (the order the model ran them); an op's index is its position in
``Graph.ops``.

Only ops that produce tensors are listed. Symbolic integers (shapes) are not
ops: every stage recomputes the ones it needs, so they never cross a stage
boundary. Multi-output ops (``split``, a higher-order op) are one op whose
``outputs`` lists every tensor it returns.

A Graph is pure data: names, shapes, dtypes, byte counts and FLOPs, nothing
that holds a module, an fx node or a tensor. It pickles, and
:meth:`Graph.to_json` / :meth:`Graph.from_json` round-trip it exactly (dtypes
written by name, e.g. ``"float32"``), so a plan can be made for a model that
was traced elsewhere.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import torch

from rannc_py.errors import ConfigError


def canonical_names(tied_params: list[list[str]]) -> dict[str, str]:
    """Map every name of a tied group to the group's first name.

    Takes groups of names that are one tensor, first name first (as
    ``Graph.tied_params``). Returns ``{name: first name of its group}`` for
    every name in a group, the first one included; names in no group are
    absent, so look names up with ``.get(name, name)``. Raises nothing.
    """
    return {name: group[0] for group in tied_params for name in group}


def dtype_name(dtype: torch.dtype) -> str:
    """The name ``torch`` knows ``dtype`` by, e.g. ``"float32"``."""
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str) -> torch.dtype:
    """The ``torch.dtype`` named ``name`` (as :func:`dtype_name` writes it); raises ConfigError."""
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ConfigError(f"unknown dtype {name!r}; expected a torch dtype name such as 'float32'")
    return dtype


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

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the dtype by name)."""
        return {"shape": list(self.shape), "dtype": dtype_name(self.dtype), "nbytes": self.nbytes,
                "batch_dim": self.batch_dim}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TensorMeta:
        """Inverse of :meth:`to_dict`; raises ConfigError on a bad dtype, KeyError on a missing key."""
        batch_dim = d["batch_dim"]
        return cls(shape=tuple(int(x) for x in d["shape"]), dtype=parse_dtype(d["dtype"]), nbytes=int(d["nbytes"]),
                   batch_dim=None if batch_dim is None else int(batch_dim))


@dataclass(frozen=True)
class ParamInfo:
    """Shape, dtype and byte size of a parameter or buffer."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the dtype by name)."""
        return {"shape": list(self.shape), "dtype": dtype_name(self.dtype), "nbytes": self.nbytes}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ParamInfo:
        """Inverse of :meth:`to_dict`; raises ConfigError on a bad dtype, KeyError on a missing key."""
        return cls(shape=tuple(int(x) for x in d["shape"]), dtype=parse_dtype(d["dtype"]), nbytes=int(d["nbytes"]))


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

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["inputs"] = [t.to_dict() for t in self.inputs]
        d["outputs"] = [t.to_dict() for t in self.outputs]
        return {k: list(v) if isinstance(v, list) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Op:
        """Inverse of :meth:`to_dict`; raises ConfigError on a bad dtype, KeyError on a missing key."""
        return cls(
            index=int(d["index"]),
            name=str(d["name"]),
            target=str(d["target"]),
            module_path=str(d["module_path"]),
            inputs=[TensorMeta.from_dict(t) for t in d["inputs"]],
            outputs=[TensorMeta.from_dict(t) for t in d["outputs"]],
            params=[str(p) for p in d["params"]],
            buffers=[str(b) for b in d["buffers"]],
            flops=float(d["flops"]),
            input_ops=[int(i) for i in d["input_ops"]],
            output_ops=[int(i) for i in d["output_ops"]],
            user_inputs=[str(n) for n in d["user_inputs"]],
        )


@dataclass(kw_only=True, repr=False)
class Graph:
    """A traced model: ops in topological order plus parameter metadata.

    Made by :func:`rannc_py.trace` (which returns a
    :class:`~rannc_py.graph.traced.TracedGraph`, this data plus the program
    that runs it) or read back with :meth:`from_json`; built by keyword.

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
        edge_bytes: ``(u, v) -> bytes`` for every op ``v`` that reads a tensor
            op ``u`` produces: what crosses the edge at the traced batch, each
            tensor counted once.
        output_tensors: the model's tensor outputs, in ``output_names`` order
            (see :meth:`output_metas`).
        op_index: op name -> index, derived from ``ops`` (not an argument).
    """

    ops: list[Op]
    batch_size: int
    params: dict[str, ParamInfo]
    buffers: dict[str, ParamInfo]
    tied_params: list[list[str]]
    input_names: list[str]
    output_names: list[str]
    dynamic_batch: bool
    edge_bytes: dict[tuple[int, int], int]
    output_tensors: list[TensorMeta]
    op_index: dict[str, int] = field(init=False, compare=False)

    def __post_init__(self) -> None:
        self.op_index = {op.name: op.index for op in self.ops}

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
        return list(self.output_tensors)

    def op_by_name(self, name: str) -> Op:
        """Return the op named ``name``; raises ConfigError if there is none."""
        index = self.op_index.get(name)
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
        for (u, v), nbytes in self.edge_bytes.items():
            g.add_edge(u, v, bytes=nbytes)
        return g

    def fingerprint(self) -> str:
        """A stable hex digest of the graph's structure, shapes and dtypes.

        Equal for two traces of the same model at the same input shapes,
        whatever the parameter values, and for a Graph and its JSON round
        trip; use it as a profile-cache key.
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

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the graph (dtypes by name, edges as ``[u, v, bytes]``)."""
        return {
            "batch_size": self.batch_size,
            "dynamic_batch": self.dynamic_batch,
            "input_names": list(self.input_names),
            "output_names": list(self.output_names),
            "tied_params": [list(g) for g in self.tied_params],
            "params": {fqn: p.to_dict() for fqn, p in self.params.items()},
            "buffers": {fqn: b.to_dict() for fqn, b in self.buffers.items()},
            "ops": [op.to_dict() for op in self.ops],
            "edge_bytes": [[u, v, n] for (u, v), n in self.edge_bytes.items()],
            "output_tensors": [t.to_dict() for t in self.output_tensors],
        }

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Graph:
        """Inverse of :meth:`to_dict`: an equal plain Graph (same fingerprint).

        Raises ConfigError when ``d`` is malformed (a missing key, a wrong
        type, an unknown dtype), naming the problem.
        """
        try:
            return Graph(
                ops=[Op.from_dict(op) for op in d["ops"]],
                batch_size=int(d["batch_size"]),
                params={str(k): ParamInfo.from_dict(v) for k, v in d["params"].items()},
                buffers={str(k): ParamInfo.from_dict(v) for k, v in d["buffers"].items()},
                tied_params=[[str(n) for n in g] for g in d["tied_params"]],
                input_names=[str(n) for n in d["input_names"]],
                output_names=[str(n) for n in d["output_names"]],
                dynamic_batch=bool(d["dynamic_batch"]),
                edge_bytes={(int(u), int(v)): int(n) for u, v, n in d["edge_bytes"]},
                output_tensors=[TensorMeta.from_dict(t) for t in d["output_tensors"]],
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ConfigError(f"malformed graph dict ({e!r}); write it with Graph.to_dict() or Graph.to_json()") from e

    def to_json(self) -> str:
        """Serialise to JSON; :meth:`from_json` gives back an equal Graph."""
        return json.dumps(self.to_dict())

    @staticmethod
    def from_json(text: str) -> Graph:
        """Parse :meth:`to_json` output. Raises ConfigError on malformed input."""
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"graph JSON does not parse: {e}; write it with Graph.to_json()") from e
        return Graph.from_dict(d)
