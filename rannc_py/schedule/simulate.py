"""Execute a schedule symbolically: deadlock detection and step-time prediction.

The execution model is the runtime's: each stage runs its action list in
order; a SEND is nonblocking and eager (the sender goes on at once, the
message arrives after the link's transfer time, one message at a time per
directed link); a RECV blocks until its message has arrived. FORWARD,
BACKWARD and ALLREDUCE (the gradient sync, then the optimizer step) occupy the
stage for their cost. With every cost zero this is the tiny executor
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
    """

    forward: float
    backward: float
    send_act: float = 0.0
    send_grad: float = 0.0
    allreduce: float = 0.0
    update: float = 0.0


@dataclass(frozen=True)
class Event:
    """One executed action: on ``stage`` from ``start`` to ``end`` seconds.

    For a SEND, the interval is the message's time on the link; for a RECV,
    the time the stage waited for it.
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
        events: every action's interval, in execution order per stage.
        busy: per stage, seconds spent in FORWARD/BACKWARD/ALLREDUCE.
        max_in_flight: per stage, the most microbatches whose activations were
            held at once (forward done, backward not yet).
    """

    step_time: float
    events: tuple[Event, ...]
    busy: tuple[float, ...]
    max_in_flight: tuple[int, ...]


_SEND_TO_RECV = {K.SEND_ACT: K.RECV_ACT, K.SEND_GRAD: K.RECV_GRAD}


def simulate(schedule: Schedule, costs: Sequence[StageCosts] | None = None) -> Timeline:
    """Run ``schedule`` under the execution model above.

    Args:
        schedule: per-stage action lists.
        costs: one :class:`StageCosts` per stage; None means every cost is zero
            (only the order and deadlock-freedom matter).
    Returns:
        The :class:`Timeline` of the step.
    Raises:
        PlanError: the schedule deadlocks (every unfinished stage waits on a
            receive whose message never comes), a message is never received,
            or ``costs`` has the wrong length.
    """
    p = schedule.num_stages
    if costs is None:
        costs = [StageCosts(0.0, 0.0)] * p
    if len(costs) != p or len(schedule.actions) != p:
        raise PlanError(
            f"schedule has {len(schedule.actions)} action lists for {p} stages and "
            f"{len(costs)} stage costs; they must all match"
        )
    ptr = [0] * p
    clock = [0.0] * p
    busy = [0.0] * p
    held = [0] * p
    max_held = [0] * p
    link_free: dict[tuple[int, int], float] = {}
    # (receiving stage, recv kind, microbatch) -> arrival times in send order
    mailbox: dict[tuple[int, ActionKind, int | None], list[float]] = {}
    events: list[Event] = []
    progress = True
    while progress:
        progress = False
        for s in range(p):
            acts = schedule.actions[s]
            c = costs[s]
            while ptr[s] < len(acts):
                a = acts[ptr[s]]
                t = clock[s]
                if a.kind in (K.RECV_ACT, K.RECV_GRAD):
                    box = mailbox.get((s, a.kind, a.microbatch))
                    if not box:
                        break  # blocked: try the other stages
                    arrival = box.pop(0)
                    end = max(t, arrival)
                elif a.kind in _SEND_TO_RECV:
                    dst = s + 1 if a.kind is K.SEND_ACT else s - 1
                    if not 0 <= dst < p:
                        raise PlanError(f"stage {s} action {a} sends to stage {dst}, which does not exist")
                    cost = c.send_act if a.kind is K.SEND_ACT else c.send_grad
                    start = max(t, link_free.get((s, dst), 0.0))
                    arrival = start + cost
                    link_free[(s, dst)] = arrival
                    mailbox.setdefault((dst, _SEND_TO_RECV[a.kind], a.microbatch), []).append(arrival)
                    events.append(Event(s, a, start, arrival))
                    ptr[s] += 1
                    progress = True
                    continue
                else:
                    dur = {K.FORWARD: c.forward, K.BACKWARD: c.backward, K.ALLREDUCE: c.allreduce + c.update}[a.kind]
                    end = t + dur
                    busy[s] += dur
                    if a.kind is K.FORWARD:
                        held[s] += 1
                        max_held[s] = max(max_held[s], held[s])
                    elif a.kind is K.BACKWARD:
                        held[s] -= 1
                events.append(Event(s, a, t, end))
                clock[s] = end
                ptr[s] += 1
                progress = True
    stuck = [s for s in range(p) if ptr[s] < len(schedule.actions[s])]
    if stuck:
        waits = ", ".join(f"stage {s} at {schedule.actions[s][ptr[s]]}" for s in stuck)
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
    step = max([clock[s] for s in range(p)] + [e.end for e in events])
    return Timeline(step, tuple(events), tuple(busy), tuple(max_held))
