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


def follow_train_mode(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Make the dropouts of a traced stage obey ``gm.train()`` / ``gm.eval()``.

    The tracer records dropout with its training flag fixed at trace time;
    each becomes an ``nn.Dropout`` submodule, which draws the same random
    numbers as the traced op in training mode and is the identity in eval.
    """
    changed = False
    for k, node in enumerate(list(gm.graph.nodes)):
        if node.op == "call_function" and node.target is torch.ops.aten.dropout.default:
            x, p, train = node.args
            if train is not True:
                continue
            name = f"rannc_dropout_{k}"
            gm.add_submodule(name, nn.Dropout(float(p)))
            with gm.graph.inserting_after(node):
                new = gm.graph.call_module(name, (x,))
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            changed = True
    if changed:
        gm.recompile()
    return gm
