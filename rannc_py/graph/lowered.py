"""Turn a ``torch.export`` program into the Graph IR and the program that runs it.

Every fx node of the exported graph gets a *kind*:

``input``   a user tensor input (placeholder)
``param``   a parameter, ``buffer`` a buffer, ``const`` a lifted constant
``op``      a call that returns tensors: one :class:`~rannc_py.graph.ir.Op`
``alias``   ``getitem`` picking one tensor out of a multi-output op
``sym``     a symbolic or Python scalar (a shape, a size product); stages
            recompute these, they never cross a boundary
``attr``    a ``get_attr`` (the body of a higher-order op)
``drop``    a runtime check returning None (``_assert_tensor_metadata``...)

:func:`lower` returns the pure-data :class:`~rannc_py.graph.ir.Graph` and a
:class:`Program`: the exported fx module and the model, with that
classification, which :mod:`rannc_py.graph.staged` cuts into stage modules.

The batch dimension of a tensor (``TensorMeta.batch_dim``) follows one rule,
:meth:`Program.tensor_meta`: with a dynamic batch, the first dimension whose
size depends on the *batch symbol* (dim 0 of the first user input whose dim 0
is symbolic); with a static one, a leading dimension of the batch's size.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import sympy
import torch
import torch.utils._pytree as pytree
from torch import fx
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, OutputKind

from rannc_py.errors import TraceError
from rannc_py.graph.flops import op_flops
from rannc_py.graph.ir import Graph, Op, ParamInfo, TensorMeta, canonical_names
from rannc_py.graph.layout import InputLayout, OutputLayout


@dataclass
class Program:
    """The exported program of a traced model, each fx node classified.

    ``gm`` is the exported fx module, ``model`` the user model whose
    Parameter and buffer objects the stages bind, ``inputs`` / ``outputs``
    the flattening of the model's call and result. ``batch_symbol`` is the
    batch dimension's size symbol (None for a static trace) and ``dynamic``
    whether the stages run at any batch size.
    """

    gm: fx.GraphModule
    model: torch.nn.Module
    inputs: InputLayout
    outputs: OutputLayout
    prefix: str  # the wrapper's attribute holding the user model, stripped from names
    batch_size: int
    dynamic: bool
    batch_symbol: sympy.Symbol | None = None
    kind: dict[fx.Node, str] = field(default_factory=dict)
    op_of: dict[fx.Node, int] = field(default_factory=dict)
    op_nodes: list[fx.Node] = field(default_factory=list)
    source: dict[fx.Node, str] = field(default_factory=dict)  # placeholder -> input name / FQN / const key
    user_outputs: list[fx.Node] = field(default_factory=list)
    mutations: list[tuple[fx.Node, str]] = field(default_factory=list)  # (new value, buffer FQN)
    symbols: dict[sympy.Symbol, tuple[str, int]] = field(default_factory=dict)  # symbol -> (input, dim)
    constants: dict[str, torch.Tensor] = field(default_factory=dict)

    def strip(self, name: str) -> str:
        """Remove the wrapper prefix from an FQN or module path."""
        if name == self.prefix:
            return ""
        return name[len(self.prefix) + 1 :] if name.startswith(self.prefix + ".") else name

    def tensor_meta(self, val: torch.Tensor) -> TensorMeta:
        """The :class:`TensorMeta` of a node's example value ``val`` (see the module docstring)."""
        shape = tuple(_hint(d) for d in val.shape)
        batch_dim = None
        if self.dynamic:
            batch_dim = next((i for i, d in enumerate(val.shape)
                              if isinstance(d, torch.SymInt) and self.batch_symbol in d.node.expr.free_symbols), None)
        elif shape and shape[0] == self.batch_size:
            # A static trace has no symbol to follow: assume a leading batch-sized dim is the batch.
            batch_dim = 0
        nbytes = math.prod(shape) * val.element_size()
        return TensorMeta(shape=shape, dtype=val.dtype, nbytes=nbytes, batch_dim=batch_dim)

    def flatten_inputs(self, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None) -> dict[str, torch.Tensor]:
        """Flatten a call's ``args``/``kwargs`` into ``{input name: tensor}``; raises ConfigError
        when the structure or a constant differs from the traced call."""
        return self.inputs.flatten(tuple(args), dict(kwargs or {}))

    def unflatten_outputs(self, values: Sequence[torch.Tensor]) -> Any:
        """Rebuild the model's output object from its tensors in output-name order; raises
        ConfigError on a wrong count."""
        return self.outputs.unflatten(list(values))


def _hint(d: Any) -> int:
    if isinstance(d, int):
        return d
    hint = d.node.hint
    if hint is None:
        hint = d.node.shape_env.size_hint(d.node.expr, allow_none=True)
    # Unbacked sizes (data-dependent) have no example value; 1 keeps estimates finite.
    return int(hint) if hint is not None else 1


def _tensors_in(val: Any) -> list[torch.Tensor]:
    if isinstance(val, torch.Tensor):
        return [val]
    if isinstance(val, (list, tuple)):
        return [v for v in val if isinstance(v, torch.Tensor)]
    return []


def _module_path(node: fx.Node, program: Program) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    if path.startswith("_empty_nn_module_stack"):
        return ""
    return program.strip(path)


def _classify_placeholders(ep: ExportedProgram, program: Program, tied: list[list[str]]) -> None:
    nodes = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    # Every use of a tied parameter is named after its first FQN, as model.named_parameters() lists it.
    canonical = canonical_names(tied)
    user_index = 0
    for spec in ep.graph_signature.input_specs:
        node = nodes[spec.arg.name] if hasattr(spec.arg, "name") else None
        if spec.kind == InputKind.USER_INPUT:
            names = program.inputs.names
            name = names[user_index] if user_index < len(names) else None
            user_index += 1
            if node is None or name is None:
                continue
            program.kind[node], program.source[node] = "input", name
        elif node is None:
            continue
        elif spec.kind == InputKind.PARAMETER:
            fqn = program.strip(spec.target)
            program.kind[node], program.source[node] = "param", canonical.get(fqn, fqn)
        elif spec.kind == InputKind.BUFFER:
            program.kind[node], program.source[node] = "buffer", program.strip(spec.target)
        elif spec.kind == InputKind.CONSTANT_TENSOR:
            key = program.strip(spec.target)
            program.kind[node], program.source[node] = "const", key
            program.constants[key] = ep.constants[spec.target]
        else:
            raise TraceError(
                f"the traced program has an input of kind {spec.kind.name} ({spec.arg}); rannc_py supports "
                "tensor inputs, parameters, buffers and tensor constants only"
            )


def _classify_calls(ep: ExportedProgram, program: Program) -> None:
    for node in ep.graph.nodes:
        if node.op != "call_function":
            if node.op == "get_attr":
                program.kind[node] = "attr"
            continue
        val = node.meta.get("val")
        src = node.args[0] if node.args else None
        if node.target is operator.getitem and isinstance(src, fx.Node) and program.kind.get(src) == "op":
            program.kind[node] = "alias"
            program.op_of[node] = program.op_of[src]
        elif _tensors_in(val):
            program.kind[node] = "op"
            program.op_of[node] = len(program.op_nodes)
            program.op_nodes.append(node)
        elif val is None and not node.users:
            program.kind[node] = "drop"
        else:
            program.kind[node] = "sym"


def _classify_outputs(ep: ExportedProgram, program: Program) -> None:
    out_node = next(n for n in ep.graph.nodes if n.op == "output")
    values = list(out_node.args[0])
    for spec, value in zip(ep.graph_signature.output_specs, values):
        if spec.kind == OutputKind.USER_OUTPUT:
            if not isinstance(value, fx.Node):
                raise TraceError(f"the model returns a constant {value!r} where a tensor was expected")
            program.user_outputs.append(value)
        elif spec.kind == OutputKind.BUFFER_MUTATION:
            program.mutations.append((value, program.strip(spec.target)))
        elif spec.kind == OutputKind.USER_INPUT_MUTATION:
            raise TraceError(
                f"forward mutates its input {spec.target!r} in place; rannc_py cannot split such a model. "
                "Clone the input inside forward before modifying it"
            )
        else:
            raise TraceError(f"unsupported output of kind {spec.kind.name} in the traced program")


def _find_symbols(program: Program) -> None:
    """Record which input dimension defines each size symbol, and the batch symbol."""
    for node, kind in program.kind.items():
        if kind != "input":
            continue
        for dim, size in enumerate(getattr(node.meta.get("val"), "shape", ())):
            if isinstance(size, torch.SymInt) and isinstance(size.node.expr, sympy.Symbol):
                program.symbols.setdefault(size.node.expr, (program.source[node], dim))
                if dim == 0 and program.batch_symbol is None:
                    program.batch_symbol = size.node.expr
    program.dynamic = program.dynamic and program.batch_symbol is not None


def _build_op(program: Program, index: int, node: fx.Node, edge_bytes: dict[tuple[int, int], int]) -> Op:
    """The :class:`Op` of op node ``node``; adds the bytes of the edges into it to ``edge_bytes``."""
    op = Op(index=index, name=node.name, target=str(node.target), module_path=_module_path(node, program))
    shapes: list[tuple[int, ...]] = []
    seen_values: set[fx.Node] = set()
    for x in pytree.tree_leaves((node.args, node.kwargs)):
        if not isinstance(x, fx.Node):
            continue
        xkind = program.kind.get(x)
        xval = x.meta.get("val")
        if isinstance(xval, torch.Tensor):
            shapes.append(tuple(_hint(d) for d in xval.shape))
        if x in seen_values:
            continue
        seen_values.add(x)
        if xkind == "param":
            op.params.append(program.source[x])
        elif xkind == "buffer":
            op.buffers.append(program.source[x])
        elif xkind in ("input", "op", "alias") and isinstance(xval, torch.Tensor):
            meta = program.tensor_meta(xval)
            op.inputs.append(meta)
            if xkind == "input":
                op.user_inputs.append(program.source[x])
            else:
                src = program.op_of[x]
                if src not in op.input_ops:
                    op.input_ops.append(src)
                edge_bytes[(src, index)] = edge_bytes.get((src, index), 0) + meta.nbytes
    op.outputs = [program.tensor_meta(t) for t in _tensors_in(node.meta.get("val"))]
    out_shape = op.outputs[0].shape if op.outputs else None
    op.flops = op_flops(node.target, shapes, out_shape, node.args)
    return op


def _param_infos(program: Program) -> tuple[dict[str, ParamInfo], dict[str, ParamInfo]]:
    """The parameters and the buffers the graph reads, FQN -> :class:`ParamInfo`."""
    params: dict[str, ParamInfo] = {}
    buffers: dict[str, ParamInfo] = {}
    for node, kind in program.kind.items():
        # Unused placeholders (the second name of a tied parameter, unused weights) are left out.
        if kind in ("param", "buffer") and node.users:
            fqn = program.source[node]
            t = program.model.get_parameter(fqn) if kind == "param" else program.model.get_buffer(fqn)
            info = ParamInfo(shape=tuple(t.shape), dtype=t.dtype, nbytes=t.numel() * t.element_size())
            (params if kind == "param" else buffers)[fqn] = info
    return params, buffers


def lower(ep: ExportedProgram, model: torch.nn.Module, prefix: str, inputs: InputLayout,
          outputs: OutputLayout, batch_size: int, dynamic: bool) -> tuple[Graph, Program]:
    """Build the :class:`Graph` and the :class:`Program` of an exported wrapper around ``model``.

    Takes the exported program, the user model, the wrapper attribute name
    ``prefix`` under which the model was held, the input/output layouts, the
    traced batch size and whether the batch dim was exported as dynamic.
    Returns the pure-data graph and the program that runs it. Raises
    TraceError for programs using features the stages cannot run.
    """
    program = Program(gm=ep.graph_module, model=model, inputs=inputs, outputs=outputs, prefix=prefix,
                      batch_size=batch_size, dynamic=dynamic)
    tied = tied_groups(model)
    _classify_placeholders(ep, program, tied)
    _classify_calls(ep, program)
    _classify_outputs(ep, program)
    _find_symbols(program)

    edge_bytes: dict[tuple[int, int], int] = {}
    ops = [_build_op(program, index, node, edge_bytes) for index, node in enumerate(program.op_nodes)]
    for op in ops:
        for src in op.input_ops:
            ops[src].output_ops.append(op.index)
    params, buffers = _param_infos(program)
    graph = Graph(
        ops=ops,
        batch_size=batch_size,
        params=params,
        buffers=buffers,
        tied_params=tied,
        input_names=list(inputs.names),
        output_names=list(outputs.names),
        dynamic_batch=program.dynamic,
        edge_bytes=edge_bytes,
        output_tensors=[program.tensor_meta(node.meta["val"]) for node in program.user_outputs],
    )
    return graph, program


def tied_groups(model: torch.nn.Module, buffers: bool = False) -> list[list[str]]:
    """Groups of names of ``model`` that are the same tensor object, in registration order.

    Takes the model and ``buffers`` (default False: parameters only; True:
    parameters, then buffers, grouped together). Returns every group of two
    or more names, each in ``named_parameters()`` / ``named_buffers()`` order
    (first name first). Raises nothing.
    """
    named: list[tuple[str, torch.Tensor]] = [*model.named_parameters(remove_duplicate=False)]
    if buffers:
        named += model.named_buffers(remove_duplicate=False)
    by_id: dict[int, list[str]] = {}
    for fqn, t in named:
        by_id.setdefault(id(t), []).append(fqn)
    return [names for names in by_id.values() if len(names) > 1]
