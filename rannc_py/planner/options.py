"""Every planning option, with its default, in one record: :class:`PlanOptions`.

``RaNNCModule(model, opt, **options)``, ``rannc_py.plan(graph, **options)``
and ``python -m rannc_py plan`` each build one :class:`PlanOptions` from
what the user gave and pass that record down; nothing below them retypes the
options. Values are checked when the record is made, so a bad option fails
at once (in ``RaNNCModule``'s constructor, not at the first forward call).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from rannc_py.errors import ConfigError
from rannc_py.hardware.cluster import Cluster, parse_size
from rannc_py.planner.cost import optimizer_state_factor
from rannc_py.planner.plan import SHARD_LEVELS

TRAINING_SCHEDULES: tuple[str, ...] = ("1f1b", "gpipe")
"""The schedules a training plan uses by default (``forward_only`` runs no backward, so it never trains)."""

EXPERIMENTAL_SCHEDULES: tuple[str, ...] = ("zb-h1", "interleaved", "zb-v")
"""Schedules the planner searches only when named in ``schedules`` (RaNNCModule runs them too)."""


@dataclass(frozen=True, kw_only=True)
class PlanOptions:
    """What the planner may choose and what it must respect.

    Attributes:
        cluster: what to plan for: a :class:`~rannc_py.hardware.cluster.Cluster`
            or a preset string (``"a64fx:nodes=256"``, ``"local:ranks=4"``).
            Default None: ``RaNNCModule`` plans for ``"local:ranks=<ranks>"``
            (this machine, measured once and cached); ``rannc_py.plan`` needs one.
        memory_limit: bytes (or a size string such as ``"8GiB"``) each device
            may use; replaces the cluster's per-device memory. Default None:
            the cluster's (for ``local``, the machine's memory divided by the ranks).
        memory_margin: fraction of the memory kept free, in [0, 1). Default 0.1.
        microbatches: pin the number of microbatches per step. Default None (searched).
        schedules: the schedules the planner may pick, a non-empty subset of
            ``("1f1b", "gpipe")`` plus, only when named, the experimental
            :data:`EXPERIMENTAL_SCHEDULES`: ``"zb-h1"`` (split backward),
            ``"interleaved"`` (2, 3 or 4 model chunks per rank, searched
            where the chain has p * v blocks and the microbatches are a
            multiple of the p pipeline positions) and ``"zb-v"`` (two chunks
            per rank in a V, split backward). With chunks, ``num_stages`` and
            ``replicas`` pin the pipeline positions (the ranks' groups), not
            the p * v stages. Default ``("1f1b", "gpipe")``.
        recompute: True/False forces activation recompute on every stage;
            None (default) turns it on only for stages that do not fit otherwise.
        max_stages: upper bound on the pipeline depth. Default None (the number of blocks).
        num_stages: pin the pipeline depth. Default None (searched).
        replicas: pin the replica count of every stage (their sum is the
            device count; implies the depth); stage boundaries are still
            placed by the search. Default None (searched).
        optimizer: the optimizer's state: ``"sgd"``, ``"sgd_momentum"``,
            ``"adam"`` or ``"adamw"``, or the number of parameter-sized state
            buffers it keeps. Default ``"adam"``; ``RaNNCModule`` counts the
            user's optimizer's buffers instead.
        update_cost: seconds per parameter byte of one optimizer step, paid
            once per step on every stage. Default None: a fused step's memory
            traffic at the device's bandwidth (``RaNNCModule`` measures the
            user's optimizer on ``local``).
        return_outputs: count the memory of returning the model's non-loss
            outputs (logits) to every rank, as ``RaNNCModule(return_outputs=True)``
            does; False for training that uses only the loss (the runtime
            then frees those outputs as it goes). Default True.
        shard_optimizer: how each replicated stage's replicas share the
            optimizer step (:attr:`rannc_py.planner.plan.StagePlan.shard_level`):
            level 0 (every replica steps everything), 1 (optimizer state
            sharded over the replicas: gradients reduce-scattered, each
            replica steps its shard, parameters allgathered) or 2 (as 1, and
            only the gradient shard is kept between steps). None: the
            planner chooses level 0 or 1 per stage (level 2 needs as much
            memory at the step's peak, see :mod:`rannc_py.planner.cost`);
            False or 0 (default, as before the option existed): level 0
            everywhere; True: level 1 on every replicated
            stage; 1 or 2: that level on every replicated stage (stages with
            one replica run level 0 whatever is given). The same key in an
            explicit layout dict (``plan=dict(..., shard_optimizer=True)``)
            takes these values or one level per stage, absent meaning 0.
            A sharded stage needs the optimizer given to ``RaNNCModule``
            (or made by its factory), whose param groups then hold the
            shards; the runtime falls back to level 0, with a warning,
            without one or when its update is not element-wise.
        tensor: the tensor degree of every stage (each replica a tensor group
            of that many consecutive ranks, :mod:`rannc_py.planner.tensor`).
            None (default): searched over 1 and the degrees the graph's
            tensor annotation allows (``rannc_py.plan`` makes one; without
            an annotation only 1 is tried, as before the option existed);
            an int pins it (a degree above 1 needs the annotation to allow it
            and must divide the device count). Pinned ``replicas`` count
            tensor groups at a pinned degree; without one only degree 1 is
            searched (they count ranks).

    Raises:
        ConfigError: (on construction) a value of the wrong type or out of range.
    """

    cluster: Cluster | str | None = None
    memory_limit: int | str | None = None
    memory_margin: float = 0.1
    microbatches: int | None = None
    schedules: tuple[str, ...] = TRAINING_SCHEDULES
    recompute: bool | None = None
    max_stages: int | None = None
    num_stages: int | None = None
    replicas: tuple[int, ...] | None = field(default=None)
    optimizer: str | int = "adam"
    update_cost: float | None = None
    return_outputs: bool = True
    shard_optimizer: bool | int | None = False
    tensor: int | None = None

    def __post_init__(self) -> None:
        if self.cluster is not None and not isinstance(self.cluster, (Cluster, str)):
            raise ConfigError(f"cluster must be a Cluster or a preset string like 'a64fx:nodes=4', "
                              f"got {self.cluster!r}")
        if self.memory_limit is not None:
            limit = self.memory_limit if isinstance(self.memory_limit, int) else None
            if isinstance(self.memory_limit, str):
                limit = parse_size(self.memory_limit)
            if isinstance(self.memory_limit, bool) or limit is None or limit < 1:
                raise ConfigError(f"memory_limit must be a positive byte count or a size like '8GiB', "
                                  f"got {self.memory_limit!r}")
            object.__setattr__(self, "memory_limit", limit)
        margin = self.memory_margin
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 <= margin < 1:
            raise ConfigError(f"memory_margin must be a fraction in [0, 1), got {margin!r}")
        for name in ("microbatches", "max_stages", "num_stages"):
            _positive_or_none(name, getattr(self, name))
        if isinstance(self.schedules, str) or not isinstance(self.schedules, Sequence):
            raise ConfigError(f"schedules must be a sequence of schedule names, got {self.schedules!r}")
        scheds = tuple(self.schedules)
        known = TRAINING_SCHEDULES + EXPERIMENTAL_SCHEDULES
        if not scheds or any(s not in known for s in scheds):
            raise ConfigError(f"schedules must be a non-empty subset of {TRAINING_SCHEDULES} (or the experimental "
                              f"{EXPERIMENTAL_SCHEDULES}), got {self.schedules!r}")
        object.__setattr__(self, "schedules", scheds)
        if self.recompute not in (None, True, False):
            raise ConfigError(f"recompute must be True, False or None (searched), got {self.recompute!r}")
        if self.replicas is not None:
            if isinstance(self.replicas, (str, bytes)) or not isinstance(self.replicas, Sequence):
                raise ConfigError(f"replicas must list one replica count per stage, got {self.replicas!r}")
            reps = tuple(self.replicas)
            for r in reps:
                _positive_or_none("replicas[i]", r)
            if not reps:
                raise ConfigError("replicas must list at least one stage's replica count, got []")
            object.__setattr__(self, "replicas", reps)
        optimizer_state_factor(self.optimizer)
        if self.tensor is not None and (isinstance(self.tensor, bool) or not isinstance(self.tensor, int)
                                        or self.tensor < 1):
            raise ConfigError(f"tensor must be None (searched) or a tensor degree >= 1 such as 2, got {self.tensor!r}")
        cost = self.update_cost
        if cost is not None and (isinstance(cost, bool) or not isinstance(cost, (int, float))
                                 or not (math.isfinite(cost) and cost >= 0)):
            raise ConfigError(f"update_cost must be a finite number of seconds >= 0, got {cost!r}")
        if not isinstance(self.return_outputs, bool):
            raise ConfigError(f"return_outputs must be True or False, got {self.return_outputs!r}")
        if self.shard_optimizer is not None:
            if isinstance(self.shard_optimizer, Sequence) and not isinstance(self.shard_optimizer, str):
                raise ConfigError(f"shard_optimizer={self.shard_optimizer!r}: the planner takes one bool or level "
                                  "for every stage; a level per stage is for an explicit layout, "
                                  "plan=dict(stages=..., shard_optimizer=[...])")
            shard_levels(self.shard_optimizer, None)

    @classmethod
    def from_kwargs(cls, options: Mapping[str, Any], *, base: PlanOptions | None = None) -> PlanOptions:
        """``base`` (default: all defaults) with ``options`` replaced, by name.

        Raises:
            ConfigError: a name that is not a planning option (the message
                lists the known ones), or a bad value.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigError(f"unknown option(s) {unknown}; the planning options are {sorted(known)}")
        return dataclasses.replace(base or cls(), **options)


def shard_levels(value: Any, stages: int | None) -> tuple[int, ...]:
    """The sharding level of each of ``stages`` stages that ``value`` asks for
    (``shard_optimizer``: a bool, a level, or a level per stage; see :class:`PlanOptions`).

    With ``stages`` None, only the value is checked and a single level is
    returned as a one-element tuple (a per-stage sequence as a tuple).

    Raises:
        ConfigError: not a bool, a level in (0, 1, 2) or a sequence of them, or
            a sequence whose length is not ``stages``.
    """
    if isinstance(value, bool):
        one: tuple[int, ...] = (int(value),)
    elif isinstance(value, int) and value in SHARD_LEVELS:
        one = (value,)
    elif isinstance(value, Sequence) and not isinstance(value, (str, bytes)) and value and all(
            not isinstance(v, bool) and isinstance(v, int) and v in SHARD_LEVELS for v in value):
        levels = tuple(int(v) for v in value)
        if stages is not None and len(levels) != stages:
            raise ConfigError(f"shard_optimizer={list(levels)} gives {len(levels)} levels for {stages} stages; "
                              "give one level per stage, or one bool/level for all")
        return levels
    else:
        raise ConfigError(f"shard_optimizer must be True/False, a level 0, 1 or 2, or one level per stage, "
                          f"got {value!r}")
    return one if stages is None else one * stages


def positive_int(name: str, v: Any) -> int:
    """``v`` when it is a positive int (not a bool); raises ConfigError naming ``name`` otherwise."""
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ConfigError(f"{name} must be a positive integer, got {v!r}")
    return v


def _positive_or_none(name: str, v: Any) -> None:
    if v is not None:
        positive_int(name, v)
