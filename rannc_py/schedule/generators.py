"""Pure functions that generate pipeline schedules.

p is the number of pipeline ranks, m the microbatches per step, v the model
chunks (stages) per rank; with one chunk per rank stage s runs on rank s.

- GPipe (Huang et al., 2019): every microbatch forward, then every backward.
  Stage s keeps all m microbatches' activations.
- 1F1B with a flush (PipeDream-Flush, Narayanan et al., 2021; Megatron-LM's
  non-interleaved schedule): stage s runs ``min(p - s - 1, m)`` warm-up
  forwards, then alternates one forward and one backward, then drains the
  remaining backwards. Stage s keeps at most ``min(p - s, m)`` microbatches'
  activations.
- interleaved 1F1B (Narayanan et al., 2021, Sec. 2.2, Megatron-LM's
  interleaved schedule): rank r holds stages r, r + p, ..., r + (v-1)p;
  forwards go in rounds of p microbatches through chunk 0, then chunk 1, ...;
  backwards the same with the chunks reversed; rank r runs
  ``(p - r - 1) * 2 + (v - 1) * p`` warm-up forwards, then 1F1B. Needs m a
  multiple of p (as Megatron-LM does). On equal stages the step is
  ``(v m + p - 1)`` chunk-times of forward + backward, a bubble of
  ``(p - 1) / (v m + p - 1)`` of the step against 1F1B's ``(p - 1) / (m + p - 1)``.
- ZB-H1 (Qi et al., 2024, "Zero Bubble Pipeline Parallelism", Sec. 3.1): 1F1B's
  warm-up and steady phase with the backward split into I (input gradients)
  and W (weight gradients); stage s runs its first W only after s more I's,
  so the weight gradients fill the drain. Every stage holds at most
  ``min(p, m)`` microbatches' activations (until their W), 1F1B's peak. With
  ``T_F = T_I = T_W = t`` (so a full backward is 2t) the step is
  ``(3m + p - 1) t`` for m >= p (bubble ``(p - 1) t`` per rank, a third of
  1F1B's ``3 (p - 1) t``) and ``(2m + 2p - 1) t`` for m < p: the last stage's
  I of microbatch 0 starts at ``(p - 1) t`` and I's reach stage 0 a t per
  stage later, while the W's each stage defers cover the gaps in between.
- ZB-V (Qi et al., 2024, Sec. 4): two chunks per rank in a V, rank r holds
  stages r and 2p - 1 - r, so the first and the last stage share rank 0 and
  the turn (stages p - 1, p) is on rank p - 1 with no message. The order is
  list scheduling at unit cost per F, I and W: whenever a rank is free it runs
  an I if one is ready, else an F if it holds fewer than 2p chunk-microbatch
  activations (1F1B's peak in bytes: p full microbatches), else a W; ties go
  to the older microbatch, then the later stage. On equal chunks the bubble
  is ``(p - 1)`` chunk-F times for p <= 4 and m >= p, and at most ``p + 1`` up
  to p = 8 for m >= 2p, against 1F1B's ``6 (p - 1)`` in the same unit.
- forward_only: forwards only, for evaluation or ``torch.no_grad``
  (:func:`forward_only_on`: on a chunked schedule's stage placement).

Every training schedule ends each rank's list with one ALLREDUCE per stage it holds.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

from rannc_py.errors import ConfigError, PlanError
from rannc_py.schedule.actions import Action, ActionKind, Schedule

K = ActionKind

Op = tuple[ActionKind, int, "int | None"]
"""(kind, stage, microbatch) of one action, before it becomes an :class:`Action`."""

CHUNKS = {"gpipe": 1, "1f1b": 1, "forward_only": 1, "zb-h1": 1, "interleaved": 2, "zb-v": 2}
"""Default stages per rank of each schedule."""


def _check(num_stages: int, num_microbatches: int) -> None:
    for name, v in (("num_stages", num_stages), ("num_microbatches", num_microbatches)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{name} must be a positive integer, got {v!r}")


def chunks_of(name: str, chunks: int | None = None) -> int:
    """Stages per rank of schedule ``name``: ``chunks``, or its default when None.

    Raises:
        ConfigError: unknown name, or a chunk count the schedule cannot use
            (interleaved needs >= 2, zb-v exactly 2, the others 1).
    """
    if name not in CHUNKS:
        raise ConfigError(f"unknown schedule {name!r}; choose one of {sorted(CHUNKS)}")
    v = CHUNKS[name] if chunks is None else chunks
    if isinstance(v, bool) or not isinstance(v, int):
        raise ConfigError(f"chunks must be an integer, got {v!r}")
    ok = v >= 2 if name == "interleaved" else v == CHUNKS[name]
    if not ok:
        need = ">= 2" if name == "interleaved" else str(CHUNKS[name])
        raise ConfigError(f"schedule {name!r} holds {need} chunk(s) per rank, got chunks={v}")
    return v


def _fwd(ranks: Sequence[int], s: int, i: int) -> list[Op]:
    out: list[Op] = []
    if s > 0 and ranks[s - 1] != ranks[s]:
        out.append((K.RECV_ACT, s, i))
    out.append((K.FORWARD, s, i))
    if s < len(ranks) - 1 and ranks[s + 1] != ranks[s]:
        out.append((K.SEND_ACT, s, i))
    return out


def _bwd(ranks: Sequence[int], s: int, i: int, kind: ActionKind = K.BACKWARD) -> list[Op]:
    out: list[Op] = []
    if s < len(ranks) - 1 and ranks[s + 1] != ranks[s]:
        out.append((K.RECV_GRAD, s, i))
    out.append((kind, s, i))
    if s > 0 and ranks[s - 1] != ranks[s]:
        out.append((K.SEND_GRAD, s, i))
    return out


def _allreduces(ranks: Sequence[int], r: int) -> list[Op]:
    return [(K.ALLREDUCE, s, None) for s in range(len(ranks)) if ranks[s] == r]


def _gpipe_order(p: int, m: int) -> list[list[Op]]:
    ranks = range(p)
    return [[op for i in range(m) for op in _fwd(ranks, s, i)] + [op for i in range(m) for op in _bwd(ranks, s, i)]
            + _allreduces(ranks, s) for s in range(p)]


def _one_f_one_b_order(p: int, m: int) -> list[list[Op]]:
    ranks = range(p)
    out = []
    for s in range(p):
        warm = min(p - s - 1, m)
        acts = [op for i in range(warm) for op in _fwd(ranks, s, i)]
        for k in range(m - warm):
            acts += _fwd(ranks, s, warm + k) + _bwd(ranks, s, k)
        for k in range(m - warm, m):
            acts += _bwd(ranks, s, k)
        out.append(acts + _allreduces(ranks, s))
    return out


def _forward_only_order(p: int, m: int) -> list[list[Op]]:
    return [[op for i in range(m) for op in _fwd(range(p), s, i)] for s in range(p)]


def _interleaved_order(p: int, m: int, v: int) -> list[list[Op]]:
    if m % p:
        raise ConfigError(f"interleaved 1F1B needs microbatches ({m}) to be a multiple of the pipeline ranks "
                          f"({p}); pick m in {[p * k for k in range(1, 5)]}, ...")
    ranks = [s % p for s in range(p * v)]
    out = []
    for r in range(p):
        # Rounds of p microbatches: chunk 0 of the round, then chunk 1, ... (backward: chunks reversed).
        fwd = [(c * p + r, g + i) for g in range(0, m, p) for c in range(v) for i in range(p)]
        bwd = [(c * p + r, g + i) for g in range(0, m, p) for c in reversed(range(v)) for i in range(p)]
        warm = min((p - r - 1) * 2 + (v - 1) * p, v * m)
        acts = [op for s, i in fwd[:warm] for op in _fwd(ranks, s, i)]
        for k in range(v * m - warm):
            acts += _fwd(ranks, *fwd[warm + k]) + _bwd(ranks, *bwd[k])
        for s, i in bwd[v * m - warm:]:
            acts += _bwd(ranks, s, i)
        out.append(acts + _allreduces(ranks, r))
    return out


def _zb_h1_order(p: int, m: int) -> list[list[Op]]:
    ranks = range(p)
    out = []
    for s in range(p):
        warm = min(p - s - 1, m)
        acts = [op for i in range(warm) for op in _fwd(ranks, s, i)]
        done_w = 0
        for k in range(m - warm):
            acts += _fwd(ranks, s, warm + k) + _bwd(ranks, s, k, K.BACKWARD_INPUT)
            if k >= s:  # stage s defers its W's by s microbatches: they fill the drain
                acts.append((K.BACKWARD_WEIGHT, s, done_w))
                done_w += 1
        for k in range(m - warm, m):
            acts += _bwd(ranks, s, k, K.BACKWARD_INPUT) + [(K.BACKWARD_WEIGHT, s, done_w)]
            done_w += 1
        acts += [(K.BACKWARD_WEIGHT, s, i) for i in range(done_w, m)]
        out.append(acts + _allreduces(ranks, s))
    return out


def v_ranks(p: int) -> tuple[int, ...]:
    """Rank of each of ZB-V's 2p stages: stage s on rank s, stage 2p - 1 - s on rank s too."""
    return tuple(s if s < p else 2 * p - 1 - s for s in range(2 * p))


def _zb_v_order(p: int, m: int) -> list[list[Op]]:
    ranks = v_ranks(p)
    compute = _list_schedule(p, m, ranks, cap=2 * p)
    out = []
    for r in range(p):
        acts: list[Op] = []
        for kind, s, i in compute[r]:
            assert i is not None
            acts += _fwd(ranks, s, i) if kind is K.FORWARD else (
                _bwd(ranks, s, i, kind) if kind is K.BACKWARD_INPUT else [(kind, s, i)])
        out.append(acts + _allreduces(ranks, r))
    return out


def _list_schedule(p: int, m: int, ranks: Sequence[int], cap: int) -> list[list[Op]]:
    """F, I and W per rank in the order a unit-cost list schedule runs them (see ZB-V above).

    Every action takes one time unit, so each rank is free at every step t and
    an action finished at t + 1 enables its successors from step t + 1 on.
    """
    S = len(ranks)
    mine = [[s for s in range(S) if ranks[s] == r] for r in range(p)]
    done: dict[tuple[ActionKind, int, int], int] = {}
    count = {kind: [0] * S for kind in (K.FORWARD, K.BACKWARD_INPUT, K.BACKWARD_WEIGHT)}
    held = [0] * p
    order: list[list[Op]] = [[] for _ in range(p)]
    never = 1 << 60
    left, t = 3 * S * m, 0
    while left:
        if t > 6 * S * m + 4 * S:
            raise PlanError(f"zb-v list schedule for p={p}, m={m} stalls; use another schedule")
        for r in range(p):
            ready = []
            for s in mine[r]:
                f, i, w = (count[k][s] for k in (K.FORWARD, K.BACKWARD_INPUT, K.BACKWARD_WEIGHT))
                if f < m and held[r] < cap and (s == 0 or done.get((K.FORWARD, s - 1, f), never) <= t):
                    ready.append((1, f, -s, K.FORWARD))
                if i < f and done[(K.FORWARD, s, i)] <= t and (
                        s == S - 1 or done.get((K.BACKWARD_INPUT, s + 1, i), never) <= t):
                    ready.append((0, i, -s, K.BACKWARD_INPUT))
                if w < i and done[(K.BACKWARD_INPUT, s, w)] <= t:
                    ready.append((2, w, -s, K.BACKWARD_WEIGHT))
            if not ready:
                continue
            _, mb, neg_s, kind = min(ready)
            s = -neg_s
            done[(kind, s, mb)] = t + 1
            count[kind][s] += 1
            held[r] += {K.FORWARD: 1, K.BACKWARD_WEIGHT: -1}.get(kind, 0)
            order[r].append((kind, s, mb))
            left -= 1
        t += 1
    return order


_ORDERS: dict[str, Callable[[int, int, int], list[list[Op]]]] = {
    "gpipe": lambda p, m, v: _gpipe_order(p, m),
    "1f1b": lambda p, m, v: _one_f_one_b_order(p, m),
    "interleaved": _interleaved_order,
    "zb-h1": lambda p, m, v: _zb_h1_order(p, m),
    "zb-v": lambda p, m, v: _zb_v_order(p, m),
    "forward_only": lambda p, m, v: _forward_only_order(p, m),
}


def stage_ranks(name: str, num_ranks: int, chunks: int) -> tuple[int, ...]:
    """The rank of every stage of schedule ``name`` (empty: one stage per rank, stage s on rank s)."""
    if chunks == 1:
        return ()
    return v_ranks(num_ranks) if name == "zb-v" else tuple(s % num_ranks for s in range(num_ranks * chunks))


def rank_orders(name: str, num_ranks: int, num_microbatches: int,
                chunks: int | None = None) -> tuple[tuple[int, ...], tuple[tuple[Op, ...], ...]]:
    """The (kind, stage, microbatch) sequence of every rank of schedule ``name``, and the rank of
    every stage (empty for one stage per rank), without building :class:`Action` objects (what
    :func:`by_name` wraps; used by the fast step-time code).

    Raises:
        ConfigError: unknown name, p / m not positive integers, a bad chunk count, or
            (interleaved) m not a multiple of p.
    """
    v = chunks_of(name, chunks)
    _check(num_ranks, num_microbatches)  # before the cache: 2.0 == 2 there
    return _rank_orders(name, num_ranks, num_microbatches, v)


@functools.lru_cache(maxsize=128)
def _rank_orders(name: str, p: int, m: int, v: int) -> tuple[tuple[int, ...], tuple[tuple[Op, ...], ...]]:
    return stage_ranks(name, p, v), tuple(tuple(o) for o in _ORDERS[name](p, m, v))


def by_name(name: str, num_ranks: int, num_microbatches: int, chunks: int | None = None) -> Schedule:
    """The schedule called ``name`` for ``num_ranks`` pipeline ranks and m microbatches.

    Args:
        name: "gpipe", "1f1b", "interleaved", "zb-h1", "zb-v" or "forward_only".
        num_ranks: pipeline ranks p >= 1 (the pipeline depth for one stage per rank).
        num_microbatches: microbatches per step m >= 1.
        chunks: stages per rank; default the schedule's own (2 for interleaved and zb-v, else 1).
    Returns:
        The schedule: ``chunks * p`` stages, one action list per rank.
    Raises:
        ConfigError: unknown name, p / m not positive integers, a chunk count the schedule
            cannot use, or (interleaved) m not a multiple of p.
    """
    v = chunks_of(name, chunks)
    ranks, orders = rank_orders(name, num_ranks, num_microbatches, v)
    acts = tuple(tuple(Action(k, s, i) for k, s, i in ops) for ops in orders)
    return Schedule(name, num_ranks * v, num_microbatches, acts, ranks)


def gpipe(num_stages: int, num_microbatches: int) -> Schedule:
    """GPipe: all forwards (microbatch 0..m-1), then all backwards (0..m-1), then ALLREDUCE.

    Args:
        num_stages: pipeline depth p >= 1.
        num_microbatches: microbatches per step m >= 1.
    Returns:
        The schedule, one action list per stage.
    Raises:
        ConfigError: p or m is not a positive integer.
    """
    return by_name("gpipe", num_stages, num_microbatches)


def one_f_one_b(num_stages: int, num_microbatches: int) -> Schedule:
    """1F1B with a flush (PipeDream-Flush / Megatron order), then ALLREDUCE.

    Stage s runs ``w = min(p - s - 1, m)`` warm-up forwards, then ``m - w``
    pairs (forward ``w + k``, backward ``k``), then the last ``w`` backwards,
    so it holds at most ``min(p - s, m)`` microbatches' activations.

    Args:
        num_stages: pipeline depth p >= 1.
        num_microbatches: microbatches per step m >= 1.
    Returns:
        The schedule, one action list per stage.
    Raises:
        ConfigError: p or m is not a positive integer.
    """
    return by_name("1f1b", num_stages, num_microbatches)


def interleaved(num_ranks: int, num_microbatches: int, chunks: int = 2) -> Schedule:
    """Interleaved 1F1B: ``chunks`` (v >= 2) stages per rank, rank r holding r, r + p, ...

    See the module docstring for the order and its bubble.

    Raises:
        ConfigError: p, m or v out of range, or m not a multiple of p.
    """
    return by_name("interleaved", num_ranks, num_microbatches, chunks)


def zb_h1(num_stages: int, num_microbatches: int) -> Schedule:
    """ZB-H1: 1F1B with the backward split into I and W, each stage's W deferred (module docstring).

    Raises:
        ConfigError: p or m is not a positive integer.
    """
    return by_name("zb-h1", num_stages, num_microbatches)


def zb_v(num_ranks: int, num_microbatches: int) -> Schedule:
    """ZB-V: two stages per rank in a V, split backward, list-scheduled (module docstring).

    Raises:
        ConfigError: p or m is not a positive integer.
    """
    return by_name("zb-v", num_ranks, num_microbatches)


def forward_only(num_stages: int, num_microbatches: int) -> Schedule:
    """Forwards only (evaluation / no_grad): RECV_F, F, SEND_F per microbatch; no ALLREDUCE.

    Raises:
        ConfigError: p or m is not a positive integer.
    """
    return by_name("forward_only", num_stages, num_microbatches)


def forward_only_on(name: str, num_ranks: int, num_microbatches: int, chunks: int | None = None) -> Schedule:
    """Forwards only on the stage placement of schedule ``name`` (evaluation of a chunked plan).

    Rank r runs, for each stage it holds in ascending order, every microbatch's RECV_F, F and
    SEND_F (no RECV/SEND between two adjacent stages on one rank, ZB-V's turn). Every stage
    waits only on the one before it, which its rank or an earlier stage's rank runs first, so
    no rank waits in a cycle. With one chunk per rank it is :func:`forward_only`.

    Raises:
        ConfigError: what :func:`by_name` raises for ``name`` with these arguments.
    """
    v = chunks_of(name, chunks)
    _check(num_ranks, num_microbatches)
    if v == 1:
        return forward_only(num_ranks, num_microbatches)
    ranks = stage_ranks(name, num_ranks, v)
    acts = tuple(
        tuple(Action(k, st, mb) for s in range(len(ranks)) if ranks[s] == r for i in range(num_microbatches)
              for k, st, mb in _fwd(ranks, s, i))
        for r in range(num_ranks))
    return Schedule("forward_only", num_ranks * v, num_microbatches, acts, ranks)


SCHEDULES: dict[str, Callable[[int, int], Schedule]] = {
    "gpipe": gpipe,
    "1f1b": one_f_one_b,
    "interleaved": interleaved,
    "zb-h1": zb_h1,
    "zb-v": zb_v,
    "forward_only": forward_only,
}


def in_flight_bound(name: str, num_ranks: int, num_microbatches: int, chunks: int | None = None) -> tuple[int, ...]:
    """The most stage-microbatch activations each rank holds at once (forward done, its full
    backward or W not yet), as the schedule promises; :func:`validate` checks it.

    A unit is one stage's activations of one microbatch; with v chunks a stage
    is about 1/v of the rank's model, so ``2p`` units of ZB-V weigh as much as
    1F1B's ``p``.
    """
    p, m = num_ranks, num_microbatches
    v = chunks_of(name, chunks)
    if name == "gpipe":
        return (m,) * p
    if name == "1f1b":
        return tuple(min(p - s, m) for s in range(p))
    if name == "interleaved":
        return tuple(min((p - r - 1) * 2 + (v - 1) * p + 1, v * m) for r in range(p))
    if name == "zb-h1":
        return (min(p, m),) * p
    if name == "zb-v":
        return (min(2 * p, 2 * m),) * p
    return (m,) * p  # forward_only: nothing is freed by a backward
