"""Handles on communication in flight, and the tensors they keep alive."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from rannc_py.errors import CommError, ConfigError

# Works not yet seen complete: MPI reads or writes their tensors' memory until
# then, so they stay referenced here even if the caller drops its handle.
_in_flight: list[Work] = []

_CONFIG_ERROR = 2


class Work:
    """A started communication: wait for it, or ask whether it has finished.

    Keeps the tensors it reads and writes alive until it has completed.
    """

    def __init__(self, handle: Any, tensors: tuple[Any, ...], what: str) -> None:
        self._handle = handle
        self._tensors: tuple[Any, ...] | None = tensors
        self._what = what
        self._waited = False
        _in_flight[:] = [w for w in _in_flight if not w._handle.is_completed()]
        _in_flight.append(self)

    def wait(self) -> None:
        """Block (without the GIL) until the operation completes.

        Raises: ConfigError if the ranks disagreed on sizes or algorithm;
        CommError if MPI reported a failure. Calling it again re-raises.
        """
        self._handle.wait()
        self._waited = True
        self._tensors = None
        status = self._handle.status
        if status == 1:
            return
        message = f"{self._what}: {self._handle.message}"
        if status == _CONFIG_ERROR:
            raise ConfigError(message)
        raise CommError(message)

    def is_completed(self) -> bool:
        """Return True once the operation has finished (successfully or not)."""
        return bool(self._handle.is_completed())

    def __repr__(self) -> str:
        state = "completed" if self.is_completed() else "in flight"
        return f"Work({self._what}, {state})"


def in_flight() -> bool:
    """Return True while some communication started through this package has not completed."""
    return any(not w.is_completed() for w in _in_flight)


def wait_all(works: Iterable[Work]) -> None:
    """Wait for every work in ``works``, then raise the first error among them, if any.

    Takes: an iterable of :class:`Work`.
    Raises: the first ConfigError or CommError raised by a ``wait()``.
    """
    first: BaseException | None = None
    for w in works:
        try:
            w.wait()
        except (ConfigError, CommError) as e:  # re-raised below after all have finished
            if first is None:
                first = e
    if first is not None:
        raise first
