"""One rank's device and the network path between two ranks: the records every cluster is made of."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rannc_py.errors import ConfigError


@dataclass(frozen=True, kw_only=True)
class Device:
    """One compute device (a rank's share of the machine).

    Attributes:
        name: preset name.
        peak_flops: dtype name ("float32", "bfloat16", "float16") -> peak FLOP/s.
        memory: bytes usable by one rank.
        memory_bandwidth: bytes/s from that memory.
        compute_efficiency: fraction of ``peak_flops`` that the model's kernels
            are assumed to reach (the analytic profile divides by it; MFU is
            still reported against the peak). Default 1.0: the figures are
            already achieved rates (the measured ``local`` preset).
        bandwidth_efficiency: the same for ``memory_bandwidth`` (default 1.0).
        action_overhead: seconds a rank spends on each compute action of a
            schedule (forward, backward, and each part of a split backward)
            besides the model's own kernels: the runtime's dispatch and
            autograd's set-up. Default 0.
        tensor_overhead: seconds per parameter tensor per step besides its
            bytes: the optimizer's per-tensor work and applying, clipping
            and zeroing each gradient. Default 0.
        step_overhead: seconds per step of fixed work outside the schedule's
            actions (checking the call, cutting the batch, returning the
            outputs), besides the collectives it takes. Default 0.

    Raises ConfigError when ``memory`` is not a positive number of bytes.
    """

    name: str
    peak_flops: tuple[tuple[str, float], ...]
    memory: int
    memory_bandwidth: float
    compute_efficiency: float = 1.0
    bandwidth_efficiency: float = 1.0
    action_overhead: float = 0.0
    tensor_overhead: float = 0.0
    step_overhead: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.memory, (int, float)) or not self.memory > 0:
            raise ConfigError(f"device {self.name!r} memory must be a positive number of bytes, got "
                              f"{self.memory!r}; give e.g. memory=8GiB in the preset or memory_limit='8GiB'")
        for name in ("action_overhead", "tensor_overhead", "step_overhead"):
            _check_seconds(f"device {self.name!r} {name}", getattr(self, name))

    def flops(self, dtype: torch.dtype | str = torch.float32) -> float:
        """Peak FLOP/s for ``dtype``. Raises ConfigError when the preset has no figure for it."""
        key = str(dtype).removeprefix("torch.")
        for name, value in self.peak_flops:
            if name == key:
                return value
        raise ConfigError(
            f"device {self.name!r} has no peak FLOP/s for {key}; known: {[n for n, _ in self.peak_flops]}"
        )


def _check_seconds(what: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
        raise ConfigError(f"{what} must be a finite number of seconds >= 0, got {value!r}")


@dataclass(frozen=True)
class Link:
    """A network path: ``bandwidth`` bytes/s per direction, ``latency`` seconds per message, and
    ``overhead`` seconds the sending or the receiving rank itself spends posting one message
    (default 0; time the rank cannot compute, where latency only delays the message)."""

    bandwidth: float
    latency: float
    overhead: float = 0.0

    def __post_init__(self) -> None:
        _check_seconds("link overhead", self.overhead)

