"""Checks on tensors handed to C++ zero-copy: a CPU tensor, contiguous, of the expected dtype.

The communication engine and the SIMD kernels (:mod:`rannc_py.optim.kernels`)
read and write a tensor's memory through its address, so both check the
same things first, here. Importing this module loads no MPI.
"""

from __future__ import annotations

import torch

from rannc_py.errors import ConfigError


def check_tensor(t: object, name: str, dtype: torch.dtype | None = None, *, hint: str = "") -> torch.Tensor:
    """Return ``t`` if it is a contiguous CPU tensor (of ``dtype`` if given).

    Takes: the object to check, the argument's name for the message, the
    dtype required (None: any), and ``hint``, a sentence added to every
    message (e.g. what the caller supports instead).
    Raises: ConfigError naming the argument, what was wrong and the fix.
    """
    more = f"; {hint}" if hint else ""
    if not isinstance(t, torch.Tensor):
        raise ConfigError(f"{name} must be a torch.Tensor, got {type(t).__name__}{more}")
    if t.device.type != "cpu":
        raise ConfigError(f"{name} must be on the CPU, got device {t.device}; move it with .cpu(){more}")
    if not t.is_contiguous():
        raise ConfigError(
            f"{name} is not contiguous (shape {tuple(t.shape)}, stride {t.stride()}); "
            f"pass tensor.contiguous(){more}"
        )
    if dtype is not None and t.dtype != dtype:
        raise ConfigError(f"{name} must be {dtype}, got {t.dtype}; convert it with .to({dtype}){more}")
    return t


def nbytes(t: torch.Tensor) -> int:
    """Size of a contiguous tensor's data in bytes."""
    return t.numel() * t.element_size()
