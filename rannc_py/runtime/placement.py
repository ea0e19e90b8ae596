"""Place a plan on this rank: its stage's program and the tensors it holds.

Every rank materialises (from ``meta``) only what its stage reads, makes its
copies agree with the other holders (as DDP does at construction), and
builds its stage's program. Parameters and buffers that no stage reads stay
with rank 0 as the model holds them, so the state dict still carries them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from mpi4py import MPI
from torch import Tensor, nn

from rannc_py.graph.staged import StagedModule
from rannc_py.graph.traced import TracedGraph
from rannc_py.planner.plan import Plan
from rannc_py.runtime import params as P
from rannc_py.runtime.layout import rank_stage
from rannc_py.runtime.stage import StageProgram, follow_train_mode, updated_buffers


@dataclass
class Placement:
    """What this rank runs and holds.

    Attributes:
        stage: the stage index this rank runs.
        program: the stage's program.
        local: canonical name -> every parameter/buffer this rank holds.
        params: canonical name -> the parameters its stage trains.
        owned: names this rank speaks for in state dicts and norms (it is
            their lowest-numbered holder).
        holders: canonical parameter name -> the ranks whose stages read it.
        grad_order: every parameter name, in the order backward finalises
            their gradients (the reverse of their first use in forward).
        input_dims: user input name -> its batch dimension (None: not batched).
        output_dims: model output name -> its batch dimension.
    """

    stage: int
    program: StageProgram
    local: dict[str, Tensor]
    params: dict[str, nn.Parameter]
    owned: set[str]
    holders: dict[str, tuple[int, ...]]
    grad_order: list[str]
    input_dims: dict[str, int | None]
    output_dims: dict[str, int | None]


def place(
    model: nn.Module,
    graph: TracedGraph,
    plan: Plan,
    names: dict[str, str],
    comm: MPI.Comm,
    param_init: Callable[[nn.Module], None] | None,
) -> Placement:
    """Build this rank's :class:`Placement` (collective over ``comm``).

    ``names`` is :func:`rannc_py.runtime.params.canonical_names` of ``model``.
    Values: where rank 0 holds the whole model (nothing on ``meta``) every
    holder copies rank 0's values; otherwise each tensor's lowest-numbered
    holder's values (materialised with the same seed on every rank).

    Raises:
        PlanError: the plan leaves this rank without a stage.
        ConfigError: a meta module cannot be initialised (see :func:`params.materialize`).
    """
    rank = comm.Get_rank()
    staged = graph.split(plan.assignment())
    s = rank_stage(plan, rank)
    stage = staged.stages[s]
    holders: dict[str, set[int]] = {}
    for st, sp in zip(staged.stages, plan.stages):
        for f in (*st.param_fqns, *st.buffer_fqns):
            holders.setdefault(names[f], set()).update(sp.ranks)
    unused = sorted(set(names.values()) - set(holders))
    for f in unused:  # read by no stage: rank 0 keeps them for the state dict
        holders[f] = {0}
    held = sorted(f for f, h in holders.items() if rank in h)
    seed = comm.bcast(torch.initial_seed() % 2**31 if rank == 0 else None, root=0)
    # Tensors no stage reads are left as they are (on meta they have nothing to initialise them).
    P.materialize(model, [f for f in held if f not in unused], seed, param_init)
    full0 = comm.bcast(all(not t.is_meta for t in (*model.parameters(), *model.buffers())) if rank == 0 else None)
    P.copy_from_source(model, {f: tuple(sorted(h)) for f, h in holders.items()}, comm, from_rank0=full0)

    tensors = {f: P.get_tensor(model, names[f]) for f in (*stage.param_fqns, *stage.buffer_fqns)}
    program = stage_program(staged, s, tensors, model.training)
    local = {f: P.get_tensor(model, f) for f in held}
    params = {names[f]: tensors[f] for f in stage.param_fqns}
    first_use: dict[str, int] = {}
    for op in graph.ops:
        for f in op.params:
            first_use.setdefault(names[f], op.index)
    # A gradient is final once backward has passed the parameter's first use in forward.
    order = sorted(first_use, key=lambda f: -first_use[f])
    input_dims, output_dims = batch_dims(staged, graph)
    return Placement(
        stage=s,
        program=program,
        local=local,
        params=params,  # type: ignore[arg-type]
        owned={f for f in local if min(holders[f]) == rank},
        holders={f: tuple(sorted(holders[f])) for f in {names[f] for st in staged.stages for f in st.param_fqns}},
        grad_order=order,
        input_dims=input_dims,
        output_dims=output_dims,
    )


def stage_program(staged: StagedModule, s: int, tensors: Mapping[str, Tensor], training: bool) -> StageProgram:
    """Stage ``s`` of ``staged`` as this rank runs it, bound to ``tensors`` (graph FQN -> this
    rank's parameter or buffer object) and set to ``training`` mode.

    Raises:
        ConfigError: a tensor the stage reads is missing from ``tensors``.
    """
    stage = staged.stages[s]
    gm = stage.module_with({f: tensors[f] for f in stage.param_fqns if f in tensors},
                           {f: tensors[f] for f in stage.buffer_fqns if f in tensors})
    gm.train(training)
    buffers = updated_buffers(gm)
    gm = follow_train_mode(gm)
    send = staged.stages[s + 1].activation_inputs if s + 1 < len(staged.stages) else []
    return StageProgram(
        gm, stage.input_names, stage.output_names, stage.activation_inputs, send, stage.batch_dims, buffers
    )


def batch_dims(staged: StagedModule, graph: TracedGraph) -> tuple[dict[str, int | None], dict[str, int | None]]:
    """The batch dimension of every user input and of every model output (None: not batched)."""
    inputs: dict[str, int | None] = {}
    for st in staged.stages:
        inputs.update({n: st.batch_dims.get(n) for n in st.user_inputs})
    last = staged.stages[-1]
    return inputs, {n: last.batch_dims.get(n) for n in graph.output_names}
