"""Schedule actions: the instructions a pipeline stage executes, as plain data.

A :class:`Schedule` holds one action list per *rank* of the pipeline; every
data-parallel replica of a rank runs the same list on its own shard of each
microbatch. A rank holds one model chunk (stage) in GPipe, 1F1B and ZB-H1, or
several non-adjacent ones (virtual stages: interleaved 1F1B, ZB-V), and every
action names the stage it is for. The planner's simulator and the runtime's
executor read the same lists, so the predicted and the executed order cannot
drift apart.

Backward comes in two forms: one full ``B`` (today's GPipe and 1F1B), or
split as in zero-bubble pipelines (Qi et al., 2024): ``I`` computes the
gradients of the stage's inputs, which go upstream at once, and ``W`` the
weight gradients, which may wait. (The paper calls the first part "B"; here
``B`` keeps its meaning of a full backward so existing lists read the same.)
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from enum import Enum
from typing import Any

from rannc_py.errors import PlanError


class ActionKind(str, Enum):
    """What a stage does at one step of its action list."""

    FORWARD = "F"
    BACKWARD = "B"  # full backward: input and weight gradients together
    BACKWARD_INPUT = "I"  # split backward, part 1: gradients of the stage's inputs (sent upstream at once)
    BACKWARD_WEIGHT = "W"  # split backward, part 2: the stage's weight gradients (deferred)
    SEND_ACT = "SEND_F"  # send this stage's output activations to stage + 1
    RECV_ACT = "RECV_F"  # receive this stage's input activations from stage - 1
    SEND_GRAD = "SEND_B"  # send the gradient of this stage's inputs to stage - 1
    RECV_GRAD = "RECV_B"  # receive the gradient of this stage's outputs from stage + 1
    ALLREDUCE = "ALLREDUCE"  # gradient sync across the stage's replicas, after its last backward


BACKWARDS = (ActionKind.BACKWARD, ActionKind.BACKWARD_INPUT, ActionKind.BACKWARD_WEIGHT)
"""The kinds that make a schedule a training schedule."""
INPUT_GRADIENTS = (ActionKind.BACKWARD, ActionKind.BACKWARD_INPUT)
"""The kinds that produce the gradients a stage sends upstream (SEND_B follows one of them)."""


@dataclass(frozen=True)
class Action:
    """One instruction: ``kind`` for ``microbatch`` (None for ALLREDUCE) of ``stage``.

    ``stage`` is the model chunk the action is for (the rank that runs it is
    the schedule's :meth:`Schedule.rank_of` it); the peer of a send or receive
    is implied by the kind (activations flow to ``stage + 1``, gradients to
    ``stage - 1``).
    """

    kind: ActionKind
    stage: int
    microbatch: int | None

    def __str__(self) -> str:
        if self.microbatch is None:
            return self.kind.value
        return f"{self.kind.value}{self.microbatch}"

    def label(self, with_stage: bool) -> str:
        """``str(self)``, prefixed by ``"<stage>:"`` when ``with_stage`` (``"3:F0"``), as JSON writes
        actions of schedules with several stages per rank."""
        return f"{self.stage}:{self}" if with_stage else str(self)

    @property
    def peer(self) -> int | None:
        """The stage on the other end of a send or receive, else None."""
        if self.kind in (ActionKind.SEND_ACT, ActionKind.RECV_GRAD):
            return self.stage + 1
        if self.kind in (ActionKind.RECV_ACT, ActionKind.SEND_GRAD):
            return self.stage - 1
        return None


_ACTION_RE = re.compile(r"^(?:(\d+):)?(SEND_F|RECV_F|SEND_B|RECV_B|ALLREDUCE|F|B|I|W)(\d*)$")


def parse_action(text: str, stage: int) -> Action:
    """Parse the compact form written by :meth:`Action.label` (``"SEND_F3"``, ``"5:W2"``).

    ``stage`` is the action's stage when the text names none.

    Raises:
        PlanError: ``text`` is not an action.
    """
    m = _ACTION_RE.match(text) if isinstance(text, str) else None
    if m is None:
        raise PlanError(
            f"cannot parse schedule action {text!r} of stage {stage}: expected F<i>, B<i>, I<i>, W<i>, "
            "SEND_F<i>, RECV_F<i>, SEND_B<i>, RECV_B<i> or ALLREDUCE, optionally after '<stage>:'"
        )
    if m.group(1) is not None:
        stage = int(m.group(1))
    kind = ActionKind(m.group(2))
    digits = m.group(3)
    if (kind is ActionKind.ALLREDUCE) != (digits == ""):
        raise PlanError(
            f"schedule action {text!r} of stage {stage}: ALLREDUCE takes no microbatch, "
            "every other action needs one"
        )
    return Action(kind, stage, int(digits) if digits else None)


@dataclass(frozen=True)
class Schedule:
    """Per-rank action lists of one training (or inference) step.

    Attributes:
        name: the generator that made it ("gpipe", "1f1b", "interleaved", "zb-h1", "zb-v", "forward_only").
        num_stages: model chunks (stages) in pipeline order; the pipeline depth for one stage per rank.
        num_microbatches: microbatches per step m.
        actions: ``actions[r]`` is rank r's ordered action list (rank r of the pipeline,
            i.e. its r-th group of replicas).
        stage_ranks: ``stage_ranks[s]`` is the rank that holds stage s; empty (the default)
            means stage s on rank s, one stage per rank.
    """

    name: str
    num_stages: int
    num_microbatches: int
    actions: tuple[tuple[Action, ...], ...]
    stage_ranks: tuple[int, ...] = ()

    def __str__(self) -> str:
        head = f"{self.name}: {self.num_stages} stages x {self.num_microbatches} microbatches"
        if self.stage_ranks:
            head += f" on {self.num_ranks} ranks"
        lines = [head]
        for r, acts in enumerate(self.actions):
            who = f"rank {r}" if self.stage_ranks else f"stage {r}"
            lines.append(f"  {who}: " + " ".join(a.label(bool(self.stage_ranks)) for a in acts))
        return "\n".join(lines)

    @property
    def num_ranks(self) -> int:
        """Ranks of the pipeline (action lists)."""
        return len(self.actions)

    @property
    def chunks(self) -> int:
        """Stages per rank (1 unless the schedule has virtual stages)."""
        return max(self.num_stages // max(self.num_ranks, 1), 1)

    def rank_of(self, stage: int) -> int:
        """The rank holding ``stage`` (``stage`` itself with one stage per rank)."""
        return self.stage_ranks[stage] if self.stage_ranks else stage

    @property
    def is_training(self) -> bool:
        """True when the schedule has backward actions."""
        return any(a.kind in BACKWARDS for acts in self.actions for a in acts)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; actions in their compact string form (``"<stage>:"`` first and a
        ``stage_ranks`` entry only for schedules with several stages per rank)."""
        out: dict[str, Any] = {
            "name": self.name,
            "num_stages": self.num_stages,
            "num_microbatches": self.num_microbatches,
            "actions": [[a.label(bool(self.stage_ranks)) for a in acts] for acts in self.actions],
        }
        if self.stage_ranks:
            out["stage_ranks"] = list(self.stage_ranks)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Schedule:
        """Inverse of :meth:`to_dict`. Raises PlanError on malformed input."""
        try:
            acts = tuple(
                tuple(parse_action(t, s) for t in stage_acts) for s, stage_acts in enumerate(d["actions"])
            )
            ranks = tuple(int(r) for r in d.get("stage_ranks", ()))
            return cls(str(d["name"]), int(d["num_stages"]), int(d["num_microbatches"]), acts, ranks)
        except (KeyError, TypeError, ValueError) as e:
            raise PlanError(f"malformed schedule JSON ({e!r}); write it with Schedule.to_json()") from e

    def to_json(self) -> str:
        """Serialise to a JSON string (round-trips exactly through :meth:`from_json`)."""
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> Schedule:
        """Parse a string written by :meth:`to_json`. Raises PlanError on malformed input."""
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise PlanError(f"schedule JSON does not parse: {e}") from e
        return cls.from_dict(d)
