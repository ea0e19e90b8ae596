"""The project's own models, in plain PyTorch: :mod:`.gpt` (decoder-only) and :mod:`.bert` (encoder).

They are what the examples train and what ``python -m rannc_py plan --model
gpt:...`` / ``rbert:...`` plan, shipped inside the package so both work from
an installed copy. This package imports nothing else of rannc_py: the models
are ordinary ``nn.Module``s that any PyTorch code can use.
"""

from __future__ import annotations

import torch
from torch import nn


def materialize(model: nn.Module, device: torch.device | str = "cpu") -> nn.Module:
    """Allocate a model built on the ``meta`` device and initialise it.

    Takes the model and the target device; returns the same model, with
    storage on ``device``, every module's ``reset_parameters()`` applied
    (parents first, so tied weights are re-tied before being initialised).
    """
    model.to_empty(device=device)
    for m in model.modules():
        reset = getattr(m, "reset_parameters", None)
        if callable(reset):
            reset()
    return model
