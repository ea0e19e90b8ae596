"""The errors rannc_py raises. Every one is a :class:`RaNNCError`.

Each message says what was wrong, the value seen, and what to do about it.
"""

from __future__ import annotations


class RaNNCError(Exception):
    """Base class of every error rannc_py raises on purpose."""


class ConfigError(RaNNCError, ValueError):
    """An argument, option or input has a value rannc_py cannot use."""


class TraceError(RaNNCError):
    """The model could not be captured into a graph."""


class PartitionError(RaNNCError):
    """A requested split of the graph into stages is not valid."""


class NoFeasiblePlanError(RaNNCError):
    """No layout of the model fits the devices' memory.

    Attributes:
        required_memory: the smallest per-device memory in bytes (before the
            margin is taken off) at which some layout would fit, or None when
            no layout exists at any memory (e.g. pins that cannot be met).
    """

    def __init__(self, message: str, *, required_memory: int | None = None) -> None:
        super().__init__(message)
        self.required_memory = required_memory


class PlanError(RaNNCError):
    """A plan is malformed or does not match the model or cluster it is used with."""


class CommError(RaNNCError):
    """Communication between ranks failed, or a rank failed and ended the job."""
