"""Recompute symbolic sizes inside a stage instead of sending them.

With a dynamic batch, shape arithmetic in the traced graph (``x.size(0)``,
``B * T``) produces SymInt nodes. A stage that needs such a value rebuilds
it from its sympy expression, reading each symbol as ``sym_size`` of the
user input that defines it; user inputs are available to every stage, so no
integer ever crosses a stage boundary.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import sympy
import torch
from torch import fx
from torch.utils._sympy.functions import FloorDiv, Mod, PythonMod

aten = torch.ops.aten


class Untranslatable(Exception):
    """The expression uses a construct :func:`emit` does not rebuild."""


def constant_value(val: Any) -> int | float | bool | None:
    """The Python value of a scalar node's ``val`` if it does not depend on any symbol, else None."""
    if isinstance(val, (bool, int, float)):
        return val
    if isinstance(val, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        expr = val.node.expr
        if not expr.free_symbols:
            if isinstance(val, torch.SymBool):
                return bool(expr)
            return int(expr) if isinstance(val, torch.SymInt) else float(expr)
    return None


def symbols_of(val: Any, known: dict[sympy.Symbol, tuple[str, int]]) -> set[sympy.Symbol] | None:
    """The symbols a SymInt ``val`` depends on, or None if it cannot be rebuilt from ``known`` symbols."""
    if not isinstance(val, torch.SymInt):
        return None
    expr = val.node.expr
    if not expr.free_symbols <= set(known):
        return None
    try:
        _check(expr)
    except Untranslatable:
        return None
    return set(expr.free_symbols)


def _check(expr: sympy.Expr) -> None:
    if isinstance(expr, (sympy.Integer, sympy.Symbol)):
        return
    if isinstance(expr, (sympy.Add, sympy.Mul, FloorDiv, Mod, PythonMod)):
        for arg in expr.args:
            _check(arg)
        return
    if isinstance(expr, sympy.Pow) and isinstance(expr.exp, sympy.Integer) and int(expr.exp) >= 1:
        _check(expr.base)
        return
    raise Untranslatable(str(expr))


def emit(graph: fx.Graph, expr: sympy.Expr, symbol_node: Callable[[sympy.Symbol], fx.Node]) -> Any:
    """Append nodes computing integer ``expr`` to ``graph`` and return the result node (or int).

    ``symbol_node`` returns the node holding a symbol's value. Raises
    Untranslatable for an expression outside + * // % and integer powers.
    """
    if isinstance(expr, sympy.Integer):
        return int(expr)
    if isinstance(expr, sympy.Symbol):
        return symbol_node(expr)
    if isinstance(expr, (sympy.Add, sympy.Mul)):
        fn = operator.add if isinstance(expr, sympy.Add) else operator.mul
        # sympy keeps the numeric coefficient first; start from it so ints stay ints.
        parts = [emit(graph, arg, symbol_node) for arg in expr.args]
        acc = parts[0]
        for part in parts[1:]:
            acc = _apply(graph, fn, acc, part)
        return acc
    if isinstance(expr, FloorDiv):
        return _apply(graph, operator.floordiv, emit(graph, expr.args[0], symbol_node), emit(graph, expr.args[1], symbol_node))
    if isinstance(expr, (Mod, PythonMod)):
        return _apply(graph, operator.mod, emit(graph, expr.args[0], symbol_node), emit(graph, expr.args[1], symbol_node))
    if isinstance(expr, sympy.Pow) and isinstance(expr.exp, sympy.Integer) and int(expr.exp) >= 1:
        base = emit(graph, expr.base, symbol_node)
        acc = base
        for _ in range(int(expr.exp) - 1):
            acc = _apply(graph, operator.mul, acc, base)
        return acc
    raise Untranslatable(str(expr))


def _apply(graph: fx.Graph, fn: Callable[[Any, Any], Any], a: Any, b: Any) -> Any:
    if not isinstance(a, fx.Node) and not isinstance(b, fx.Node):
        return fn(a, b)
    return graph.call_function(fn, (a, b))
