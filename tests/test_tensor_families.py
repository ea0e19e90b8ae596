"""Tensor splits of model families whose attention is written differently (in one process, simulated group).

Each case is traced, split over 2 ranks by :func:`find_tensor_split` and run
by the rank programs of tests/test_tensor_program.py (outputs and every
gradient compared with eager, tolerance stated there); each must split all
its attention and MLP projections (nothing rejected):

- a key/value cache on (Hugging Face's default ``use_cache``): its first step
  concatenates an empty 1-D tensor with each layer's keys and values, which
  ``torch.cat`` skips;
- a fused projection cut by ``chunk`` after a per-head view (GPT-NeoX's
  query_key_value: each head's q, k and v adjacent);
- rotary embeddings built with ``stack`` and ``flatten`` and attention
  written as two ``matmul`` s (GPT-J);
- eager attention (``attn_implementation="eager"``: scores = q @ k^T, then @ v)
  of GPT-2 and Llama;
- an encoder-decoder (BART: encoder, decoder self- and cross-attention).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from test_tensor_program import mismatches, run_split
from test_tensor_split import FusedAttention
from torch import nn
from tp_models import llama_kv

from rannc_py import trace
from rannc_py.graph.tensor_split import find_tensor_split

V, SEQ = 96, 16


def _ids() -> torch.Tensor:
    return torch.randint(0, V, (4, SEQ))


def _lm(build: Callable[[], nn.Module]) -> tuple[nn.Module, tuple[()], dict[str, Any]]:
    torch.manual_seed(0)
    ids = _ids()
    return build(), (), {"input_ids": ids, "labels": ids}


def llama_cached() -> Any:
    model, args, kwargs = llama_kv(2, vocab=V)
    model.config.use_cache = True
    return model, args, {k: v for k, v in kwargs.items() if k != "use_cache"}


def gpt_neox() -> Any:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    return _lm(lambda: GPTNeoXForCausalLM(GPTNeoXConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=32)))


def gptj() -> Any:
    from transformers import GPTJConfig, GPTJForCausalLM

    return _lm(lambda: GPTJForCausalLM(GPTJConfig(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                                  rotary_dim=4)))


def gpt2_eager() -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    return _lm(lambda: GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                                  attn_implementation="eager")))


def llama_eager() -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    return _lm(lambda: LlamaForCausalLM(LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, attn_implementation="eager")))


def bart() -> Any:
    from transformers import BartConfig, BartForConditionalGeneration

    return _lm(lambda: BartForConditionalGeneration(BartConfig(
        vocab_size=V, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=32)))


FAMILIES = {"llama_cached": llama_cached, "gpt_neox": gpt_neox, "gptj": gptj, "gpt2_eager": gpt2_eager,
            "llama_eager": llama_eager, "bart": bart}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_splits_every_projection_and_equals_the_model(name: str) -> None:
    run = run_split(FAMILIES[name](), 2)
    split, model = run["split"], run["graph"].model
    assert split.rejected == {}
    matrices = [n for n, p in model.named_parameters() if p.dim() == 2]
    assert set(matrices) <= set(split.params) | {n for n in matrices if "position" in n or "wpe" in n}
    assert mismatches(run) == []


class HandAttention(FusedAttention):
    """Attention by hand: an empty cache, a per-head fused projection cut by chunk, a stacked rotation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, self.heads, 3 * (c // self.heads)).transpose(1, 2).chunk(3, dim=-1)
        q = torch.stack((-q[..., 1::2], q[..., ::2]), dim=-1).flatten(-2)  # rotate pairs
        k = torch.cat([torch.tensor([]), k], dim=-2)
        scores = F.softmax(q @ k.transpose(-1, -2) / 2.0, dim=-1)
        return self.out((scores @ v).transpose(1, 2).reshape(b, t, c)).square().mean()


def test_hand_written_attention_splits_on_heads() -> None:
    x = torch.randn(2, 5, 16)
    split = find_tensor_split(trace(HandAttention(), (x,)).program, 2)
    assert split.rejected == {} and {"qkv.weight", "qkv.bias", "out.weight"} <= set(split.params)
    assert split.params["qkv.weight"].blocks == (48,)  # per-head layout: a contiguous half is each rank's heads
    assert [kind for kind, _ in split.collectives()].count("allreduce") == 1  # after the output projection
    torch.manual_seed(0)
    assert mismatches(run_split((HandAttention(), (x,), {}), 2)) == []


class UnevenChunks(nn.Module):
    """A projection chunked along its features into uneven pieces: it cannot be split, and stays whole."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(8, 10), nn.Linear(4, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b, c = self.up(x).chunk(3, dim=-1)  # 4, 4, 2 features
        return self.down(a * b).sum() + c.sum()


def test_uneven_chunks_along_the_split_dim_stay_replicated() -> None:
    x = torch.randn(3, 8)
    split = find_tensor_split(trace(UnevenChunks(), (x,)).program, 2)
    assert "up.weight" not in split.params and "chunk" in next(iter(split.rejected.values()))
    torch.manual_seed(0)
    assert mismatches(run_split((UnevenChunks(), (x,), {}), 2)) == []
