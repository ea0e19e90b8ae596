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
from rannc_py.schedule.generators import chunks_of, rank_orders
from rannc_py.schedule.simulate import StageCosts

K = ActionKind
_COMPUTE, _RECV, _SEND = 0, 1, 2
# Compute kinds in the order of the per-stage duration slots (stage * len(_SLOTS) + slot).
_SLOTS = (K.FORWARD, K.BACKWARD, K.BACKWARD_INPUT, K.BACKWARD_WEIGHT, K.ALLREDUCE)

Program = tuple[tuple[tuple[tuple[int, int, int, int], ...], ...], int, int]


@functools.lru_cache(maxsize=64)
def compile_schedule(name: str, p: int, m: int, chunks: int | None = None) -> Program:
    """Per rank ``(code, a, b, c)``: compute (duration slot a), RECV (message a, by stage b) or SEND
    (message a on link b, costing send slot c, by stage c // 2); the link count; the message count.

    Duration slots are ``stage * 5 + kind`` (F, B, I, W, ALLREDUCE); message ids
    ``(receiving stage * 2 + direction) * m + microbatch``; send slots
    ``sending stage * 2 + direction`` (0: activations down, 1: gradients up); links
    are numbered per directed pair of ranks in order of first use.
    """
    ranks, orders = rank_orders(name, p, m, chunks)

    def rank_of(s: int) -> int:
        return ranks[s] if ranks else s

    slot = {k: n for n, k in enumerate(_SLOTS)}
    links: dict[tuple[int, int], int] = {}
    out = []
    for r, ops in enumerate(orders):
        prog = []
        for kind, s, mb_or_none in ops:
            mb = mb_or_none or 0  # only ALLREDUCE has none, and it sends nothing
            if kind in slot:
                prog.append((_COMPUTE, s * len(_SLOTS) + slot[kind], 0, 0))
            elif kind is K.RECV_ACT:
                prog.append((_RECV, (s * 2) * m + mb, s, 0))
            elif kind is K.RECV_GRAD:
                prog.append((_RECV, (s * 2 + 1) * m + mb, s, 0))
            else:
                down = kind is K.SEND_ACT
                dst = s + 1 if down else s - 1
                link = links.setdefault((r, rank_of(dst)), len(links))
                prog.append((_SEND, (dst * 2 + (0 if down else 1)) * m + mb, link, s * 2 + (0 if down else 1)))
        out.append(tuple(prog))
    stages = len(ranks) if ranks else p
    return tuple(out), len(links), 2 * stages * m


def step_time(schedule: str, num_microbatches: int, costs: Sequence[StageCosts], chunks: int | None = None) -> float:
    """The step time :func:`rannc_py.schedule.simulate` gives ``by_name(schedule, p, m, chunks)``.

    Args:
        schedule: a schedule name (:data:`rannc_py.schedule.SCHEDULES`).
        num_microbatches: m.
        costs: one :class:`StageCosts` per stage (``chunks * p`` of them).
        chunks: stages per rank; default the schedule's own.
    Returns:
        Seconds, bit-identical to the simulator's ``step_time``.
    Raises:
        ConfigError: bad schedule name or sizes (as :func:`by_name`).
        PlanError: the schedule deadlocks, or ``costs`` is not a multiple of the chunks.
    """
    v = chunks_of(schedule, chunks)
    if len(costs) % v:
        raise PlanError(f"{len(costs)} stage costs for schedule {schedule!r} with {v} chunks per rank; "
                        "give one per stage, a multiple of the chunks")
    p = len(costs) // v
    ranks, nlinks, nmsg = compile_schedule(schedule, p, num_microbatches, v)
    durs: list[float] = []
    sends: list[float] = []
    posts: list[float] = []
    for c in costs:
        durs += [c.forward, c.backward, c.backward - c.backward_weight, c.backward_weight,
                 c.allreduce + c.update + c.fixed]
        sends += [c.send_act, c.send_grad]
        posts.append(c.post)
    link_free = [0.0] * nlinks
    arrival = [-1.0] * nmsg
    R = len(ranks)
    ptr = [0] * R
    clock = [0.0] * R
    last = 0.0
    progress = True
    while progress:
        progress = False
        for r in range(R):
            prog, k, t = ranks[r], ptr[r], clock[r]
            n = len(prog)
            while k < n:
                code, a, b, slot = prog[k]
                if code == _COMPUTE:
                    t = t + durs[a]
                elif code == _RECV:
                    arr = arrival[a]
                    if arr < 0.0:
                        break
                    t = max(t + posts[b], arr)
                else:
                    t = t + posts[slot // 2]
                    start = max(t, link_free[b])
                    end = start + sends[slot]
                    link_free[b] = end
                    arrival[a] = end
                    last = max(last, end)
                k += 1
            if k != ptr[r]:
                ptr[r], clock[r] = k, t
                progress = True
    if any(ptr[r] < len(ranks[r]) for r in range(R)):
        raise PlanError(f"schedule {schedule!r} with {p} ranks and {num_microbatches} microbatches deadlocks")
    return max(clock + [last])
