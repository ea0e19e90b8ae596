"""Pure functions that generate pipeline schedules.

- GPipe (Huang et al., 2019): every microbatch forward, then every backward.
  Stage s keeps all m microbatches' activations.
- 1F1B with a flush (PipeDream-Flush, Narayanan et al., 2021; Megatron-LM's
  non-interleaved schedule): stage s runs ``min(p - s - 1, m)`` warm-up
  forwards, then alternates one forward and one backward, then drains the
  remaining backwards. Stage s keeps at most ``min(p - s, m)`` microbatches'
  activations.
- forward_only: forwards only, for evaluation or ``torch.no_grad``.

Every training schedule ends each stage's list with one ALLREDUCE.
"""

from __future__ import annotations

from collections.abc import Callable

from rannc_py.errors import ConfigError
from rannc_py.schedule.actions import Action, ActionKind, Schedule

K = ActionKind


def _check(num_stages: int, num_microbatches: int) -> None:
    for name, v in (("num_stages", num_stages), ("num_microbatches", num_microbatches)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{name} must be a positive integer, got {v!r}")


Step = tuple[ActionKind, "int | None"]


def _fwd(s: int, p: int, i: int) -> list[Step]:
    out: list[Step] = []
    if s > 0:
        out.append((K.RECV_ACT, i))
    out.append((K.FORWARD, i))
    if s < p - 1:
        out.append((K.SEND_ACT, i))
    return out


def _bwd(s: int, p: int, i: int) -> list[Step]:
    out: list[Step] = []
    if s < p - 1:
        out.append((K.RECV_GRAD, i))
    out.append((K.BACKWARD, i))
    if s > 0:
        out.append((K.SEND_GRAD, i))
    return out


def _gpipe_order(p: int, m: int) -> list[list[Step]]:
    stages = []
    for s in range(p):
        acts: list[Step] = []
        for i in range(m):
            acts += _fwd(s, p, i)
        for i in range(m):
            acts += _bwd(s, p, i)
        acts.append((K.ALLREDUCE, None))
        stages.append(acts)
    return stages


def _one_f_one_b_order(p: int, m: int) -> list[list[Step]]:
    stages = []
    for s in range(p):
        warm = min(p - s - 1, m)
        acts: list[Step] = []
        for i in range(warm):
            acts += _fwd(s, p, i)
        for k in range(m - warm):
            acts += _fwd(s, p, warm + k)
            acts += _bwd(s, p, k)
        for k in range(m - warm, m):
            acts += _bwd(s, p, k)
        acts.append((K.ALLREDUCE, None))
        stages.append(acts)
    return stages


def _forward_only_order(p: int, m: int) -> list[list[Step]]:
    stages = []
    for s in range(p):
        acts: list[Step] = []
        for i in range(m):
            acts += _fwd(s, p, i)
        stages.append(acts)
    return stages


_ORDERS: dict[str, Callable[[int, int], list[list[Step]]]] = {
    "gpipe": _gpipe_order,
    "1f1b": _one_f_one_b_order,
    "forward_only": _forward_only_order,
}


def stage_orders(name: str, num_stages: int, num_microbatches: int) -> list[list[Step]]:
    """The (kind, microbatch) sequence of every stage of schedule ``name``, without building
    :class:`Action` objects (what :func:`by_name` wraps; used by the fast step-time code).

    Raises:
        ConfigError: unknown name, or p / m not positive integers.
    """
    order = _ORDERS.get(name)
    if order is None:
        raise ConfigError(f"unknown schedule {name!r}; choose one of {sorted(_ORDERS)}")
    _check(num_stages, num_microbatches)
    return order(num_stages, num_microbatches)


def _build(name: str, p: int, m: int) -> Schedule:
    stages = stage_orders(name, p, m)
    return Schedule(name, p, m, tuple(tuple(Action(k, s, i) for k, i in acts) for s, acts in enumerate(stages)))


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
    return _build("gpipe", num_stages, num_microbatches)


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
    return _build("1f1b", num_stages, num_microbatches)


def forward_only(num_stages: int, num_microbatches: int) -> Schedule:
    """Forwards only (evaluation / no_grad): RECV_F, F, SEND_F per microbatch; no ALLREDUCE.

    Raises:
        ConfigError: p or m is not a positive integer.
    """
    return _build("forward_only", num_stages, num_microbatches)


SCHEDULES: dict[str, Callable[[int, int], Schedule]] = {
    "gpipe": gpipe,
    "1f1b": one_f_one_b,
    "forward_only": forward_only,
}


def by_name(name: str, num_stages: int, num_microbatches: int) -> Schedule:
    """The schedule generator called ``name`` ("gpipe", "1f1b", "forward_only") applied to p, m.

    Raises:
        ConfigError: unknown name, or p / m not positive integers.
    """
    gen = SCHEDULES.get(name)
    if gen is None:
        raise ConfigError(f"unknown schedule {name!r}; choose one of {sorted(SCHEDULES)}")
    return gen(num_stages, num_microbatches)
