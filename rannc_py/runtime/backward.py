"""Split backward: the input gradients now (``I``), the weight gradients later (``W``).

Zero-bubble schedules (Qi et al., 2024) send a stage's input gradients
upstream as soon as they exist and defer the weight gradients into the
pipeline's idle time. :func:`backward_input` and :func:`backward_weight`
do the two parts of one microbatch's backward; together they give bitwise
the gradients of one ``torch.autograd.backward`` over the same graph, and no
autograd node's work is done twice.

The cut, in the microbatch's autograd graph (backward nodes; an edge goes
from a node to the nodes its outputs feed):

- *input nodes* lie on a path to one of the stage's inputs. I runs exactly
  these: ``torch.autograd.grad`` with respect to the inputs, keeping the graph.
- *weight nodes* are the others that lead to a parameter. W runs them.
- a *boundary* is an input node with an output towards weight nodes (the
  backward of a matmul, of a layer norm): in I it computes only its input
  outputs, and a pre-hook keeps the gradient it received; W runs it again
  from that gradient with only its weight outputs wanted. An output with no
  input node above it (every node of the first stage, whose inputs are
  integers) is its own root in W.

Every node thus runs on the same incoming gradient and the same saved
tensors as in one backward, and the engine sums a node's incoming gradients
in the same order (it runs ready nodes latest-created first, and input nodes
only ever wait on input nodes), so each output, and each ``.grad``
accumulation, is bitwise the full backward's.

W is one engine call per *group*: the boundaries whose weight nodes meet (a
parameter read by several ops joins them), with ``inputs=`` the group's
parameters. One call for every boundary would not do: the engine would also
re-run the input nodes between two boundaries, since they lead to the lower
one's weights. A group whose boundaries lie on one path of input nodes (a
weight read twice along the path to the inputs) cannot be cut that way; it
is not split: I computes its parameters' gradients as well and W
accumulates them.

The graph stays alive from I to W: a split-backward schedule holds a
microbatch's activations until its W (as its memory model counts them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge, Node, get_gradient_edge


@dataclass
class _Group:
    """Boundaries whose weight parts share nodes, and the parameters they lead to."""

    boundaries: list[Node] = field(default_factory=list)
    roots: list[tuple[Tensor, Tensor]] = field(default_factory=list)  # outputs rooted in weight nodes
    params: dict[int, Tensor] = field(default_factory=dict)  # id -> parameter
    whole: bool = False  # not split: I computes the parameters' gradients


@dataclass
class WeightWork:
    """What :func:`backward_weight` needs of one microbatch: per group, its W roots and gradients,
    and its parameters."""

    calls: list[tuple[list[GradientEdge], list[Tensor], list[Tensor]]]
    accumulate: list[tuple[Tensor, Tensor]]  # (parameter, gradient) of groups computed in I


def _kids(node: Node) -> list[Node]:
    return [n for n, _ in node.next_functions if n is not None]


def _reach(roots: list[Node], inputs: set[int], params: set[int]) -> tuple[dict[Node, bool], dict[Node, bool]]:
    """For every node below ``roots``: does it lead to an input, does it lead to a parameter."""
    to_input: dict[Node, bool] = {}
    to_param: dict[Node, bool] = {}
    stack: list[tuple[Node, bool]] = [(r, False) for r in roots]
    seen: set[Node] = set()
    while stack:
        node, expanded = stack.pop()
        if expanded:
            leaf = id(node.variable) if hasattr(node, "variable") else None  # AccumulateGrad of a leaf
            kids = _kids(node)
            to_input[node] = leaf in inputs or any(to_input[k] for k in kids)
            to_param[node] = leaf in params or any(to_param[k] for k in kids)
        elif node not in seen:
            seen.add(node)
            stack.append((node, True))
            stack.extend((k, False) for k in _kids(node) if k not in seen)
    return to_input, to_param


def _group(units: list[tuple[Node | None, list[Node], list[tuple[Tensor, Tensor]]]], to_input: dict[Node, bool],
           to_param: dict[Node, bool], params: dict[int, Tensor]) -> list[_Group]:
    """Join the units (a boundary or an output's weight root, with the weight nodes just below it)
    whose weight nodes meet; each group with the parameters its weight nodes reach."""
    parent = list(range(len(units)))

    def find(u: int) -> int:
        while parent[u] != u:
            parent[u] = parent[parent[u]]
            u = parent[u]
        return u

    owner: dict[Node, int] = {}
    leaves: list[list[Tensor]] = [[] for _ in units]
    for u, (_, below, _) in enumerate(units):
        stack = list(below)
        while stack:
            node = stack.pop()
            if node in owner:
                parent[find(owner[node])] = find(u)
                continue
            owner[node] = u
            if hasattr(node, "variable") and id(node.variable) in params:
                leaves[u].append(node.variable)
            stack.extend(k for k in _kids(node) if to_param[k] and not to_input[k])
    groups: dict[int, _Group] = {}
    for u, (boundary, _, roots) in enumerate(units):
        g = groups.setdefault(find(u), _Group())
        if boundary is not None:
            g.boundaries.append(boundary)
        g.roots += roots
        g.params.update((id(p), p) for p in leaves[u])
    out = list(groups.values())
    for g in out:
        g.whole = len(g.boundaries) > 1 and _on_one_path(g.boundaries, to_input)
    return out


def _on_one_path(boundaries: list[Node], to_input: dict[Node, bool]) -> bool:
    """True when one of ``boundaries`` reaches another through input nodes."""
    targets = set(boundaries)
    for b in boundaries:
        stack = [k for k in _kids(b) if to_input.get(k, False)]
        seen: set[Node] = set()
        while stack:
            node = stack.pop()
            if node in targets:
                return True
            if node not in seen:
                seen.add(node)
                stack.extend(k for k in _kids(node) if to_input.get(k, False))
    return False


def _cut(outputs: Sequence[Tensor], grads: Sequence[Tensor], inputs: Sequence[Tensor],
         params: Sequence[Tensor]) -> tuple[list[_Group], dict[Node, bool]]:
    """The groups of the graph below ``outputs`` (see the module docstring), and which nodes are input nodes."""
    edges = [get_gradient_edge(t) for t in outputs]
    by_id = {id(p): p for p in params}
    to_input, to_param = _reach(list({e.node: None for e in edges}), {id(t) for t in inputs}, set(by_id))
    units: list[tuple[Node | None, list[Node], list[tuple[Tensor, Tensor]]]] = []
    rooted: dict[Node, list[tuple[Tensor, Tensor]]] = {}
    for t, g, e in zip(outputs, grads, edges):
        if not to_input[e.node] and to_param[e.node]:
            rooted.setdefault(e.node, []).append((t, g))
    units += [(None, [node], roots) for node, roots in rooted.items()]
    for node, inward in to_input.items():
        below = [k for k in _kids(node) if to_param[k] and not to_input[k]]
        if inward and below:
            units.append((node, below, []))
    return _group(units, to_input, to_param, by_id), to_input


def backward_input(outputs: Sequence[Tensor], grads: Sequence[Tensor], inputs: Sequence[Tensor],
                   params: Sequence[Tensor]) -> tuple[list[Tensor | None], WeightWork]:
    """The I part of one backward: the gradients of ``inputs``, and what the W part needs.

    Args:
        outputs: the stage's outputs to back-propagate from (the loss, or the
            outputs whose gradients came from the next stage).
        grads: their gradients, one per output.
        inputs: the stage's inputs that need a gradient (leaves requiring grad).
        params: the stage's parameters that need a gradient.

    Returns:
        Each input's gradient (None where no output depends on it), and the
        :class:`WeightWork` to pass to :func:`backward_weight` (which must run
        before the outputs' graph is dropped).
    """
    groups, _ = _cut(outputs, grads, inputs, params)
    kept: dict[Node, tuple[Tensor | None, ...]] = {}
    hooks = [b.register_prehook(_keeper(kept, b)) for g in groups if not g.whole for b in g.boundaries]
    whole = [p for g in groups if g.whole for p in g.params.values()]
    wanted = [*inputs, *whole]
    try:
        got = torch.autograd.grad(list(outputs), wanted, list(grads), retain_graph=True, allow_unused=True) \
            if wanted else ()
    finally:
        for h in hooks:
            h.remove()
    work = WeightWork(calls=[], accumulate=[(p, g) for p, g in zip(whole, got[len(inputs):]) if g is not None])
    for group in groups:
        if group.whole:
            continue
        roots = [get_gradient_edge(t) for t, _ in group.roots]
        root_grads = [g for _, g in group.roots]
        for b in group.boundaries:
            for k, g in enumerate(kept.get(b, ())):
                if g is not None:
                    roots.append(GradientEdge(b, k))
                    root_grads.append(g)
        if roots and group.params:
            work.calls.append((roots, root_grads, list(group.params.values())))
    return list(got[: len(inputs)]), work


def _keeper(kept: dict[Node, tuple[Tensor | None, ...]], node: Node) -> Any:
    def keep(grad_outputs: tuple[Tensor | None, ...]) -> None:
        kept[node] = tuple(grad_outputs)

    return keep


def backward_weight(work: WeightWork) -> None:
    """The W part: accumulate the parameters' gradients of the microbatch whose I made ``work``
    into their ``.grad`` (their post-accumulate hooks run, as in one backward)."""
    for roots, grads, params in work.calls:
        torch.autograd.backward(roots, grads, inputs=params)
    if work.accumulate:
        # Through the engine, not by hand, so the parameters' hooks (gradient sync) see them.
        torch.autograd.backward([p for p, _ in work.accumulate], [g for _, g in work.accumulate])
    work.calls.clear()
    work.accumulate.clear()
