"""Random ops of the rank programs (graph.tensor_random) draw eager's masks, bitwise.

Eager draws from torch's default generator; each op here from a generator of
its own started in the same state, so the comparison is exact
(``torch.equal``), and the generators must end in the same state.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from rannc_py.graph.tensor_random import RandomOp
from rannc_py.graph.tensor_rules import Shard, shard_tensor, unshard

SEED = 3


def generator() -> torch.Generator:
    return torch.Generator().manual_seed(SEED)


def qkv(kv_heads: int = 4) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    return (torch.randn(2, 4, 8, 16, generator=g), torch.randn(2, kv_heads, 8, 16, generator=g),
            torch.randn(2, kv_heads, 8, 16, generator=g))


MASKS: dict[str, dict[str, Any]] = {
    "none": {},
    "causal": {"is_causal": True},
    "float": {"attn_mask": torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))},
    "bool_scaled": {"attn_mask": torch.randn(8, 8, generator=torch.Generator().manual_seed(2)) > 0, "scale": 0.3},
}


@pytest.mark.parametrize("mask", sorted(MASKS))
def test_attention_dropout_is_eagers(mask: str) -> None:
    q, k, v = qkv()
    kw = MASKS[mask]
    torch.manual_seed(SEED)
    want = F.scaled_dot_product_attention(q, k, v, dropout_p=0.2, **kw)
    g = generator()
    got = RandomOp("attention", None, 0, 1, g)(q, k, v, kw.get("attn_mask"), 0.2, kw.get("is_causal", False),
                                               scale=kw.get("scale"))
    assert torch.equal(got, want)
    assert torch.equal(g.get_state(), torch.get_rng_state())


def test_grouped_query_attention_dropout_is_eagers() -> None:
    q, k, v = qkv(kv_heads=2)
    torch.manual_seed(SEED)
    want = F.scaled_dot_product_attention(q, k, v, dropout_p=0.2, enable_gqa=True)
    got = RandomOp("attention", None, 0, 1, generator())(q, k, v, None, 0.2, False, enable_gqa=True)
    assert torch.equal(got, want)


def test_split_attention_ranks_hold_their_heads_of_eagers() -> None:
    """Two ranks of two heads each: their outputs joined are eager's over four heads."""
    q, k, v = qkv()
    torch.manual_seed(SEED)
    want = F.scaled_dot_product_attention(q, k, v, dropout_p=0.2, is_causal=True)
    shard = Shard(dim=1, blocks=(4,))
    parts = [RandomOp("attention", shard, r, 2, generator())(*(shard_tensor(t, shard, r, 2) for t in (q, k, v)),
                                                              None, 0.2, True) for r in range(2)]
    assert torch.equal(unshard(parts, shard), want)


@pytest.mark.parametrize("blocks", [(16,), (8, 8)])
def test_split_dropout_ranks_hold_their_part_of_eagers(blocks: tuple[int, ...]) -> None:
    """A tensor split on its features (contiguously or by blocks): each rank's dropout is its
    part of eager's over the whole tensor, and every rank's generator ends in eager's state."""
    x = torch.randn(4, 3, 16, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(SEED)
    want = F.dropout(x, 0.3)
    shard = Shard(dim=2, blocks=blocks)
    gens = [generator() for _ in range(2)]
    parts = [RandomOp("dropout", shard, r, 2, gens[r])(shard_tensor(x, shard, r, 2), 0.3, True) for r in range(2)]
    assert torch.equal(unshard(parts, shard), want)
    assert all(torch.equal(g.get_state(), torch.get_rng_state()) for g in gens)


def test_eval_mode_draws_nothing() -> None:
    x, (q, k, v) = torch.randn(4, 16), qkv()
    g = generator()
    start = g.get_state()
    drop, attn = RandomOp("dropout", None, 0, 1, g).eval(), RandomOp("attention", None, 0, 1, g).eval()
    assert drop(x, 0.3, True) is x
    assert torch.equal(attn(q, k, v, None, 0.2, True), F.scaled_dot_product_attention(q, k, v, is_causal=True))
    assert torch.equal(g.get_state(), start)
