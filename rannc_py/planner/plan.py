"""The Plan: pure data that tells the runtime how to split and place a model.

A plan is computed once (or loaded from a file), is deterministic for the same
inputs and round-trips exactly through JSON. The runtime reads nothing else
from the planner.

Row split rule (the runtime follows it): the global batch is cut into
``microbatches`` consecutive chunks of equal size (``batch_size`` is a
multiple of ``microbatches``); replica j of a stage with r replicas processes
chunk j of :func:`split_sizes` (microbatch rows, r) of every microbatch.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rannc_py._util import atomic_write, format_bytes, format_seconds
from rannc_py.comm.cost import ALGORITHMS
from rannc_py.errors import ConfigError, PlanError
from rannc_py.schedule import (
    SCHEDULES,
    Schedule,
    StageCosts,
    Timeline,
    by_name,
    simulate,
)
from rannc_py.schedule.generators import chunks_of, stage_ranks

SHARD_LEVELS: tuple[int, ...] = (0, 1, 2)
"""A stage's sharding levels (:attr:`StagePlan.shard_level`)."""


def split_sizes(n: int, parts: int) -> list[int]:
    """Sizes of ``parts`` consecutive chunks of ``n`` rows, as equal as possible, larger first.

    Same as the chunk sizes of ``torch.tensor_split(x, parts)``.
    """
    if parts < 1:
        raise PlanError(f"cannot split {n} rows into {parts} parts; parts must be >= 1")
    q, r = divmod(n, parts)
    return [q + 1 if i < r else q for i in range(parts)]


@dataclass(frozen=True, kw_only=True)
class StagePlan:
    """One pipeline stage.

    Attributes:
        index: stage number, 0 first.
        ops: indices into ``graph.ops`` run by this stage (ascending).
        param_fqns: parameters (and buffers) this stage reads; a tied weight
            appears in every stage that reads it.
        ranks: global MPI ranks that run this stage (ascending): ``replicas``
            tensor groups of ``tensor`` consecutive ranks each, replica j's
            group being ``ranks[j * tensor:(j + 1) * tensor]``
            (:meth:`tensor_groups`); with ``tensor`` 1, one rank per replica.
        recompute: drop activations after forward and re-run it in backward.
        predicted_compute_time: seconds of forward + backward per step on one replica.
        predicted_peak_memory: bytes per rank (model state + activations + buffers).
        allreduce: the algorithm that sums the stage's gradients across its
            replicas (one of :data:`rannc_py.comm.cost.ALGORITHMS`), the one
            the cost model found fastest for them. Default "mpi" (plans
            written before the field existed read as "mpi").
        costs: the per-microbatch seconds the planner simulated for this
            stage (forward; backward including a recompute stage's re-run
            forward; sending activations on, gradients back, each including
            any re-split between replica counts; the once-per-step gradient
            allreduce including the tied-weight sum, and the optimizer step
            after it, 0 in plans saved before it was counted), what
            :meth:`Plan.timeline` replays. None for a plan the planner did
            not make (a hand-written layout) or saved before the field existed.
        shard_level: how the stage's replicas share its optimizer step
            (:data:`SHARD_LEVELS`): 0 every replica keeps all gradients and
            optimizer state and steps every parameter; 1 the gradients are
            reduce-scattered and each replica keeps the optimizer state of,
            and steps, only its shard (a contiguous range of the flat
            parameter buckets), the parameters being allgathered after the
            step; 2 as 1, and the full gradient buffers are released once
            reduce-scattered, so between steps a replica holds only its
            gradient shard. Default 0 (plans written before the field
            existed read as 0; the JSON carries it only when it is not 0).
        tensor: the stage's tensor degree: each replica is a tensor group of
            this many ranks that share the stage's ops split inside
            (:mod:`rannc_py.graph.tensor_split`), each holding its shards of
            the split parameters and a copy of the rest. Default 1 (no
            tensor parallelism; the JSON carries it only when it is not 1).
        tensor_collectives: seconds per microbatch of the tensor group's own
            collectives (forward and backward), included in ``costs``; 0
            when ``tensor`` is 1 or the planner did not price it.
    """

    index: int
    ops: tuple[int, ...]
    param_fqns: tuple[str, ...]
    ranks: tuple[int, ...]
    recompute: bool
    predicted_compute_time: float
    predicted_peak_memory: int
    allreduce: str = "mpi"
    costs: StageCosts | None = None
    shard_level: int = 0
    tensor: int = 1
    tensor_collectives: float = 0.0

    @property
    def replicas(self) -> int:
        """Number of data-parallel replicas of this stage (tensor groups)."""
        return len(self.ranks) // self.tensor

    def tensor_groups(self) -> list[tuple[int, ...]]:
        """The ranks of each replica's tensor group, replica 0 first."""
        t = self.tensor
        return [self.ranks[j * t:(j + 1) * t] for j in range(self.replicas)]

    def replica_ranks(self, position: int) -> tuple[int, ...]:
        """The ranks at tensor position ``position`` of every replica (those that hold the same shards)."""
        return self.ranks[position::self.tensor]


@dataclass(frozen=True, kw_only=True)
class Plan:
    """A hybrid data/tensor/pipeline-parallel layout of one model on one cluster.

    Attributes:
        batch_size: global batch size of one step.
        microbatches: microbatches per step (divides ``batch_size``).
        schedule: schedule name ("1f1b", "gpipe", or the experimental "zb-h1"), see
            :mod:`rannc_py.schedule`.
        stages: the stages, in pipeline order.
        world_size: number of ranks the plan uses (every rank runs one stage, or :attr:`chunks` stages,
            in one of its tensor groups).
        graph_fingerprint: hash of the graph the plan was made for.
        cluster: description of the cluster the plan was made for.
        step_time: predicted seconds per training step.
        peak_memory_per_rank: predicted peak bytes, indexed by rank.
        samples_per_second: predicted throughput.
        mfu: predicted model FLOP utilisation (0..1).
        search_time: seconds the planner spent.
        chunks: model chunks (stages) per rank of the schedule (v). With v > 1
            the ``len(stages)`` stages run on ``len(stages) / v`` pipeline
            positions (:attr:`num_positions`): stage s on position
            :meth:`position_of_stage` (interleaved: ``s % p``; zb-v: the V,
            stages s and 2p - 1 - s together), and every stage of one position
            lists the same ranks and tensor degree, so each rank holds v
            stages (:meth:`stages_of_rank`). Default 1: one stage per rank; the
            JSON carries it only when it is not 1, so plans read and write as before.
    """

    batch_size: int
    microbatches: int
    schedule: str
    stages: tuple[StagePlan, ...]
    world_size: int
    graph_fingerprint: str
    cluster: str
    step_time: float
    peak_memory_per_rank: tuple[int, ...]
    samples_per_second: float
    mfu: float
    search_time: float
    chunks: int = 1

    def __post_init__(self) -> None:
        self._check()

    def _check(self) -> None:
        if self.schedule not in SCHEDULES:
            raise PlanError(f"plan names unknown schedule {self.schedule!r}; known: {sorted(SCHEDULES)}")
        try:
            chunks_of(self.schedule, self.chunks)
        except ConfigError as e:
            raise PlanError(f"plan's schedule and chunks do not match: {e}") from e
        if self.microbatches < 1 or self.batch_size < 1 or self.batch_size % self.microbatches:
            raise PlanError(
                f"plan batch_size={self.batch_size} must be a positive multiple of "
                f"microbatches={self.microbatches}"
            )
        if not self.stages:
            raise PlanError("plan has no stages")
        if len(self.stages) % self.chunks:
            raise PlanError(f"plan has {len(self.stages)} stages, not a multiple of its chunks={self.chunks} "
                            "stages per rank")
        seen: set[int] = set()
        first: dict[int, StagePlan] = {}  # position -> its first stage
        for i, st in enumerate(self.stages):
            if st.index != i:
                raise PlanError(f"stage at position {i} has index {st.index}; stages must be numbered 0..")
            if not st.ranks:
                raise PlanError(f"stage {i} has no ranks")
            if st.costs is not None and not all(
                    math.isfinite(v) and v >= 0 for v in dataclasses.astuple(st.costs)):
                raise PlanError(f"stage {i} has costs {st.costs}; every cost must be a finite number of "
                                "seconds >= 0")
            if isinstance(st.shard_level, bool) or st.shard_level not in SHARD_LEVELS:
                raise PlanError(f"stage {i} has shard_level {st.shard_level!r}; it must be one of "
                                f"{list(SHARD_LEVELS)}")
            if isinstance(st.tensor, bool) or not isinstance(st.tensor, int) or st.tensor < 1 \
                    or len(st.ranks) % st.tensor:
                raise PlanError(f"stage {i} has tensor degree {st.tensor!r} for {len(st.ranks)} ranks; it must be "
                                "a positive integer that divides the stage's rank count")
            if st.allreduce not in ALGORITHMS:
                raise PlanError(f"stage {i} names unknown allreduce algorithm {st.allreduce!r}; "
                                f"known: {list(ALGORITHMS)}")
            pos = self.position_of_stage(i)
            if pos in first:
                other = first[pos]
                if st.ranks != other.ranks or st.tensor != other.tensor:
                    raise PlanError(
                        f"stages {other.index} and {i} share pipeline position {pos} ({self.schedule}, "
                        f"chunks={self.chunks}) but list different ranks or tensor degrees "
                        f"({other.ranks} x{other.tensor} against {st.ranks} x{st.tensor}); the stages of "
                        "one position run on the same ranks")
                continue
            first[pos] = st
            for r in st.ranks:
                if not 0 <= r < self.world_size or r in seen:
                    raise PlanError(
                        f"stage {i} rank {r} is outside 0..{self.world_size - 1} or held by another stage"
                    )
                seen.add(r)
            if self.batch_size // self.microbatches < st.replicas:
                raise PlanError(
                    f"stage {i} has {st.replicas} replicas but a microbatch has only "
                    f"{self.batch_size // self.microbatches} rows; every replica needs at least one"
                )
        if self.schedule == "interleaved" and self.microbatches % self.num_positions:
            raise PlanError(f"interleaved plan has {self.microbatches} microbatches on {self.num_positions} "
                            "pipeline positions; the schedule needs a multiple of the positions")
        if len(seen) != self.world_size:
            raise PlanError(f"plan uses {len(seen)} ranks but world_size is {self.world_size}")
        if len(self.peak_memory_per_rank) != self.world_size:
            raise PlanError(
                f"peak_memory_per_rank has {len(self.peak_memory_per_rank)} entries for "
                f"world_size {self.world_size}"
            )

    @property
    def num_stages(self) -> int:
        """Stages (model chunks) in pipeline order; the pipeline depth when :attr:`chunks` is 1."""
        return len(self.stages)

    @property
    def num_positions(self) -> int:
        """Pipeline positions p: groups of ranks that each hold :attr:`chunks` stages."""
        return len(self.stages) // self.chunks

    def position_of_stage(self, stage: int) -> int:
        """The pipeline position (0..p-1) whose ranks run ``stage``."""
        if self.chunks == 1:
            return stage
        return stage_ranks(self.schedule, self.num_positions, self.chunks)[stage]

    def stages_of_rank(self, rank: int) -> tuple[int, ...]:
        """Every stage ``rank`` holds, ascending (one unless :attr:`chunks` > 1; empty when unused)."""
        return tuple(st.index for st in self.stages if rank in st.ranks)

    def assignment(self) -> list[int]:
        """Stage index of every op index (the input of ``graph.split``).

        Raises:
            PlanError: the stages' op sets do not cover 0..N-1 exactly once.
        """
        n = sum(len(st.ops) for st in self.stages)
        out = [-1] * n
        for st in self.stages:
            for op in st.ops:
                if not 0 <= op < n or out[op] != -1:
                    raise PlanError(f"op {op} of stage {st.index} is out of range 0..{n - 1} "
                                    "or in two stages")
                out[op] = st.index
        return out

    def stage_of_rank(self, rank: int) -> int | None:
        """The stage whose replica ``rank`` holds (its first, :meth:`stages_of_rank`, when it holds
        several), or None when the plan does not use it."""
        for st in self.stages:
            if rank in st.ranks:
                return st.index
        return None

    def replica_of_rank(self, rank: int) -> int | None:
        """The replica (tensor group) of its stage that ``rank`` belongs to (its row chunk), or None."""
        s = self.stage_of_rank(rank)
        return None if s is None else self.stages[s].ranks.index(rank) // self.stages[s].tensor

    def tensor_rank_of(self, rank: int) -> int | None:
        """Position of ``rank`` inside its tensor group (0 when the stage has tensor degree 1), or None."""
        s = self.stage_of_rank(rank)
        return None if s is None else self.stages[s].ranks.index(rank) % self.stages[s].tensor

    def make_schedule(self) -> Schedule:
        """The training schedule's action lists for this plan's stages and microbatches."""
        return by_name(self.schedule, self.num_positions, self.microbatches, self.chunks)

    def timeline(self) -> Timeline:
        """The planner's simulation of one step of this plan.

        Replays :meth:`make_schedule`'s action lists with the stage costs the
        planner recorded, so for a plan the planner made, ``timeline().step_time``
        equals ``step_time``. Every replica of a stage runs the same row.

        Returns:
            The :class:`rannc_py.schedule.Timeline` of one step.
        Raises:
            PlanError: the plan records no stage costs (written by hand, or
                saved by an older version); make it again with ``rannc_py.plan``.
        """
        missing = [st.index for st in self.stages if st.costs is None]
        if missing:
            raise PlanError(
                f"the plan records no simulated costs for stage(s) {missing}, so it has no timeline; it was "
                "written by hand or saved by an older version of rannc_py. Re-plan with rannc_py.plan(...)"
            )
        return simulate(self.make_schedule(), [st.costs for st in self.stages if st.costs is not None])

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (``chunks``, a stage's ``shard_level``, ``tensor``, ``tensor_collectives`` and
        ``costs.backward_weight`` only when set, so plans without them write as before)."""
        d = dataclasses.asdict(self)
        if d["chunks"] == 1:
            del d["chunks"]
        for st in d["stages"]:
            if st["costs"] is not None and st["costs"]["backward_weight"] == 0.0:
                del st["costs"]["backward_weight"]
            if st["shard_level"] == 0:
                del st["shard_level"]
            if st["tensor"] == 1:
                del st["tensor"]
            if st["tensor_collectives"] == 0.0:
                del st["tensor_collectives"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        """Inverse of :meth:`to_dict`. Raises PlanError on a malformed dict."""
        try:
            stages = tuple(
                StagePlan(
                    index=int(s["index"]),
                    ops=tuple(int(o) for o in s["ops"]),
                    param_fqns=tuple(str(f) for f in s["param_fqns"]),
                    ranks=tuple(int(r) for r in s["ranks"]),
                    recompute=bool(s["recompute"]),
                    predicted_compute_time=float(s["predicted_compute_time"]),
                    predicted_peak_memory=int(s["predicted_peak_memory"]),
                    allreduce=str(s.get("allreduce", "mpi")),
                    shard_level=int(s.get("shard_level", 0)),
                    tensor=int(s.get("tensor", 1)),
                    tensor_collectives=float(s.get("tensor_collectives", 0.0)),
                    costs=None if s.get("costs") is None else StageCosts(**{
                        f.name: float(s["costs"].get(f.name, f.default)) for f in dataclasses.fields(StageCosts)}),
                )
                for s in d["stages"]
            )
            return cls(
                batch_size=int(d["batch_size"]),
                microbatches=int(d["microbatches"]),
                schedule=str(d["schedule"]),
                stages=stages,
                world_size=int(d["world_size"]),
                graph_fingerprint=str(d["graph_fingerprint"]),
                cluster=str(d["cluster"]),
                step_time=float(d["step_time"]),
                peak_memory_per_rank=tuple(int(x) for x in d["peak_memory_per_rank"]),
                samples_per_second=float(d["samples_per_second"]),
                mfu=float(d["mfu"]),
                search_time=float(d["search_time"]),
                chunks=int(d.get("chunks", 1)),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise PlanError(f"malformed plan ({e!r}); write plans with Plan.to_json() or Plan.save()") from e

    def to_json(self) -> str:
        """Serialise to JSON; :meth:`from_json` gives back an equal Plan."""
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        """Parse :meth:`to_json` output. Raises PlanError on malformed input."""
        try:
            d = json.loads(text)
        except (TypeError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise PlanError(f"plan JSON does not parse ({e}); write plans with Plan.to_json() or Plan.save()") from e
        return cls.from_dict(d)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the plan as JSON to ``path`` atomically (temp file in the same folder, then rename)."""
        atomic_write(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Plan:
        """Read a plan written by :meth:`save`. Raises PlanError on a missing or unreadable file
        or malformed content."""
        try:
            text = Path(path).read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise PlanError(f"cannot read plan file {os.fspath(path)!r} ({e}); give the path of a plan "
                            "written by Plan.save() or `python -m rannc_py plan --json`") from e
        return cls.from_json(text)

    def _chunk_note(self) -> str:
        return "" if self.chunks == 1 else f" ({self.chunks} per rank on {self.num_positions} positions)"

    def summary(self) -> str:
        """A readable table of the stages and the predictions."""
        mb_rows = self.batch_size // self.microbatches
        lines = [
            (f"Plan: {self.num_stages} stages{self._chunk_note()}, {self.world_size} ranks, "
             f"schedule {self.schedule}, "
             f"batch {self.batch_size} = {self.microbatches} microbatches x {mb_rows}"),
            f"cluster: {self.cluster}",
            (f"{'stage':>5} {'ops':>11} {'params':>7} {'ranks':>13} {'tensor':>6} {'recomp':>6} "
             f"{'compute/step':>12} {'tp comm/mb':>10} {'peak mem':>10} {'allreduce':>9} {'shard':>5}"),
        ]
        for st in self.stages:
            ops = f"{st.ops[0]}-{st.ops[-1]}" if st.ops else "-"
            ranks = f"{st.ranks[0]}-{st.ranks[-1]} (x{st.replicas})" if len(st.ranks) > 1 else f"{st.ranks[0]}"
            tp_comm = format_seconds(st.tensor_collectives) if st.tensor > 1 else "-"
            lines.append(
                f"{st.index:>5} {ops:>11} {len(st.param_fqns):>7} {ranks:>13} {st.tensor:>6} "
                f"{'yes' if st.recompute else 'no':>6} {format_seconds(st.predicted_compute_time):>12} "
                f"{tp_comm:>10} {format_bytes(st.predicted_peak_memory):>10} "
                f"{st.allreduce if st.replicas > 1 else '-':>9} {st.shard_level if st.replicas > 1 else '-':>5}"
            )
        lines.append(
            f"predicted: step {format_seconds(self.step_time)}, {self.samples_per_second:.4g} samples/s, "
            f"MFU {100 * self.mfu:.1f}%, peak memory {format_bytes(max(self.peak_memory_per_rank))}/rank; "
            f"search {self.search_time:.2f} s"
        )
        return "\n".join(lines)
