"""rannc_py.plan and rannc_py.profile on a real traced model (the example GPT, tiny size)."""

from __future__ import annotations

import json

import pytest
import torch

import rannc_py
from rannc_py.errors import ConfigError, NoFeasiblePlanError, PlanError
from rannc_py.profiling import Profile
from rannc_py.profiling.coarsen import coarsen, layer_key


@pytest.fixture(scope="module")
def gpt():
    from rannc_py.models.gpt import GPT, gpt_config

    torch.manual_seed(0)
    model = GPT(gpt_config("tiny", n_layer=3))
    ids = torch.randint(0, 256, (4, 16))
    graph = rannc_py.trace(model, (ids,), {"labels": ids})
    return model, graph, ids


def test_coarsen_keeps_layers_apart(gpt):
    _, graph, _ = gpt
    blocks = coarsen(graph)
    assert [i for b in blocks for i in b] == list(range(len(graph.ops)))
    keys = [{layer_key(graph.ops[i].module_path) for i in b} for b in blocks]
    for layer in ("transformer.h.0", "transformer.h.1", "transformer.h.2"):
        holders = [k for k in keys if layer in k]
        assert len(holders) == 1, f"{layer} split over blocks"
    assert len(coarsen(graph, max_blocks=2)) == 2


def test_analytic_profile_and_plan(gpt):
    _, graph, _ = gpt
    prof = rannc_py.profile(graph, 4, device="a64fx")
    assert isinstance(prof, Profile) and prof.source == "analytic"
    assert Profile.from_json(prof.to_json()) == prof
    p = rannc_py.plan(graph, batch_size=16, cluster="a64fx:nodes=4")
    assert p.world_size == 4 and sum(s.replicas for s in p.stages) == 4
    assert p.graph_fingerprint == graph.fingerprint()
    staged = graph.split(p.assignment())  # the plan's assignment is a valid split
    assert staged.num_stages == p.num_stages
    assert rannc_py.Plan.from_json(p.to_json()) == p
    again = rannc_py.plan(graph, batch_size=16, cluster="a64fx:nodes=4")
    assert again.to_dict() | {"search_time": 0} == p.to_dict() | {"search_time": 0}


def test_pinned_layout(gpt):
    _, graph, _ = gpt
    p = rannc_py.plan(graph, batch_size=8, cluster="a64fx:nodes=3", replicas=[2, 1], microbatches=2)
    assert [s.ranks for s in p.stages] == [(0, 1), (2,)]
    fqns = {f for s in p.stages for f in s.param_fqns}
    assert fqns >= set(graph.params)


def test_measured_profile_is_cached(gpt, tmp_path, monkeypatch):
    _, graph, ids = gpt
    monkeypatch.setenv("RANNC_CACHE_DIR", str(tmp_path))
    inputs = graph.flatten_inputs((ids,), {"labels": ids})
    prof = rannc_py.profile(graph, 4, inputs=inputs, repeats=1)
    assert prof.source == "measured" and all(prof.forward_time(k, 4) > 0 for k in range(len(prof.blocks)))
    # Timed at 4 and 2 rows; the fitted line never goes negative (see test_two_point_fit).
    assert all(f >= 0 for f in prof.fwd_fixed + prof.bwd_fixed)
    assert sum(prof.backward_time(k, 4) for k in range(len(prof.blocks))) > 0

    def boom(*a, **k):
        raise AssertionError("measured again instead of reading the cache")

    monkeypatch.setattr("rannc_py.profiling.measure.measure_profile", boom)
    assert rannc_py.profile(graph, 4, inputs=inputs, repeats=1) == prof
    p = rannc_py.plan(graph, batch_size=8, cluster="local:ranks=2,memory=4GiB", profile=prof)
    assert p.world_size == 2


def test_errors(gpt):
    _, graph, _ = gpt
    with pytest.raises(NoFeasiblePlanError, match="smallest per-device memory that fits is"):
        rannc_py.plan(graph, batch_size=8, cluster="a64fx:nodes=2,memory=1MB")
    with pytest.raises(ConfigError, match="batch_size must be a positive integer"):
        rannc_py.plan(graph, batch_size=0, cluster="a64fx:nodes=2")
    with pytest.raises(ConfigError, match="not divisible"):
        rannc_py.plan(graph, batch_size=10, cluster="a64fx:nodes=2", microbatches=4)
    with pytest.raises(ConfigError, match="unknown cluster preset"):
        rannc_py.plan(graph, batch_size=8, cluster="cray:nodes=2")
    with pytest.raises(ConfigError, match="needs example inputs"):
        rannc_py.profile(graph, 4)
    other = rannc_py.profile(graph, 4, device="a64fx")
    other = Profile(**{**other.__dict__, "graph_fingerprint": "x"})
    with pytest.raises(PlanError, match="different graph"):
        rannc_py.plan(graph, batch_size=8, cluster="a64fx:nodes=2", profile=other)


def test_two_point_fit():
    from rannc_py.profiling.measure import _fit

    assert _fit([8, 4], [1.0 + 8 * 0.5, 1.0 + 4 * 0.5]) == pytest.approx((1.0, 0.5))
    assert _fit([8], [4.0]) == (0.0, 0.5)  # one batch size only: through the origin
    assert _fit([8, 4], [2.0, 3.0]) == (2.0, 0.0)  # noisy negative slope: constant
    assert _fit([8, 4], [4.0, 0.5]) == (0.0, 0.5)  # negative intercept: through the origin


def test_optimizer_step_is_charged_once_per_step(gpt):
    _, graph, _ = gpt
    from rannc_py.hardware.cluster import as_cluster
    from rannc_py.planner.cost import fused_update_cost

    pins = {"batch_size": 8, "cluster": "a64fx:nodes=1", "microbatches": 2, "schedules": ("1f1b",)}
    free = rannc_py.plan(graph, update_cost=0.0, **pins)
    slow = rannc_py.plan(graph, update_cost=1e-6, **pins)
    default = rannc_py.plan(graph, **pins)
    nbytes = sum(info.nbytes for info in graph.params.values())  # tied weights counted once
    assert slow.stages[0].costs.update > 0 and free.stages[0].costs.update == 0
    # one stage: the step is the pipeline, then the optimizer over every parameter byte, once
    per_byte = slow.stages[0].costs.update / 1e-6
    assert slow.step_time - free.step_time == pytest.approx(per_byte * 1e-6, rel=1e-9)
    assert per_byte >= nbytes
    # default: Adam's fused traffic (7 words per parameter) at the device's bandwidth
    expected = fused_update_cost("adam", as_cluster("a64fx:nodes=1").device)
    assert default.stages[0].costs.update == pytest.approx(per_byte * expected, rel=1e-9)
    # the plan keeps the cost through JSON, and plans written before it had one still load
    assert rannc_py.Plan.from_json(slow.to_json()) == slow
    d = json.loads(slow.to_json())
    for st in d["stages"]:
        del st["costs"]["update"]
    assert rannc_py.Plan.from_json(json.dumps(d)).stages[0].costs.update == 0.0


def test_optimizer_state_by_count(gpt):
    _, graph, _ = gpt
    pins = {"batch_size": 8, "cluster": "a64fx:nodes=1", "microbatches": 2, "schedules": ("1f1b",)}
    by_name = rannc_py.plan(graph, optimizer="sgd_momentum", **pins)
    by_count = rannc_py.plan(graph, optimizer=1, **pins)
    assert by_count.to_dict() | {"search_time": 0} == by_name.to_dict() | {"search_time": 0}
    amsgrad = rannc_py.plan(graph, optimizer=3, **pins)
    assert amsgrad.peak_memory_per_rank[0] > rannc_py.plan(graph, optimizer="adam", **pins).peak_memory_per_rank[0]
    with pytest.raises(ConfigError, match="0 or more state buffers"):
        rannc_py.plan(graph, optimizer=-1, **pins)
    with pytest.raises(ConfigError, match="unknown optimizer 'lamb'"):
        rannc_py.plan(graph, optimizer="lamb", **pins)
    with pytest.raises(ConfigError, match="update_cost must be"):
        rannc_py.plan(graph, update_cost=-1.0, **pins)


def test_measuring_leaves_the_model_as_it_was(tmp_path, monkeypatch):
    # Planning happens inside the first training call: timing the blocks must not
    # leave gradients in .grad, move BatchNorm's running statistics or draw random numbers.
    monkeypatch.setenv("RANNC_CACHE_DIR", str(tmp_path))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.Dropout(0.5),
                                torch.nn.Linear(8, 3))
    x = torch.randn(8, 6)
    graph = rannc_py.trace(model, (x,))
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    prof = rannc_py.profile(graph, 8, inputs=graph.flatten_inputs((x,), {}), repeats=2)
    assert prof.source == "measured" and sum(prof.bwd_per_sample) + sum(prof.bwd_fixed) > 0
    assert all(p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, buffers[k]), f"{k} changed"
    assert torch.equal(torch.get_rng_state(), rng)
