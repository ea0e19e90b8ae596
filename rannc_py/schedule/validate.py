"""Check a schedule before anything runs it."""

from __future__ import annotations

from rannc_py.errors import ConfigError, PlanError
from rannc_py.schedule.actions import INPUT_GRADIENTS, ActionKind, Schedule
from rannc_py.schedule.generators import SCHEDULES, in_flight_bound
from rannc_py.schedule.simulate import simulate

K = ActionKind
Key = tuple[ActionKind, int, "int | None"]


def _positions(schedule: Schedule) -> dict[Key, tuple[int, int]]:
    """(kind, stage, microbatch) -> (rank, index in its list); raises on misplaced or repeated actions."""
    pos: dict[Key, tuple[int, int]] = {}
    for r, acts in enumerate(schedule.actions):
        for idx, a in enumerate(acts):
            if not 0 <= a.stage < schedule.num_stages or schedule.rank_of(a.stage) != r:
                raise PlanError(f"action {a} of stage {a.stage} is in the list of rank {r}, which does not hold "
                                "that stage")
            if a.kind is K.ALLREDUCE:
                if a.microbatch is not None:
                    raise PlanError(f"stage {a.stage}: ALLREDUCE must have no microbatch, got {a.microbatch}")
            elif a.microbatch is None or not 0 <= a.microbatch < schedule.num_microbatches:
                raise PlanError(
                    f"stage {a.stage}: action {a.kind.value} has microbatch {a.microbatch!r}, outside "
                    f"0..{schedule.num_microbatches - 1}"
                )
            key = (a.kind, a.stage, a.microbatch)
            if key in pos:
                raise PlanError(f"stage {a.stage}: action {a} appears more than once")
            pos[key] = (r, idx)
    return pos


def _check_placement(schedule: Schedule) -> None:
    S, R = schedule.num_stages, schedule.num_ranks
    if schedule.stage_ranks:
        if len(schedule.stage_ranks) != S or sorted(set(schedule.stage_ranks)) != list(range(R)):
            raise PlanError(f"stage_ranks {list(schedule.stage_ranks)} must give each of the {S} stages one of "
                            f"the {R} ranks, every rank at least one stage")
    elif R != S:
        raise PlanError(f"schedule has {R} action lists for {S} stages")


def validate(schedule: Schedule) -> None:
    """Raise PlanError unless ``schedule`` is well formed and runs to completion.

    Checks, per stage s and microbatch i: each forward exactly once; in a
    training schedule (one with backwards) either one full backward B or one I
    and one W, after the forward (F before I before W); where stage s + 1 is on
    the same rank, its F after stage s's F, and stage s's backward after stage
    s + 1's (nothing is sent between them); receives before and sends after the
    compute they feed or follow, only to stages on other ranks; exactly one
    ALLREDUCE per stage, after every compute of its rank; every send matched
    by a receive; no deadlock, by executing the lists symbolically (sends
    nonblocking and eager, receives blocking); and, for a schedule a generator
    of that name makes, no rank holding more activations than
    :func:`rannc_py.schedule.generators.in_flight_bound` promises.

    Args:
        schedule: the schedule to check.
    Raises:
        PlanError: on the first violation, naming the stage and action.
    """
    S, m = schedule.num_stages, schedule.num_microbatches
    if S < 1 or m < 1:
        raise PlanError(f"schedule needs >= 1 stage and >= 1 microbatch, got p={S}, m={m}")
    _check_placement(schedule)
    pos = _positions(schedule)
    training = schedule.is_training
    for s in range(S):
        for i in range(m):
            _check_microbatch(schedule, pos, s, i, training)
        _check_allreduce(schedule, pos, s, training)
    timeline = simulate(schedule)  # raises on deadlock or unreceived messages
    if training:
        _check_memory(schedule, timeline.max_in_flight)


def _local(schedule: Schedule, s: int, other: int) -> bool | None:
    """None when stage ``other`` does not exist, else whether it shares stage s's rank."""
    if not 0 <= other < schedule.num_stages:
        return None
    return schedule.rank_of(other) == schedule.rank_of(s)


def _check_microbatch(schedule: Schedule, pos: dict[Key, tuple[int, int]], s: int, i: int, training: bool) -> None:
    f = pos.get((K.FORWARD, s, i))
    if f is None:
        raise PlanError(f"stage {s} never runs forward F{i}")
    prev, nxt = _local(schedule, s, s - 1), _local(schedule, s, s + 1)
    _order(pos, s, (K.RECV_ACT, s, i), f, before=True, needed=prev is False)
    _order(pos, s, (K.SEND_ACT, s, i), f, before=False, needed=nxt is False)
    if prev:
        _after(pos, (K.FORWARD, s - 1, i), f, f"stage {s}: F{i} must come after stage {s - 1}'s F{i} on its rank")
    full, inp, wgt = (pos.get((k, s, i)) for k in (K.BACKWARD, K.BACKWARD_INPUT, K.BACKWARD_WEIGHT))
    if not training:
        for kind in (K.BACKWARD, K.BACKWARD_INPUT, K.BACKWARD_WEIGHT, K.RECV_GRAD, K.SEND_GRAD):
            if (kind, s, i) in pos:
                raise PlanError(f"stage {s}: {kind.value}{i} in a schedule without backwards")
        return
    if (full is None) == (inp is None) or (inp is None) != (wgt is None):
        raise PlanError(f"stage {s}, microbatch {i}: needs either one full backward B{i} or one I{i} and one "
                        f"W{i}, got {[k for k, x in zip('BIW', (full, inp, wgt)) if x is not None] or 'none'}")
    b = full if full is not None else inp
    assert b is not None
    _after(pos, (K.FORWARD, s, i), b, f"stage {s}: backward B{i} comes before its forward F{i}")
    if wgt is not None and wgt[1] < b[1]:
        raise PlanError(f"stage {s}: W{i} comes before its I{i}")
    _order(pos, s, (K.RECV_GRAD, s, i), b, before=True, needed=nxt is False)
    _order(pos, s, (K.SEND_GRAD, s, i), b, before=False, needed=prev is False)
    if nxt:
        later = next(pos[k] for k in ((g, s + 1, i) for g in INPUT_GRADIENTS) if k in pos)
        if later[1] > b[1]:
            raise PlanError(f"stage {s}: backward of microbatch {i} must come after stage {s + 1}'s on its rank")


def _check_allreduce(schedule: Schedule, pos: dict[Key, tuple[int, int]], s: int, training: bool) -> None:
    ar = pos.get((K.ALLREDUCE, s, None))
    if not training:
        if ar is not None:
            raise PlanError(f"stage {s}: ALLREDUCE in a schedule without backwards")
        return
    r = schedule.rank_of(s)
    compute = [idx for idx, a in enumerate(schedule.actions[r]) if a.kind is not K.ALLREDUCE]
    if ar is None or (compute and ar[1] < compute[-1]):
        raise PlanError(f"stage {s}: a training schedule needs exactly one ALLREDUCE, at the end")


def _check_memory(schedule: Schedule, held: tuple[int, ...]) -> None:
    if schedule.name not in SCHEDULES:
        return
    try:
        bound = in_flight_bound(schedule.name, schedule.num_ranks, schedule.num_microbatches, schedule.chunks)
    except ConfigError:
        return  # not a shape the generator of that name makes: nothing promised
    for r, (h, b) in enumerate(zip(held, bound)):
        if h > b:
            raise PlanError(f"schedule {schedule.name!r}: rank {r} holds {h} microbatches' activations at once, "
                            f"more than the {b} the schedule promises")


def _after(pos: dict[Key, tuple[int, int]], key: Key, at: tuple[int, int], message: str) -> None:
    first = pos.get(key)
    if first is None or first[1] > at[1]:
        raise PlanError(message)


def _order(pos: dict[Key, tuple[int, int]], s: int, key: Key, anchor: tuple[int, int], *, before: bool,
           needed: bool) -> None:
    at = pos.get(key)
    name = f"{key[0].value}{key[2]}"
    if not needed:
        if at is not None:
            raise PlanError(f"stage {s}: {name} has no peer stage to talk to")
        return
    if at is None:
        raise PlanError(f"stage {s} is missing {name}")
    if before and at[1] > anchor[1]:
        raise PlanError(f"stage {s}: {name} must come before the compute that uses it")
    if not before and at[1] < anchor[1]:
        raise PlanError(f"stage {s}: {name} must come after the compute that produces it")
