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
- an encoder-decoder (BART: encoder, decoder self- and cross-attention);
- batch and heads merged into one dimension for ``baddbmm`` / ``bmm`` with an
  ALiBi bias of that merged shape (BLOOM): a repeated shard, every sample's
  heads cut alike, at any batch size.
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
from tp_sim import run_ranks

from rannc_py import trace
from rannc_py.graph.tensor_program import build_rank_program, shard_parameters
from rannc_py.graph.tensor_rules import Shard, shard_tensor, unshard
from rannc_py.graph.tensor_split import OpSplit, find_tensor_split

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


def bloom() -> Any:
    from transformers import BloomConfig, BloomForCausalLM

    return _lm(lambda: BloomForCausalLM(BloomConfig(vocab_size=V, hidden_size=32, n_layer=2, n_head=4)))


FAMILIES = {"bloom": bloom, "llama_cached": llama_cached, "gpt_neox": gpt_neox, "gptj": gptj, "gpt2_eager": gpt2_eager,
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


class MergedHeads(nn.Module):
    """Attention over ``batch * heads`` merged (``bmm``), with a per-head linear bias of that shape
    and dropout on the merged probabilities."""

    def __init__(self, dim: int = 32, heads: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        h, d = self.heads, c // self.heads
        q, k, v = (y.view(b, t, h, d).transpose(1, 2).reshape(b * h, t, d) for y in self.qkv(x).split(c, -1))
        slopes = torch.arange(1, h + 1, dtype=x.dtype) / h
        bias = (slopes[:, None] * torch.arange(t, dtype=x.dtype)).expand(b, h, t).reshape(b * h, 1, t)
        scores = torch.baddbmm(bias, q, k.transpose(1, 2), beta=1.0, alpha=d ** -0.5)
        probs = F.dropout(F.softmax(scores.view(b, h, t, t), dim=-1).view(b * h, t, t), self.dropout, self.training)
        y = torch.bmm(probs, v).view(b, h, t, d).transpose(1, 2).reshape(b, t, c)
        return self.out(y).square().mean()


def test_repeated_shard_round_trip() -> None:
    full = torch.arange(24.0).view(6, 4)  # along dim 1: two runs (samples) of 2 (heads)
    shard = Shard(dim=1, blocks=(2,), repeat=True)
    parts = [shard_tensor(full, shard, r, 2) for r in range(2)]
    assert parts[0].tolist() == full[:, [0, 2]].tolist()  # every run of 2 halved
    assert torch.equal(unshard(parts, shard), full)
    assert shard.to_dict() == {"dim": 1, "blocks": [2], "repeat": True} and not shard.plain


@pytest.mark.parametrize("degree", [2, 4])
def test_merged_batch_heads_split_at_any_batch(degree: int) -> None:
    x = torch.randn(4, 6, 32)
    graph = trace(MergedHeads(), (x,))
    split = find_tensor_split(graph.program, degree)
    assert split.rejected == {} and {"qkv.weight", "out.weight"} <= set(split.params)
    assert any(s is not None and s.repeat for op in split.ops.values() for s in op.outputs)
    torch.manual_seed(0)
    assert mismatches(run_split((MergedHeads(), (x,), {}), degree)) == []
    # The rank programs were made at batch 4; at batch 3 (another microbatch size) they still equal eager.
    model = graph.model
    small = torch.randn(3, 6, 32)
    want = model(small)
    inputs = graph.flatten_inputs((small,), {})

    def rank(r: int, group: Any) -> torch.Tensor:
        return build_rank_program(graph.program, split, group)(shard_parameters(graph.program, split, r), inputs)[0]

    for got in run_ranks(degree, rank):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_merged_batch_heads_dropout_draws_eagers_mask() -> None:
    torch.manual_seed(0)
    assert mismatches(run_split((MergedHeads(dropout=0.3), (torch.randn(4, 6, 32),), {}), 2)) == []


def test_bias_cut_contiguously_is_caught() -> None:
    # The merged bias must be cut per sample (repeated); a contiguous cut gives other samples' heads.
    x = torch.randn(4, 6, 32)
    graph = trace(MergedHeads(), (x,))
    split = find_tensor_split(graph.program, 2)
    [(name, op)] = [(n, o) for n, o in split.ops.items() if any(a[0] == "narrow" and a[4] for a in o.inputs.values())]
    wrong = {src: ("narrow", a[1], (x.shape[0] * 4,), a[3], False) for src, a in op.inputs.items()}
    split.ops[name] = OpSplit(mode=op.mode, outputs=op.outputs, inputs=wrong)
    torch.manual_seed(0)
    assert mismatches(run_split((MergedHeads(), (x,), {}), 2, split=split)) != []
