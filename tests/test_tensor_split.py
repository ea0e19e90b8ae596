"""find_tensor_split on small graphs: which ops run split, the shards, where the collectives go."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from models import CASES
from torch import nn
from tp_models import gpt_vocab96, llama_kv, mixed_mlp

from rannc_py import ConfigError, trace
from rannc_py.graph.tensor_split import Shard, TensorSplit, find_tensor_split


def split_of(model: nn.Module, *args: torch.Tensor, degree: int = 2, **kwargs: torch.Tensor) -> TensorSplit:
    return find_tensor_split(trace(model, args, kwargs).program, degree)


class TwoLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))


class FusedAttention(nn.Module):
    """One projection to q, k, v split afterwards, heads, attention, an output projection."""

    def __init__(self, dim: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = (y.view(b, t, self.heads, c // self.heads).transpose(1, 2) for y in self.qkv(x).split(c, dim=-1))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, t, c))


class NormInside(nn.Module):
    """A layer norm over the features an up projection would split: that projection stays whole."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.norm, self.down = nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.norm(self.up(x)))


class Tables(nn.Module):
    """A token table (rows > columns, indexed by the input) and a position table (indexed by arange)."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens, self.positions = nn.Embedding(32, 8), nn.Embedding(16, 8)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.tokens(ids) + self.positions(torch.arange(ids.shape[1]))


def test_column_then_row_with_one_allreduce_each_way() -> None:
    split = split_of(TwoLayers(), torch.randn(4, 8))
    assert [split.mode(n) for n in ("linear", "relu", "linear_1")] == ["column", "split", "row"]
    assert split.params == {"up.weight": Shard(0, (16,)), "up.bias": Shard(0, (16,)), "down.weight": Shard(1, (16,))}
    # The input's gradient is summed in backward (it feeds the split), the partial sum in forward.
    assert split.collectives() == [("grad_allreduce", "flat_0"), ("allreduce", "linear_1")]
    assert split.rejected == {}


def test_fused_projection_gets_a_blocked_shard() -> None:
    split = split_of(FusedAttention(), torch.randn(2, 6, 16))
    assert split.params["qkv.weight"] == Shard(dim=0, blocks=(16, 16, 16))
    assert split.params["qkv.bias"] == Shard(dim=0, blocks=(16, 16, 16))
    assert split.params["out.weight"] == Shard(dim=1, blocks=(16,))
    assert split.mode("scaled_dot_product_attention") == "split"
    assert split.ops["scaled_dot_product_attention"].outputs == (Shard(dim=1, blocks=(4,)),)  # split over heads
    assert [k for k, _ in split.collectives()] == ["grad_allreduce", "allreduce"]


def test_heads_that_do_not_divide_stay_replicated() -> None:
    split = split_of(FusedAttention(dim=18, heads=3), torch.randn(2, 6, 18))
    assert "qkv.weight" not in split.params and "qkv.bias" not in split.params
    assert "view" in split.rejected["linear"] and "scaled_dot_product_attention" not in split.ops
    # The output projection reads a replicated input: split on its outputs, allgathered as the model's output.
    assert split.mode("linear_1") == "column" and split.mode("output") == "gather"


def test_a_norm_over_split_features_keeps_the_region_replicated() -> None:
    split = split_of(NormInside(), torch.randn(4, 8))
    assert "up.weight" not in split.params and "layer_norm" not in split.ops
    assert "layer_norm" in split.rejected["linear"]
    # What follows the norm starts a split of its own and ends it at the output.
    assert split.mode("linear_1") == "column" and split.mode("output") == "gather"


def test_the_softmax_over_hidden_features_of_the_custom_model_is_replicated() -> None:
    model, args, kwargs = mixed_mlp()
    split = split_of(model, *args, **kwargs)
    assert "up.weight" not in split.params and "softmax" not in split.ops
    assert split.params["fc1.weight"] == Shard(0, (32,)) and split.params["fc2.weight"] == Shard(1, (32,))


def test_only_a_token_table_is_split_over_its_rows() -> None:
    split = split_of(Tables(), torch.randint(0, 32, (4, 6)))
    assert split.params == {"tokens.weight": Shard(0, (32,))}
    assert split.mode("embedding") == "vocab_embedding" and split.mode("embedding_1") == "replicated"
    assert split.collectives() == [("allreduce", "embedding")]


def test_vocab_parallel_head_and_loss_on_a_tied_gpt() -> None:
    model, args, kwargs = gpt_vocab96()
    split = split_of(model, *args, **kwargs)
    assert split.params["transformer.wte.weight"] == Shard(0, (96,))  # the table and the head, still one tensor
    modes = {op.mode for op in split.ops.values()}
    assert {"vocab_embedding", "vocab_cross_entropy", "gather"} <= modes


@pytest.mark.parametrize(("kv_heads", "degree", "kv_split"), [(2, 2, True), (2, 4, False), (1, 2, False)])
def test_grouped_query_attention_splits_kv_heads_where_they_divide(kv_heads: int, degree: int, kv_split: bool) -> None:
    model, args, kwargs = llama_kv(kv_heads)
    split = split_of(model, *args, degree=degree, **kwargs)
    layer = "model.layers.0.self_attn"
    assert f"{layer}.q_proj.weight" in split.params and f"{layer}.o_proj.weight" in split.params
    assert (f"{layer}.k_proj.weight" in split.params) == kv_split
    assert (f"{layer}.v_proj.weight" in split.params) == kv_split


def test_hf_gpt2_fused_conv1d_projection_is_blocked() -> None:
    model, args, kwargs = CASES["hf_gpt2"]()
    split = split_of(model, *args, **kwargs)
    # Conv1D keeps its weight as (in, out): the output features are dim 1.
    assert split.params["transformer.h.0.attn.c_attn.weight"] == Shard(1, (32, 32, 32))
    assert split.params["transformer.h.0.attn.c_proj.weight"] == Shard(0, (32,))


def test_degree_one_splits_nothing_and_a_bad_degree_is_refused() -> None:
    program = trace(TwoLayers(), (torch.randn(4, 8),)).program
    assert find_tensor_split(program, 1).params == {}
    with pytest.raises(ConfigError, match="tensor degree"):
        find_tensor_split(program, 0)


def test_the_split_is_json_data() -> None:
    split = split_of(FusedAttention(), torch.randn(2, 6, 16))
    d = json.loads(json.dumps(split.to_dict()))
    assert d["params"]["qkv.weight"] == {"dim": 0, "blocks": [16, 16, 16]}
    assert d["ops"]["linear_1"]["mode"] == "row"


class SplitTwice(nn.Module):
    """A fused projection cut in two pieces; one piece is cut again along the sequence (the split
    stays) and, with ``again_features``, the other along its features (a nested fusion, which is
    left replicated)."""

    def __init__(self, again_features: bool) -> None:
        super().__init__()
        self.again_features = again_features
        self.fused, self.out_a, self.out_b = nn.Linear(8, 32), nn.Linear(16, 8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # a scalar, to call backward on
        a, b = self.fused(x).split(16, dim=-1)
        first, second = a.split(3, dim=1)
        a = torch.cat([second, first], dim=1)
        if self.again_features:
            c, d = b.split(8, dim=-1)
            return (self.out_a(a) + self.out_b(c * d)).square().mean()
        return (self.out_a(a) + self.out_a(b)).square().mean()


@pytest.mark.parametrize("again_features", [False, True])
def test_pieces_of_a_fused_projection_split_again(again_features: bool) -> None:
    from test_tensor_program import mismatches, run_split

    model = SplitTwice(again_features)
    x = torch.randn(4, 6, 8)
    split = split_of(model, x)
    if again_features:
        assert "fused.weight" not in split.params and "split" in split.rejected["linear"]
    else:
        assert split.params["fused.weight"] == Shard(0, (16, 16))
        assert split.mode("cat") == "split"
    assert mismatches(run_split((model, (x,), {}), 2)) == []
