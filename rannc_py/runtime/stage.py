"""A pipeline stage as the executor sees it: a module, named inputs and outputs.

Built from a :class:`rannc_py.StagedModule`: stage ``s + 1`` receives the
outputs of stage ``s`` that it reads (``activations``) and reads the user's
inputs directly; the last stage's outputs are the model's outputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class TensorMeta:
    """Shape and dtype of one tensor crossing a stage boundary.

    ``shape`` is the sender's chunk; ``batch_dim`` is the dimension holding
    rows of the batch (None when the tensor is the same for every row).
    """

    shape: tuple[int, ...]
    dtype: torch.dtype
    batch_dim: int | None

    def with_rows(self, rows: int) -> tuple[int, ...]:
        """The shape of this tensor for a chunk of ``rows`` rows."""
        if self.batch_dim is None:
            return self.shape
        s = list(self.shape)
        s[self.batch_dim] = rows
        return tuple(s)


def describe(t: Tensor, rows: int) -> TensorMeta:
    """Metadata of ``t`` produced for a chunk of ``rows`` rows.

    The batch dimension is taken to be dimension 0 when its size is ``rows``,
    the convention of the traced graph (inputs are batch-first).
    """
    bd = 0 if t.dim() > 0 and t.shape[0] == rows else None
    return TensorMeta(tuple(t.shape), t.dtype, bd)


@dataclass
class StageProgram:
    """One stage's module and the names of what it reads and writes.

    Attributes:
        module: the stage's ``nn.Module``; called positionally in ``input_names`` order.
        input_names: every input, in call order.
        output_names: every output, in the module's return order.
        recv_names: activations received from the previous stage, in message order.
        send_names: outputs sent to the next stage, in message order.
    """

    module: nn.Module
    input_names: list[str]
    output_names: list[str]
    recv_names: list[str]
    send_names: list[str]

    def __call__(self, values: dict[str, Tensor]) -> dict[str, Tensor]:
        """Run the stage on ``values`` (name -> tensor); return its outputs by name."""
        out = self.module(*[values[n] for n in self.input_names])
        if isinstance(out, Tensor):
            out = (out,)
        if len(out) != len(self.output_names):
            raise RuntimeError(
                f"stage module returned {len(out)} values for {len(self.output_names)} outputs "
                f"{self.output_names}"
            )
        return dict(zip(self.output_names, out))


def build_programs(
    modules: Sequence[nn.Module],
    input_names: Sequence[Sequence[str]],
    output_names: Sequence[Sequence[str]],
) -> list[StageProgram]:
    """Programs for every stage, with the activations each pair of stages exchanges.

    Both ends of a boundary derive the message order from the same lists, so
    no names travel at run time.
    """
    progs = []
    for s, mod in enumerate(modules):
        send = []
        if s + 1 < len(modules):
            nxt = set(input_names[s + 1])
            send = [n for n in output_names[s] if n in nxt]
        recv = []
        if s > 0:
            mine = set(input_names[s])
            recv = [n for n in output_names[s - 1] if n in mine]
        progs.append(StageProgram(mod, list(input_names[s]), list(output_names[s]), recv, send))
    return progs


class _TrainOnly(nn.Module):
    """Calls ``op`` with argument ``index`` as traced in training mode, and ``eval_value`` in eval."""

    def __init__(self, op: object, index: int, eval_value: object) -> None:
        super().__init__()
        self.op, self.index, self.eval_value = op, index, eval_value

    def forward(self, *args: object) -> object:
        if not self.training:
            args = (*args[: self.index], self.eval_value, *args[self.index + 1 :])
        return self.op(*args)  # type: ignore[operator]


# Ops whose behaviour depends on the mode the model was traced in: the
# argument that carries it, and its value in eval mode.
_MODE_ARGS = {
    torch.ops.aten.dropout.default: (2, False),
    torch.ops.aten.scaled_dot_product_attention.default: (4, 0.0),
}


def follow_train_mode(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Make the dropouts of a traced stage obey ``gm.train()`` / ``gm.eval()``.

    The tracer records dropout (also inside scaled-dot-product attention)
    with its training setting fixed at trace time; each such op becomes a
    submodule that runs the same op, drawing the same random numbers, in
    training mode and runs it without dropout in eval mode.
    """
    changed = False
    for k, node in enumerate(list(gm.graph.nodes)):
        spec = _MODE_ARGS.get(node.target) if node.op == "call_function" else None
        if spec is None or node.kwargs or len(node.args) <= spec[0]:
            continue
        name = f"rannc_mode_{k}"
        gm.add_submodule(name, _TrainOnly(node.target, *spec))
        with gm.graph.inserting_after(node):
            new = gm.graph.call_module(name, node.args)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        changed = True
    if changed:
        gm.recompile()
    return gm
