"""Tiny models and fixed-seed batches for the runtime's multi-rank tests."""

from __future__ import annotations

import torch
from torch import nn

from examples.gpt.model import GPT, GPTConfig

VOCAB, SEQ = 64, 16


def build_model(name: str, dropout: float = 0.0) -> nn.Module:
    """A freshly initialised tiny model (uses the global torch seed)."""
    if name == "gpt":
        return GPT(GPTConfig(vocab_size=VOCAB, block_size=SEQ, n_layer=2, n_head=2, n_embd=32, dropout=dropout))
    raise ValueError(f"unknown test model {name!r}")


def make_batch(name: str, rows: int, seed: int) -> dict[str, torch.Tensor]:
    """A global batch of ``rows`` rows, the same on every rank for the same seed."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (rows, SEQ), generator=g)
    return {"input_ids": ids, "labels": ids}
