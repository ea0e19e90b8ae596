"""Forward FLOP estimates for the ATen ops a traced graph contains.

Only matrix products and convolutions are counted, the same convention as
``torch.utils.flop_counter``: they dominate compute time in the models this
package targets, and everything else is memory-bound (its cost comes from
bytes, which the profiler measures separately). A multiply-add counts as two
FLOPs.

The formulas work on concrete shapes only, so estimating a 96-layer model
takes milliseconds and never allocates a tensor.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch.utils.flop_counter import conv_flop_count

Shape = Sequence[int]

aten = torch.ops.aten


def _prod(xs: Shape) -> int:
    return math.prod(int(x) for x in xs)


def _matmul(a: Shape, b: Shape, out: Shape) -> float:
    """``torch.matmul`` semantics: 1-D operands are promoted, batch dims broadcast."""
    if len(a) == 0 or len(b) == 0:
        return 0.0
    k = a[-1]
    return 2.0 * _prod(out) * k


def _linear(x: Shape, w: Shape, out: Shape) -> float:
    # weight is (out_features, in_features); the bias add is not counted.
    return 2.0 * _prod(out) * w[-1]


def _sdpa(q: Shape, k: Shape, v: Shape, out: Shape) -> float:
    # scores = q @ k^T: (..., L, E) x (..., E, S); out = p @ v: (..., L, S) x (..., S, Ev).
    batch = _prod(q[:-2])
    length, e = q[-2], q[-1]
    s, ev = k[-2], v[-1]
    return 2.0 * batch * length * s * e + 2.0 * batch * length * s * ev


def _conv(x: Shape, w: Shape, out: Shape, transposed: bool) -> float:
    return float(conv_flop_count(list(x), list(w), list(out), transposed=transposed))


# Each entry takes (tensor-argument shapes in call order, output shape, non-tensor args).
_Formula = Callable[[Sequence[Shape], Shape, tuple], float]

_FORMULAS: dict[object, _Formula] = {
    aten.linear.default: lambda s, o, a: _linear(s[0], s[1], o),
    aten.matmul.default: lambda s, o, a: _matmul(s[0], s[1], o),
    aten.mm.default: lambda s, o, a: _matmul(s[0], s[1], o),
    aten.bmm.default: lambda s, o, a: _matmul(s[0], s[1], o),
    aten.addmm.default: lambda s, o, a: _matmul(s[1], s[2], o),
    aten.baddbmm.default: lambda s, o, a: _matmul(s[1], s[2], o),
    aten.scaled_dot_product_attention.default: lambda s, o, a: _sdpa(s[0], s[1], s[2], o),
    aten.conv1d.default: lambda s, o, a: _conv(s[0], s[1], o, False),
    aten.conv2d.default: lambda s, o, a: _conv(s[0], s[1], o, False),
    aten.conv3d.default: lambda s, o, a: _conv(s[0], s[1], o, False),
    aten.conv_transpose1d.default: lambda s, o, a: _conv(s[0], s[1], o, True),
    aten.conv_transpose2d.input: lambda s, o, a: _conv(s[0], s[1], o, True),
    aten.conv_transpose3d.input: lambda s, o, a: _conv(s[0], s[1], o, True),
    aten.convolution.default: lambda s, o, a: _conv(s[0], s[1], o, bool(a[6]) if len(a) > 6 else False),
}


def op_flops(target: object, tensor_shapes: Sequence[Shape], out_shape: Shape | None, args: tuple) -> float:
    """Forward FLOPs of one op at concrete shapes.

    Takes the op's ``target`` (an ATen overload), the shapes of its tensor
    arguments in call order, its (first) output shape and its raw arguments
    (for flags such as ``transposed``). Returns the estimate, 0.0 for ops that
    are not matrix products or convolutions. Never raises on an unknown op.
    """
    formula = _FORMULAS.get(target)
    if formula is None or out_shape is None:
        return 0.0
    try:
        return float(formula(tensor_shapes, out_shape, args))
    except (IndexError, TypeError, ValueError):
        # An unexpected overload signature: an estimate of 0 is safer than a crash.
        return 0.0
