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


def dropout_case(name: str, p: float = 0.1) -> Case:
    """A model of tests/models.py with every dropout at ``p`` (attention dropout included)."""
    from models import _bert_kwargs, _ids

    torch.manual_seed(0)
    ids = _ids(vocab=96)
    if name == "gpt":
        from rannc_py.models.gpt import GPT, gpt_config

        return GPT(gpt_config("tiny", vocab_size=96, block_size=16, n_embd=32, dropout=p)), (), {
            "input_ids": ids, "labels": ids}
    if name == "hf_gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        cfg = GPT2Config(vocab_size=96, n_positions=16, n_embd=32, n_layer=2, n_head=2, resid_pdrop=p,
                         embd_pdrop=p, attn_pdrop=p, use_cache=False, bos_token_id=0, eos_token_id=0)
        return GPT2LMHeadModel(cfg), (), {"input_ids": ids, "labels": ids, "use_cache": False}
    if name == "hf_llama":
        model, args, kwargs = llama_kv(2, vocab=96)
        model.config.attention_dropout = p
        for layer in model.model.layers:
            layer.self_attn.attention_dropout = p
        return model, args, kwargs
    from transformers import BertConfig, BertForPreTraining

    kwargs = _bert_kwargs()
    cfg = BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     max_position_embeddings=16, hidden_dropout_prob=p, attention_probs_dropout_prob=p)
    return BertForPreTraining(cfg), (), kwargs
