"""A model that returns a key/value cache splits as one that does not (Hugging Face's default ``use_cache``).

The cache's first step concatenates an empty 1-D tensor with each layer's
keys and values (``torch.cat`` skips such tensors); the split must see
through it, and the rank programs (simulated group, see
tests/test_tensor_program.py) must equal the model, cache outputs included.
"""

from __future__ import annotations

import torch
from test_tensor_program import mismatches, run_split
from torch import nn
from tp_models import llama_kv

from rannc_py import trace
from rannc_py.graph.tensor_split import find_tensor_split


def test_llama_with_its_cache_on_splits_and_equals_the_model() -> None:
    model, args, kwargs = llama_kv(2, vocab=96)
    kwargs = {k: v for k, v in kwargs.items() if k != "use_cache"}
    model.config.use_cache = True
    run = run_split((model, args, kwargs), 2)
    assert len(run["split"].params) >= 2 * 7  # every projection of both layers, the tables too
    assert mismatches(run) == []


class Cached(nn.Module):
    """Keys appended to an empty cache, then attention over heads: the split reaches through the cat."""

    def __init__(self) -> None:
        super().__init__()
        self.k, self.q, self.out = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, t, _ = x.shape
        k = self.k(x).view(b, t, 4, 4).transpose(1, 2)
        k = torch.cat([torch.tensor([]), k], dim=-2)
        q = self.q(x).view(b, t, 4, 4).transpose(1, 2)
        y = torch.nn.functional.scaled_dot_product_attention(q, k, k)
        return self.out(y.transpose(1, 2).reshape(b, t, 16)).sum(), k


def test_an_empty_cache_part_is_not_narrowed() -> None:
    x = torch.randn(2, 5, 16)
    split = find_tensor_split(trace(Cached(), (x,)).program, 2)
    assert {"k.weight", "q.weight", "out.weight"} <= set(split.params)
    torch.manual_seed(0)
    assert mismatches(run_split((Cached(), (x,), {}), 2)) == []
