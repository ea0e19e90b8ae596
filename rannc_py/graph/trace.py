"""Capture an unmodified ``nn.Module`` into a :class:`~rannc_py.graph.traced.TracedGraph`.

The model is wrapped in a module that takes and returns flat tuples of
tensors, then exported with ``torch.export.export(..., strict=False)``. The
wrapper keeps the user's call structure out of the exported program: inputs
become a flat tuple (Python scalars are baked in as constants) and outputs a
flat tuple, rebuilt into the model's own output type by the TracedGraph.

The batch dimension (dim 0 of every tensor input whose dim 0 equals the first
input's) is exported as one dynamic ``Dim`` so that stages run at any
microbatch size. When the model cannot be exported that way (it branches on
the batch size, or the batch is 1), the trace falls back to static shapes and
records ``Graph.dynamic_batch = False``.

Slices that keep a whole dimension (``x[:, :-1]`` exports a ``slice`` of dim
0 from 0 to the end before the one of dim 1) are removed from the exported
graph: eager indexing skips them, but as ops their backward allocates a
zero-filled tensor of the input's size and copies the gradient into it.
"""

from __future__ import annotations

import linecache
import os
import re
import sys
import traceback
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from rannc_py.errors import TraceError
from rannc_py.graph.layout import InputLayout, OutputLayout
from rannc_py.graph.lowered import lower
from rannc_py.graph.traced import TracedGraph

# Attribute under which the wrapper holds the user's model; stripped from every name.
_PREFIX = "model"


class _FlatCall(nn.Module):
    """Calls the user model with arguments rebuilt from a flat tuple of tensors."""

    def __init__(self, model: nn.Module, inputs: InputLayout, seen: list[Any]) -> None:
        super().__init__()
        self.model = model
        self._inputs = inputs
        # Receives the model's raw output. A bound method, not the list itself: export
        # inspects container attributes for tensors assigned during tracing.
        self._record = seen.append

    def forward(self, *flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        args, kwargs = self._inputs.unflatten(flat)
        out = self.model(*args, **kwargs)
        self._record(out)
        layout = OutputLayout(out)
        return tuple(layout.flatten(out))


def trace(
    model: nn.Module,
    args: tuple[Any, ...] | list[Any] = (),
    kwargs: dict[str, Any] | None = None,
    *,
    dynamic_batch: bool = True,
    dynamic_seq: bool = False,
) -> TracedGraph:
    """Trace ``model(*args, **kwargs)`` into a :class:`TracedGraph`.

    Takes an unmodified module (parameters may live on the ``meta`` device:
    nothing is allocated or computed), example positional and keyword
    arguments, and ``dynamic_batch`` (default True: export dim 0 of the
    batch-carrying inputs as dynamic, falling back to static shapes if that
    fails; False: trace static shapes only) and ``dynamic_seq`` (default
    False; True: also export the sequence dimension as dynamic, see
    :func:`_seq_dims`, falling back to a dynamic batch only when the model
    fixes its length). The module is traced in its
    current mode (``model.train()`` keeps dropout in the graph). When every
    parameter and buffer is on ``meta``, tensor inputs are moved to ``meta``
    too, and ops that create tensors are recorded to create them on the CPU,
    where the stages run once their parameters are materialised.

    Inputs may be tensors, Python bool/int/float constants, None, and
    tuples/lists/dicts of these; outputs a tensor, tuple, dict, dataclass
    registered with ``torch.export`` or a Hugging Face ``ModelOutput``.

    Returns the TracedGraph (a :class:`~rannc_py.graph.ir.Graph` plus the
    program that runs it). Raises TraceError, naming the module and source line
    where capture broke, with the reason and a hint.
    """
    if not isinstance(model, nn.Module):
        raise TraceError(f"trace() needs an nn.Module, got {type(model).__name__}")
    if kwargs is not None and not isinstance(kwargs, Mapping):
        raise TraceError(f"trace() takes kwargs as a dict of keyword arguments, got {type(kwargs).__name__}")
    args = tuple(args) if isinstance(args, (tuple, list)) else (args,)
    inputs = InputLayout(args, dict(kwargs or {}))
    flat = list(inputs.flatten(args, dict(kwargs or {})).values())
    tensors = [*model.parameters(), *model.buffers()]
    on_meta = bool(tensors) and all(t.is_meta for t in tensors)
    if on_meta:
        # A model on the meta device is traced for planning only: match its inputs to it.
        flat = [t if t.is_meta else torch.empty_like(t, device="meta") for t in flat]
    batch_size = int(flat[0].shape[0]) if flat[0].dim() > 0 else 1
    batch_carrying = [t.dim() > 0 and int(t.shape[0]) == batch_size for t in flat]

    dynamic_failure = ""
    if dynamic_batch and any(batch_carrying):
        batch = torch.export.Dim("batch")
        shapes = tuple({0: batch} if carry else None for carry in batch_carrying)
        seq = _seq_dims(flat, batch_carrying) if dynamic_seq else []
        attempts: list[Any] = [_with_seq(shapes, seq, {})] if any(seq) else []
        attempts.append(shapes)
        while attempts:
            attempt = attempts.pop(0)
            try:
                return _export(model, inputs, flat, batch_size, (attempt,), dynamic=True, on_meta=on_meta)
            except TraceError:
                raise
            except Exception as e:  # noqa: BLE001 - retried with fewer dynamic dims; the last error is reported
                bounds = _seq_bounds(str(e)) if attempt is not shapes and len(attempts) == 1 else None
                if bounds is not None:  # the model admits a range of lengths (e.g. up to its positions)
                    attempts.insert(0, _with_seq(shapes, seq, bounds))
                dynamic_failure = f"{type(e).__name__}: {str(e).strip()[:300]}"
    try:
        graph = _export(model, inputs, flat, batch_size, None, dynamic=False, on_meta=on_meta)
    except TraceError:
        raise
    except Exception as e:  # every export failure becomes a TraceError
        raise _trace_error(model, e) from e
    if dynamic_failure:
        warnings.warn(
            f"{type(model).__name__} was traced with a fixed batch size of {batch_size}, so its stages only run "
            f"at that size; a dynamic batch dimension failed with {dynamic_failure}",
            stacklevel=2,
        )
    return graph


def _seq_dims(flat: list[torch.Tensor], batch_carrying: list[bool]) -> list[bool]:
    """Which inputs have a sequence dimension (dim 1) to export as dynamic.

    The sequence length is dim 1 of the first integer (token) input of two or
    more dimensions; every batch-carrying input whose dim 1 has that size
    (token type ids, attention masks, labels) shares it. A length of 1 is
    left static: export specialises sizes 0 and 1.
    """
    tokens = next((t for t in flat if t.dim() >= 2 and not t.is_floating_point() and not t.is_complex()), None)
    if tokens is None or int(tokens.shape[1]) < 2:
        return [False] * len(flat)
    seq = int(tokens.shape[1])
    return [carry and t.dim() >= 2 and int(t.shape[1]) == seq for t, carry in zip(flat, batch_carrying)]


def _seq_bounds(message: str) -> dict[str, int] | None:
    """The range of lengths export suggests when the model guards the sequence length
    (``seq = Dim('seq', min=3, max=16)``), or None when it suggests none."""
    found = re.search(r"Dim\('seq'((?:, (?:min|max)=\d+)*)\)", message)
    if found is None or not found.group(1):
        return None
    return {k: int(v) for k, v in re.findall(r"(min|max)=(\d+)", found.group(1))}


def _with_seq(shapes: tuple[dict[int, Any] | None, ...], seq: list[bool],
              bounds: dict[str, int]) -> tuple[dict[int, Any] | None, ...]:
    length = torch.export.Dim("seq", **bounds)
    return tuple({**(s or {}), 1: length} if has else s for s, has in zip(shapes, seq))


def _export(model: nn.Module, inputs: InputLayout, flat: list[torch.Tensor], batch_size: int,
            dynamic_shapes: Any, dynamic: bool, on_meta: bool) -> TracedGraph:
    seen: list[Any] = []
    wrapper = _FlatCall(model, inputs, seen)
    ep = torch.export.export(wrapper, tuple(flat), dynamic_shapes=dynamic_shapes, strict=False)
    if on_meta:
        _create_on_cpu(ep.graph)
    _drop_whole_slices(ep.graph)
    if not seen:
        raise TraceError("torch.export did not run the model's forward; cannot record its output structure")
    outputs = OutputLayout(seen[-1])
    graph, program = lower(ep, model, _PREFIX, inputs, outputs, batch_size, dynamic)
    return TracedGraph.from_parts(graph, program)


def _drop_whole_slices(graph: torch.fx.Graph) -> None:
    """Replace every ``aten.slice`` that keeps its whole dimension (start 0, step 1, end past the
    size) by its input, as eager indexing does; one the graph returns is kept."""
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not torch.ops.aten.slice.Tensor:
            continue
        src, dim, start, end, step = (*node.args, *(None,) * (5 - len(node.args)))[:5]
        dim = 0 if dim is None else dim
        if start not in (None, 0) or step not in (None, 1) or node.kwargs:
            continue
        size = src.meta["val"].shape[dim] if isinstance(src, torch.fx.Node) and "val" in src.meta else None
        whole = end is None or (isinstance(end, int) and (end >= sys.maxsize or (isinstance(size, int) and end >= size)))
        if whole and not any(user.op == "output" for user in node.users):
            node.replace_all_uses_with(src)
            graph.erase_node(node)


def _create_on_cpu(graph: torch.fx.Graph) -> None:
    """Point ops that create tensors (``arange``, ``zeros``...) recorded with ``device=meta`` at the CPU.

    Tracing a meta model records where it ran, but its stages run where their
    parameters are materialised (the CPU); the nodes' metadata stays on meta.
    """
    for node in graph.nodes:
        dev = node.kwargs.get("device")
        if dev is not None and torch.device(dev).type == "meta":
            node.kwargs = {**node.kwargs, "device": torch.device("cpu")}


def _where(model: nn.Module, error: BaseException) -> tuple[str, str]:
    """The innermost module of ``model`` running, and the user source line, when ``error`` was raised."""
    names = {id(m): name for name, m in model.named_modules()}
    module_path = "<not inside the model>"
    line = "<unknown>"
    torch_dir = os.path.dirname(torch.__file__)
    own_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tb = error.__traceback__
    frames = []
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in frames:
        owner = frame.f_locals.get("self")
        if owner is not None and id(owner) in names:
            module_path = names[id(owner)] or "<top-level module>"
    for frame, lineno in traceback.walk_tb(error.__traceback__):
        path = frame.f_code.co_filename
        if not path.startswith(torch_dir) and not path.startswith(own_dir) and "importlib" not in path:
            line = f"{path}:{lineno} in {frame.f_code.co_name}"
            text = linecache.getline(path, lineno).strip()
            if text:
                line += f": {text}"
    return module_path, line


def _hint(message: str) -> str:
    lowered = message.lower()
    if "cache" in lowered or "past_key_values" in lowered:
        return "build the model with use_cache=False (and pass use_cache=False) so no KV cache object is created"
    if "data-dependent" in lowered or "data dependent" in lowered or "guardondatadependent" in lowered:
        return (
            "forward branches on tensor values; move that control flow out of forward, or express it "
            "with torch.where / torch.cond"
        )
    if "device" in lowered and ("mismatch" in lowered or "same device" in lowered):
        return "put every input on the device of the model's parameters"
    if "constraint" in lowered or "specializ" in lowered:
        return "forward depends on an exact input size; pass example inputs of the size you will train with"
    return "make forward depend only on tensor shapes, not tensor values, and avoid Python side effects"


def _trace_error(model: nn.Module, error: BaseException) -> TraceError:
    module_path, line = _where(model, error)
    reason = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
    return TraceError(
        f"could not trace {type(model).__name__}: capture broke in module {module_path!r} at {line}\n"
        f"  reason: {reason[:500]}\n  hint: {_hint(str(error) + type(error).__name__)}"
    )

