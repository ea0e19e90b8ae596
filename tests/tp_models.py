"""Models for the tensor-parallel tests that tests/models.py does not have: a custom model with a
region no split can cross, and vocabularies / head counts that divide by the tensor degree."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from models import SEQ
from torch import nn

Case = tuple[nn.Module, tuple[Any, ...], dict[str, Any]]


class MixedMLP(nn.Module):
    """A split-able MLP block, then one whose hidden features are mixed by a softmax over them
    (no split can cross it), with a keyword target and a dict output."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 16)
        self.up, self.down = nn.Linear(16, 32), nn.Linear(32, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor, *, target: torch.Tensor) -> dict[str, torch.Tensor]:
        h = x + self.fc2(F.gelu(self.fc1(x)))
        u = self.up(h)
        h = h + self.down(u * torch.softmax(u, dim=-1))
        out = self.head(h)
        return {"loss": F.mse_loss(out, target), "out": out}


def mixed_mlp() -> Case:
    torch.manual_seed(0)
    return MixedMLP(), (torch.randn(4, SEQ, 16),), {"target": torch.randn(4, SEQ, 4)}


def gpt_vocab96() -> Case:
    """The project's GPT, tied head, a vocabulary that divides by 2, 3 and 4, four heads."""
    from rannc_py.models.gpt import GPT, gpt_config

    torch.manual_seed(0)
    ids = torch.randint(0, 96, (4, SEQ))
    return GPT(gpt_config("tiny", vocab_size=96, block_size=16, n_embd=48, n_head=4)), (), {"input_ids": ids, "labels": ids}


def gpt2_vocab96() -> Case:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=96, n_positions=16, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
                     attn_pdrop=0.0, use_cache=False, bos_token_id=0, eos_token_id=0)
    ids = torch.randint(0, 96, (4, SEQ))
    return GPT2LMHeadModel(cfg), (), {"input_ids": ids, "labels": ids, "use_cache": False}


def llama_kv(kv_heads: int, vocab: int = 97) -> Case:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=kv_heads, max_position_embeddings=32, use_cache=False, bos_token_id=0,
                      eos_token_id=0)
    ids = torch.randint(0, vocab, (4, SEQ))
    return LlamaForCausalLM(cfg), (), {"input_ids": ids, "labels": ids, "use_cache": False}
