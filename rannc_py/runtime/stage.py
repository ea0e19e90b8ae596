"""A pipeline stage as the executor sees it: a module, named inputs and outputs.

Built from a :class:`rannc_py.StagedModule`: stage ``s + 1`` receives the
outputs of stage ``s`` that it reads (``activations``) and reads the user's
inputs directly; the last stage's outputs are the model's outputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from rannc_py.errors import ConfigError, PartitionError


@dataclass(frozen=True)
class WireMeta:
    """Shape and dtype of one tensor crossing a stage boundary, as the sender describes it.

    (Not the graph's :class:`rannc_py.graph.ir.TensorMeta`, which describes a
    traced tensor for the planner; this one describes a message on the wire.)

    ``shape`` is the sender's chunk; ``batch_dim`` is the dimension holding
    rows of the batch (None when the tensor is the same for every row), and
    ``per_row`` how many entries of that dimension one row holds (e.g. the
    sequence length once batch and sequence are flattened together).
    """

    shape: tuple[int, ...]
    dtype: torch.dtype
    batch_dim: int | None
    per_row: int = 1

    def with_rows(self, rows: int) -> tuple[int, ...]:
        """The shape of this tensor for a chunk of ``rows`` rows."""
        if self.batch_dim is None:
            return self.shape
        s = list(self.shape)
        s[self.batch_dim] = rows * self.per_row
        return tuple(s)

    def rows(self, t: Tensor, offset: int, rows: int) -> Tensor:
        """Rows ``[offset, offset + rows)`` of ``t``, a tensor this metadata describes."""
        assert self.batch_dim is not None
        return t.narrow(self.batch_dim, offset * self.per_row, rows * self.per_row)


def describe(t: Tensor, name: str, batch_dim: int | None, rows: int) -> WireMeta:
    """Metadata of ``t`` (output ``name``, a chunk of ``rows`` rows) whose rows lie along ``batch_dim``.

    Raises:
        ConfigError: the batch dimension's size is not a multiple of ``rows``.
    """
    if batch_dim is None:
        return WireMeta(tuple(t.shape), t.dtype, None)
    size = t.shape[batch_dim]
    if rows <= 0 or size % rows:
        raise ConfigError(
            f"stage output {name!r} of shape {tuple(t.shape)} has {size} entries along its batch dimension "
            f"{batch_dim}, not a multiple of the chunk's {rows} rows; it cannot be split by rows between "
            "stage replicas; use a plan without replicas at this stage boundary"
        )
    return WireMeta(tuple(t.shape), t.dtype, batch_dim, size // rows)


@dataclass
class StageProgram:
    """One stage's module and the names of what it reads and writes.

    Attributes:
        module: the stage's ``nn.Module``; called positionally in ``input_names`` order.
        input_names: every input, in call order.
        output_names: every output, in the module's return order.
        recv_names: activations received from the previous stage, in message order.
        send_names: outputs sent to the next stage, in message order.
        batch_dims: input/output name -> the dimension holding the batch's
            rows (None: the same tensor for every row).
        updated_buffers: buffers the forward writes in place (see :func:`updated_buffers`).
    """

    module: nn.Module
    input_names: list[str]
    output_names: list[str]
    recv_names: list[str]
    send_names: list[str]
    batch_dims: dict[str, int | None] = field(default_factory=dict)
    updated_buffers: list[Tensor] = field(default_factory=list)

    def __call__(self, values: dict[str, Tensor]) -> dict[str, Tensor]:
        """Run the stage on ``values`` (name -> tensor); return its outputs by name.

        Raises:
            PartitionError: the module returned another number of values than
                the stage has outputs.
        """
        out = self.module(*[values[n] for n in self.input_names])
        if isinstance(out, Tensor):
            out = (out,)
        if len(out) != len(self.output_names):
            raise PartitionError(
                f"stage module returned {len(out)} values for {len(self.output_names)} outputs "
                f"{self.output_names}; the stage's module must return one value per output "
                "of its slice of the graph (build it with rannc_py.StagedModule)"
            )
        return dict(zip(self.output_names, out))


class _TrainOnly(nn.Module):
    """Calls ``op`` with argument ``index`` as traced in training mode, and ``eval_value`` in eval."""

    def __init__(self, op: object, index: int, eval_value: object) -> None:
        super().__init__()
        self.op, self.index, self.eval_value = op, index, eval_value

    def forward(self, *args: object) -> object:
        if not self.training:
            args = (*args[: self.index], self.eval_value, *args[self.index + 1 :])
        return self.op(*args)  # type: ignore[operator]


class _UpdateInTraining(nn.Module):
    """An in-place update of a buffer (``num_batches_tracked += 1``) that eval mode skips, as eager does."""

    def __init__(self, op: object) -> None:
        super().__init__()
        self.op = op

    def forward(self, buffer: Tensor, *args: object) -> object:
        return self.op(buffer, *args) if self.training else buffer  # type: ignore[operator]


class _BatchNorm(nn.Module):
    """``aten.batch_norm`` traced in training mode, following the module's mode.

    Training: batch statistics, running ones updated in place, as traced. The
    op runs on copies of the running statistics that are then written back,
    because autograd saves them for backward: updating the buffers themselves
    would fail the backward of every microbatch but the last one in flight.
    Eval: running statistics, left unchanged.
    """

    def forward(self, x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor | None,
                var: Tensor | None, training: bool, *rest: object) -> Tensor:
        if not (self.training and training) or mean is None or var is None:
            return torch.ops.aten.batch_norm.default(x, weight, bias, mean, var, self.training and training, *rest)
        new_mean, new_var = mean.clone(), var.clone()
        out = torch.ops.aten.batch_norm.default(x, weight, bias, new_mean, new_var, True, *rest)
        with torch.no_grad():
            mean.copy_(new_mean)
            var.copy_(new_var)
        return out


# Ops whose behaviour depends on the mode the model was traced in: the
# argument that carries it, and its value in eval mode.
_MODE_ARGS = {
    torch.ops.aten.dropout.default: (2, False),
    torch.ops.aten.scaled_dot_product_attention.default: (4, 0.0),
}


def _updates_buffer(node: torch.fx.Node) -> bool:
    """True for an in-place op (``add_``, ``copy_``) writing into a module attribute (a buffer)."""
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return False
    first = node.args[0] if node.args else None
    in_place = node.target._schema.name.endswith("_") or node.target is torch.ops.aten.copy_.default
    return in_place and isinstance(first, torch.fx.Node) and first.op == "get_attr"


def follow_train_mode(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Make the mode-dependent ops of a traced stage obey ``gm.train()`` / ``gm.eval()``.

    The tracer records dropout (also inside scaled-dot-product attention) and
    batch norm with the training setting fixed at trace time, and buffer
    updates (running statistics) as in-place ops; each becomes a submodule
    that runs the traced op in training mode (drawing the same random
    numbers) and its eval form in eval mode: no dropout, running statistics
    used and left unchanged.
    """
    changed = False
    for k, node in enumerate(list(gm.graph.nodes)):
        if node.op != "call_function" or node.kwargs:
            continue
        spec = _MODE_ARGS.get(node.target)
        if spec is not None and len(node.args) > spec[0]:
            module: nn.Module = _TrainOnly(node.target, *spec)
        elif node.target is torch.ops.aten.batch_norm.default:
            module = _BatchNorm()
        elif _updates_buffer(node):
            module = _UpdateInTraining(node.target)
        else:
            continue
        name = f"rannc_mode_{k}"
        gm.add_submodule(name, module)
        with gm.graph.inserting_after(node):
            new = gm.graph.call_module(name, node.args)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        changed = True
    if changed:
        gm.recompile()
    return gm


def updated_buffers(gm: torch.fx.GraphModule) -> list[Tensor]:
    """The buffers a stage's forward writes in place (running statistics), in graph order.

    Call before :func:`follow_train_mode`. A recomputed forward must see them
    as the first forward did and must not update them twice.
    """
    targets: list[str] = []
    for node in gm.graph.nodes:
        if _updates_buffer(node):
            targets.append(str(node.args[0].target))
        elif node.op == "call_function" and node.target is torch.ops.aten.batch_norm.default and node.args[5]:
            # running mean and variance (None when the layer tracks no running statistics)
            targets += [str(a.target) for a in node.args[3:5] if isinstance(a, torch.fx.Node) and a.op == "get_attr"]
    out: list[Tensor] = []
    for t in targets:
        buf = gm.get_buffer(t)
        if all(buf is not b for b in out):
            out.append(buf)
    return out
