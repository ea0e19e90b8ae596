"""Random ops of a tensor-parallel rank program, drawing exactly what eager PyTorch draws.

A rank program must train as the unsplit model does, dropout included, so
every rank draws eager's masks and advances the generator as eager does:

* In a replicated region every rank draws the same full mask: the ranks
  start from one generator state (the runtime makes them share it) and run
  the traced op unchanged.
* In a split region a rank's tensor is only its part of eager's, so a mask
  drawn over it would be another mask. The rank draws the *full-shape* mask
  from the shared state, as eager would over the whole tensor, and keeps
  its part (:func:`~rannc_py.graph.tensor_rules.shard_tensor`, blocks
  included). The generator then advances as eager's does, on every rank.

Eager's CPU dropout (``aten.dropout``) is ``x * noise`` with ``noise =
empty_like(x).bernoulli_(1 - p).div_(1 - p)``; scaled-dot-product
attention with ``dropout_p > 0`` runs its math form (``softmax(q k^T *
scale + mask)``, then that dropout, then ``@ v``, the scale applied as its
square root to q and to k). :class:`RandomOp` computes the same, so the
mask is bitwise eager's (tests/test_tensor_random.py). In eval mode
(``module.eval()``) both ops draw nothing, as eager's ``model.eval()``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from rannc_py.graph.tensor_rules import Shard, shard_tensor


def dropout_noise(shape: torch.Size | tuple[int, ...], like: torch.Tensor, p: float,
                  generator: torch.Generator | None) -> torch.Tensor:
    """Eager dropout's scaled keep mask over a tensor of ``shape`` laid out as ``like``.

    Takes the full shape, a tensor whose dtype, device and memory order the
    mask follows (eager's ``empty_like``: bernoulli fills in memory order on
    some builds), the drop probability and the generator (None: torch's
    default one). Returns ``bernoulli(1 - p) / (1 - p)`` of ``shape``.
    """
    order = sorted(range(like.dim()), key=lambda d: -like.stride()[d])
    noise = torch.empty([shape[d] for d in order], dtype=like.dtype, device=like.device)
    noise = noise.permute([order.index(d) for d in range(like.dim())])
    return noise.bernoulli_(1 - p, generator=generator).div_(1 - p)


class RandomOp(nn.Module):
    """``aten.dropout`` or ``aten.scaled_dot_product_attention`` of a rank program (see the module docstring).

    ``kind`` is ``"dropout"`` or ``"attention"``; ``shard`` is the op's
    output shard on this rank (None: replicated), ``rank`` and ``degree``
    the rank's place in the group; ``generator`` the generator to draw from
    (None: torch's default, as eager; a simulated group gives each rank its
    own copy of one state).
    """

    def __init__(self, kind: str, shard: Shard | None, rank: int, degree: int,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.kind, self.shard, self.rank, self.degree = kind, shard, rank, degree
        self.generator = generator

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.kind == "dropout":
            return self.dropout(*args, **kwargs)
        return self.attention(*args, **kwargs)

    def noise(self, like: torch.Tensor, p: float) -> torch.Tensor:
        """This rank's part of the mask eager draws over the full tensor ``like`` is a part of."""
        if self.shard is None:
            return dropout_noise(like.shape, like, p, self.generator)
        shape = list(like.shape)
        shape[self.shard.dim] = like.shape[self.shard.dim] * self.degree if self.shard.repeat else sum(self.shard.blocks)
        return shard_tensor(dropout_noise(tuple(shape), like, p, self.generator), self.shard, self.rank, self.degree)

    def dropout(self, x: torch.Tensor, p: float, train: bool | None = None) -> torch.Tensor:
        if not (self.training and train) or p == 0:
            return x
        if self.shard is None and self.generator is None:
            return torch.ops.aten.dropout.default(x, p, True)  # eager's own op, on any device
        if p == 1:
            return x * 0.0
        return x * self.noise(x, p)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
                  dropout_p: float = 0.0, is_causal: bool = False, *, scale: float | None = None,
                  enable_gqa: bool = False) -> torch.Tensor:
        p = dropout_p if self.training else 0.0
        if p == 0 or (self.shard is None and self.generator is None):
            return torch.ops.aten.scaled_dot_product_attention.default(
                q, k, v, attn_mask, p, is_causal, scale=scale, enable_gqa=enable_gqa)
        if enable_gqa:  # each group of query heads reads one key / value head
            k, v = (t.repeat_interleave(q.shape[-3] // t.shape[-3], -3) for t in (k, v))
        root = math.sqrt(scale if scale is not None else 1 / math.sqrt(q.shape[-1]))
        attn = (q * root) @ (k.transpose(-2, -1) * root)
        if is_causal:
            attn_mask = torch.ones(attn.shape[-2:], dtype=torch.bool, device=q.device).tril()
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            attn = attn.masked_fill(attn_mask.logical_not(), float("-inf"))
        elif attn_mask is not None:
            attn = attn + attn_mask
        attn = torch.ops.aten._safe_softmax.default(attn, -1)  # fully masked rows give 0, as eager's math form
        return (attn * self.noise(attn, p)) @ v
