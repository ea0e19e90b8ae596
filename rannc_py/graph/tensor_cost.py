"""What tensor parallelism changes in a graph's costs, as pure data the planner reads.

A :class:`TensorAnnotation` says, for each tensor degree ``t`` the graph
allows (a degree at which :func:`rannc_py.graph.tensor_split.find_tensor_split`
splits something), per op index of the :class:`~rannc_py.graph.ir.Graph`:

* whether the op runs split over the group (each rank does ``1/t`` of its
  FLOPs: column/row-parallel matmuls, the ops between them, a vocab-parallel
  embedding or cross-entropy) or replicated (every rank does all of it);
* the bytes of its outputs that are split (a rank keeps ``1/t`` of them);
* the group collectives it ends with in the forward (the allreduce after a
  row-parallel matmul or a vocab-parallel embedding, the allgather of a split
  model output, a vocab-parallel cross-entropy's three allreduces of one
  value per row) and the backward collective of each replicated floating
  tensor its split ops read (the gradient allreduce of Megatron's ``f``,
  charged on the first op that reads it), each as fixed bytes plus bytes per
  sample at the traced batch;
* which parameters are sharded (a rank holds ``1/t`` of each, and of its
  gradient and optimizer state).

It holds nothing of the traced program: it pickles and round-trips through
:meth:`TensorAnnotation.to_dict` / :meth:`TensorAnnotation.from_dict`, so the
planner (which never imports the program) can read it.
:func:`rannc_py.graph.tensor_annotate.tensor_annotation` makes it from a
traced graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rannc_py.errors import ConfigError

FORWARD_KINDS = ("allreduce", "allgather", "vocab_cross_entropy")
BACKWARD_KINDS = ("grad_allreduce",)


@dataclass(frozen=True)
class GroupCollective:
    """One collective over a tensor group, per microbatch.

    Attributes:
        kind: ``"allreduce"``, ``"allgather"`` (bytes: the gathered, full
            tensor), ``"vocab_cross_entropy"`` (``messages`` allreduces of a
            value per row) or ``"grad_allreduce"`` (backward).
        op: index of the Graph op it belongs to (the op it follows in the
            forward; for ``grad_allreduce`` the first split op reading the
            tensor, whose stage runs it).
        fixed_bytes: bytes that do not scale with the batch.
        per_sample_bytes: bytes per sample.
        messages: how many collectives of ``(fixed + per_sample * rows) / messages`` bytes each.
    """

    kind: str
    op: int
    fixed_bytes: float
    per_sample_bytes: float
    messages: int = 1

    @property
    def backward(self) -> bool:
        """Whether it runs in the backward pass."""
        return self.kind in BACKWARD_KINDS

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {"kind": self.kind, "op": self.op, "fixed_bytes": self.fixed_bytes,
                "per_sample_bytes": self.per_sample_bytes, "messages": self.messages}


@dataclass(frozen=True)
class DegreeCosts:
    """The split of one tensor degree in cost terms (see the module docstring).

    Attributes:
        degree: the tensor group's size t.
        split_ops: op indices that run split (``1/t`` of their FLOPs per rank), ascending.
        split_bytes: ``(op index, bytes)`` of each op's outputs that are split, at the traced batch.
        collectives: the group collectives, in program order.
        sharded_params: canonical FQNs of the parameters sharded over the group, sorted.
    """

    degree: int
    split_ops: tuple[int, ...]
    split_bytes: tuple[tuple[int, int], ...]
    collectives: tuple[GroupCollective, ...]
    sharded_params: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {"degree": self.degree, "split_ops": list(self.split_ops),
                "split_bytes": [list(x) for x in self.split_bytes],
                "collectives": [c.to_dict() for c in self.collectives],
                "sharded_params": list(self.sharded_params)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DegreeCosts:
        """Inverse of :meth:`to_dict`; raises KeyError/TypeError/ValueError on a malformed dict."""
        return cls(degree=int(d["degree"]), split_ops=tuple(int(i) for i in d["split_ops"]),
                   split_bytes=tuple((int(i), int(n)) for i, n in d["split_bytes"]),
                   collectives=tuple(GroupCollective(kind=str(c["kind"]), op=int(c["op"]),
                                                     fixed_bytes=float(c["fixed_bytes"]),
                                                     per_sample_bytes=float(c["per_sample_bytes"]),
                                                     messages=int(c["messages"])) for c in d["collectives"]),
                   sharded_params=tuple(str(f) for f in d["sharded_params"]))


@dataclass(frozen=True)
class TensorAnnotation:
    """Per allowed tensor degree, what tensor parallelism changes in a graph's costs.

    Attributes:
        graph_fingerprint: :meth:`Graph.fingerprint` of the graph it was made for.
        degrees: one :class:`DegreeCosts` per allowed degree, ascending
            (degrees at which nothing splits are absent).
        tried: the degrees that were tried (allowed or not).
    """

    graph_fingerprint: str
    degrees: tuple[DegreeCosts, ...]
    tried: tuple[int, ...] = ()

    @property
    def allowed(self) -> tuple[int, ...]:
        """The tensor degrees the graph allows (1, no split, is always allowed and not listed)."""
        return tuple(d.degree for d in self.degrees)

    def at(self, degree: int) -> DegreeCosts:
        """The costs of ``degree``; raises ConfigError naming the allowed degrees when it is not one."""
        for d in self.degrees:
            if d.degree == degree:
                return d
        raise ConfigError(f"tensor degree {degree} splits nothing in this graph; the allowed degrees are "
                          f"{[1, *self.allowed]} (tried {list(self.tried)})")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {"graph_fingerprint": self.graph_fingerprint, "tried": list(self.tried),
                "degrees": [d.to_dict() for d in self.degrees]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TensorAnnotation:
        """Inverse of :meth:`to_dict`. Raises ConfigError on a malformed dict."""
        try:
            return cls(graph_fingerprint=str(d["graph_fingerprint"]), tried=tuple(int(t) for t in d["tried"]),
                       degrees=tuple(DegreeCosts.from_dict(x) for x in d["degrees"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"malformed tensor annotation dict ({e!r}); write it with "
                              "TensorAnnotation.to_dict()") from e
