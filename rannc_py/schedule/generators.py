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


def _fwd(s: int, p: int, i: int) -> list[Action]:
    out = []
    if s > 0:
        out.append(Action(K.RECV_ACT, s, i))
    out.append(Action(K.FORWARD, s, i))
    if s < p - 1:
        out.append(Action(K.SEND_ACT, s, i))
    return out


def _bwd(s: int, p: int, i: int) -> list[Action]:
    out = []
    if s < p - 1:
        out.append(Action(K.RECV_GRAD, s, i))
    out.append(Action(K.BACKWARD, s, i))
    if s > 0:
        out.append(Action(K.SEND_GRAD, s, i))
    return out


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
    _check(num_stages, num_microbatches)
    p, m = num_stages, num_microbatches
    stages = []
    for s in range(p):
        acts: list[Action] = []
        for i in range(m):
            acts += _fwd(s, p, i)
        for i in range(m):
            acts += _bwd(s, p, i)
        acts.append(Action(K.ALLREDUCE, s, None))
        stages.append(tuple(acts))
    return Schedule("gpipe", p, m, tuple(stages))


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
    _check(num_stages, num_microbatches)
    p, m = num_stages, num_microbatches
    stages = []
    for s in range(p):
        warm = min(p - s - 1, m)
        acts: list[Action] = []
        for i in range(warm):
            acts += _fwd(s, p, i)
        for k in range(m - warm):
            acts += _fwd(s, p, warm + k)
            acts += _bwd(s, p, k)
        for k in range(m - warm, m):
            acts += _bwd(s, p, k)
        acts.append(Action(K.ALLREDUCE, s, None))
        stages.append(tuple(acts))
    return Schedule("1f1b", p, m, tuple(stages))


def forward_only(num_stages: int, num_microbatches: int) -> Schedule:
    """Forwards only (evaluation / no_grad): RECV_F, F, SEND_F per microbatch; no ALLREDUCE.

    Raises:
        ConfigError: p or m is not a positive integer.
    """
    _check(num_stages, num_microbatches)
    p, m = num_stages, num_microbatches
    stages = []
    for s in range(p):
        acts: list[Action] = []
        for i in range(m):
            acts += _fwd(s, p, i)
        stages.append(tuple(acts))
    return Schedule("forward_only", p, m, tuple(stages))


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
