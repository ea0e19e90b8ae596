"""How a model's call arguments and outputs map to flat lists of tensors.

The traced graph takes and returns flat tuples of tensors. An
:class:`InputLayout` remembers how the user's ``(args, kwargs)`` flatten into
named tensors (Python scalars such as ``use_cache=False`` become constants of
the trace); an :class:`OutputLayout` rebuilds the model's output object
(tensor, tuple, dict, dataclass or Hugging Face ``ModelOutput``) from the
flat tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree

from rannc_py.errors import ConfigError, TraceError

# Non-tensor leaves that a trace can bake in as constants.
_CONSTANT_TYPES = (bool, int, float)


def _key_name(key: Any) -> str:
    if isinstance(key, pytree.MappingKey):
        return str(key.key)
    if isinstance(key, pytree.SequenceKey):
        return str(key.idx)
    if isinstance(key, pytree.GetAttrKey):
        return key.name
    return str(key).strip(".[]'\"")


def _flatten_with_names(tree: Any, root: str) -> tuple[list[tuple[str, Any]], pytree.TreeSpec]:
    try:
        pairs, spec = pytree.tree_flatten_with_path(tree)
        named = [(".".join(_key_name(k) for k in path), leaf) for path, leaf in pairs]
    except ValueError:
        # A container registered without key names: number the leaves instead.
        leaves, spec = pytree.tree_flatten(tree)
        named = [(f"{root}{i}", leaf) for i, leaf in enumerate(leaves)]
    return named, spec


def _sorted_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    # Flattening order must not depend on the order the caller wrote kwargs in.
    return {k: kwargs[k] for k in sorted(kwargs)}


class InputLayout:
    """The flattening of a traced call's ``(args, kwargs)``.

    ``names`` lists the tensor inputs: a positional argument ``i`` is named
    ``arg{i}``, a keyword argument by its key, nested leaves with a dotted
    suffix (``arg0.1``, ``batch.mask``).
    """

    def __init__(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        named, self.spec = _flatten_with_names((tuple(args), _sorted_kwargs(kwargs)), "input")
        self.names: list[str] = []
        # For each leaf: the tensor input's name, or None and the constant.
        self.leaves: list[tuple[str | None, Any]] = []
        for path, leaf in named:
            name = self._name(path)
            if isinstance(leaf, torch.Tensor):
                self.names.append(name)
                self.leaves.append((name, None))
            elif isinstance(leaf, _CONSTANT_TYPES):
                self.leaves.append((None, leaf))
            else:
                hint = " Tokenize text into tensors first." if isinstance(leaf, str) else ""
                raise TraceError(
                    f"input {name!r} is a {type(leaf).__name__} ({leaf!r:.60}), which cannot be traced: inputs "
                    f"must be tensors, Python bool/int/float constants, None, or tuples/lists/dicts of these.{hint}"
                )
        if not self.names:
            raise TraceError("the model call has no tensor input; pass at least one tensor in args or kwargs")

    @staticmethod
    def _name(path: str) -> str:
        head, _, rest = path.partition(".")
        if head == "0":  # positional: "0.<i>[.<nested>]"
            index, _, nested = rest.partition(".")
            return f"arg{index}" + (f".{nested}" if nested else "")
        return rest  # keyword: "1.<key>[.<nested>]"

    def flatten(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Map a call with the traced structure to ``{input name: tensor}``; raises ConfigError."""
        leaves, spec = pytree.tree_flatten((tuple(args), _sorted_kwargs(kwargs)))
        if spec != self.spec:
            raise ConfigError(
                f"the call's arguments have structure {spec}, but the model was traced with {self.spec}; "
                "call it with the same positional/keyword arguments as the traced example"
            )
        out: dict[str, torch.Tensor] = {}
        for (name, const), leaf in zip(self.leaves, leaves):
            if name is not None:
                if not isinstance(leaf, torch.Tensor):
                    raise ConfigError(f"input {name!r} was a tensor when traced but is {type(leaf).__name__} now")
                out[name] = leaf
            elif leaf != const:
                raise ConfigError(
                    f"a constant input was {const!r} when traced but is {leaf!r} now; constants are baked "
                    "into the trace, so trace again with the new value"
                )
        return out

    def unflatten(self, tensors: Sequence[torch.Tensor]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Rebuild ``(args, kwargs)`` from the tensor inputs in ``names`` order."""
        it = iter(tensors)
        leaves = [next(it) if name is not None else const for name, const in self.leaves]
        args, kwargs = pytree.tree_unflatten(leaves, self.spec)
        return tuple(args), dict(kwargs)


class OutputLayout:
    """The flattening of a model's output into named tensors."""

    def __init__(self, output: Any) -> None:
        named, self.spec = _flatten_with_names(output, "output")
        self.names: list[str] = []
        self.leaves: list[tuple[bool, Any]] = []  # (is tensor, constant)
        for path, leaf in named:
            if isinstance(leaf, torch.Tensor):
                self.names.append(path or "output")
                self.leaves.append((True, None))
            else:
                self.leaves.append((False, leaf))
        if len(set(self.names)) != len(self.names):
            self.names = [f"output{i}" for i in range(len(self.names))]

    def flatten(self, output: Any) -> list[torch.Tensor]:
        """The tensor leaves of ``output`` (a value with the traced structure)."""
        leaves, _ = pytree.tree_flatten(output)
        return [x for (is_tensor, _), x in zip(self.leaves, leaves) if is_tensor]

    def unflatten(self, values: list[torch.Tensor]) -> Any:
        """Rebuild the output object from its tensors in ``names`` order; raises ConfigError."""
        if len(values) != len(self.names):
            raise ConfigError(
                f"expected {len(self.names)} output tensors ({self.names}), got {len(values)}"
            )
        it = iter(values)
        leaves = [next(it) if is_tensor else const for is_tensor, const in self.leaves]
        return pytree.tree_unflatten(leaves, self.spec)
