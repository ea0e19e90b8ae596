"""Per-rank programs of a tensor-parallel split: the traced program rewritten onto one rank's shards.

:func:`build_rank_program` rewrites the exported fx graph of a traced model
by a :class:`~rannc_py.graph.tensor_split.TensorSplit`: parameters are bound
to the rank's shards (:func:`shard_parameters`), size arguments of views,
expands and splits along the split dimension are divided by the degree, and
the group's collectives are inserted as calls to a pluggable
:class:`TensorGroup` (simulated over threads in the tests; MPI in the
runtime). The collectives and their backward follow Megatron-LM (Shoeybi et
al., 2019, fig. 3):

==================  ==========================  ==========================
function            forward                     backward
==================  ==========================  ==========================
copy (``f``)        identity                    allreduce(sum)
reduce (``g``)      allreduce(sum)              identity
gather              allgather, blocks joined    the rank's part
==================  ==========================  ==========================

:func:`rank_program_ir` gives the same rewritten graph as a
:class:`~rannc_py.graph.lowered.Program` (each inserted collective an op of
the op index it serves), so :mod:`rannc_py.graph.staged` cuts it into
pipeline stages as it cuts the traced program.

``reduce``'s identity backward and ``gather``'s slice are right because what
follows them is replicated: every rank computes the same gradient there.
The vocab-parallel embedding and cross-entropy are built from the same
three (a group max for the cross-entropy's stability, which needs no
gradient: the log-sum-exp does not depend on the shift).
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import fx, nn

from rannc_py.graph.lowered import Program
from rannc_py.graph.tensor_random import RandomOp
from rannc_py.graph.tensor_rules import action_shard, aten_name, shard_tensor, unshard
from rannc_py.graph.tensor_split import Shard, TensorSplit


class TensorGroup(Protocol):
    """The collectives of one rank of a tensor group.

    ``rank`` is this rank's index in the group (0..size-1). ``all_reduce``
    returns the element-wise sum (``op="sum"``) or maximum (``op="max"``)
    of every rank's tensor, as a new tensor; ``all_gather`` returns every
    rank's tensor, in rank order. Every rank calls them in the same order.
    """

    rank: int
    size: int

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor: ...

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]: ...


class _Copy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: TensorGroup) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return ctx.group.all_reduce(grad.contiguous()), None


class _Reduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: TensorGroup) -> torch.Tensor:
        return group.all_reduce(x.contiguous())

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: TensorGroup, shard: Shard) -> torch.Tensor:
        ctx.group, ctx.shard = group, shard
        return unshard(group.all_gather(x.contiguous()), shard)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return shard_tensor(grad, ctx.shard, ctx.group.rank, ctx.group.size).contiguous(), None, None


class Collective(nn.Module):
    """One group operation of a rank program, called from the fx graph (``call_module``).

    ``kind`` is ``"copy"``, ``"reduce"``, ``"gather"`` (with ``shard``) or
    ``"narrow"`` (the rank's part of a replicated tensor, with ``shard``; no
    communication).
    """

    def __init__(self, group: TensorGroup, kind: str, shard: Shard | None = None) -> None:
        super().__init__()
        self.group, self.kind, self.shard = group, kind, shard

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "copy":
            return _Copy.apply(x, self.group)
        if self.kind == "reduce":
            return _Reduce.apply(x, self.group)
        assert self.shard is not None
        if self.kind == "gather":
            return _Gather.apply(x, self.group, self.shard)
        return shard_tensor(x, self.shard, self.group.rank, self.group.size)


class RowMatmul(nn.Module):
    """A row-parallel matmul: the rank's partial product, summed over the group, then the bias.

    ``linear`` takes ``(x, w, b)`` with ``w`` (out, in); ``addmm`` ``(b, x, w)``
    and ``mm`` ``(x, w)`` with ``w`` (in, out).
    """

    def __init__(self, group: TensorGroup, kind: str) -> None:
        super().__init__()
        self.group, self.kind = group, kind

    def forward(self, *args: Any) -> torch.Tensor:
        if self.kind == "linear":
            x, w, b = (*args, None)[:3]
            partial = F.linear(x, w)
        else:
            b, x, w = args if self.kind == "addmm" else (None, *args)
            partial = torch.mm(x, w)
        out = _Reduce.apply(partial, self.group)
        return out if b is None else out + b


class VocabEmbedding(nn.Module):
    """An embedding whose table is split over its rows: each rank looks up the ids in its range
    (zeros elsewhere) and the group sums the rows. ``rows`` is the full table's row count."""

    def __init__(self, group: TensorGroup, rows: int) -> None:
        super().__init__()
        self.group, self.rows = group, rows

    def forward(self, weight: torch.Tensor, ids: torch.Tensor, padding_idx: int = -1) -> torch.Tensor:
        local = self.rows // self.group.size
        lo = self.group.rank * local
        outside = (ids < lo) | (ids >= lo + local)
        local_ids = (ids - lo).masked_fill(outside, 0)
        pad = padding_idx - lo if lo <= padding_idx < lo + local else -1
        rows = F.embedding(local_ids, weight, padding_idx=pad if pad >= 0 else None)
        return _Reduce.apply(rows.masked_fill(outside.unsqueeze(-1), 0.0), self.group)


class VocabCrossEntropy(nn.Module):
    """Cross-entropy over logits split on the class dimension (N, C/t), targets replicated.

    loss_i = log sum_c exp(z_ic) - z_i,target with z = logits - max: the max
    is a group max, the sum and the target logit group sums. Reductions
    ``"mean"`` (over targets other than ``ignore_index``), ``"sum"``, ``"none"``.
    """

    def __init__(self, group: TensorGroup) -> None:
        super().__init__()
        self.group = group

    def forward(self, logits: torch.Tensor, target: torch.Tensor, weight: Any = None, reduction: int = 1,
                ignore_index: int = -100, label_smoothing: float = 0.0) -> torch.Tensor:
        local = logits.shape[1]
        lo = self.group.rank * local
        shift = self.group.all_reduce(logits.detach().amax(dim=1), op="max")
        z = logits - shift.unsqueeze(1)
        sum_exp = _Reduce.apply(z.exp().sum(dim=1), self.group)
        valid = target != ignore_index
        mine = valid & (target >= lo) & (target < lo + local)
        picked = z.gather(1, (target - lo).clamp(0, local - 1).unsqueeze(1)).squeeze(1)
        target_logit = _Reduce.apply(torch.where(mine, picked, 0.0), self.group)
        losses = torch.where(valid, sum_exp.log() - target_logit, 0.0)
        if reduction == 0:
            return losses
        return losses.sum() if reduction == 2 else losses.sum() / valid.sum()


def _divided(sizes: Any, dim: int, degree: int, divide: Callable[[fx.Node], fx.Node]) -> Any:
    """A size list with entry ``dim`` divided by the degree (-1 kept; a symbolic entry, e.g. a
    merged batch x heads, divided by ``divide``)."""
    sizes = list(sizes)
    if isinstance(sizes[dim], fx.Node):
        sizes[dim] = divide(sizes[dim])
    elif isinstance(sizes[dim], int) and sizes[dim] != -1:
        sizes[dim] //= degree
    return sizes


def _local_args(node: fx.Node, args: tuple[Any, ...], split: TensorSplit, in_dim: int | None,
                divide: Callable[[fx.Node], fx.Node]) -> tuple[Any, ...]:
    """``args`` of a split op with its size arguments along the split dimension made local."""
    name = aten_name(node)
    out = split.ops[node.name].outputs[0]
    if name in ("view", "reshape", "_unsafe_view", "expand") and out is not None:
        return (args[0], _divided(args[1], out.dim, split.degree, divide), *args[2:])
    if name in ("split", "split_with_sizes") and in_dim is not None:
        ndim = node.args[0].meta["val"].dim()  # type: ignore[union-attr]
        dim = int(args[2]) if len(args) > 2 else 0
        if (dim + ndim if dim < 0 else dim) == in_dim:
            size = args[1]
            local = [s // split.degree for s in size] if isinstance(size, (list, tuple)) else size // split.degree
            return (args[0], local, *args[2:])
    return args


# ops drawing random numbers -> their RandomOp kind (attention draws only with dropout_p > 0)
_RANDOM = {"dropout": "dropout", "scaled_dot_product_attention": "attention"}


class _Rewriter:
    """Copies the program's graph node by node, rewriting what the split changes."""

    def __init__(self, program: Program, split: TensorSplit, group: TensorGroup,
                 generator: torch.Generator | None, part_of: Callable[[fx.Node], int] | None = None) -> None:
        self.prog, self.split, self.group, self.generator = program, split, group, generator
        self.part_of = part_of or (lambda node: 0)
        self.graph = fx.Graph()
        self.root = nn.Module()
        self.env: dict[fx.Node, fx.Node] = {}
        self.done: dict[tuple[Any, ...], fx.Node] = {}  # (source node, action, part) -> its new node
        # an inserted collective -> (the node reading its result, the node it acts on)
        self.inserted: dict[fx.Node, tuple[fx.Node, fx.Node]] = {}
        self.reader: fx.Node | None = None
        self.sizes: list[fx.Node] = []  # symbolic sizes divided by the degree (kind "sym")

    def add(self, module: nn.Module, name: str) -> str:
        target, k = f"tp_{name}", 1
        while hasattr(self.root, target):  # the same collective in two parts
            target, k = f"tp_{name}_{k}", k + 1
        self.root.add_module(target, module)
        return target

    def call(self, module: nn.Module, args: tuple[Any, ...], name: str) -> fx.Node:
        return self.graph.call_module(self.add(module, name), args)

    def action(self, x: fx.Node, act: tuple[Any, ...]) -> fx.Node:
        """The new node of input ``x`` after ``act`` (copy / narrow / gather), made once per input
        and part (see :func:`rank_program_ir`)."""
        assert self.reader is not None
        part = self.part_of(self.reader) if self.reader.op != "output" else self.part_of(x)
        key = (x, *act[:3], act[0] != "copy" and action_shard(act).repeat, part)
        if key in self.done:
            return self.done[key]
        new = self.env[x]
        if act[0] == "copy" or (act[0] == "narrow" and act[3]):
            copy_key = (x, "copy", part)
            if copy_key not in self.done:
                self.done[copy_key] = self._inserted(self.call(Collective(self.group, "copy"), (new,), f"copy_{x.name}"), x)
            new = self.done[copy_key]
        if act[0] in ("narrow", "gather"):
            shard = action_shard(act)
            new = self._inserted(self.call(Collective(self.group, act[0], shard), (new,), f"{act[0]}_{x.name}_{act[1]}"), x)
        self.done[key] = new
        return new

    def _divide(self, size: fx.Node) -> fx.Node:
        """A symbolic size divided by the degree, computed once per size node."""
        key = (size, "divide")
        if key not in self.done:
            new = self.graph.call_function(operator.floordiv, (size, self.split.degree))
            if "val" in size.meta:  # a symbolic size of its own (a stage re-derives it from the inputs)
                new.meta["val"] = size.meta["val"] // self.split.degree
            self.done[key] = new
            self.sizes.append(new)
        return self.done[key]

    def _inserted(self, new: fx.Node, x: fx.Node) -> fx.Node:
        assert self.reader is not None
        new.meta = dict(x.meta)
        self.inserted[new] = (self.reader, x)
        return new

    def mapped(self, node: fx.Node) -> tuple[tuple[Any, ...], dict[str, Any]]:
        acts = self.split.ops[node.name].inputs if node.name in self.split.ops else {}
        self.reader = node
        def arg(x: fx.Node) -> fx.Node:
            return self.action(x, acts[x.name]) if x.name in acts else self.env[x]
        args = fx.node.map_arg(node.args, arg)
        kwargs = fx.node.map_arg(node.kwargs, arg)
        return tuple(args), dict(kwargs)

    def visit(self, node: fx.Node) -> None:
        if node.op == "get_attr":
            setattr(self.root, str(node.target), getattr(self.prog.gm, str(node.target)))
        mode = self.split.mode(node.name)
        args, kwargs = self.mapped(node)
        packet = aten_name(node)
        if mode == "row":
            new = self.call(RowMatmul(self.group, packet), args, node.name)
        elif mode == "vocab_embedding":
            rows = int(node.args[0].meta["val"].shape[0])  # type: ignore[union-attr]
            new = self.call(VocabEmbedding(self.group, rows), args[:3], node.name)
        elif mode == "vocab_cross_entropy":
            new = self.call(VocabCrossEntropy(self.group), args, node.name)
        elif packet in _RANDOM:
            shard = self.split.ops[node.name].outputs[0] if mode == "split" else None
            op = RandomOp(_RANDOM[packet], shard, self.group.rank, self.group.size, self.generator)
            new = self.graph.call_module(self.add(op, node.name), args, kwargs)
        else:
            if mode == "split":
                first = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
                in_shard = self.split.ops[first.name].outputs if first is not None and first.name in self.split.ops else ()
                in_dim = in_shard[0].dim if len(in_shard) == 1 and in_shard[0] is not None else None
                args = _local_args(node, args, self.split, in_dim, self._divide)
            new = self.graph.node_copy(node, lambda x: self.env[x])
            new.args, new.kwargs = args, kwargs
        if new.op == "call_module":
            new.meta = dict(node.meta)
        self.env[node] = new


class RankProgram(nn.Module):
    """One rank's program of a tensor-parallel split.

    Call it with the rank's parameters (``{canonical FQN: tensor}``, from
    :func:`shard_parameters`) and the model's flattened inputs (``{input
    name: tensor}``, from ``TracedGraph.flatten_inputs``); it returns the
    model's flattened outputs in ``Graph.output_names`` order, whole on every
    rank. Buffers are read from the traced model.
    """

    def __init__(self, program: Program, module: fx.GraphModule) -> None:
        super().__init__()
        self.program = program
        self.module = module

    def forward(self, params: Mapping[str, torch.Tensor], inputs: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        prog = self.program
        values: list[Any] = []
        for node in prog.gm.graph.nodes:
            if node.op != "placeholder":
                continue
            kind, source = prog.kind.get(node), prog.source.get(node, "")
            if kind == "param":
                values.append(params[source])
            elif kind == "buffer":
                values.append(prog.model.get_buffer(source))
            elif kind == "const":
                values.append(prog.constants[source])
            else:
                values.append(inputs[source])
        outs = self.module(*values)
        return list(outs[len(outs) - len(prog.user_outputs):])


def build_rank_program(program: Program, split: TensorSplit, group: TensorGroup,
                       generator: torch.Generator | None = None) -> RankProgram:
    """The program rank ``group.rank`` of the tensor group runs under ``split``.

    Takes the traced program (``trace(...).program``), the split from
    :func:`~rannc_py.graph.tensor_split.find_tensor_split`, this rank's
    group (``group.size`` must equal ``split.degree``) and the generator its
    dropout draws from (None: torch's default, which every rank of the group
    must hold in one state; see :mod:`rannc_py.graph.tensor_random`).
    Returns a :class:`RankProgram`; its dropout follows ``train()`` /
    ``eval()``. Raises ValueError on a group of another size.
    """
    if group.size != split.degree:
        raise ValueError(f"the group has {group.size} ranks but the split is for {split.degree}; "
                         "pass a group of the split's degree")
    rw = _Rewriter(program, split, group, generator)
    for node in program.gm.graph.nodes:
        if node.op == "output":
            rw.graph.output(rw.mapped(node)[0][0])
        else:
            rw.visit(node)
    return RankProgram(program, fx.GraphModule(rw.root, rw.graph))


def rank_program_ir(program: Program, split: TensorSplit, group: TensorGroup,
                    generator: torch.Generator | None = None,
                    part_of: Callable[[int], int] | None = None) -> Program:
    """The rank program of :func:`build_rank_program` as a :class:`Program` of its own, to be cut
    into pipeline stages (:func:`rannc_py.graph.staged.build_stages`) like the traced one.

    Every node keeps its kind, source and op index; each inserted collective
    is an ``op`` of the op index of the node that reads it (a model output's
    gather: of the node it gathers), so it runs in that op's stage. The
    parameter placeholders still name the full parameters (canonical FQNs):
    bind the rank's shards (:func:`shard_parameters`) when building a stage.
    ``part_of`` maps an op index to its part (its pipeline stage; default:
    one part): a replicated tensor read by split ops in two parts gets a
    copy (and narrow) in each, so no collective's result crosses a part
    boundary it need not cross. Raises ValueError on a group of another size.
    """
    if group.size != split.degree:
        raise ValueError(f"the group has {group.size} ranks but the split is for {split.degree}; "
                         "pass a group of the split's degree")
    where = part_of or (lambda index: 0)

    def part(node: fx.Node) -> int:
        index = program.op_of.get(node)
        return where(index) if index is not None else -1

    rw = _Rewriter(program, split, group, generator, part)
    old_out = None
    new_values: list[Any] = []
    for node in program.gm.graph.nodes:
        if node.op == "output":
            old_out = node
            new_values = list(rw.mapped(node)[0][0])
            rw.graph.output(tuple(new_values))
        else:
            rw.visit(node)
    gm = fx.GraphModule(rw.root, rw.graph)
    out = dataclasses.replace(program, gm=gm, kind={}, op_of={}, op_nodes=[], source={}, user_outputs=[],
                              mutations=[])
    for old, kind in program.kind.items():
        new = rw.env.get(old)
        if new is None:
            continue
        out.kind[new] = kind
        if old in program.source:
            out.source[new] = program.source[old]
        if old in program.op_of:
            out.op_of[new] = program.op_of[old]
    for new in rw.sizes:
        out.kind[new] = "sym"
    for new, (reader, x) in rw.inserted.items():
        out.kind[new] = "op"
        out.op_of[new] = program.op_of[x if reader is old_out else reader]
    out.op_nodes = [n for n in rw.graph.nodes if out.kind.get(n) == "op"]
    assert old_out is not None
    n_mut = len(new_values) - len(program.user_outputs)
    old_values = list(old_out.args[0])  # type: ignore[arg-type]
    assert all(old_values[i] is v for i, (v, _) in enumerate(program.mutations)), "mutations come first"
    out.mutations = [(new_values[i], fqn) for i, (_, fqn) in enumerate(program.mutations)]
    out.user_outputs = new_values[n_mut:]
    return out


def shard_parameters(program: Program, split: TensorSplit, rank: int) -> dict[str, torch.Tensor]:
    """Rank ``rank``'s parameters: a copy of its shard of each split one, a copy of each replicated one.

    Takes the traced program, the split and the rank (0..degree-1). Returns
    ``{canonical FQN: leaf tensor}`` with ``requires_grad`` as the model's
    parameter. Raises ValueError for a rank outside the group.
    """
    if not 0 <= rank < split.degree:
        raise ValueError(f"rank {rank} is outside a tensor group of {split.degree}; pass 0..{split.degree - 1}")
    out: dict[str, torch.Tensor] = {}
    for node, kind in program.kind.items():
        if kind != "param":
            continue
        fqn = program.source[node]
        full = program.model.get_parameter(fqn)
        shard = split.params.get(fqn)
        local = full.detach() if shard is None else shard_tensor(full.detach(), shard, rank, split.degree)
        out[fqn] = local.clone().requires_grad_(full.requires_grad)
    return out
