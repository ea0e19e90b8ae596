"""FusedSGD: torch.optim.SGD (momentum, dampening, Nesterov, weight decay) run by the SIMD kernels."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from rannc_py._core import kernels as _k
from rannc_py.errors import ConfigError
from rannc_py.optim._flat import FlatStateOptimizer, _FlatGroup, as_number


class FusedSGD(FlatStateOptimizer):
    """Stochastic gradient descent with optional momentum, fused into one SIMD kernel.

    A drop-in ``torch.optim.SGD`` for contiguous fp32 CPU parameters; updates
    agree with torch's to the last bits and the momentum buffers live in one
    flat buffer per param group (state key 'momentum_buffer', as in torch).

    Args:
        params: parameters or param groups, as for any torch optimizer.
        lr: learning rate (default 1e-3), read from the group at every step.
        momentum: momentum factor (default 0).
        dampening: dampening of the momentum (default 0).
        weight_decay: L2 penalty added to the gradient (default 0).
        nesterov: Nesterov momentum (default False); needs momentum > 0 and
            dampening 0.
        maximize: maximize the objective instead of minimizing (default False).

    Raises:
        ConfigError: a hyperparameter is not a number or out of range, ``params``
            is empty or not parameters, or a parameter is not a contiguous fp32
            CPU tensor.
    """

    _buffer_names = ("momentum_buffer",)
    _uses_step = False

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
    ) -> None:
        if not 0.0 <= as_number(lr):
            raise ConfigError(f"learning rate must be >= 0, got {lr!r}")
        if not 0.0 <= as_number(momentum):
            raise ConfigError(f"momentum must be >= 0, got {momentum!r}")
        if not 0.0 <= as_number(weight_decay):
            raise ConfigError(f"weight_decay must be >= 0, got {weight_decay!r}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ConfigError(
                f"Nesterov momentum needs momentum > 0 and dampening 0, got momentum={momentum}, "
                f"dampening={dampening}"
            )
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "dampening": dampening,
            "weight_decay": weight_decay,
            "nesterov": nesterov,
            "maximize": maximize,
        }
        super().__init__(params, defaults)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("nesterov", False)
            group.setdefault("maximize", False)

    def _check_group(self, group: dict[str, Any]) -> None:
        if group.get("differentiable", False):
            raise ConfigError(
                "FusedSGD does not implement differentiable=True; use torch.optim.SGD for it"
            )

    def _update_group(
        self,
        group: dict[str, Any],
        flat: _FlatGroup,
        live: list[tuple[int, Tensor]],
        grads: list[Tensor],
    ) -> None:
        momentum = float(group["momentum"])
        # Without momentum there is no state (as in torch). With it, a param's
        # first update sets its buffer to the gradient; later ones decay it.
        batches: dict[bool, list[int]] = {True: [], False: []}
        for j, (i, p) in enumerate(live):
            first = momentum != 0.0 and "momentum_buffer" not in self.state.get(p, {})
            batches[first].append(j)
        for first, members in batches.items():
            if not members:
                continue
            params, gs, bufs, sizes = [], [], [], []
            for j in members:
                i, p = live[j]
                params.append(p.data_ptr())
                gs.append(grads[j].data_ptr())
                sizes.append(p.numel())
                if momentum != 0.0:
                    bufs.append(flat.views[i]["momentum_buffer"].data_ptr())
            _k.sgd_step(
                params,
                gs,
                bufs,
                sizes,
                lr=float(group["lr"]),
                momentum=momentum,
                dampening=float(group["dampening"]),
                weight_decay=float(group["weight_decay"]),
                nesterov=bool(group["nesterov"]),
                maximize=bool(group["maximize"]),
                first_step=first,
            )
            if first:
                for j in members:
                    i, p = live[j]
                    self.state[p]["momentum_buffer"] = flat.views[i]["momentum_buffer"]
