"""trace(): the Graph's metadata, meta-device tracing and the errors it raises."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import networkx as nx
import pytest
import torch
from models import CASES
from mpi_launch import REPO
from test_staged import traced
from torch import nn

from rannc_py import Graph, PartitionError, TraceError, trace


@pytest.mark.parametrize("name", sorted(CASES))
def test_graph_metadata_is_consistent(name: str) -> None:
    model, _, _, graph = traced(name)
    assert isinstance(graph, Graph) and graph.ops
    assert graph.batch_size == 4
    assert all(op.index == i for i, op in enumerate(graph.ops))
    assert len({op.name for op in graph.ops}) == len(graph.ops)
    for op in graph.ops:
        assert all(src < op.index for src in op.input_ops), "ops must be in topological order"
        assert all(op.index in graph.ops[src].output_ops for src in op.input_ops)
        assert op.outputs and all(t.nbytes > 0 or 0 in t.shape for t in op.outputs)
    # Every parameter the model uses is listed once, under the name named_parameters() gives it.
    named = dict(model.named_parameters())
    assert set(graph.params) == set(named)
    for fqn, info in graph.params.items():
        assert info.shape == tuple(named[fqn].shape) and info.dtype == named[fqn].dtype
        assert info.nbytes == named[fqn].numel() * named[fqn].element_size()
    assert {p for op in graph.ops for p in op.params} == set(graph.params)
    assert graph.total_flops > 0
    assert graph.dynamic_batch
    nxg = graph.to_networkx()
    assert nx.is_directed_acyclic_graph(nxg) and nxg.number_of_nodes() == len(graph.ops)
    assert all(d["bytes"] > 0 for _, _, d in nxg.edges(data=True))
    assert f"{len(graph.ops)} ops" in graph.summary()


def test_gpt2_metadata() -> None:
    graph = traced("hf_gpt2")[3]
    assert graph.input_names == ["input_ids", "labels"]
    assert graph.output_names == ["loss", "logits"]
    assert graph.tied_params == [["transformer.wte.weight", "lm_head.weight"]]
    c_fc = [op for op in graph.ops if op.module_path == "transformer.h.0.mlp.c_fc" and op.flops > 0]
    assert len(c_fc) == 1
    # Conv1D: (B*T, 32) x (32, 128) at B=4, T=8.
    assert c_fc[0].flops == 2 * 4 * 8 * 32 * 128
    assert sorted(c_fc[0].params) == ["transformer.h.0.mlp.c_fc.bias", "transformer.h.0.mlp.c_fc.weight"]
    out = c_fc[0].outputs[0]
    assert out.shape == (32, 128) and out.batch_dim == 0 and out.nbytes == 32 * 128 * 4
    wpe = next(op for op in graph.ops if op.module_path == "transformer.wpe")
    assert wpe.outputs[0].batch_dim is None  # position embeddings do not scale with the batch
    assert any(op.outputs[0].shape == () and op.outputs[0].batch_dim is None for op in graph.ops)  # the loss


def test_cnn_metadata_and_buffers() -> None:
    graph = traced("cnn")[3]
    assert graph.input_names == ["arg0", "arg1"] and graph.output_names == ["loss", "logits"]
    assert "blocks.0.bn1.running_mean" in graph.buffers
    bn = [op for op in graph.ops if op.module_path == "blocks.0.bn1"]
    assert any("blocks.0.bn1.running_mean" in op.buffers for op in bn)
    conv = next(op for op in graph.ops if op.module_path == "stem")
    # 3x3 conv, 3 -> 8 channels, 8x8 output, batch 4.
    assert conv.flops == 2 * 4 * 8 * 8 * 8 * 3 * 3 * 3


def test_flatten_and_unflatten_round_trip() -> None:
    model, args, kwargs, graph = traced("hf_bert")
    flat = graph.flatten_inputs(args, kwargs)
    assert list(flat) == graph.input_names
    assert flat["input_ids"] is kwargs["input_ids"]
    out = model(**kwargs)
    rebuilt = graph.unflatten_outputs([getattr(out, n) for n in graph.output_names])
    assert type(rebuilt) is type(out) and rebuilt.loss is out.loss


def test_fingerprint_is_stable_and_shape_sensitive() -> None:
    model, args, kwargs, graph = traced("gpt")
    again = trace(model, args, kwargs)
    assert again.fingerprint() == graph.fingerprint()
    longer = {k: torch.cat([v, v], dim=1) for k, v in kwargs.items()}
    assert trace(model, (), longer).fingerprint() != graph.fingerprint()


def test_static_fallback_when_batch_size_is_branched_on() -> None:
    class BatchBranch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x) * 2 if x.shape[0] == 3 else self.fc(x)

    with pytest.warns(UserWarning, match="fixed batch size of 3"):
        graph = trace(BatchBranch(), (torch.randn(3, 4),))
    assert not graph.dynamic_batch and graph.batch_size == 3
    assert trace(BatchBranch(), (torch.randn(3, 4),), dynamic_batch=False).fingerprint() == graph.fingerprint()


def test_meta_device_gpt_with_a_billion_parameters_does_not_allocate() -> None:
    script = textwrap.dedent(
        """
        import json, resource, sys, torch
        sys.path.insert(0, sys.argv[1])
        from rannc_py.models.gpt import GPT, gpt_config
        from rannc_py import trace
        with torch.device("meta"):
            # Wide and shallow: over 1e9 parameters with few ops, so the trace is quick.
            model = GPT(gpt_config("1.3b", n_layer=4, n_embd=4096, n_head=32))
        ids = torch.zeros(2, 64, dtype=torch.long)  # on CPU: trace moves it to meta
        graph = trace(model, kwargs={"input_ids": ids, "labels": ids})
        print(json.dumps({
            "params": model.num_parameters(),
            "graph_param_bytes": graph.param_bytes,
            "ops": len(graph.ops),
            "dynamic": graph.dynamic_batch,
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        }))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(REPO)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["params"] >= 1e9
    assert result["graph_param_bytes"] == 4 * result["params"]
    assert result["dynamic"] and result["ops"] > 4 * 10
    assert result["peak_rss"] < 2 * 2**30, f"peak RSS {result['peak_rss'] / 2**30:.2f} GiB"


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(4, 4), Gate())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


class Gate(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # branches on a tensor value: not traceable
            return x * 2
        return x


def test_untraceable_model_names_module_and_line() -> None:
    with pytest.raises(TraceError) as info:
        trace(DataDependent(), (torch.randn(2, 4),))
    message = str(info.value)
    assert "'inner.1'" in message  # the module that was running
    assert "test_trace.py" in message and "if x.sum() > 0" in message  # the source line
    assert "data-dependent" in message or "torch.cond" in message  # the hint


def test_input_of_untraceable_type() -> None:
    model = CASES["mlp"]()[0]
    with pytest.raises(TraceError, match="'arg1.0' is a str.*Tokenize"):
        trace(model, (torch.randn(2, 6), ["a", "b"]))


def test_python_scalar_inputs_are_constants() -> None:
    _, _, kwargs, graph = traced("hf_gpt2")
    assert "use_cache" not in graph.input_names
    from rannc_py import ConfigError

    with pytest.raises(ConfigError, match="constant"):
        graph.flatten_inputs((), {**kwargs, "use_cache": True})


def test_invalid_assignment_names_the_backward_edge() -> None:
    graph = traced("mlp")[3]
    assignment = [0] * len(graph.ops)
    assignment[0] = 1  # fc1 after the ops that read it
    with pytest.raises(PartitionError, match=r"edge .* goes backwards"):
        graph.split(assignment)
    with pytest.raises(PartitionError, match="have no ops"):
        graph.split([0] * (len(graph.ops) - 1) + [2])
    with pytest.raises(PartitionError, match="entries"):
        graph.split([0])


def test_too_many_stages() -> None:
    graph = traced("mlp")[3]
    n = len(graph.ops)
    with pytest.raises(PartitionError, match=f"1..{n}"):
        graph.split(n + 1)
    assert graph.split(n).num_stages == n


class _Shifted(nn.Module):
    """Slices like a language model's loss (``x[:, :-1]``), plus a whole-dimension slice it returns."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.lin(x)
        return y[:, :-1].sum(), y[:, :]


@pytest.mark.parametrize("dynamic", [True, False])
def test_whole_dimension_slices_are_removed(dynamic: bool) -> None:
    model = _Shifted()
    x = torch.randn(3, 5, 4)
    graph = trace(model, (x,), dynamic_batch=dynamic)
    slices = [op for op in graph.ops if "slice" in op.target]
    # y[:, :-1] keeps one slice (dim 1); the dim-0 slice before it is gone; the returned y[:, :] stays an op
    kept = [op for op in slices if op.output_ops]
    assert len(kept) == 1 and kept[0].outputs[0].shape[1] == 4
    staged = graph.split(1)
    ref = model(x)
    out = staged(x)
    torch.testing.assert_close(out[0], ref[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out[1], ref[1], rtol=0, atol=0)
