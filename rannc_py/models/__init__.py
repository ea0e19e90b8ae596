"""The project's own models, in plain PyTorch: :mod:`.gpt` (decoder-only) and :mod:`.bert` (encoder).

They are what the examples train and what ``python -m rannc_py plan --model
gpt:...`` / ``rbert:...`` plan, shipped inside the package so both work from
an installed copy. This package imports nothing else of rannc_py: the models
are ordinary ``nn.Module``s that any PyTorch code can use.
"""

from __future__ import annotations

from dataclasses import fields, replace
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import nn

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

C = TypeVar("C", bound="DataclassInstance")


def sized(sizes: dict[str, C], kind: str, name: str, overrides: dict[str, Any]) -> C:
    """The config of size ``name`` in ``sizes`` with ``overrides`` applied (those whose value is not None).

    Takes the named sizes (dataclass configs), the model's name for messages
    (``"GPT"``), the size name and the overrides by field name. Raises
    ``ValueError`` for an unknown size or field.
    """
    if name not in sizes:
        raise ValueError(f"unknown {kind} size {name!r}; choose one of {sorted(sizes)}")
    base = sizes[name]
    known = {f.name for f in fields(base)}
    unknown = set(overrides) - known
    if unknown:
        raise ValueError(f"unknown {type(base).__name__} fields {sorted(unknown)}; known fields are {sorted(known)}")
    return replace(base, **{k: v for k, v in overrides.items() if v is not None})


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
