"""Turn a ``torch.export`` program into the Graph IR.

Every fx node of the exported graph gets a *kind*:

``input``   a user tensor input (placeholder)
``param``   a parameter, ``buffer`` a buffer, ``const`` a lifted constant
``op``      a call that returns tensors: one :class:`~rannc_py.graph.ir.Op`
``alias``   ``getitem`` picking one tensor out of a multi-output op
``sym``     a symbolic or Python scalar (a shape, a size product); stages
            recompute these, they never cross a boundary
``attr``    a ``get_attr`` (the body of a higher-order op)
``drop``    a runtime check returning None (``_assert_tensor_metadata``...)

:class:`Lowered` keeps that classification next to the exported program so
:mod:`rannc_py.graph.staged` can cut it into stage modules.
"""

from __future__ import annotations

import math
import operator
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
from rannc_py.graph.ir import Graph, Op, ParamInfo, TensorMeta
from rannc_py.graph.layout import InputLayout, OutputLayout

_SYM_TYPES = (torch.SymInt, torch.SymFloat, torch.SymBool, int, float, bool)


@dataclass
class Lowered:
    """The exported program plus what the IR and the stage builder need to know about its nodes."""

    gm: fx.GraphModule
    model: torch.nn.Module
    inputs: InputLayout
    outputs: OutputLayout
    prefix: str  # the wrapper's attribute holding the user model, stripped from names
    kind: dict[fx.Node, str] = field(default_factory=dict)
    op_of: dict[fx.Node, int] = field(default_factory=dict)
    op_nodes: list[fx.Node] = field(default_factory=list)
    source: dict[fx.Node, str] = field(default_factory=dict)  # placeholder -> input name / FQN / const key
    user_outputs: list[fx.Node] = field(default_factory=list)
    mutations: list[tuple[fx.Node, str]] = field(default_factory=list)  # (new value, buffer FQN)
    symbols: dict[sympy.Symbol, tuple[str, int]] = field(default_factory=dict)  # symbol -> (input, dim)
    constants: dict[str, torch.Tensor] = field(default_factory=dict)
    edge_bytes: dict[tuple[int, int], int] = field(default_factory=dict)
    op_index_by_name: dict[str, int] = field(default_factory=dict)

    def strip(self, name: str) -> str:
        """Remove the wrapper prefix from an FQN or module path."""
        if name == self.prefix:
            return ""
        return name[len(self.prefix) + 1 :] if name.startswith(self.prefix + ".") else name


def _hint(d: Any) -> int:
    if isinstance(d, int):
        return d
    hint = d.node.hint
    if hint is None:
        hint = d.node.shape_env.size_hint(d.node.expr, allow_none=True)
    # Unbacked sizes (data-dependent) have no example value; 1 keeps estimates finite.
    return int(hint) if hint is not None else 1


def _meta(val: torch.Tensor, batch_sym: sympy.Symbol | None, batch_size: int, dynamic: bool) -> TensorMeta:
    shape = tuple(_hint(d) for d in val.shape)
    batch_dim = None
    for i, d in enumerate(val.shape):
        if dynamic and isinstance(d, torch.SymInt) and batch_sym in d.node.expr.free_symbols:
            batch_dim = i
            break
    if not dynamic and shape and shape[0] == batch_size:
        # A static trace has no symbol to follow: assume a leading batch-sized dim is the batch.
        batch_dim = 0
    nbytes = math.prod(shape) * val.element_size()
    return TensorMeta(shape=shape, dtype=val.dtype, nbytes=nbytes, batch_dim=batch_dim)


def _tensors_in(val: Any) -> list[torch.Tensor]:
    if isinstance(val, torch.Tensor):
        return [val]
    if isinstance(val, (list, tuple)):
        return [v for v in val if isinstance(v, torch.Tensor)]
    return []


def _module_path(node: fx.Node, low: Lowered) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    if path.startswith("_empty_nn_module_stack"):
        return ""
    return low.strip(path)


def _classify_placeholders(ep: ExportedProgram, low: Lowered, tied: list[list[str]]) -> None:
    nodes = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    # Every use of a tied parameter is named after its first FQN, as model.named_parameters() lists it.
    canonical = {alias: group[0] for group in tied for alias in group}
    user_index = 0
    for spec in ep.graph_signature.input_specs:
        node = nodes[spec.arg.name] if hasattr(spec.arg, "name") else None
        if spec.kind == InputKind.USER_INPUT:
            name = low.inputs.names[user_index] if user_index < len(low.inputs.names) else None
            user_index += 1
            if node is None or name is None:
                continue
            low.kind[node], low.source[node] = "input", name
        elif node is None:
            continue
        elif spec.kind == InputKind.PARAMETER:
            fqn = low.strip(spec.target)
            low.kind[node], low.source[node] = "param", canonical.get(fqn, fqn)
        elif spec.kind == InputKind.BUFFER:
            low.kind[node], low.source[node] = "buffer", low.strip(spec.target)
        elif spec.kind == InputKind.CONSTANT_TENSOR:
            key = low.strip(spec.target)
            low.kind[node], low.source[node] = "const", key
            low.constants[key] = ep.constants[spec.target]
        else:
            raise TraceError(
                f"the traced program has an input of kind {spec.kind.name} ({spec.arg}); rannc_py supports "
                "tensor inputs, parameters, buffers and tensor constants only"
            )


def _classify_calls(ep: ExportedProgram, low: Lowered) -> None:
    for node in ep.graph.nodes:
        if node.op != "call_function":
            if node.op == "get_attr":
                low.kind[node] = "attr"
            continue
        val = node.meta.get("val")
        src = node.args[0] if node.args else None
        if node.target is operator.getitem and isinstance(src, fx.Node) and low.kind.get(src) == "op":
            low.kind[node] = "alias"
            low.op_of[node] = low.op_of[src]
        elif _tensors_in(val):
            low.kind[node] = "op"
            low.op_of[node] = len(low.op_nodes)
            low.op_nodes.append(node)
        elif val is None and not node.users:
            low.kind[node] = "drop"
        else:
            low.kind[node] = "sym"


def _classify_outputs(ep: ExportedProgram, low: Lowered) -> None:
    out_node = next(n for n in ep.graph.nodes if n.op == "output")
    values = list(out_node.args[0])
    for spec, value in zip(ep.graph_signature.output_specs, values):
        if spec.kind == OutputKind.USER_OUTPUT:
            if not isinstance(value, fx.Node):
                raise TraceError(f"the model returns a constant {value!r} where a tensor was expected")
            low.user_outputs.append(value)
        elif spec.kind == OutputKind.BUFFER_MUTATION:
            low.mutations.append((value, low.strip(spec.target)))
        elif spec.kind == OutputKind.USER_INPUT_MUTATION:
            raise TraceError(
                f"forward mutates its input {spec.target!r} in place; rannc_py cannot split such a model. "
                "Clone the input inside forward before modifying it"
            )
        else:
            raise TraceError(f"unsupported output of kind {spec.kind.name} in the traced program")


def build_graph(ep: ExportedProgram, model: torch.nn.Module, prefix: str, inputs: InputLayout,
                outputs: OutputLayout, batch_size: int, dynamic: bool) -> Graph:
    """Build the :class:`Graph` of an exported wrapper around ``model``.

    Takes the exported program, the user model, the wrapper attribute name
    ``prefix`` under which the model was held, the input/output layouts, the
    traced batch size and whether the batch dim was exported as dynamic.
    Raises TraceError for programs using features the stages cannot run.
    """
    low = Lowered(gm=ep.graph_module, model=model, inputs=inputs, outputs=outputs, prefix=prefix)
    tied = tied_groups(model)
    _classify_placeholders(ep, low, tied)
    _classify_calls(ep, low)
    _classify_outputs(ep, low)

    batch_sym = None
    for node, kind in low.kind.items():
        if kind != "input":
            continue
        val = node.meta.get("val")
        for dim, size in enumerate(getattr(val, "shape", ())):
            if isinstance(size, torch.SymInt) and isinstance(size.node.expr, sympy.Symbol):
                low.symbols.setdefault(size.node.expr, (low.source[node], dim))
                if dim == 0 and batch_sym is None:
                    batch_sym = size.node.expr
    dynamic = dynamic and batch_sym is not None

    ops: list[Op] = []
    for index, node in enumerate(low.op_nodes):
        op = Op(index=index, name=node.name, target=str(node.target), module_path=_module_path(node, low))
        low.op_index_by_name[node.name] = index
        shapes: list[tuple[int, ...]] = []
        seen_values: set[fx.Node] = set()
        for x in pytree.tree_leaves((node.args, node.kwargs)):
            if not isinstance(x, fx.Node):
                continue
            xkind = low.kind.get(x)
            xval = x.meta.get("val")
            if isinstance(xval, torch.Tensor):
                shapes.append(tuple(_hint(d) for d in xval.shape))
            if x in seen_values:
                continue
            seen_values.add(x)
            if xkind == "param":
                op.params.append(low.source[x])
            elif xkind == "buffer":
                op.buffers.append(low.source[x])
            elif xkind in ("input", "op", "alias") and isinstance(xval, torch.Tensor):
                meta = _meta(xval, batch_sym, batch_size, dynamic)
                op.inputs.append(meta)
                if xkind == "input":
                    op.user_inputs.append(low.source[x])
                else:
                    src = low.op_of[x]
                    if src not in op.input_ops:
                        op.input_ops.append(src)
                    low.edge_bytes[(src, index)] = low.edge_bytes.get((src, index), 0) + meta.nbytes
        op.outputs = [_meta(t, batch_sym, batch_size, dynamic) for t in _tensors_in(node.meta.get("val"))]
        out_shape = op.outputs[0].shape if op.outputs else None
        op.flops = op_flops(node.target, shapes, out_shape, node.args)
        ops.append(op)
    for op in ops:
        for src in op.input_ops:
            ops[src].output_ops.append(op.index)

    params: dict[str, ParamInfo] = {}
    buffers: dict[str, ParamInfo] = {}
    for node, kind in low.kind.items():
        # Unused placeholders (the second name of a tied parameter, unused weights) are left out.
        if kind in ("param", "buffer") and node.users:
            fqn = low.source[node]
            t = model.get_parameter(fqn) if kind == "param" else model.get_buffer(fqn)
            info = ParamInfo(shape=tuple(t.shape), dtype=t.dtype, nbytes=t.numel() * t.element_size())
            (params if kind == "param" else buffers)[fqn] = info

    return Graph(
        ops=ops,
        batch_size=batch_size,
        params=params,
        buffers=buffers,
        tied_params=tied,
        input_names=list(inputs.names),
        output_names=list(outputs.names),
        dynamic_batch=dynamic,
        lowered=low,
    )


def tied_groups(model: torch.nn.Module) -> list[list[str]]:
    """Groups of parameter FQNs of ``model`` that are the same Parameter object, in registration order."""
    by_id: dict[int, list[str]] = {}
    for fqn, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(fqn)
    return [names for names in by_id.values() if len(names) > 1]
