"""FusedAdam and FusedAdamW: torch.optim.Adam / AdamW run by the SIMD kernels.

The update is torch's (``_single_tensor_adam``, amsgrad off) operation for
operation, so parameters agree with ``torch.optim.Adam``/``AdamW`` to the last
bits; state lives in flat buffers (see ``_flat.py``) and one kernel call
updates a whole param group, spread over ``rannc_py.optim.set_num_threads``
threads.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from torch import Tensor

from rannc_py._core import kernels as _k
from rannc_py.errors import ConfigError
from rannc_py.optim._flat import FlatStateOptimizer, _FlatGroup, as_number


def _check_hyper(
    lr: float, betas: tuple[float, float], eps: float, weight_decay: float
) -> None:
    if not 0.0 <= as_number(lr):
        raise ConfigError(f"learning rate must be >= 0, got {lr!r}")
    if not 0.0 <= as_number(eps):
        raise ConfigError(f"eps must be >= 0, got {eps!r}")
    if not isinstance(betas, (tuple, list)) or len(betas) != 2 or not all(0.0 <= as_number(b) < 1.0 for b in betas):
        raise ConfigError(f"betas must be two values in [0, 1), got {betas!r}")
    if not 0.0 <= as_number(weight_decay):
        raise ConfigError(f"weight_decay must be >= 0, got {weight_decay!r}")


class FusedAdam(FlatStateOptimizer):
    """Adam (Kingma & Ba, 2015) with its update fused into one SIMD kernel.

    A drop-in ``torch.optim.Adam`` for contiguous fp32 CPU parameters, with the
    same arguments minus the ones that choose torch's implementation.

    Args:
        params: parameters or param groups, as for any torch optimizer.
        lr: learning rate (default 1e-3); read from the group at every step,
            so LR schedulers work.
        betas: coefficients of the running averages of the gradient and its
            square (default (0.9, 0.999)).
        eps: added to the denominator (default 1e-8).
        weight_decay: L2 penalty added to the gradient, or with
            ``decoupled_weight_decay`` the AdamW decay of the weights (default 0).
        maximize: maximize the objective instead of minimizing (default False).
        decoupled_weight_decay: AdamW's decoupled weight decay (default False).

    Raises:
        ConfigError: a hyperparameter is not a number or out of range, ``params``
            is empty or not parameters, or a parameter is not a contiguous fp32
            CPU tensor.
    """

    _buffer_names = ("exp_avg", "exp_avg_sq")
    _uses_step = True

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
        decoupled_weight_decay: bool = False,
    ) -> None:
        _check_hyper(lr, betas, eps, weight_decay)
        defaults = {
            "lr": lr,
            "betas": tuple(betas),
            "eps": eps,
            "weight_decay": weight_decay,
            "maximize": maximize,
            "decoupled_weight_decay": decoupled_weight_decay,
        }
        super().__init__(params, defaults)

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Groups saved by torch.optim.Adam carry the same keys; older ones may lack these.
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("maximize", False)
            group.setdefault("decoupled_weight_decay", False)

    def _check_group(self, group: dict[str, Any]) -> None:
        for key in ("amsgrad", "capturable", "differentiable"):
            if group.get(key, False):
                raise ConfigError(
                    f"{type(self).__name__} does not implement {key}=True (seen in a param group); "
                    f"use torch.optim.{type(self).__name__[5:]} for it"
                )

    def _update_group(
        self,
        group: dict[str, Any],
        flat: _FlatGroup,
        live: list[tuple[int, Tensor]],
        grads: list[Tensor],
    ) -> None:
        for i, p in live:
            if "exp_avg" not in self.state.get(p, {}):
                self._init_state(flat, i, p)
        index = torch.tensor([i for i, _ in live], dtype=torch.long)
        flat.steps.index_add_(0, index, torch.ones(len(live), dtype=torch.float32))
        # Params that skipped steps (no grad) have other step counts: one call per count.
        by_step: dict[float, list[int]] = defaultdict(list)
        for j, step in enumerate(flat.steps[index].tolist()):
            by_step[step].append(j)
        beta1, beta2 = (float(b) for b in group["betas"])
        for step, members in by_step.items():
            params, gs, avgs, sqs, sizes = [], [], [], [], []
            for j in members:
                i, p = live[j]
                views = flat.views[i]
                params.append(p.data_ptr())
                gs.append(grads[j].data_ptr())
                avgs.append(views["exp_avg"].data_ptr())
                sqs.append(views["exp_avg_sq"].data_ptr())
                sizes.append(p.numel())
            _k.adam_step(
                params,
                gs,
                avgs,
                sqs,
                sizes,
                lr=float(group["lr"]),
                beta1=beta1,
                beta2=beta2,
                eps=float(group["eps"]),
                weight_decay=float(group["weight_decay"]),
                step=step,
                decoupled_weight_decay=bool(group["decoupled_weight_decay"]),
                maximize=bool(group["maximize"]),
            )


class FusedAdamW(FusedAdam):
    """AdamW (Loshchilov & Hutter, 2019): :class:`FusedAdam` with decoupled weight decay.

    A drop-in ``torch.optim.AdamW`` for contiguous fp32 CPU parameters; the
    arguments are :class:`FusedAdam`'s, with ``weight_decay`` defaulting to
    1e-2 as in torch.

    Raises:
        ConfigError: a hyperparameter is not a number or out of range, ``params``
            is empty or not parameters, or a parameter is not a contiguous fp32
            CPU tensor.
    """

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        maximize: bool = False,
    ) -> None:
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            maximize=maximize,
            decoupled_weight_decay=True,
        )

    def __setstate__(self, state: dict[str, Any]) -> None:
        # As torch.optim.AdamW: loaded state is always AdamW, whatever it was saved as.
        super().__setstate__(state)
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True
