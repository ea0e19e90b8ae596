"""Coarsen a Graph's op list into a chain of blocks the search cuts between.

Ops are in topological order, so any cut of that order into consecutive runs
is a valid pipeline split (every edge goes to the same or a later stage);
blocks are therefore consecutive op runs, which keeps them convex.

1. Start with one block per run of ops under the same *layer key*: the module
   path up to its first numeric component (``transformer.h.3``), else its first
   two components (``transformer.wte``). So every transformer layer is its
   own block and can be split from its neighbours.
2. Merge the lightest block into its lighter neighbour while there are more
   than ``max_blocks`` blocks or a block carries under 1 % of the mean weight
   (weight = FLOPs + bytes written, a machine-independent proxy), so glue ops
   (residual adds, a loss) join a neighbour (RaNNC's coarsening, simplified).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rannc_py.errors import ConfigError

if TYPE_CHECKING:
    from rannc_py.graph.ir import Graph

# FLOPs charged per byte written when weighing a block: a typical machine balance.
_FLOPS_PER_BYTE = 10.0


def layer_key(module_path: str) -> str:
    """The layer an op belongs to, from its module path (see the module docstring)."""
    comps = module_path.split(".") if module_path else []
    for k, c in enumerate(comps):
        if c.isdigit():
            return ".".join(comps[: k + 1])
    return ".".join(comps[:2])


def coarsen(graph: Graph, max_blocks: int = 64) -> list[tuple[int, ...]]:
    """Group ``graph.ops`` into at most ``max_blocks`` consecutive runs.

    Args:
        graph: the traced model.
        max_blocks: upper bound on the number of blocks (>= 1).
    Returns:
        The blocks, each a tuple of consecutive op indices, in order.
    Raises:
        ConfigError: max_blocks < 1 or the graph has no ops.
    """
    if max_blocks < 1:
        raise ConfigError(f"max_blocks must be >= 1, got {max_blocks}")
    if not graph.ops:
        raise ConfigError("the graph has no ops to partition; trace a model that computes something")
    weight = [op.flops + _FLOPS_PER_BYTE * op.output_bytes for op in graph.ops]
    runs: list[list[int]] = []
    last = None
    for op in graph.ops:
        key = layer_key(op.module_path)
        if runs and key == last:
            runs[-1].append(op.index)
        else:
            runs.append([op.index])
        last = key
    w = [sum(weight[i] for i in r) for r in runs]
    while len(runs) > 1:
        mean = sum(w) / len(w)
        k = min(range(len(runs)), key=lambda i: (w[i], i))
        if len(runs) <= max_blocks and w[k] >= 0.01 * mean:
            break
        if k == 0:
            nb = 1
        elif k == len(runs) - 1:
            nb = k - 1
        else:
            nb = k - 1 if w[k - 1] <= w[k + 1] else k + 1
        lo, hi = min(k, nb), max(k, nb)
        runs[lo] = runs[lo] + runs[hi]
        w[lo] += w[hi]
        del runs[hi], w[hi]
    return [tuple(r) for r in runs]


def cut_bytes(graph: Graph) -> list[float]:
    """Bytes per sample crossing the boundary after each op (index k: between op k and k + 1).

    A batch-carrying output of op u crosses every boundary from u up to its
    last consumer; tensors without a batch dimension and the model's own
    inputs (every stage reads those directly) are not counted.
    """
    n = len(graph.ops)
    diff = [0.0] * (n + 1)
    for op in graph.ops:
        if not op.output_ops:
            continue
        nbytes = sum(t.nbytes for t in op.outputs if t.batch_dim is not None) / graph.batch_size
        last = max(op.output_ops)
        diff[op.index] += nbytes
        diff[last] -= nbytes
    out, run = [], 0.0
    for k in range(n):
        run += diff[k]
        out.append(run)
    return out
