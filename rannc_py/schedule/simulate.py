"""Execute a schedule symbolically: deadlock detection and step-time prediction.

The execution model is the runtime's: each rank runs its action list in
order; a SEND is nonblocking and eager (the sender goes on at once, the
message arrives after its transfer time, one message at a time per directed
link between two ranks); a RECV blocks until its message has arrived.
FORWARD, BACKWARD (full), its two halves I (input gradients, ``backward -
backward_weight``) and W (``backward_weight``), and ALLREDUCE (the gradient
sync, then the optimizer step) occupy the rank for their stage's cost. With every cost zero this is the tiny executor
:func:`rannc_py.schedule.validate` uses to find deadlocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from rannc_py.errors import PlanError
from rannc_py.schedule.actions import Action, ActionKind, Schedule

K = ActionKind


@dataclass(frozen=True)
class StageCosts:
    """Seconds one stage spends on each action, per microbatch.

    Attributes:
        forward: one microbatch's forward on one replica.
        backward: one microbatch's backward (plus the re-run forward on a recompute stage).
        send_act: moving one microbatch's output activations to stage + 1 (including any re-split).
        send_grad: moving one microbatch's input gradients to stage - 1.
        allreduce: the stage's data-parallel gradient sync (once per step).
        update: the optimizer's step on the stage's parameters (once per step,
            after the allreduce; the ALLREDUCE action stands for both).
        backward_weight: the part of ``backward`` that computes weight
            gradients, what a split backward's W costs (its I costs the rest).
            Default 0: no split known, so I costs the whole backward and W nothing
            (plans saved before the field existed read so).
        post: seconds the stage's rank spends posting one send or receive
            (its own time, where the transfer runs beside it). Default 0.
        fixed: seconds per step of the runtime's work outside the actions
            (moving the inputs in and the outputs out, per-tensor optimizer and
            gradient work, the step's bookkeeping and collectives), charged
            with ALLREDUCE. Default 0.
    """

    forward: float
    backward: float
    send_act: float = 0.0
    send_grad: float = 0.0
    allreduce: float = 0.0
    update: float = 0.0
    backward_weight: float = 0.0
    post: float = 0.0
    fixed: float = 0.0


@dataclass(frozen=True)
class Event:
    """One executed action: by the ranks of action list ``stage`` from ``start`` to ``end`` seconds.

    ``stage`` is the index of the list that ran it: the stage itself with one
    stage per rank, else the rank (``action.stage`` names the stage). For a
    SEND, the interval is the message's time on the link; for a RECV, the time
    the rank waited for it.
    """

    stage: int
    action: Action
    start: float
    end: float


@dataclass(frozen=True)
class Timeline:
    """The result of simulating one step.

    Attributes:
        step_time: when the last stage finished its last action.
        events: every action's interval, in execution order per rank.
        busy: per rank (action list), seconds spent computing (F, B, I, W, ALLREDUCE).
        max_in_flight: per rank, the most stage-microbatch activations held at
            once (forward done, its full backward or its W not yet).
    """

    step_time: float
    events: tuple[Event, ...]
    busy: tuple[float, ...]
    max_in_flight: tuple[int, ...]


_SEND_TO_RECV = {K.SEND_ACT: K.RECV_ACT, K.SEND_GRAD: K.RECV_GRAD}


def durations(c: StageCosts) -> dict[ActionKind, float]:
    """Seconds of each compute kind of a stage with costs ``c`` (the fast path reads the same)."""
    return {K.FORWARD: c.forward, K.BACKWARD: c.backward, K.BACKWARD_INPUT: c.backward - c.backward_weight,
            K.BACKWARD_WEIGHT: c.backward_weight, K.ALLREDUCE: c.allreduce + c.update + c.fixed}


_FREES = (K.BACKWARD, K.BACKWARD_WEIGHT)


def simulate(schedule: Schedule, costs: Sequence[StageCosts] | None = None) -> Timeline:
    """Run ``schedule`` under the execution model above.

    Args:
        schedule: per-rank action lists.
        costs: one :class:`StageCosts` per stage; None means every cost is zero
            (only the order and deadlock-freedom matter).
    Returns:
        The :class:`Timeline` of the step.
    Raises:
        PlanError: the schedule deadlocks (every unfinished rank waits on a
            receive whose message never comes), a message is never received,
            or ``costs`` has the wrong length.
    """
    S, R = schedule.num_stages, schedule.num_ranks
    if costs is None:
        costs = [StageCosts(0.0, 0.0)] * S
    if len(costs) != S or (not schedule.stage_ranks and R != S):
        raise PlanError(
            f"schedule has {R} action lists for {S} stages and "
            f"{len(costs)} stage costs; they must all match"
        )
    durs = [durations(c) for c in costs]
    ptr = [0] * R
    clock = [0.0] * R
    busy = [0.0] * R
    held = [0] * R
    max_held = [0] * R
    link_free: dict[tuple[int, int], float] = {}
    # (receiving stage, recv kind, microbatch) -> arrival times in send order
    mailbox: dict[tuple[int, ActionKind, int | None], list[float]] = {}
    events: list[Event] = []
    progress = True
    while progress:
        progress = False
        for r in range(R):
            acts = schedule.actions[r]
            while ptr[r] < len(acts):
                a = acts[ptr[r]]
                t = clock[r]
                if a.kind in (K.RECV_ACT, K.RECV_GRAD):
                    box = mailbox.get((a.stage, a.kind, a.microbatch))
                    if not box:
                        break  # blocked: try the other ranks
                    arrival = box.pop(0)
                    end = max(t + costs[a.stage].post, arrival)
                elif a.kind in _SEND_TO_RECV:
                    dst = a.stage + 1 if a.kind is K.SEND_ACT else a.stage - 1
                    if not 0 <= dst < S:
                        raise PlanError(f"stage {a.stage} action {a} sends to stage {dst}, which does not exist")
                    c = costs[a.stage]
                    cost = c.send_act if a.kind is K.SEND_ACT else c.send_grad
                    link = (r, schedule.rank_of(dst))
                    t = t + c.post
                    start = max(t, link_free.get(link, 0.0))
                    arrival = start + cost
                    link_free[link] = arrival
                    mailbox.setdefault((dst, _SEND_TO_RECV[a.kind], a.microbatch), []).append(arrival)
                    events.append(Event(r, a, start, arrival))
                    clock[r] = t
                    ptr[r] += 1
                    progress = True
                    continue
                else:
                    dur = durs[a.stage][a.kind]
                    end = t + dur
                    busy[r] += dur
                    if a.kind is K.FORWARD:
                        held[r] += 1
                        max_held[r] = max(max_held[r], held[r])
                    elif a.kind in _FREES:
                        held[r] -= 1
                events.append(Event(r, a, t, end))
                clock[r] = end
                ptr[r] += 1
                progress = True
    stuck = [r for r in range(R) if ptr[r] < len(schedule.actions[r])]
    if stuck:
        waits = ", ".join(f"stage {r} at {schedule.actions[r][ptr[r]]}" for r in stuck)
        raise PlanError(
            f"schedule {schedule.name!r} deadlocks: {waits} wait for messages that are never sent; "
            "every RECV needs a matching SEND earlier in the peer's list"
        )
    left = {k: v for k, v in mailbox.items() if v}
    if left:
        (dst, kind, mb), _ = min(left.items(), key=lambda kv: (kv[0][0], kv[0][1].value, kv[0][2] or 0))
        raise PlanError(
            f"schedule {schedule.name!r}: a message for stage {dst} ({kind.value}{mb}) is sent but "
            f"never received; add the matching {kind.value}{mb} to stage {dst}'s list"
        )
    step = max([clock[r] for r in range(R)] + [e.end for e in events])
    return Timeline(step, tuple(events), tuple(busy), tuple(max_held))
