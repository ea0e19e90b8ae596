"""The Graph is pure data: it round-trips through JSON and pickle, holds no module, fx
node or tensor, and plans exactly like the traced graph it was copied from."""

from __future__ import annotations

import ast
import json
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
from mpi_launch import REPO
from test_staged import traced
from torch import nn

import rannc_py
from rannc_py import ConfigError, Graph, TracedGraph, trace
from rannc_py.graph.ir import Op, ParamInfo, TensorMeta, canonical_names
from rannc_py.runtime.params import canonical_names as model_canonical_names

# A GPT-2, a grouped-query-attention Llama and a CNN with BatchNorm buffers.
FAMILIES = ["hf_gpt2", "hf_llama", "cnn"]


class MixedDtypes(nn.Module):
    """Keyword inputs, a dict output, an int64 buffer, a bfloat16 branch and a tied weight."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 8)
        self.head = nn.Linear(8, 11, bias=False)
        self.head.weight = self.emb.weight
        self.bf16 = nn.Linear(8, 8).to(torch.bfloat16)
        self.register_buffer("offsets", torch.arange(6, dtype=torch.int64))

    def forward(self, ids: torch.Tensor, *, scale: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.emb(ids + self.offsets[: ids.shape[1]]) * scale
        h = h + self.bf16(h.to(torch.bfloat16)).float()
        return {"logits": self.head(h), "norm": h.norm()}


def _mixed() -> TracedGraph:
    torch.manual_seed(0)
    ids = torch.randint(0, 5, (3, 6))
    return trace(MixedDtypes(), (ids,), {"scale": torch.full((3, 1, 1), 0.5)})


def _graph(name: str) -> TracedGraph:
    graph = _mixed() if name == "mixed" else traced(name)[3]
    assert isinstance(graph, TracedGraph)
    return graph


def _edges(graph: Graph) -> list[tuple[int, int, int]]:
    return sorted((u, v, d["bytes"]) for u, v, d in graph.to_networkx().edges(data=True))


_LEAVES = (int, float, str, bool, type(None), torch.dtype)
_RECORDS = (Graph, Op, TensorMeta, ParamInfo)


def _assert_pure(value: Any, path: str = "graph") -> None:
    """Fail unless ``value`` is built only of IR records, containers and plain leaves."""
    if isinstance(value, _LEAVES):
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _assert_pure(v, f"{path}[{i}]")
    elif isinstance(value, dict):
        for k, v in value.items():
            _assert_pure(k, f"{path} key {k!r}")
            _assert_pure(v, f"{path}[{k!r}]")
    elif type(value) in _RECORDS:
        for k, v in vars(value).items():
            _assert_pure(v, f"{path}.{k}")
    else:
        raise AssertionError(f"{path} holds a {type(value).__module__}.{type(value).__name__}")


@pytest.mark.parametrize("name", [*FAMILIES, "mixed"])
def test_json_round_trip_is_equal(name: str) -> None:
    graph = _graph(name)
    data = graph.data()
    back = Graph.from_json(graph.to_json())
    assert type(back) is Graph and back == data
    assert back.ops == graph.ops and back.params == graph.params and back.buffers == graph.buffers
    assert back.fingerprint() == graph.fingerprint()
    assert back.output_metas() == graph.output_metas()
    assert _edges(back) == _edges(graph)
    assert back.op_index == graph.op_index and back.summary() == graph.summary() and repr(back) == repr(graph)
    assert Graph.from_dict(json.loads(json.dumps(data.to_dict()))) == data


@pytest.mark.parametrize("name", [*FAMILIES, "mixed"])
def test_pickle_round_trip_and_data_is_pure(name: str) -> None:
    graph = _graph(name)
    data = graph.data()
    assert type(data) is Graph and not hasattr(data, "program") and not hasattr(data, "split")
    _assert_pure(data)
    assert data.fingerprint() == graph.fingerprint()
    back = pickle.loads(pickle.dumps(data))
    assert back == data and back.fingerprint() == graph.fingerprint()
    # The copy shares nothing: editing it leaves the traced graph as it was.
    data.ops[0].params.append("x")
    assert "x" not in graph.ops[0].params


def test_dtypes_are_written_by_name() -> None:
    graph = _mixed()
    d = json.loads(graph.to_json())
    assert d["params"]["emb.weight"]["dtype"] == "float32"
    assert d["params"]["bf16.weight"]["dtype"] == "bfloat16"
    assert d["buffers"]["offsets"]["dtype"] == "int64"
    assert graph.tied_params == [["emb.weight", "head.weight"]]
    assert graph.output_names == ["logits", "norm"]
    assert [t.batch_dim for t in graph.output_metas()] == [0, None]


def test_traced_graph_api() -> None:
    model, args, kwargs, graph = traced("hf_gpt2")
    assert rannc_py.TracedGraph is TracedGraph and isinstance(graph, Graph)
    assert graph.model is model and graph.program.model is model
    assert graph.flatten_inputs(args, kwargs)["input_ids"] is kwargs["input_ids"]
    assert graph.split(2).graph is graph


def test_plan_from_a_json_graph_equals_plan_from_the_trace() -> None:
    graph = traced("hf_gpt2")[3]
    offline = Graph.from_json(graph.to_json())
    a = rannc_py.plan(graph, batch_size=16, cluster="a64fx:nodes=4")
    b = rannc_py.plan(offline, batch_size=16, cluster="a64fx:nodes=4")
    assert a.to_dict() | {"search_time": 0} == b.to_dict() | {"search_time": 0}


def test_measuring_a_plain_graph_is_a_config_error() -> None:
    _, args, kwargs, graph = traced("mlp")
    with pytest.raises(ConfigError, match="without its program"):
        rannc_py.profile(graph.data(), 4, inputs=graph.flatten_inputs(args, kwargs))


@pytest.mark.parametrize("text", ["{", "[]", '{"ops": []}'])
def test_malformed_json_is_a_config_error(text: str) -> None:
    with pytest.raises(ConfigError, match="graph"):
        Graph.from_json(text)


def test_unknown_dtype_is_a_config_error() -> None:
    d = _mixed().data().to_dict()
    d["params"]["emb.weight"]["dtype"] = "float33"
    with pytest.raises(ConfigError, match="float33"):
        Graph.from_dict(d)


def test_canonical_names() -> None:
    assert canonical_names([["a.w", "b.w", "c.w"], ["x"]]) == {"a.w": "a.w", "b.w": "a.w", "c.w": "a.w", "x": "x"}
    assert canonical_names([]) == {}
    model = MixedDtypes()
    model.register_buffer("alias", model.offsets)  # a buffer registered under two names
    names = model_canonical_names(model)
    assert names["head.weight"] == "emb.weight" and names["emb.weight"] == "emb.weight"
    assert names["alias"] == "offsets" and names["bf16.bias"] == "bf16.bias"
    assert list(names) == [n for n, _ in model.named_parameters(remove_duplicate=False)] + [
        n for n, _ in model.named_buffers(remove_duplicate=False)
    ]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.update([node.module] + [f"{node.module}.{a.name}" for a in node.names])
    return found


def test_ir_imports_no_program() -> None:
    imports = _imports(Path(REPO) / "rannc_py" / "graph" / "ir.py")
    assert not [m for m in imports if m.startswith("rannc_py.graph")]
    assert not [m for m in imports if m == "torch.fx" or m.startswith("torch.fx.") or m == "torch.export"]
