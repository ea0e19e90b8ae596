"""Check a schedule before anything runs it."""

from __future__ import annotations

from rannc_py.errors import PlanError
from rannc_py.schedule.actions import ActionKind, Schedule
from rannc_py.schedule.simulate import simulate

K = ActionKind


def _positions(schedule: Schedule, s: int) -> dict[tuple[ActionKind, int | None], int]:
    pos: dict[tuple[ActionKind, int | None], int] = {}
    for idx, a in enumerate(schedule.actions[s]):
        if a.stage != s:
            raise PlanError(f"action {a} in stage {s}'s list says it belongs to stage {a.stage}")
        if a.kind is K.ALLREDUCE:
            if a.microbatch is not None:
                raise PlanError(f"stage {s}: ALLREDUCE must have no microbatch, got {a.microbatch}")
        elif a.microbatch is None or not 0 <= a.microbatch < schedule.num_microbatches:
            raise PlanError(
                f"stage {s}: action {a.kind.value} has microbatch {a.microbatch!r}, outside "
                f"0..{schedule.num_microbatches - 1}"
            )
        key = (a.kind, a.microbatch)
        if key in pos:
            raise PlanError(f"stage {s}: action {a} appears more than once")
        pos[key] = idx
    return pos


def validate(schedule: Schedule) -> None:
    """Raise PlanError unless ``schedule`` is well formed and runs to completion.

    Checks, per stage s and microbatch i: each forward exactly once; in a
    training schedule (one with backwards) each backward exactly once and after
    its forward, and exactly one ALLREDUCE, last; receives before and sends
    after the compute they feed or follow, and only towards existing stages;
    every send matched by a receive; and no deadlock, by executing the lists
    symbolically (sends nonblocking and eager, receives blocking).

    Args:
        schedule: the schedule to check.
    Raises:
        PlanError: on the first violation, naming the stage and action.
    """
    p, m = schedule.num_stages, schedule.num_microbatches
    if p < 1 or m < 1:
        raise PlanError(f"schedule needs >= 1 stage and >= 1 microbatch, got p={p}, m={m}")
    if len(schedule.actions) != p:
        raise PlanError(f"schedule has {len(schedule.actions)} action lists for {p} stages")
    training = schedule.is_training
    for s in range(p):
        pos = _positions(schedule, s)
        for i in range(m):
            f = pos.get((K.FORWARD, i))
            if f is None:
                raise PlanError(f"stage {s} never runs forward F{i}")
            _order(pos, s, (K.RECV_ACT, i), f, before=True, needed=s > 0)
            _order(pos, s, (K.SEND_ACT, i), f, before=False, needed=s < p - 1)
            b = pos.get((K.BACKWARD, i))
            if training:
                if b is None:
                    raise PlanError(f"stage {s} never runs backward B{i} (other stages do)")
                if b < f:
                    raise PlanError(f"stage {s}: backward B{i} comes before its forward F{i}")
                _order(pos, s, (K.RECV_GRAD, i), b, before=True, needed=s < p - 1)
                _order(pos, s, (K.SEND_GRAD, i), b, before=False, needed=s > 0)
            else:
                for kind in (K.BACKWARD, K.RECV_GRAD, K.SEND_GRAD):
                    if (kind, i) in pos:
                        raise PlanError(f"stage {s}: {kind.value}{i} in a schedule without backwards")
        ar = pos.get((K.ALLREDUCE, None))
        if training and ar != len(schedule.actions[s]) - 1:
            raise PlanError(f"stage {s}: a training schedule needs exactly one ALLREDUCE, at the end")
        if not training and ar is not None:
            raise PlanError(f"stage {s}: ALLREDUCE in a schedule without backwards")
    simulate(schedule)  # raises on deadlock or unreceived messages


def _order(
    pos: dict[tuple[ActionKind, int | None], int],
    s: int,
    key: tuple[ActionKind, int],
    anchor: int,
    *,
    before: bool,
    needed: bool,
) -> None:
    at = pos.get(key)
    name = f"{key[0].value}{key[1]}"
    if not needed:
        if at is not None:
            raise PlanError(f"stage {s}: {name} has no peer stage to talk to")
        return
    if at is None:
        raise PlanError(f"stage {s} is missing {name}")
    if before and at > anchor:
        raise PlanError(f"stage {s}: {name} must come before the compute that uses it")
    if not before and at < anchor:
        raise PlanError(f"stage {s}: {name} must come after the compute that produces it")
