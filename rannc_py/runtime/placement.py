"""Place a plan on this rank: its stages' programs and the tensors it holds.

A rank holds one stage, or with several model chunks per rank (interleaved,
ZB-V) the stages ``plan.stages_of_rank(rank)``: it materialises the union of
their parameters, one tensor per canonical name, so a parameter two of its
stages read (GPT-2's tied embedding and LM head on ZB-V's rank 0, which holds
the first and the last stage) is one local tensor whose gradient accumulates
from both programs and is summed once per holder rank.

Every rank materialises (from ``meta``) only what its stage reads, makes its
copies agree with the other holders (as DDP does at construction), and
builds its stage's program. Parameters and buffers that no stage reads stay
with rank 0 as the model holds them, so the state dict still carries them.

A plan whose stages have a tensor degree t > 1 (:mod:`rannc_py.runtime.tensor_stages`)
runs each stage's program split over its tensor group: the rank keeps its
shards of the split parameters (new Parameters, after the full ones were
made to agree) and the replicated ones whole; gradients are summed over the
ranks at its tensor position only (``grad_holders``), since each position
holds other shards and the replicated parameters' gradients are already
whole on every rank of a group.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from mpi4py import MPI
from torch import Tensor, nn

from rannc_py.graph.staged import Stage
from rannc_py.graph.tensor_rules import shard_tensor
from rannc_py.graph.traced import TracedGraph
from rannc_py.planner.plan import Plan
from rannc_py.runtime import params as P
from rannc_py.runtime.layout import rank_stage
from rannc_py.runtime.stage import StageProgram, follow_train_mode, updated_buffers
from rannc_py.runtime.tensor_stages import TensorStages, position_ranks


@dataclass
class Placement:
    """What this rank runs and holds.

    Attributes:
        stages: the stages this rank runs, ascending (one unless the plan has chunks).
        programs: stage -> its program on this rank.
        local: canonical name -> every parameter/buffer this rank holds.
        params: canonical name -> the parameters its stages train.
        owned: names this rank speaks for in state dicts and norms (it is
            their lowest-numbered holder).
        holders: canonical parameter name -> the ranks whose stages read it.
        grad_order: every parameter name, in the order backward finalises
            their gradients (the reverse of their first use in forward).
        input_dims: user input name -> its batch dimension (None: not batched).
        output_dims: model output name -> its batch dimension.
        tensor: the tensor-parallel split this rank runs (None: degree 1).
        grad_holders: canonical parameter name -> the ranks its gradient is
            summed over with this rank (``holders`` at degree 1; with tensor
            groups, the holders at this rank's tensor position).
        grad_sets: every rank's ``grad_holders`` sets (they decide the
            communicators, so every rank needs all of them).
    """

    stages: tuple[int, ...]
    programs: dict[int, StageProgram]
    local: dict[str, Tensor]
    params: dict[str, nn.Parameter]
    owned: set[str]
    holders: dict[str, tuple[int, ...]]
    grad_order: list[str]
    input_dims: dict[str, int | None]
    output_dims: dict[str, int | None]
    tensor: TensorStages | None = None
    grad_holders: dict[str, tuple[int, ...]] | None = None
    grad_sets: list[tuple[int, ...]] | None = None


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
    rank_stage(plan, rank)  # raises when the plan leaves this rank idle
    mine_stages = plan.stages_of_rank(rank)
    tensor = TensorStages.create(plan, graph, comm)
    stages = graph.split(plan.assignment()).stages if tensor is None else tensor.stages(graph, plan.assignment())
    holders: dict[str, set[int]] = {}
    by_position: list[dict[str, set[int]]] = [{} for _ in range(plan.stages[mine_stages[0]].tensor)]
    positions = position_ranks(plan)
    for st, sp, at in zip(stages, plan.stages, positions):
        for f in (*st.param_fqns, *st.buffer_fqns):
            holders.setdefault(names[f], set()).update(sp.ranks)
            for p, ranks in enumerate(at):
                by_position[p].setdefault(names[f], set()).update(ranks)
    unused = sorted(set(names.values()) - set(holders))
    for f in unused:  # read by no stage: rank 0 keeps them for the state dict
        holders[f] = {0}
    held = sorted(f for f, h in holders.items() if rank in h)
    seed = comm.bcast(torch.initial_seed() % 2**31 if rank == 0 else None, root=0)
    sources = {f: tuple(sorted(h)) for f, h in holders.items()}
    shards: dict[str, nn.Parameter] = {}
    full0 = None
    if tensor is not None:  # split parameters first, one module at a time
        full0 = comm.bcast(all(not t.is_meta for t in (*model.parameters(), *model.buffers())) if rank == 0 else None)
        shards = _place_shards(model, tensor, sources, seed, param_init, comm, full0)
    split = {} if tensor is None else tensor.shards  # every rank's split names: the same dict on every rank
    # Tensors no stage reads are left as they are (on meta they have nothing to initialise them).
    P.materialize(model, [f for f in held if f not in unused and f not in split], seed, param_init)
    if full0 is None:
        full0 = comm.bcast(all(not t.is_meta for t in (*model.parameters(), *model.buffers())) if rank == 0 else None)
    P.copy_from_source(model, {f: h for f, h in sources.items() if f not in split}, comm, from_rank0=full0)
    local = {f: shards[f] if f in shards else P.get_tensor(model, f) for f in held}
    programs: dict[int, StageProgram] = {}
    params: dict[str, Tensor] = {}
    for s in mine_stages:
        stage = stages[s]
        tensors = {f: local[names[f]] for f in (*stage.param_fqns, *stage.buffer_fqns)}
        programs[s] = stage_program(stages, s, tensors, model.training)
        params.update({names[f]: tensors[f] for f in stage.param_fqns})
    first_use: dict[str, int] = {}
    for op in graph.ops:
        for f in op.params:
            first_use.setdefault(names[f], op.index)
    # A gradient is final once backward has passed the parameter's first use in forward.
    order = sorted(first_use, key=lambda f: -first_use[f])
    input_dims, output_dims = batch_dims(stages, graph)
    trained = {names[f] for st in stages for f in st.param_fqns}
    grad_holders = {f: tuple(sorted(holders[f])) for f in trained}
    grad_sets = sorted(set(grad_holders.values()))
    owned = {f for f in local if min(holders[f]) == rank}
    if tensor is not None:
        mine = by_position[tensor.position]
        grad_holders = {f: tuple(sorted(mine[f])) for f in trained}
        grad_sets = sorted({tuple(sorted(h[f])) for h in by_position for f in trained})
        # a shard counts once per position (norms, state dicts), a replicated tensor once in all
        owned = {f for f in local if min(mine[f] if f in tensor.shards else holders[f]) == rank}
    return Placement(
        stages=mine_stages,
        programs=programs,
        local=local,
        params=params,  # type: ignore[arg-type]
        owned=owned,
        holders={f: tuple(sorted(holders[f])) for f in trained},
        grad_order=order,
        input_dims=input_dims,
        output_dims=output_dims,
        tensor=tensor,
        grad_holders=grad_holders,
        grad_sets=grad_sets,
    )


def _place_shards(model: nn.Module, tensor: TensorStages, sources: dict[str, tuple[int, ...]], seed: int, param_init: Callable[[nn.Module], None] | None, comm: MPI.Comm,
                  full0: bool) -> dict[str, nn.Parameter]:
    """This rank's shards of the split parameters it holds (collective over ``comm``).

    One module at a time (in one order on every rank): its tensors are
    materialised where they are on ``meta``, made to agree with their source,
    and the rank's shard of each split one is copied out; a split tensor
    materialised here is freed at once, so a rank of a meta model holds at
    most one module's full split parameters besides its shards. (A model
    built whole stays whole until the runtime releases it.)
    """
    rank = comm.Get_rank()
    modules: dict[str, list[str]] = {}
    for f in sorted(tensor.shards):
        if f in sources:
            modules.setdefault(f.rpartition(".")[0], []).append(f)
    out: dict[str, nn.Parameter] = {}
    for path, split in sorted(modules.items()):
        mine = [f for f in split if rank in sources[f]]
        was_meta = {f for f in mine if P.get_tensor(model, f).is_meta}
        P.materialize(model, mine, seed, param_init)
        P.copy_from_source(model, {f: sources[f] for f in split}, comm, from_rank0=full0)
        for f in mine:
            full = P.get_tensor(model, f)
            part = shard_tensor(full.detach(), tensor.shards[f], tensor.position, tensor.degree).clone()
            out[f] = nn.Parameter(part, requires_grad=full.requires_grad)
        if was_meta:
            P.release(model, keep=set(P.canonical_names(model).values()) - was_meta)
    return out


def stage_program(stages: Sequence[Stage], s: int, tensors: Mapping[str, Tensor], training: bool) -> StageProgram:
    """Stage ``s`` of ``stages`` (a StagedModule's) as this rank runs it, bound to ``tensors`` (graph
    FQN -> this rank's parameter or buffer object) and set to ``training`` mode.

    Raises:
        ConfigError: a tensor the stage reads is missing from ``tensors``.
    """
    stage = stages[s]
    gm = stage.module_with({f: tensors[f] for f in stage.param_fqns if f in tensors},
                           {f: tensors[f] for f in stage.buffer_fqns if f in tensors})
    gm.train(training)
    buffers = updated_buffers(gm)
    gm = follow_train_mode(gm)
    send = stages[s + 1].activation_inputs if s + 1 < len(stages) else []
    return StageProgram(
        gm, stage.input_names, stage.output_names, stage.activation_inputs, send, stage.batch_dims, buffers
    )


def batch_dims(stages: Sequence[Stage], graph: TracedGraph) -> tuple[dict[str, int | None], dict[str, int | None]]:
    """The batch dimension of every user input and of every model output (None: not batched)."""
    inputs: dict[str, int | None] = {}
    for st in stages:
        inputs.update({n: st.batch_dims.get(n) for n in st.user_inputs})
    last = stages[-1]
    return inputs, {n: last.batch_dims.get(n) for n in graph.output_names}
