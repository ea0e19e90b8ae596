"""The propagation rules of the tensor split: how each kind of op carries a split through.

Used by :mod:`rannc_py.graph.tensor_split` (see its docstring for the
method); :class:`Shard` with :func:`shard_tensor` / :func:`unshard` (a
rank's part of a tensor and the whole from the parts) are shared with the
rank programs. A rule takes the propagation and an op whose inputs include a split
tensor, and returns the split of its output (a list for a multi-output op)
with what to do to its replicated inputs first, or None when the op cannot
run on split inputs (then the split is taken back). Shapes are the traced
example's (symbolic sizes at their hints).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import fx


@dataclass(frozen=True)
class Shard:
    """How a tensor is split across the group: along ``dim``, block by block.

    ``blocks`` are the full sizes of consecutive blocks along ``dim`` (they
    sum to the dimension's size); rank ``r`` of ``t`` holds the ``r``-th
    contiguous ``1/t`` of every block, concatenated. One block is a plain
    contiguous shard; several are the blocked shard of a fused projection.
    With ``repeat`` the one block is a period: the dimension is a run of
    such blocks, as many as it holds (a batch x heads dimension merged by a
    view, whose runs are the samples' heads, at any batch size), and every
    run is cut alike.
    """

    dim: int
    blocks: tuple[int, ...]
    repeat: bool = False

    @property
    def plain(self) -> bool:
        """One contiguous part per rank (a single block, not repeated)."""
        return len(self.blocks) == 1 and not self.repeat

    def moved(self, dim: int) -> Shard:
        """The same cut along another dimension (a transpose or a view moved it there)."""
        return Shard(dim=dim, blocks=self.blocks, repeat=self.repeat)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (``repeat`` only when set)."""
        d: dict[str, Any] = {"dim": self.dim, "blocks": list(self.blocks)}
        if self.repeat:
            d["repeat"] = True
        return d


def shard_tensor(full: torch.Tensor, shard: Shard, rank: int, degree: int) -> torch.Tensor:
    """Rank ``rank``'s part of ``full`` under ``shard``: its ``1/degree`` of every block, joined.

    Differentiable (a narrow per block). Raises ValueError when a block does
    not divide by the degree.
    """
    if shard.repeat:
        (period,) = shard.blocks
        if period % degree or full.shape[shard.dim] % period:
            raise ValueError(f"runs of {period} along dim {shard.dim} (size {full.shape[shard.dim]}) do not "
                             f"divide by the tensor degree {degree}")
        local = period // degree
        runs = full.unflatten(shard.dim, (-1, period))
        return runs.narrow(shard.dim + 1, rank * local, local).flatten(shard.dim, shard.dim + 1)
    parts, start = [], 0
    for size in shard.blocks:
        if size % degree:
            raise ValueError(f"block of {size} along dim {shard.dim} does not divide by the tensor degree {degree}")
        local = size // degree
        parts.append(full.narrow(shard.dim, start + rank * local, local))
        start += size
    return parts[0] if len(parts) == 1 else torch.cat(parts, shard.dim)


def unshard(parts: Sequence[torch.Tensor], shard: Shard) -> torch.Tensor:
    """The full tensor from every rank's part (rank order); inverse of :func:`shard_tensor`."""
    degree = len(parts)
    if shard.repeat:
        local = shard.blocks[0] // degree
        runs = [x.unflatten(shard.dim, (-1, local)) for x in parts]
        return torch.cat(runs, shard.dim + 1).flatten(shard.dim, shard.dim + 1)
    pieces: list[torch.Tensor] = []
    start = 0
    for size in shard.blocks:
        local = size // degree
        pieces += [p.narrow(shard.dim, start, local) for p in parts]
        start += local
    return torch.cat(pieces, shard.dim)


def action_shard(act: Sequence[Any]) -> Shard:
    """The cut a ``narrow`` / ``gather`` input action makes (see ``OpSplit.inputs``)."""
    repeat = act[4] if act[0] == "narrow" else act[3]
    return Shard(dim=int(act[1]), blocks=tuple(act[2]), repeat=bool(repeat))


class Restart(Exception):
    """The propagation changed a decision (a candidate rejected, blocks refined): run it again."""


@dataclass
class SplitValue:
    """A split value during propagation: its shard and the column matmuls it comes from."""

    shard: Shard
    seeds: frozenset[str]


class Propagation(Protocol):
    """What the rules read of a propagation pass (:class:`rannc_py.graph.tensor_split._Pass`)."""

    t: int
    state: Any

    def split_of(self, x: Any) -> SplitValue | None: ...

    def shape(self, x: Any) -> tuple[int, ...]: ...

    def tensor_inputs(self, node: fx.Node) -> list[fx.Node]: ...

    def narrow_inputs(self, node: fx.Node, operands: dict[fx.Node, int | None],
                      like: Shard) -> dict[str, tuple[Any, ...]] | None: ...


def aten_name(node: fx.Node) -> str:
    """The ATen op name without namespace and overload (``"add"`` for ``aten.add.Tensor``)."""
    text = str(node.target)
    return text.split(".")[1] if text.startswith("aten.") else text


ELEMENTWISE = {
    "add", "sub", "mul", "div", "neg", "gelu", "silu", "relu", "tanh", "sigmoid", "exp", "log", "pow", "rsqrt",
    "sqrt", "erf", "abs", "clamp", "dropout", "to", "_to_copy", "contiguous", "clone", "alias", "detach",
    "type_as", "where", "masked_fill", "reciprocal", "square", "maximum", "minimum", "eq", "ne", "lt", "le", "gt",
    "ge", "logical_not", "bitwise_not", "__and__", "__or__",
}
_VIEWS = {"view", "reshape", "_unsafe_view"}
_REDUCTIONS = {"mean", "sum", "amax", "amin"}
_SOFTMAX = {"softmax", "_softmax", "log_softmax", "_log_softmax"}


def args_of(node: fx.Node) -> Any:
    """A node's positional arguments, untyped: the rules check what they read."""
    return node.args


def kwargs_of(node: fx.Node) -> Any:
    return node.kwargs


def nodes_in(node: fx.Node) -> Iterator[fx.Node]:
    """The fx nodes among a node's args and kwargs, nested lists included, in order."""
    found: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), found.append)
    return iter(found)


def norm_dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


# -- rules: (pass, node) -> (the output's split, input actions), or None when the op cannot run split --

_Result = tuple[Any, dict[str, tuple[Any, ...]]] | None


def _seeds(p: Propagation, node: fx.Node) -> frozenset[str]:
    return frozenset().union(*(s.seeds for x in p.tensor_inputs(node) if (s := p.split_of(x)) is not None))


def _moved(p: Propagation, node: fx.Node, dim: int | None) -> _Result:
    """The single input's split moved to output ``dim`` (None: the op cannot keep it). A plain
    shard's block becomes the new dim's size; blocks and periods are kept (the callers keep that
    dim's size)."""
    xs = p.split_of(args_of(node)[0])
    if dim is None or xs is None:
        return None
    shard = Shard(dim=dim, blocks=(p.shape(node)[dim],)) if xs.shard.plain else xs.shard.moved(dim)
    return SplitValue(shard, xs.seeds), {}


def _common(p: Propagation, node: fx.Node, operands: Sequence[Any], out_ndim: int) -> Shard | None:
    """The one split the split ``operands`` share, aligned to the output's trailing dims (None: none
    or several)."""
    shards = {s.shard.moved(s.shard.dim + out_ndim - len(p.shape(x)))
              for x in operands if isinstance(x, fx.Node) and (s := p.split_of(x)) is not None}
    return shards.pop() if len(shards) == 1 else None


def elementwise(p: Propagation, node: fx.Node) -> _Result:
    """Broadcasting ops: every split operand split on the same output dim, replicated ones narrowed."""
    out_ndim = len(p.shape(node))
    shard = _common(p, node, p.tensor_inputs(node), out_ndim)
    if shard is None:
        return None
    d = shard.dim
    operands: dict[fx.Node, int | None] = {}
    for x in p.tensor_inputs(node):
        aligned = d - (out_ndim - len(p.shape(x)))
        operands[x] = aligned if aligned >= 0 and p.shape(x)[aligned] > 1 else None
    inputs = p.narrow_inputs(node, operands, shard)
    if inputs is None:
        return None
    return SplitValue(shard, _seeds(p, node)), inputs


def _groups(src: tuple[int, ...], dst: tuple[int, ...]) -> list[tuple[list[int], list[int]]] | None:
    """Pair runs of dims of ``src`` and ``dst`` with equal products (size-1 dims left out)."""
    a = [i for i, n in enumerate(src) if n != 1]
    b = [j for j, n in enumerate(dst) if n != 1]
    out: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(a) and j < len(b):
        ga, gb = [a[i]], [b[j]]
        pa, pb = src[a[i]], dst[b[j]]
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb and i < len(a):
                ga.append(a[i])
                pa *= src[a[i]]
                i += 1
            elif pb < pa and j < len(b):
                gb.append(b[j])
                pb *= dst[b[j]]
                j += 1
            else:
                return None
        out.append((ga, gb))
    return out if i == len(a) and j == len(b) else None


def _view(p: Propagation, node: fx.Node) -> _Result:
    """A view keeps a split whose dim is the outermost of its group on both sides (heads x head_dim).

    Merging a split inner dim into an outer one (batch x heads -> one dim, as attention written
    with ``bmm`` over ``batch * heads`` does) gives a repeated shard whose period is the split
    dim's run; the view back turns that period into the split dim again."""
    xs = p.split_of(args_of(node)[0])
    assert xs is not None
    src, dst = p.shape(args_of(node)[0]), p.shape(node)
    group = next((g for g in _groups(src, dst) or [] if xs.shard.dim in g[0]), None)
    if group is None:
        return None
    ins, outs = group
    d = xs.shard.dim
    if xs.shard.repeat:  # the period's run becomes the trailing dims of the group
        if ins != [d]:
            return None
        for k in range(1, len(outs)):
            if math.prod(dst[j] for j in outs[k:]) == xs.shard.blocks[0]:
                return _moved_plain(p, xs, outs[k], dst)
        return None
    if ins[0] != d:
        if not xs.shard.plain or len(outs) != 1:
            return None
        period = math.prod(src[j] for j in ins[ins.index(d):])
        return SplitValue(Shard(dim=outs[0], blocks=(period,), repeat=True), xs.seeds), {}
    dim = outs[0]
    size = dst[dim]
    if size % p.t or (len(xs.shard.blocks) > 1 and size != src[d]):
        return None
    return _moved(p, node, dim)


def _moved_plain(p: Propagation, xs: SplitValue, dim: int, shape: tuple[int, ...]) -> _Result:
    """A plain split along output ``dim`` of ``shape`` (None when it does not divide)."""
    if shape[dim] % p.t:
        return None
    return SplitValue(Shard(dim=dim, blocks=(shape[dim],)), xs.seeds), {}


def _flatten(p: Propagation, node: fx.Node) -> _Result:
    """``flatten(x, start, end)``: a split outside the merged dims moves with them; one on the
    outermost merged dim (an unblocked split) becomes the merged dim's."""
    xs = p.split_of(args_of(node)[0])
    assert xs is not None
    ndim = len(p.shape(args_of(node)[0]))
    a = norm_dim(int(args_of(node)[1]) if len(args_of(node)) > 1 else 0, ndim) if ndim else 0
    b = norm_dim(int(args_of(node)[2]) if len(args_of(node)) > 2 else -1, ndim) if ndim else 0
    d = xs.shard.dim
    if d < a:
        return _moved(p, node, d)
    if d > b:
        return _moved(p, node, d - (b - a))
    if d != a or not xs.shard.plain:
        return None
    return _moved(p, node, a)


def _transpose(p: Propagation, node: fx.Node) -> _Result:
    xs = p.split_of(args_of(node)[0])
    assert xs is not None
    ndim = len(p.shape(node))
    a, b = (norm_dim(int(d), ndim) for d in args_of(node)[1:3])
    d = xs.shard.dim
    return _moved(p, node, b if d == a else a if d == b else d)


def _permute(p: Propagation, node: fx.Node) -> _Result:
    xs = p.split_of(args_of(node)[0])
    assert xs is not None
    ndim = len(p.shape(node))
    order = [norm_dim(int(d), ndim) for d in args_of(node)[1]]
    return _moved(p, node, order.index(xs.shard.dim))


def _unsqueeze(p: Propagation, node: fx.Node) -> _Result:
    xs = p.split_of(args_of(node)[0])
    assert xs is not None
    d = norm_dim(int(args_of(node)[1]), len(p.shape(node)))
    return _moved(p, node, xs.shard.dim + (1 if d <= xs.shard.dim else 0))


def _expand(p: Propagation, node: fx.Node) -> _Result:
    xs = p.split_of(args_of(node)[0])
    assert xs is not None
    return _moved(p, node, xs.shard.dim + len(p.shape(node)) - len(p.shape(args_of(node)[0])))


def _split(p: Propagation, node: fx.Node) -> _Result:
    """``split`` / ``split_with_sizes``: along another dim every piece keeps the split; along the
    split dim the pieces must be its blocks (a fused projection, refined here)."""
    x = args_of(node)[0]
    xs = p.split_of(x)
    assert xs is not None
    shape = p.shape(x)
    dim = norm_dim(int(args_of(node)[2]) if len(args_of(node)) > 2 else 0, len(shape))
    size = args_of(node)[1]
    sizes = tuple(size) if isinstance(size, (list, tuple)) else _chunks(shape[dim], int(size))
    return _split_into(p, node, xs, dim, sizes)


def _split_into(p: Propagation, node: fx.Node, xs: SplitValue, dim: int, sizes: tuple[int, ...]) -> _Result:
    """The pieces of a split value cut along ``dim`` into ``sizes`` (see :func:`_split`)."""
    if dim != xs.shard.dim:
        return [SplitValue(xs.shard, xs.seeds) for _ in sizes], {}
    if xs.shard.blocks != sizes or xs.shard.repeat:
        if xs.shard.plain and len(xs.seeds) == 1 and all(s % p.t == 0 for s in sizes):
            (seed,) = xs.seeds
            if seed not in p.state.blocks:
                p.state.blocks[seed] = sizes
                raise Restart
        return None
    return [SplitValue(Shard(dim=dim, blocks=(s,)), xs.seeds) for s in sizes], {}


def _chunks(n: int, size: int) -> tuple[int, ...]:
    return tuple(min(size, n - i) for i in range(0, n, size))


def _chunk(p: Propagation, node: fx.Node) -> _Result:
    """``chunk(x, n, dim)``: as ``split`` with its pieces' sizes (``ceil(size / n)`` each, the last
    smaller); along the split dim the pieces must be the blocks, and each rank's chunk of its part
    is then its part of each piece, so the call itself stays as traced."""
    x = args_of(node)[0]
    xs = p.split_of(x)
    assert xs is not None
    shape = p.shape(x)
    dim = norm_dim(int(args_of(node)[2]) if len(args_of(node)) > 2 else 0, len(shape))
    n = int(args_of(node)[1])
    sizes = _chunks(shape[dim], -(-shape[dim] // n))
    if dim == xs.shard.dim and (len(set(sizes)) != 1 or len(sizes) != n):
        return None  # uneven pieces: the ranks' chunks would not be their parts of the pieces
    return _split_into(p, node, xs, dim, sizes)


def _slice(p: Propagation, node: fx.Node) -> _Result:
    """``slice`` / ``select`` / ``narrow`` along a dim other than the split one."""
    x = args_of(node)[0]
    xs = p.split_of(x)
    assert xs is not None
    d = norm_dim(int(args_of(node)[1]) if len(args_of(node)) > 1 else 0, len(p.shape(x)))
    if d == xs.shard.dim:
        return None
    drops = aten_name(node) == "select"
    return _moved(p, node, xs.shard.dim - (1 if drops and d < xs.shard.dim else 0))


def _cat(p: Propagation, node: fx.Node) -> _Result:
    # torch.cat skips empty 1-D tensors of any other shape (a key/value cache's first step
    # concatenates one): they hold nothing to narrow.
    ndim = len(p.shape(node))
    parts = [x for x in args_of(node)[0] if not (ndim != 1 and isinstance(x, fx.Node) and p.shape(x) == (0,))]
    d = norm_dim(int(args_of(node)[1]) if len(args_of(node)) > 1 else 0, ndim)
    shard = _common(p, node, parts, ndim)
    if shard is None or shard.dim == d:
        return None
    inputs = p.narrow_inputs(node, {x: shard.dim for x in parts}, shard)
    if inputs is None:
        return None
    return SplitValue(shard, _seeds(p, node)), inputs


def _stack(p: Propagation, node: fx.Node) -> _Result:
    """``stack`` along a new dim: every part split alike (or a replicated part narrowed) keeps the split."""
    parts = args_of(node)[0]
    d = norm_dim(int(args_of(node)[1]) if len(args_of(node)) > 1 else 0, len(p.shape(node)))
    shard = _common(p, node, parts, len(p.shape(node)) - 1)
    if shard is None:
        return None
    inputs = p.narrow_inputs(node, {x: shard.dim for x in parts}, shard)
    if inputs is None:
        return None
    return SplitValue(shard.moved(shard.dim + (1 if d <= shard.dim else 0)), _seeds(p, node)), inputs


def _batched_matmul(p: Propagation, node: fx.Node) -> _Result:
    """``matmul`` / ``bmm`` of operands split on one batch dim (heads, in attention written out by
    hand: scores = q @ k^T, then scores @ v; or batch x heads merged): the product is split on it
    too. A replicated operand is narrowed where it has that batch dim, and broadcast (a weight:
    copied) where it has not. ``baddbmm(input, a, b)`` adds ``input`` as a broadcasting operand."""
    added = aten_name(node) == "baddbmm"
    a, b = args_of(node)[1:3] if added else args_of(node)[:2]
    if not all(isinstance(x, fx.Node) and len(p.shape(x)) >= 2 for x in (a, b)):
        return None
    out_ndim = len(p.shape(node))
    for x in (a, b):
        if (s := p.split_of(x)) is not None and s.shard.dim >= len(p.shape(x)) - 2:
            return None  # split along a contracted or an output feature dim: not a batch split
    extra = args_of(node)[0] if added and isinstance(args_of(node)[0], fx.Node) else None
    shard = _common(p, node, [a, b] if extra is None else [a, b, extra], out_ndim)
    if shard is None or shard.dim >= out_ndim - 2:
        return None
    d = shard.dim
    operands: dict[fx.Node, int | None] = {}
    for x in (a, b):
        aligned = d - (out_ndim - len(p.shape(x)))
        operands[x] = aligned if 0 <= aligned < len(p.shape(x)) - 2 and p.shape(x)[aligned] > 1 else None
    if extra is not None:
        aligned = d - (out_ndim - len(p.shape(extra)))
        operands[extra] = aligned if aligned >= 0 and p.shape(extra)[aligned] > 1 else None
    inputs = p.narrow_inputs(node, operands, shard)
    if inputs is None:
        return None
    return SplitValue(shard, _seeds(p, node)), inputs


def _attention(p: Propagation, node: fx.Node) -> _Result:
    """Scaled-dot-product attention over heads (dim 1 of (B, H, T, D)): q, k, v split on heads or
    narrowed to the rank's heads, the mask narrowed where it does not broadcast over heads."""
    q, k, v = args_of(node)[:3]
    mask = args_of(node)[3] if len(args_of(node)) > 3 else kwargs_of(node).get("attn_mask")
    if kwargs_of(node).get("enable_gqa") or len(p.shape(q)) != 4:
        return None
    tensors = [x for x in (q, k, v, mask) if isinstance(x, fx.Node)]
    heads = Shard(dim=1, blocks=(p.shape(q)[1],))
    splits = {s.shard for x in tensors if (s := p.split_of(x)) is not None}
    if splits != {heads} or any(p.shape(x)[1] != p.shape(q)[1] for x in (k, v)):
        return None
    operands: dict[fx.Node, int | None] = {x: 1 for x in (q, k, v)}
    if isinstance(mask, fx.Node):
        ndim = len(p.shape(mask))
        operands[mask] = ndim - 3 if ndim >= 3 and p.shape(mask)[ndim - 3] > 1 else None
    inputs = p.narrow_inputs(node, operands, heads)
    return SplitValue(heads, _seeds(p, node)), inputs or {}


def _softmax(p: Propagation, node: fx.Node) -> _Result:
    xs = p.split_of(args_of(node)[0])
    assert xs is not None
    d = norm_dim(int(args_of(node)[1]), len(p.shape(node)))
    return None if d == xs.shard.dim else _moved(p, node, xs.shard.dim)


def _reduction(p: Propagation, node: fx.Node) -> _Result:
    """``mean`` / ``sum`` / ``amax`` over dims other than the split one."""
    x = args_of(node)[0]
    xs = p.split_of(x)
    if xs is None or len(args_of(node)) < 2 or args_of(node)[1] is None:
        return None
    ndim = len(p.shape(x))
    dims = [args_of(node)[1]] if isinstance(args_of(node)[1], int) else list(args_of(node)[1])
    dims = [norm_dim(int(d), ndim) for d in dims]
    keep = bool(args_of(node)[2]) if len(args_of(node)) > 2 else bool(kwargs_of(node).get("keepdim", False))
    if xs.shard.dim in dims:
        return None
    return _moved(p, node, xs.shard.dim - (0 if keep else sum(d < xs.shard.dim for d in dims)))


RULES: dict[str, Any] = {
    **{name: _view for name in _VIEWS},
    **{name: _softmax for name in _SOFTMAX},
    **{name: _reduction for name in _REDUCTIONS},
    "transpose": _transpose,
    "flatten": _flatten,
    "permute": _permute,
    "unsqueeze": _unsqueeze,
    "expand": _expand,
    "split": _split,
    "split_with_sizes": _split,
    "chunk": _chunk,
    "slice": _slice,
    "select": _slice,
    "narrow": _slice,
    "cat": _cat,
    "stack": _stack,
    "scaled_dot_product_attention": _attention,
    "matmul": _batched_matmul,
    "bmm": _batched_matmul,
    "baddbmm": _batched_matmul,
}
