"""Tensor parallelism found in the traced graph: which ops run split across a tensor group.

:func:`find_tensor_split` propagates a split along one tensor dimension
through the exported ATen program of a model, Megatron-style (Shoeybi et
al., "Megatron-LM", 2019, section 3), deciding from the ops, shapes and
dataflow only -- never from module or class names:

* A *column-parallel* matmul reads a replicated input with its weight split
  on the output features; its result is split on the last dimension.
* Element-wise ops, views and reshapes that factor the split dimension into
  heads x head_dim (the split goes to the heads), transposes, flattens,
  splits, chunks, slices, concatenations and stacks along other dimensions,
  reductions over other dimensions, scaled-dot-product attention over heads
  and batched matmuls over them (attention written out as ``q @ k^T`` and
  ``@ v``) keep the split. A replicated
  operand of such an op is *narrowed* to the rank's part where it does not
  broadcast along the split dimension.
* A *row-parallel* matmul reads a tensor split on its input features: its
  result is a partial sum, completed by an allreduce over the group.
* A fused projection whose result is ``split`` along the split dimension
  (GPT-2's ``c_attn`` giving q, k and v) gets a *blocked* weight shard: each
  rank takes its part of every chunk, so that every chunk stays split.
* An embedding table indexed by data from a model input, with more rows than
  columns and rows divisible by the degree, is split over its rows (the
  vocabulary): each rank looks up the ids in its range, an allreduce sums the
  rows. A cross-entropy over logits split on the class dimension is computed
  vocab-parallel (group max, sum of exponentials, target logit).
* A split model output is allgathered.

A column-parallel matmul is only kept when everything its split reaches is
one of the above: when the split would reach any other op (a layer norm over
the split features, a sort, a symbolic size of the split dimension...), that
matmul is taken back and its region stays replicated on every rank -- always
correct, only slower. The propagation restarts after each such decision
until none is needed (each restart removes a candidate, so it ends).

The backward needs one more collective (Megatron's ``f``): a replicated
floating tensor read by an op whose result is split gets an identity whose
backward allreduces the gradient, because each rank computes only its part
of that tensor's gradient. :class:`TensorSplit` lists it as a ``copy`` input.

Dropout (element-wise) and attention with dropout keep the split; the rank
programs draw eager's masks in both regions
(:mod:`rannc_py.graph.tensor_random`). Other random ops are not split.

The result is pure data keyed by fx node names (the Graph's op names, plus
the ``getitem`` aliases of multi-output ops);
:mod:`rannc_py.graph.tensor_program` builds the per-rank programs from it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

import torch
from torch import fx

from rannc_py.errors import ConfigError
from rannc_py.graph.lowered import Program
from rannc_py.graph.tensor_rules import (
    ELEMENTWISE,
    RULES,
    Restart,
    Shard,
    SplitValue,
    args_of,
    aten_name,
    elementwise,
    kwargs_of,
    nodes_in,
)


@dataclass(frozen=True)
class OpSplit:
    """What one node does under the split.

    ``mode``: ``"column"`` / ``"row"`` (a parallel matmul), ``"vocab_embedding"``,
    ``"vocab_cross_entropy"``, ``"split"`` (the op runs on its inputs' parts,
    unchanged but for size arguments) or ``"gather"`` (the model output node,
    allgathering its split values). ``outputs``: the shard of each tensor the
    node returns (None: replicated). ``inputs``: per input node name, what is
    done to it first -- ``("copy",)`` (identity, gradient allreduced),
    ``("narrow", dim, blocks, floating, repeat)`` (the rank's part of a
    replicated tensor, cut as ``Shard(dim, blocks, repeat)``, after a copy
    when ``floating``) or, on the output node, ``("gather", dim, blocks, repeat)``
    (:func:`action_shard`).
    """

    mode: str
    outputs: tuple[Shard | None, ...]
    inputs: dict[str, tuple[Any, ...]] = field(default_factory=dict)


@dataclass(kw_only=True)
class TensorSplit:
    """The split of a traced program over a tensor group of ``degree`` ranks.

    Attributes:
        degree: the tensor group's size.
        ops: node name -> :class:`OpSplit` for every node that runs split or
            differently from the original (the rest runs replicated, as traced).
        params: canonical parameter FQN -> its :class:`Shard` (absent: replicated).
        rejected: the matmuls that could have been column-parallel but were
            left replicated, with the reason.
    """

    degree: int
    ops: dict[str, OpSplit]
    params: dict[str, Shard]
    rejected: dict[str, str]

    def mode(self, name: str) -> str:
        """The mode of node ``name`` (``"replicated"`` when it is not split)."""
        op = self.ops.get(name)
        return "replicated" if op is None else op.mode

    def collectives(self) -> list[tuple[str, str]]:
        """``(kind, node name)`` of every group collective in the forward, in program order.

        Kinds: ``"allreduce"`` (a row-parallel matmul or a vocab-parallel
        embedding completing its partial sum), ``"allgather"`` (a split model
        output), ``"vocab_cross_entropy"`` (its max and sum allreduces) and
        ``"grad_allreduce"`` (a ``copy`` input: the collective runs in backward).
        """
        kinds = {"row": "allreduce", "vocab_embedding": "allreduce", "gather": "allgather",
                 "vocab_cross_entropy": "vocab_cross_entropy"}
        out: list[tuple[str, str]] = []
        copied: set[str] = set()  # one backward allreduce per replicated value, however many split ops read it
        for name, op in self.ops.items():
            for src, act in op.inputs.items():
                if (act[0] == "copy" or (act[0] == "narrow" and act[3])) and src not in copied:
                    copied.add(src)
                    out.append(("grad_allreduce", src))
            if op.mode in kinds:
                out.append((kinds[op.mode], name))
        return out

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (shards as ``{"dim", "blocks"}``)."""
        return {
            "degree": self.degree,
            "params": {k: s.to_dict() for k, s in self.params.items()},
            "ops": {k: {"mode": o.mode, "outputs": [None if s is None else s.to_dict() for s in o.outputs],
                        "inputs": {n: list(a) for n, a in o.inputs.items()}} for k, o in self.ops.items()},
            "rejected": dict(self.rejected),
        }


@dataclass
class _State:
    """Decisions that survive a restart."""

    rejected: dict[str, str] = field(default_factory=dict)
    blocks: dict[str, tuple[int, ...]] = field(default_factory=dict)


def find_tensor_split(program: Program, degree: int) -> TensorSplit:
    """Decide which ops of a traced program run split over a tensor group of ``degree`` ranks.

    Takes a traced model's program (``trace(model, ...).program``) and the
    group size (an int >= 1; 1 splits nothing). Returns the
    :class:`TensorSplit`: every op's mode, the parameter shards and the
    matmuls left replicated with the reason. Raises ConfigError for a degree
    below 1.
    """
    if not isinstance(degree, int) or degree < 1:
        raise ConfigError(f"the tensor degree must be an int >= 1, got {degree!r}; pass e.g. 2")
    state = _State()
    if degree == 1:
        return TensorSplit(degree=1, ops={}, params={}, rejected={})
    while True:
        try:
            return _Pass(program, degree, state).run()
        except Restart:
            continue


class _Pass:
    """One propagation over the program, in topological order."""

    def __init__(self, program: Program, degree: int, state: _State) -> None:
        self.prog = program
        self.t = degree
        self.state = state
        self.value: dict[fx.Node, SplitValue | list[SplitValue | None] | None] = {}
        self.ops: dict[str, OpSplit] = {}
        self.param_uses: dict[str, list[tuple[Shard | None, frozenset[str]]]] = {}

    # -- the walk --------------------------------------------------------------------------------

    def run(self) -> TensorSplit:
        for node in self.prog.gm.graph.nodes:
            kind = self.prog.kind.get(node)
            if node.op == "output":
                self.output(node)
            elif kind == "alias":
                src = self.value.get(args_of(node)[0])
                piece = src[args_of(node)[1]] if isinstance(src, list) else None
                self.value[node] = piece
                if piece is not None:  # listed, so that the ops reading it see its shard
                    self.ops[node.name] = OpSplit(mode="split", outputs=(piece.shard,))
            elif kind in ("op", "sym"):
                self.visit(node, kind)
        params = self.check_params()
        return TensorSplit(degree=self.t, ops=self.ops, params=params, rejected=dict(self.state.rejected))

    def visit(self, node: fx.Node, kind: str) -> None:
        split_inputs = [x for x in self.tensor_inputs(node) if self.split_of(x) is not None]
        name = aten_name(node)
        if kind == "sym" or not isinstance(node.target, torch._ops.OpOverload):
            for x in nodes_in(node):
                self.use_param(x, None, frozenset())
            if split_inputs:
                self.reject(split_inputs, f"{node.name} ({node.target}) reads a split tensor")
            return
        if name in ("linear", "addmm", "mm") and self.matmul(node, name):
            return
        if name == "embedding" and self.embedding(node):
            return
        if name == "cross_entropy_loss" and self.cross_entropy(node):
            return
        for x in self.tensor_inputs(node):
            self.use_param(x, None, frozenset())
        if not split_inputs:
            return
        rule = RULES.get(name) or (elementwise if name in ELEMENTWISE else None)
        result = rule(self, node) if rule is not None else None
        if result is None:
            # Inputs split differently: keep the first operand's split, take back the others'.
            first = self.split_of(split_inputs[0])
            assert first is not None
            others = [x for x in split_inputs if (s := self.split_of(x)) is not None and s.shard != first.shard]
            self.reject(others or split_inputs, f"{node.name} ({node.target}) cannot run on a split tensor")
        self.record(node, "split", result)

    def output(self, node: fx.Node) -> None:
        splits = {x.name: s.shard for x in self.tensor_inputs(node) if (s := self.split_of(x)) is not None}
        if splits:
            self.ops[node.name] = OpSplit(mode="gather", outputs=(),
                                          inputs={n: ("gather", s.dim, s.blocks, s.repeat) for n, s in splits.items()})

    # -- helpers ---------------------------------------------------------------------------------

    def tensor_inputs(self, node: fx.Node) -> list[fx.Node]:
        seen: dict[fx.Node, None] = {}
        for x in nodes_in(node):
            if isinstance(x.meta.get("val"), torch.Tensor):
                seen[x] = None
        return list(seen)

    def split_of(self, x: Any) -> SplitValue | None:
        v = self.value.get(x) if isinstance(x, fx.Node) else None
        return v if isinstance(v, SplitValue) else None

    def shape(self, x: Any) -> tuple[int, ...]:
        return self.prog.tensor_meta(x.meta["val"]).shape

    def reject(self, inputs: Sequence[fx.Node], reason: str) -> NoReturn:
        seeds = frozenset().union(*(s.seeds for x in inputs if (s := self.split_of(x)) is not None))
        self.reject_seeds(seeds, reason)

    def reject_seeds(self, seeds: frozenset[str], reason: str) -> NoReturn:
        if not seeds - self.state.rejected.keys():
            raise RuntimeError(f"tensor split: nothing left to reject for {reason}")  # would loop forever
        for seed in seeds:
            self.state.rejected.setdefault(seed, reason)
        raise Restart

    def record(self, node: fx.Node, mode: str, result: tuple[Any, dict[str, tuple[Any, ...]]]) -> None:
        out, inputs = result
        self.value[node] = out
        outs = tuple(s.shard if s else None for s in out) if isinstance(out, list) else (out.shard if out else None,)
        self.ops[node.name] = OpSplit(mode=mode, outputs=outs, inputs=inputs)

    def use_param(self, x: Any, shard: Shard | None, seeds: frozenset[str]) -> None:
        if isinstance(x, fx.Node) and self.prog.kind.get(x) == "param":
            self.param_uses.setdefault(self.prog.source[x], []).append((shard, seeds))

    def check_params(self) -> dict[str, Shard]:
        """Every parameter's uses agree on one shard (a tied weight stays tied); else restart without them."""
        params: dict[str, Shard] = {}
        for fqn, uses in self.param_uses.items():
            shards = {s for s, _ in uses}
            if len(shards) > 1:
                seeds = frozenset().union(*(seeds for s, seeds in uses if s is not None))
                self.reject_seeds(seeds, f"parameter {fqn} would be split differently by its uses: {shards}")
            shard = next(iter(shards))
            if shard is not None:
                params[fqn] = shard
        return params

    def narrow_inputs(self, node: fx.Node, operands: dict[fx.Node, int | None],
                      like: Shard) -> dict[str, tuple[Any, ...]] | None:
        """Actions for the replicated tensor inputs of an op whose result is split as ``like``: copy
        each floating one, narrow the ones given a dim (cut as ``like``: plain or repeated; None
        when a blocked shard would need it)."""
        blocks = like.blocks
        inputs: dict[str, tuple[Any, ...]] = {}
        for x, dim in operands.items():
            if self.split_of(x) is not None:
                continue
            if dim is not None and len(blocks) > 1:
                return None
            floating = x.meta["val"].is_floating_point()
            if dim is not None:
                cut = like.blocks if like.repeat else (self.shape(x)[dim],)
                inputs[x.name] = ("narrow", dim, cut, floating, like.repeat)
            elif floating:
                inputs[x.name] = ("copy",)
        return inputs

    # -- seeds: matmuls with a weight parameter, embeddings ------------------------------------

    def matmul(self, node: fx.Node, name: str) -> bool:
        """Column, row or pass-through rule of a matmul by a weight parameter; False if it is none."""
        x, w, b = _matmulargs_of(node, name)
        if not (isinstance(w, fx.Node) and self.prog.kind.get(w) == "param") or kwargs_of(node):
            return False
        w_out, w_in = (0, 1) if name == "linear" else (1, 0)
        xs = self.split_of(x)
        ndim = len(self.shape(node))
        if xs is None:
            return self.column(node, x, w, b, w_out)
        if xs.shard.dim == ndim - 1 and xs.shard.plain:
            shard = Shard(dim=w_in, blocks=(self.shape(w)[w_in],))
            self.use_param(w, shard, xs.seeds)
            self.use_param(b, None, frozenset())
            self.value[node] = None
            self.ops[node.name] = OpSplit(mode="row", outputs=(None,))
            return True
        if xs.shard.dim < ndim - 1:  # split on a batch-like dim: the weight applies whole
            for p in (w, b):
                self.use_param(p, None, frozenset())
            inputs = self.narrow_inputs(node, {p: None for p in (w, b) if isinstance(p, fx.Node)}, xs.shard)
            self.record(node, "split", (xs, inputs or {}))
            return True
        return False

    def column(self, node: fx.Node, x: Any, w: fx.Node, b: Any, w_out: int) -> bool:
        n = self.shape(w)[w_out]
        blocks = self.state.blocks.get(node.name, (n,))
        if node.name in self.state.rejected or any(size % self.t for size in blocks):
            for p in (w, b):
                self.use_param(p, None, frozenset())
            return True
        shard = Shard(dim=w_out, blocks=blocks)
        seeds = frozenset({node.name})
        self.use_param(w, shard, seeds)
        self.use_param(b, Shard(dim=0, blocks=blocks), seeds)
        out = SplitValue(Shard(dim=len(self.shape(node)) - 1, blocks=blocks), seeds)
        self.record(node, "column", (out, {x.name: ("copy",)} if isinstance(x, fx.Node) else {}))
        return True

    def embedding(self, node: fx.Node) -> bool:
        """Vocab-parallel rule of an embedding of a parameter table by ids from a model input."""
        w, ids = args_of(node)[0], args_of(node)[1]
        if not (isinstance(w, fx.Node) and self.prog.kind.get(w) == "param" and isinstance(ids, fx.Node)):
            return False
        rows, cols = self.shape(w)
        key = node.name
        if self.split_of(ids) is not None or key in self.state.rejected:
            return False
        by_freq = len(args_of(node)) > 3 and bool(args_of(node)[3])  # counts would be per rank's range
        if rows % self.t or rows <= cols or by_freq or not _reads_input(ids, self.prog):
            self.use_param(w, None, frozenset())
            return True
        self.use_param(w, Shard(dim=0, blocks=(rows,)), frozenset({key}))
        self.value[node] = None
        self.ops[node.name] = OpSplit(mode="vocab_embedding", outputs=(None,))
        return True

    def cross_entropy(self, node: fx.Node) -> bool:
        """Vocab-parallel rule of a cross-entropy over logits split on the class dimension."""
        logits, target, *rest = args_of(node)
        xs = self.split_of(logits)
        weight = rest[0] if rest else kwargs_of(node).get("weight")
        smoothing = rest[3] if len(rest) > 3 else kwargs_of(node).get("label_smoothing", 0.0)
        if xs is None or len(self.shape(logits)) != 2 or xs.shard.dim != 1 or not xs.shard.plain:
            return False
        if weight is not None or smoothing or self.split_of(target) is not None:
            return False
        self.value[node] = None
        self.ops[node.name] = OpSplit(mode="vocab_cross_entropy", outputs=(None,))
        return True


def _matmulargs_of(node: fx.Node, name: str) -> tuple[Any, Any, Any]:
    """(input, weight, bias) of ``linear(x, w, b)``, ``addmm(b, x, w)`` or ``mm(x, w)``."""
    args = list(args_of(node))
    if name == "linear":
        return args[0], args[1], args[2] if len(args) > 2 else None
    if name == "addmm":
        return args[1], args[2], args[0]
    return args[0], args[1], None


def _reads_input(node: fx.Node, program: Program) -> bool:
    """Whether a model input is among the values ``node`` is computed from."""
    stack, seen = [node], set()
    while stack:
        x = stack.pop()
        if x in seen:
            continue
        seen.add(x)
        if program.kind.get(x) == "input":
            return True
        stack.extend(nodes_in(x))
    return False

