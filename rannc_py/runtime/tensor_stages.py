"""Pipeline stages whose ranks form tensor groups: each rank runs its part of the stage's ops.

A stage of tensor degree t (``StagePlan.tensor``) has replicas x t ranks;
replica j's tensor group is ``ranks[j*t:(j+1)*t]`` and the rank at position
i of it holds shard i of every split parameter. :class:`TensorStages` gives
each group a communicator of its own (``MPI_Comm_split``, then duplicated by
:class:`~rannc_py.runtime.tensor_group.MPITensorGroup`, whose collectives go
through the C++ engine) and builds the stages from the *whole program's*
split (:func:`~rannc_py.graph.tensor_split.find_tensor_split` on the traced
model, then :func:`~rannc_py.graph.tensor_program.rank_program_ir`, cut by
the plan's assignment). The whole program rather than each stage's: a
column-parallel matmul and the row-parallel one that completes it may fall
into two stages, and the activation between them then crosses the boundary
split, 1/t of its bytes, from position i to position i; a per-stage split
would have to replicate (allgather) it at every boundary and could not
split a region cut by one. The price: every stage has the same degree (a
layout with different degrees per stage is refused with ConfigError).

Pipeline messages go from position i of a stage's groups to position i of
the next stage's (:func:`position_ranks`): every position holds what it
sends (replicated tensors whole, split ones its part) and is the one that
reads it on the other side, so the rows between replicas follow the plan's
row rule among the ranks of one position exactly as without tensor groups.
The model's outputs (the loss, gathered split outputs) are the same on every
position; position 0 returns them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from mpi4py import MPI

from rannc_py.errors import ConfigError
from rannc_py.graph.lowered import Program
from rannc_py.graph.staged import Stage, build_stages
from rannc_py.graph.tensor_program import rank_program_ir
from rannc_py.graph.tensor_rules import Shard
from rannc_py.graph.tensor_split import TensorSplit, find_tensor_split
from rannc_py.graph.traced import TracedGraph
from rannc_py.planner.plan import Plan
from rannc_py.runtime.tensor_group import MPITensorGroup

CANDIDATE_DEGREES = (2, 3, 4, 6, 8)
"""Degrees named when a stage cannot be split at the one asked for."""


def plan_degree(plan: Plan) -> int:
    """The plan's tensor degree (every stage's). Raises ConfigError when stages differ."""
    degrees = [st.tensor for st in plan.stages]
    if len(set(degrees)) > 1:
        raise ConfigError(
            f"the stages have tensor degrees {degrees}; RaNNCModule runs one tensor degree for all stages "
            "(a stage's split activations cross to the same positions of the next stage's groups); "
            f"use one degree, e.g. tensor={max(degrees)} or tensor=1")
    return degrees[0]


def position_ranks(plan: Plan) -> list[list[list[int]]]:
    """Per stage, per tensor position, the ranks at that position of every replica."""
    return [[list(st.replica_ranks(p)) for p in range(st.tensor)] for st in plan.stages]


def stage_splits(split: TensorSplit, stages: Sequence[Stage]) -> list[int]:
    """How many parameters of each stage the split shards."""
    return [sum(1 for f in st.param_fqns if f in split.params) for st in stages]


def check_split(graph: TracedGraph, split: TensorSplit, assignment: list[int]) -> None:
    """Raise ConfigError when a stage has no parameter the split shards at its degree, naming
    the degrees that would split it."""
    stages = graph.split(assignment).stages
    counts = stage_splits(split, stages)
    idle = [s for s, n in enumerate(counts) if n == 0 and stages[s].param_fqns]
    if not idle and any(counts):
        return
    idle = idle or list(range(len(stages)))
    others = {d: stage_splits(find_tensor_split(graph.program, d), stages) for d in CANDIDATE_DEGREES
              if d != split.degree}
    named = {s: [d for d, c in others.items() if c[s]] for s in idle}
    what = "; ".join(f"stage {s} splits at tensor degree {named[s] or 'none of ' + str(list(CANDIDATE_DEGREES))}"
                     for s in idle)
    raise ConfigError(
        f"tensor={split.degree}: the model's ops in stage(s) {idle} have nothing that splits over {split.degree} "
        f"ranks (no matmul whose output features, no embedding whose rows divide by it, or they reach an op no "
        f"split can cross: {sorted(split.rejected)[:3]}); {what}. Use such a degree, or tensor=1")


@dataclass
class TensorStages:
    """This rank's part of a plan's tensor groups (see the module docstring).

    Attributes:
        degree: the tensor degree t of every stage.
        position: this rank's position in its group (0..t-1): its shards.
        group: the group's collectives (its own communicator).
        split: the whole training program's split.
        program: the training program it was found on.
    """

    degree: int
    position: int
    group: MPITensorGroup
    split: TensorSplit
    program: Program

    @property
    def shards(self) -> dict[str, Shard]:
        """Canonical FQN -> its shard, for every split parameter."""
        return self.split.params

    @classmethod
    def create(cls, plan: Plan, graph: TracedGraph, comm: MPI.Comm) -> TensorStages | None:
        """This rank's tensor group, for a plan of degree > 1 (None at degree 1). Collective over
        ``comm``: every rank makes its group's communicator; the ranks of a group then share
        the group's first rank's torch generator state (replicated dropout draws one mask,
        split dropout each rank's part of it).

        Raises:
            ConfigError: stages of different degrees, a sharded optimizer with tensor > 1, or a
                stage with nothing to split at the degree (see :func:`check_split`).
        """
        t = plan_degree(plan)
        if t == 1:
            return None
        rank = comm.Get_rank()
        color, mine = 0, -1
        for st in plan.stages:
            for ranks in st.tensor_groups():
                if rank in ranks:
                    mine = color
                color += 1
        split = find_tensor_split(graph.program, t)
        check_split(graph, split, plan.assignment())
        sub = comm.Split(mine, rank)
        group = MPITensorGroup(sub)
        sub.Free()
        torch.set_rng_state(group.comm.bcast(torch.get_rng_state(), root=0))
        position = plan.tensor_rank_of(rank)
        assert position is not None
        return cls(degree=t, position=position, group=group, split=split, program=graph.program)

    def stages(self, graph: TracedGraph, assignment: list[int]) -> list[Stage]:
        """The stages of ``graph`` (the training trace or another call's) split over the group.

        Raises:
            ConfigError: another call's graph would shard the parameters otherwise than the
                training graph (its rank holds the training graph's shards).
        """
        split = self.split
        if graph.program is not self.program:
            split = find_tensor_split(graph.program, self.degree)
            if split.params != self.split.params:
                changed = sorted(set(split.params.items()) ^ set(self.split.params.items()))[:3]
                raise ConfigError(
                    f"this call's graph splits the parameters otherwise than the training graph over the tensor "
                    f"group ({changed}); call the model as in the first training call")
        program = rank_program_ir(graph.program, split, self.group, part_of=lambda i: assignment[i])
        return build_stages(program, assignment)

    def free(self) -> None:
        """Free the group's communicator (see ``RaNNCModule.close``)."""
        self.group.comm.Free()

