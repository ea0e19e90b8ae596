"""Base class of the fused optimizers: per-parameter state kept in flat buffers.

Each param group owns one flat fp32 buffer per state name (e.g. ``exp_avg``)
holding every parameter's state end to end, plus one flat fp32 buffer of step
counts. ``self.state[p]`` holds views into them under torch's names ('step'
as a 0-dim tensor, 'exp_avg', ...), so ``state_dict()`` is torch's format and
loads into ``torch.optim`` and back.

The layout follows the group's current parameter list: when that list changes
(``load_state_dict``, or a runtime rebinding the optimizer to a rank's share of
the parameters) the buffers are rebuilt and existing state is copied in.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from rannc_py.comm.tensors import check_tensor
from rannc_py.errors import ConfigError


@dataclass
class _FlatGroup:
    """The flat storage of one param group."""

    signature: tuple[tuple[int, int], ...]  # (id, numel) of each param, in order
    buffers: dict[str, Tensor]  # state name -> flat fp32 buffer
    steps: Tensor  # one fp32 step count per param
    views: list[dict[str, Tensor]] = field(
        default_factory=list
    )  # per param: name -> view


def as_number(value: Any) -> float:
    """``float(value)``, or NaN (which fails every range check) when ``value`` is not a number."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def check_param(p: Tensor, owner: str) -> None:
    """Raise ConfigError unless ``p`` is a contiguous fp32 CPU tensor."""
    check_tensor(p, f"{owner} parameter of shape {tuple(p.shape)}", torch.float32,
                 hint=f"{owner} updates contiguous float32 CPU parameters; use torch.optim for others")


class FlatStateOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` whose per-parameter state lives in flat buffers.

    Subclasses set ``_buffer_names`` (state tensors shaped like the param),
    ``_uses_step`` (whether state carries torch's 'step' tensor) and implement
    ``_update_group``.
    """

    _buffer_names: tuple[str, ...] = ()
    _uses_step: bool = True

    def __init__(self, params: Any, defaults: dict[str, Any]) -> None:
        try:
            super().__init__(params, defaults)
        except (TypeError, ValueError) as e:  # torch's checks of ``params``
            raise ConfigError(f"{type(self).__name__}: {e}; pass model.parameters() or a list of param groups") from e
        self._flat: dict[int, _FlatGroup] = {}
        for group in self.param_groups:
            for p in group["params"]:
                check_param(p, type(self).__name__)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        # Unpickled optimizers have no flat storage yet; it is rebuilt on first use.
        self.__dict__.setdefault("_flat", {})

    # ---- flat storage -------------------------------------------------

    def _flat_group(self, index: int) -> _FlatGroup:
        """The flat storage of param group ``index``, rebuilt if its params changed."""
        params = self.param_groups[index]["params"]
        signature = tuple((id(p), p.numel()) for p in params)
        flat = self._flat.get(index)
        if flat is not None and flat.signature == signature:
            return flat
        flat = self._build_flat(params, signature)
        self._flat[index] = flat
        return flat

    def _build_flat(
        self, params: list[Tensor], signature: tuple[tuple[int, int], ...]
    ) -> _FlatGroup:
        total = sum(n for _, n in signature)
        buffers = {
            name: torch.zeros(total, dtype=torch.float32) for name in self._buffer_names
        }
        flat = _FlatGroup(
            signature, buffers, torch.zeros(len(params), dtype=torch.float32)
        )
        offset = 0
        for i, p in enumerate(params):
            n = p.numel()
            views = {
                name: buf[offset : offset + n].view_as(p)
                for name, buf in buffers.items()
            }
            flat.views.append(views)
            offset += n
            # Move any state the param already has (loaded, or from an older layout).
            state = self.state.get(p)
            if not state:
                continue
            for name, view in views.items():
                old = state.get(name)
                if old is None:
                    continue
                if not isinstance(old, Tensor) or old.numel() != n:
                    raise ConfigError(
                        f"optimizer state {name!r} of a parameter of shape {tuple(p.shape)} has "
                        f"{getattr(old, 'shape', old)!r}; load a state dict saved for the same parameters"
                    )
                view.copy_(old.reshape(p.shape))
                state[name] = view
            if self._uses_step and "step" in state:
                flat.steps[i] = float(state["step"])
                state["step"] = flat.steps[i]
        return flat

    def _init_state(self, flat: _FlatGroup, i: int, p: Tensor) -> dict[str, Any]:
        """Create torch-format state for param ``i`` of a group on its first update."""
        state = self.state[p]
        if self._uses_step:
            flat.steps[i] = 0.0
            state["step"] = flat.steps[i]
        for name, view in flat.views[i].items():
            view.zero_()
            state[name] = view
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict saved by this class or by its ``torch.optim`` counterpart.

        Raises:
            ConfigError: the state does not fit the parameters, or asks for a
                feature these kernels do not implement.
        """
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            self._check_group(group)
        # Copy the loaded tensors into fresh flat buffers (never alias the source).
        self._flat.clear()
        for index in range(len(self.param_groups)):
            self._flat_group(index)

    def _check_group(self, group: dict[str, Any]) -> None:
        """Raise ConfigError if ``group`` needs something the kernels lack (subclasses)."""

    # ---- step -----------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Update every parameter that has a gradient; return ``closure()``'s loss if given.

        Raises:
            ConfigError: a gradient is sparse or not fp32 on CPU.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for index, group in enumerate(self.param_groups):
            live = [(i, p) for i, p in enumerate(group["params"]) if p.grad is not None]
            if not live:
                continue
            self._check_group(group)
            flat = self._flat_group(index)
            grads = []
            for _, p in live:
                g = p.grad
                if g.is_sparse:
                    raise ConfigError(
                        f"{type(self).__name__} does not support sparse gradients; use torch.optim"
                    )
                check_param(p, type(self).__name__)
                grads.append(check_tensor(g.contiguous(), "gradient", torch.float32))
            self._update_group(group, flat, live, grads)
        return loss

    def _update_group(
        self,
        group: dict[str, Any],
        flat: _FlatGroup,
        live: list[tuple[int, Tensor]],
        grads: list[Tensor],
    ) -> None:
        raise NotImplementedError
