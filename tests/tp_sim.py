"""A simulated tensor group: the ranks run in threads of one process, collectives over Python lists.

:func:`run_ranks` calls ``fn(rank, group)`` for every rank in its own thread
and returns the results in rank order; the groups' ``all_reduce`` and
``all_gather`` meet at a barrier (a rank that fails or waits more than the
timeout breaks it, so no test hangs). Sums are taken in rank order, so every
rank gets the same bits.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch


class _Meeting:
    def __init__(self, size: int, timeout: float) -> None:
        self.size = size
        self.barrier = threading.Barrier(size, timeout=timeout)
        self.slots: list[torch.Tensor | None] = [None] * size


class SimGroup:
    """One rank's view of a simulated group (see the module docstring)."""

    def __init__(self, meeting: _Meeting, rank: int, reduce: bool = True) -> None:
        self.meeting, self.rank, self.size = meeting, rank, meeting.size
        self.reduce = reduce  # False: all_reduce(sum) returns the rank's own tensor (a deliberately wrong group)

    def _exchange(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        m = self.meeting
        m.slots[self.rank] = tensor.detach().clone()
        m.barrier.wait()
        parts = [t for t in m.slots if t is not None]
        m.barrier.wait()
        return parts

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        parts = self._exchange(tensor)
        if op == "max":
            return torch.stack(parts).amax(dim=0)
        if not self.reduce:
            return parts[self.rank]
        out = parts[0].clone()
        for p in parts[1:]:
            out += p
        return out

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        return self._exchange(tensor)


def run_ranks(size: int, fn: Callable[[int, SimGroup], Any], timeout: float = 120.0, reduce: bool = True) -> list[Any]:
    """Run ``fn(rank, group)`` for ranks 0..size-1 in lockstep threads; re-raise the first failure."""
    meeting = _Meeting(size, timeout)
    results: list[Any] = [None] * size
    errors: list[BaseException] = []

    def body(rank: int) -> None:
        try:
            results[rank] = fn(rank, SimGroup(meeting, rank, reduce))
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(e)
            meeting.barrier.abort()

    threads = [threading.Thread(target=body, args=(r,)) for r in range(size)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    real = [e for e in errors if not isinstance(e, threading.BrokenBarrierError)]
    if real or errors:
        raise (real or errors)[0]
    return results
