"""Cut a traced program into pipeline stages: one ``fx.GraphModule`` per stage.

Boundary rule (what the runtime relies on):

* User inputs are available to every stage directly; a stage lists the ones
  it reads first in ``input_names``, then the activations it receives.
* Stage ``s`` outputs every tensor produced at a stage ``<= s`` (or received
  by it) that a later stage reads, so stage ``s + 1`` receives activations
  from stage ``s`` only. The last stage outputs the model's flattened outputs
  (``Graph.output_names``).
* Symbolic sizes are recomputed in each stage from the user inputs; only
  tensors cross a boundary.
* Buffers updated in forward (BatchNorm running stats) are written in place,
  detached, by the stage that computes the new value.
* An op may be a submodule call (``call_module``, e.g. the tensor group's
  collectives of a rank program, :func:`rannc_py.graph.tensor_program.rank_program_ir`):
  the stage's module holds that submodule.

Backward across stages: run stage ``s`` on received activations that are leaf
tensors with ``requires_grad_()`` (floating point ones), then call
``torch.autograd.backward([outs that require grad], [their gradients from
stage s + 1])`` and send each received activation's ``.grad`` (None: zeros)
back to stage ``s - 1``; the last stage starts from ``loss.backward()``.
Pass-through outputs are the received leaves themselves, so their gradient
from later stages accumulates into the same ``.grad``. In this process,
:class:`StagedModule` simply chains the stages, so one ``backward()`` does
all of this and fills the original model's ``.grad``\\ s.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from rannc_py.errors import ConfigError, PartitionError
from rannc_py.graph import symbolic
from rannc_py.graph.ir import Graph
from rannc_py.graph.lowered import Program

aten = torch.ops.aten


@dataclass
class Stage:
    """One pipeline stage.

    ``module(*tensors)`` takes tensors in ``input_names`` order (the user
    inputs named in ``user_inputs``, then the activations received from the
    previous stage) and returns a tuple in ``output_names`` order. Its
    parameters and buffers are registered under their original FQNs
    (``param_fqns``, ``buffer_fqns``); tied parameters appear under each name
    the stage reads. ``batch_dims`` gives, for every input and output name,
    the dimension that holds the batch's rows (None: the tensor is the same
    for every row), by the rule of the graph's ``TensorMeta.batch_dim``.
    """

    index: int
    op_indices: list[int]
    user_inputs: list[str]
    activation_inputs: list[str]
    output_names: list[str]
    param_fqns: list[str]
    buffer_fqns: list[str]
    module: fx.GraphModule
    batch_dims: dict[str, int | None] = field(default_factory=dict)
    _fx_graph: fx.Graph = field(repr=False, default_factory=fx.Graph)
    _attrs: dict[str, Any] = field(repr=False, default_factory=dict)

    @property
    def input_names(self) -> list[str]:
        """User-input names, then activation names: the order ``module`` takes its arguments in."""
        return self.user_inputs + self.activation_inputs

    def module_with(
        self,
        params: Mapping[str, torch.Tensor],
        buffers: Mapping[str, torch.Tensor],
        constants: Mapping[str, torch.Tensor] | None = None,
    ) -> fx.GraphModule:
        """Build this stage's module bound to other tensors (e.g. on another rank).

        Takes ``params`` (FQN -> ``nn.Parameter``; pass Parameters so they are
        registered as parameters and get ``.grad``), ``buffers`` (FQN ->
        tensor, updated in place if forward mutates them) and optionally
        ``constants`` (lifted tensor constants; default: the traced values).
        Extra keys are ignored. Returns a new GraphModule over its own copy of
        the stage's fx graph; raises ConfigError
        when a tensor the stage needs is missing.
        """
        root: dict[str, Any] = dict(self._attrs)
        missing = [f for f in self.param_fqns if f not in params] + [f for f in self.buffer_fqns if f not in buffers]
        if missing:
            raise ConfigError(f"stage {self.index} needs tensors {missing[:5]} (of {len(missing)} missing)")
        root.update({f: params[f] for f in self.param_fqns})
        root.update({f: buffers[f] for f in self.buffer_fqns})
        if constants:
            root.update({k: v for k, v in constants.items() if k in root})
        # A copy of the graph: a module's graph may be edited (e.g. by a pass) without changing other ones.
        graph = fx.Graph()
        graph.output(graph.graph_copy(self._fx_graph, {}))
        return fx.GraphModule(root, graph, class_name=f"Stage{self.index}")


class StagedModule(nn.Module):
    """A traced graph cut into stages that run one after another in this process.

    Made by :meth:`rannc_py.graph.traced.TracedGraph.split`: ``graph`` is the
    graph it was cut from, ``program`` its traced program, ``assignment`` a
    validated stage per op. Calling it with the model's ``args``/``kwargs``
    returns what the model returns; ``backward()`` on the loss fills the
    original model's parameter gradients (tied parameters get the sum over
    the stages that use them). The stages share the original model's
    Parameter and buffer objects.
    """

    def __init__(self, graph: Graph, program: Program, assignment: list[int]) -> None:
        super().__init__()
        self.graph = graph
        self.program = program
        self.assignment = list(assignment)
        self.stages: list[Stage] = build_stages(program, self.assignment)
        self.stage_modules = nn.ModuleList([s.module for s in self.stages])

    @property
    def num_stages(self) -> int:
        """Number of stages."""
        return len(self.stages)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run every stage in order on the flattened inputs; return the model's output object."""
        values: dict[str, torch.Tensor] = dict(self.program.flatten_inputs(args, kwargs))
        outs: tuple[torch.Tensor, ...] = ()
        for stage in self.stages:
            outs = stage.module(*[values[n] for n in stage.input_names])
            if stage.index < len(self.stages) - 1:
                values.update(zip(stage.output_names, outs))
        return self.program.unflatten_outputs(list(outs))


def _value_nodes_in_order(prog: Program) -> list[fx.Node]:
    return [n for n in prog.gm.graph.nodes if prog.kind.get(n) in ("op", "alias")]


def _arg_nodes(node: fx.Node) -> list[fx.Node]:
    return list(node.all_input_nodes)


class _StagePlanner:
    """Works out, for every stage, which values it receives, recomputes and sends."""

    def __init__(self, prog: Program, assignment: list[int]) -> None:
        self.prog = prog
        self.assignment = assignment
        self.num_stages = max(assignment) + 1
        self.last_use: dict[fx.Node, int] = {}
        self.user_inputs: list[set[str]] = [set() for _ in range(self.num_stages)]
        self.sym_mode: dict[fx.Node, str] = {}  # "const" | "expr" | "copy"

    def stage_of(self, node: fx.Node) -> int:
        return self.assignment[self.prog.op_of[node]]

    def need(self, x: fx.Node, s: int) -> None:
        """Record that stage ``s`` reads node ``x``."""
        kind = self.prog.kind.get(x)
        if kind in ("op", "alias"):
            t = self.stage_of(x)
            if t > s:  # pragma: no cover - resolve_assignment rejects backward edges first
                raise PartitionError(f"value {x.name} is produced at stage {t} but read at stage {s}")
            if t < s:
                self.last_use[x] = max(self.last_use.get(x, s), s)
        elif kind == "input":
            self.user_inputs[s].add(self.prog.source[x])
        elif kind == "sym":
            self.need_sym(x, s)

    def need_sym(self, x: fx.Node, s: int) -> None:
        val = x.meta.get("val")
        if symbolic.constant_value(val) is not None:
            self.sym_mode[x] = "const"
            return
        syms = symbolic.symbols_of(val, self.prog.symbols)
        if syms is not None:
            self.sym_mode[x] = "expr"
            for sym in syms:
                self.user_inputs[s].add(self.prog.symbols[sym][0])
            return
        # Not expressible from the inputs' sizes (e.g. a data-dependent value): recompute it
        # from its own arguments, relaying any tensor it reads.
        self.sym_mode.setdefault(x, "copy")
        for y in _arg_nodes(x):
            self.need(y, s)

    def plan(self) -> None:
        prog = self.prog
        for node in prog.op_nodes:
            s = self.stage_of(node)
            for x in _arg_nodes(node):
                self.need(x, s)
        last = self.num_stages - 1
        for x in prog.user_outputs:
            self.need(x, last)
        for value, fqn in prog.mutations:
            if prog.kind.get(value) not in ("op", "alias"):
                self.need(value, last)
                continue
            t = self.stage_of(value)
            for node in prog.op_nodes:
                reads = any(prog.kind.get(y) == "buffer" and prog.source[y] == fqn for y in _arg_nodes(node))
                if reads and self.stage_of(node) > t:
                    raise PartitionError(
                        f"buffer {fqn!r} is updated at stage {t} but read by {node.name} at stage "
                        f"{self.stage_of(node)}; keep the ops that read and update it in one stage"
                    )

    def boundary(self, b: int) -> list[fx.Node]:
        """Values that cross from stage ``b`` to ``b + 1``, in graph order."""
        return [x for x in _value_nodes_in_order(self.prog) if x in self.last_use and self.stage_of(x) <= b < self.last_use[x]]


def _safe(name: str) -> str:
    return re.sub(r"\W", "_", name)


def build_stages(prog: Program, assignment: list[int]) -> list[Stage]:
    """Build the stages of ``prog`` for a validated assignment (see :meth:`TracedGraph.split`).

    Raises PartitionError when a value cannot be placed (a buffer updated
    before a later stage reads it, or a size that cannot be recomputed).
    """
    planner = _StagePlanner(prog, assignment)
    planner.plan()
    boundaries = [planner.boundary(b) for b in range(planner.num_stages - 1)]
    return [_build_stage(planner, s, boundaries) for s in range(planner.num_stages)]


def _build_stage(planner: _StagePlanner, s: int, boundaries: list[list[fx.Node]]) -> Stage:
    prog = planner.prog
    last = s == planner.num_stages - 1
    g = fx.Graph()
    env: dict[fx.Node, Any] = {}
    attrs: dict[str, Any] = {}
    params: list[str] = []
    buffers: list[str] = []
    user_inputs = [n for n in prog.inputs.names if n in planner.user_inputs[s]]
    received = boundaries[s - 1] if s > 0 else []
    input_node: dict[str, fx.Node] = {}
    for name in user_inputs:
        input_node[name] = g.placeholder(_safe(name))
    for x in received:
        env[x] = g.placeholder(x.name)
        env[x].meta = dict(x.meta)
    for node, kind in prog.kind.items():
        if kind == "input" and prog.source[node] in input_node:
            env[node] = input_node[prog.source[node]]
            env[node].meta = dict(node.meta)
    sym_size: dict[Any, fx.Node] = {}

    def get_attr(x: fx.Node) -> fx.Node:
        kind = prog.kind[x]
        target = prog.source[x] if kind in ("param", "buffer", "const") else str(x.target)
        if target not in attrs:
            if kind == "param":
                attrs[target] = prog.model.get_parameter(target)
                params.append(target)
            elif kind == "buffer":
                attrs[target] = prog.model.get_buffer(target)
                buffers.append(target)
            elif kind == "const":
                attrs[target] = prog.constants[target]
            else:
                attrs[target] = getattr(prog.gm, target)
        node = g.get_attr(target)
        node.meta = dict(x.meta)
        return node

    def symbol_node(sym: Any) -> fx.Node:
        if sym not in sym_size:
            name, dim = prog.symbols[sym]
            sym_size[sym] = g.call_function(aten.sym_size.int, (input_node[name], dim))
        return sym_size[sym]

    def resolve(x: fx.Node) -> Any:
        if x in env:
            return env[x]
        kind = prog.kind.get(x)
        if kind in ("param", "buffer", "const", "attr"):
            env[x] = get_attr(x)
        elif kind == "sym":
            mode = planner.sym_mode.get(x, "copy")
            if mode == "const":
                env[x] = symbolic.constant_value(x.meta.get("val"))
            elif mode == "expr":
                env[x] = symbolic.emit(g, x.meta["val"].node.expr, symbol_node)
            else:
                env[x] = g.node_copy(x, resolve)
        else:  # pragma: no cover - the planner made every other value an input of this stage
            raise PartitionError(f"internal error: stage {s} reads {x.name} ({kind}) which it does not have")
        return env[x]

    op_indices = [i for i, st in enumerate(planner.assignment) if st == s]
    for node in prog.gm.graph.nodes:
        if prog.kind.get(node) in ("op", "alias") and planner.stage_of(node) == s:
            if node.op == "call_module":  # e.g. a tensor group's collective (a rank program's op)
                attrs[str(node.target)] = prog.gm.get_submodule(str(node.target))
            env[node] = g.node_copy(node, resolve)
    for value, fqn in prog.mutations:
        in_stage = planner.stage_of(value) == s if prog.kind.get(value) in ("op", "alias") else last
        if in_stage:
            # Eager modules update running stats in place outside autograd; so does the stage.
            buf = next(n for n in prog.kind if prog.kind[n] == "buffer" and prog.source[n] == fqn)
            target = get_attr(buf)
            new = g.call_function(aten.detach.default, (resolve(value),))
            g.call_function(aten.copy_.default, (target, new))
    if last:
        outputs = prog.user_outputs
        output_names = list(prog.outputs.names)
    else:
        outputs = boundaries[s]
        output_names = [x.name for x in outputs]
    g.output(tuple(resolve(x) for x in outputs))
    batch_dims = _batch_dims(prog, {**{n: input_node[n] for n in user_inputs}, **{x.name: x for x in received}})
    batch_dims.update(_batch_dims(prog, dict(zip(output_names, outputs))))
    g.lint()
    module = fx.GraphModule(attrs, g, class_name=f"Stage{s}")
    return Stage(
        index=s,
        op_indices=op_indices,
        user_inputs=user_inputs,
        activation_inputs=[x.name for x in received],
        output_names=output_names,
        param_fqns=sorted(params),
        buffer_fqns=sorted(buffers),
        module=module,
        batch_dims=batch_dims,
        _fx_graph=g,
        _attrs={k: v for k, v in attrs.items() if k not in params and k not in buffers},
    )


def _batch_dims(prog: Program, nodes: dict[str, fx.Node]) -> dict[str, int | None]:
    """Name -> batch dimension of the tensor each node holds (None for non-tensors and batch-free ones)."""
    out: dict[str, int | None] = {}
    for name, node in nodes.items():
        val = node.meta.get("val")
        # The rule of the graph's TensorMeta.batch_dim, so stages and planner agree.
        out[name] = prog.tensor_meta(val).batch_dim if isinstance(val, torch.Tensor) else None
    return out
