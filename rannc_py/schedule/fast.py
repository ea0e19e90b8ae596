"""Step time of a schedule without an event list: the simulator's arithmetic, lean.

:func:`rannc_py.schedule.simulate` records every action as an :class:`Event`,
which takes about a second for 8 stages x 2000 microbatches; the search ranks
dozens of candidates. :func:`step_time` runs the same execution model (stages
run their lists in order, SENDs are eager and serialised per directed link,
RECVs block) over a precompiled integer program per (schedule, p, m), doing
the same floating-point operations in the same order, so its result equals
``simulate(...).step_time`` exactly.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

from rannc_py.errors import PlanError
from rannc_py.schedule.actions import ActionKind
from rannc_py.schedule.generators import stage_orders
from rannc_py.schedule.simulate import StageCosts

K = ActionKind
_COMPUTE, _RECV, _SEND = 0, 1, 2

Program = tuple[tuple[tuple[tuple[int, int, int], ...], ...], tuple[tuple[int, int], ...], int]


@functools.lru_cache(maxsize=64)
def compile_schedule(name: str, p: int, m: int) -> Program:
    """Per stage ``(code, a, b)`` triples: compute (slot a), RECV (message a) or SEND (message a on link b);
    the links as (sending stage, 0 for activations / 1 for gradients); the message count.

    Message ids are ``(receiving stage * 2 + direction) * m + microbatch``; link ids
    ``sending stage * 2 + direction`` (0: activations down, 1: gradients up).
    """
    fwd, bwd, ar, recv_act, recv_grad, send_act = (K.FORWARD, K.BACKWARD, K.ALLREDUCE, K.RECV_ACT, K.RECV_GRAD,
                                                     K.SEND_ACT)
    stages = []
    for s, acts in enumerate(stage_orders(name, p, m)):
        prog = []
        for kind, mb_or_none in acts:
            mb = mb_or_none or 0  # only ALLREDUCE has none, and it sends nothing
            if kind is fwd:
                prog.append((_COMPUTE, 0, 0))
            elif kind is bwd:
                prog.append((_COMPUTE, 1, 0))
            elif kind is ar:
                prog.append((_COMPUTE, 2, 0))
            elif kind is recv_act:
                prog.append((_RECV, (s * 2) * m + mb, 0))
            elif kind is recv_grad:
                prog.append((_RECV, (s * 2 + 1) * m + mb, 0))
            elif kind is send_act:
                prog.append((_SEND, ((s + 1) * 2) * m + mb, s * 2))
            else:
                prog.append((_SEND, ((s - 1) * 2 + 1) * m + mb, s * 2 + 1))
        stages.append(tuple(prog))
    links = tuple((s, direction) for s in range(p) for direction in (0, 1))
    return tuple(stages), links, 2 * p * m


def step_time(schedule: str, num_microbatches: int, costs: Sequence[StageCosts]) -> float:
    """The step time :func:`rannc_py.schedule.simulate` gives ``by_name(schedule, len(costs), m)``.

    Args:
        schedule: "gpipe", "1f1b" or "forward_only".
        num_microbatches: m.
        costs: one :class:`StageCosts` per stage.
    Returns:
        Seconds, bit-identical to the simulator's ``step_time``.
    Raises:
        ConfigError: bad schedule name or sizes (as :func:`by_name`).
        PlanError: the schedule deadlocks.
    """
    p = len(costs)
    stages, link_kind, nmsg = compile_schedule(schedule, p, num_microbatches)
    durs = [(c.forward, c.backward, c.allreduce + c.update) for c in costs]
    link_cost = [(costs[s].send_act, costs[s].send_grad)[k] for s, k in link_kind]
    link_free = [0.0] * len(link_kind)
    arrival = [-1.0] * nmsg
    ptr = [0] * p
    clock = [0.0] * p
    last = 0.0
    progress = True
    while progress:
        progress = False
        for s in range(p):
            prog, k, t, d = stages[s], ptr[s], clock[s], durs[s]
            n = len(prog)
            while k < n:
                code, a, b = prog[k]
                if code == _COMPUTE:
                    t = t + d[a]
                elif code == _RECV:
                    arr = arrival[a]
                    if arr < 0.0:
                        break
                    t = max(t, arr)
                else:
                    start = max(t, link_free[b])
                    end = start + link_cost[b]
                    link_free[b] = end
                    arrival[a] = end
                    last = max(last, end)
                k += 1
            if k != ptr[s]:
                ptr[s], clock[s] = k, t
                progress = True
    if any(ptr[s] < len(stages[s]) for s in range(p)):
        raise PlanError(f"schedule {schedule!r} with {p} stages and {num_microbatches} microbatches deadlocks")
    return max(clock + [last])
