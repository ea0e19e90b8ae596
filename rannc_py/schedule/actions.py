"""Schedule actions: the instructions a pipeline stage executes, as plain data.

A :class:`Schedule` holds one action list per *stage*; every data-parallel
replica of a stage runs the same list on its own shard of each microbatch.
The planner's simulator and the runtime's executor read the same lists, so the
predicted and the executed order cannot drift apart.
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
    BACKWARD = "B"
    SEND_ACT = "SEND_F"  # send this stage's output activations to stage + 1
    RECV_ACT = "RECV_F"  # receive this stage's input activations from stage - 1
    SEND_GRAD = "SEND_B"  # send the gradient of this stage's inputs to stage - 1
    RECV_GRAD = "RECV_B"  # receive the gradient of this stage's outputs from stage + 1
    ALLREDUCE = "ALLREDUCE"  # gradient sync across the stage's replicas, after its last backward


@dataclass(frozen=True)
class Action:
    """One instruction of a stage: ``kind`` for ``microbatch`` (None for ALLREDUCE).

    ``stage`` is the stage that executes the action; the peer of a send or
    receive is implied by the kind (activations flow to ``stage + 1``,
    gradients to ``stage - 1``).
    """

    kind: ActionKind
    stage: int
    microbatch: int | None

    def __str__(self) -> str:
        if self.microbatch is None:
            return self.kind.value
        return f"{self.kind.value}{self.microbatch}"

    @property
    def peer(self) -> int | None:
        """The stage on the other end of a send or receive, else None."""
        if self.kind in (ActionKind.SEND_ACT, ActionKind.RECV_GRAD):
            return self.stage + 1
        if self.kind in (ActionKind.RECV_ACT, ActionKind.SEND_GRAD):
            return self.stage - 1
        return None


_ACTION_RE = re.compile(r"^(SEND_F|RECV_F|SEND_B|RECV_B|ALLREDUCE|F|B)(\d*)$")


def parse_action(text: str, stage: int) -> Action:
    """Parse the compact form written by ``str(action)`` (e.g. ``"SEND_F3"``) for ``stage``.

    Raises:
        PlanError: ``text`` is not an action.
    """
    m = _ACTION_RE.match(text) if isinstance(text, str) else None
    if m is None:
        raise PlanError(
            f"cannot parse schedule action {text!r} of stage {stage}: "
            "expected F<i>, B<i>, SEND_F<i>, RECV_F<i>, SEND_B<i>, RECV_B<i> or ALLREDUCE"
        )
    kind = ActionKind(m.group(1))
    digits = m.group(2)
    if (kind is ActionKind.ALLREDUCE) != (digits == ""):
        raise PlanError(
            f"schedule action {text!r} of stage {stage}: ALLREDUCE takes no microbatch, "
            "every other action needs one"
        )
    return Action(kind, stage, int(digits) if digits else None)


@dataclass(frozen=True)
class Schedule:
    """Per-stage action lists of one training (or inference) step.

    Attributes:
        name: the generator that made it ("gpipe", "1f1b", "forward_only").
        num_stages: pipeline depth p.
        num_microbatches: microbatches per step m.
        actions: ``actions[s]`` is stage s's ordered action list.
    """

    name: str
    num_stages: int
    num_microbatches: int
    actions: tuple[tuple[Action, ...], ...]

    def __str__(self) -> str:
        lines = [f"{self.name}: {self.num_stages} stages x {self.num_microbatches} microbatches"]
        for s, acts in enumerate(self.actions):
            lines.append(f"  stage {s}: " + " ".join(str(a) for a in acts))
        return "\n".join(lines)

    @property
    def is_training(self) -> bool:
        """True when the schedule has backward actions."""
        return any(a.kind is ActionKind.BACKWARD for acts in self.actions for a in acts)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; actions in their compact string form."""
        return {
            "name": self.name,
            "num_stages": self.num_stages,
            "num_microbatches": self.num_microbatches,
            "actions": [[str(a) for a in acts] for acts in self.actions],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Schedule:
        """Inverse of :meth:`to_dict`. Raises PlanError on malformed input."""
        try:
            acts = tuple(
                tuple(parse_action(t, s) for t in stage_acts) for s, stage_acts in enumerate(d["actions"])
            )
            return cls(str(d["name"]), int(d["num_stages"]), int(d["num_microbatches"]), acts)
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
