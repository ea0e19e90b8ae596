"""Checks on the tensors handed to the engine: CPU, contiguous, right dtype."""

from __future__ import annotations

import torch

from rannc_py.errors import ConfigError


def check_buffer(t: object, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Return ``t`` if it is a contiguous CPU tensor (of ``dtype`` if given).

    Raises: ConfigError naming the argument and what was wrong.
    """
    if not isinstance(t, torch.Tensor):
        raise ConfigError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise ConfigError(f"{name} must be on the CPU, got device {t.device}; move it with .cpu()")
    if not t.is_contiguous():
        raise ConfigError(
            f"{name} is not contiguous (shape {tuple(t.shape)}, stride {t.stride()}); "
            "pass tensor.contiguous()"
        )
    if dtype is not None and t.dtype != dtype:
        raise ConfigError(f"{name} must be {dtype}, got {t.dtype}")
    return t


def nbytes(t: torch.Tensor) -> int:
    """Size of a contiguous tensor's data in bytes."""
    return t.numel() * t.element_size()
