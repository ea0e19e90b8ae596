"""Every error raised on bad input is a ``rannc_py.RaNNCError`` that names the bad value.

Each case calls a public entry point with one bad argument and checks the
exact error class (all of them subclass RaNNCError) and that the message
shows the value that was wrong. Only public names are called, so the cases
hold wherever the implementation lives.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import rannc_py
import rannc_py.comm.cost as comm_cost
from rannc_py import ConfigError, PartitionError, PlanError, RaNNCError, TraceError, optim, schedule
from rannc_py.hardware.cluster import parse_cluster, parse_size

BATCH = 8
CLUSTER = "a64fx:nodes=2"


class TwoLayer(nn.Module):
    """A small model with a keyword argument, so kwargs-shaped mistakes are reachable."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x))) * scale


class Branchy(nn.Module):
    """Data-dependent control flow: torch.export cannot capture it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return x
        return -x


@pytest.fixture(scope="module")
def graph() -> Any:
    torch.manual_seed(0)
    return rannc_py.trace(TwoLayer(), (torch.randn(BATCH, 6),))


@pytest.fixture(scope="module")
def plan_dict(graph: Any) -> dict[str, Any]:
    return rannc_py.plan(graph, batch_size=BATCH, cluster=CLUSTER).to_dict()


def _check(call: Callable[[], object], error: type[RaNNCError], shows: str) -> None:
    """``call()`` raises exactly ``error`` (a RaNNCError) and its message contains ``shows``."""
    assert issubclass(error, RaNNCError)
    with pytest.raises(RaNNCError) as info:
        call()
    assert type(info.value) is error, f"{type(info.value).__name__}: {info.value}"
    assert shows in str(info.value), f"{shows!r} not in {str(info.value)!r}"


def _plan(graph: Any, **options: Any) -> Callable[[], object]:
    return lambda: rannc_py.plan(graph, batch_size=options.pop("batch_size", BATCH),
                                 cluster=options.pop("cluster", CLUSTER), **options)


# ------------------------------------------------------------------ trace
@pytest.mark.parametrize(("args", "kwargs", "shows"), [
    (("not a tensor",), None, "'not a tensor'"),
    ((), None, "no tensor input"),
    ((torch.randn(BATCH, 6),), [("scale", 2.0)], "list"),
    ((torch.randn(BATCH, 5),), None, "fc1"),  # a shape the model cannot take: names the module
])
def test_trace_bad_arguments(args: tuple[Any, ...], kwargs: Any, shows: str) -> None:
    _check(lambda: rannc_py.trace(TwoLayer(), args, kwargs), TraceError, shows)


@pytest.mark.parametrize(("model", "shows"), [
    (lambda x: x, "function"),
    ("TwoLayer", "str"),
    (Branchy(), "Branchy"),
])
def test_trace_bad_model(model: Any, shows: str) -> None:
    _check(lambda: rannc_py.trace(model, (torch.randn(BATCH, 6),)), TraceError, shows)


# ------------------------------------------------------------------- plan
@pytest.mark.parametrize(("options", "shows"), [
    ({"batch_size": 0}, "got 0"),
    ({"batch_size": 8.0}, "got 8.0"),
    ({"batch_size": "8"}, "got '8'"),
    ({"microbatches": 3}, "microbatches=3"),
    ({"microbatches": 0}, "got 0"),
    ({"cluster": "tpu:nodes=2"}, "'tpu'"),
    ({"cluster": "a64fx:nodes=-2"}, "'-2'"),
    ({"cluster": "a64fx:nodes=0"}, "'0'"),
    ({"cluster": "a64fx:gpus=2"}, "'gpus'"),
    ({"cluster": "h100:gpus=2,memory=-1GB"}, "'-1GB'"),
    ({"cluster": 3}, "got 3"),
    ({"schedules": ("zero_bubble",)}, "'zero_bubble'"),
    ({"schedules": ()}, "got ()"),
    ({"schedules": None}, "got None"),
    ({"schedules": "1f1b"}, "got '1f1b'"),
    ({"replicas": [1]}, "[1]"),
    ({"replicas": [0, 2]}, "got 0"),
    ({"replicas": 2}, "got 2"),
    ({"replicas": [1, 1], "num_stages": 3}, "num_stages=3"),
    ({"num_stages": 0}, "got 0"),
    ({"num_stages": 1.5}, "got 1.5"),
    ({"num_stages": 1000}, "num_stages=1000"),
    ({"max_stages": -1}, "got -1"),
    ({"optimizer": "lion"}, "'lion'"),
    ({"optimizer": -1}, "got -1"),
    ({"optimizer": None}, "None"),
    ({"update_cost": -1.0}, "got -1.0"),
    ({"update_cost": math.nan}, "got nan"),
    ({"update_cost": "fast"}, "got 'fast'"),
    ({"memory_margin": 1.0}, "got 1.0"),
    ({"memory_margin": -0.1}, "got -0.1"),
    ({"memory_margin": "0.1"}, "got '0.1'"),
])
def test_plan_bad_options(graph: Any, options: dict[str, Any], shows: str) -> None:
    _check(_plan(graph, **options), ConfigError, shows)


def test_plan_with_profile_of_another_graph(graph: Any) -> None:
    other = rannc_py.trace(nn.Linear(6, 3), (torch.randn(BATCH, 6),))
    prof = rannc_py.profile(other, BATCH, "a64fx")
    _check(_plan(graph, profile=prof), PlanError, "different graph")


def test_plan_of_a_non_module() -> None:
    _check(lambda: rannc_py.plan("model", batch_size=BATCH, cluster=CLUSTER), TraceError, "str")


# ---------------------------------------------------------------- profile
@pytest.mark.parametrize(("call", "shows"), [
    (lambda g: rannc_py.profile(g, 0, "a64fx"), "got 0"),
    (lambda g: rannc_py.profile(g, -1), "got -1"),
    (lambda g: rannc_py.profile(g, True, "a64fx"), "got True"),
    (lambda g: rannc_py.profile(g, BATCH), "inputs"),
    (lambda g: rannc_py.profile(g, BATCH, inputs={"other": torch.randn(BATCH, 6)}), "'arg0'"),
    (lambda g: rannc_py.profile(g, BATCH, inputs={"arg0": torch.randn(BATCH, 6)}, repeats=0), "got 0"),
    (lambda g: rannc_py.profile(g, BATCH, "tpu"), "'tpu'"),
    (lambda g: rannc_py.profile(g, BATCH, 5), "got 5"),
    (lambda g: rannc_py.profile(g, BATCH, "a64fx", max_blocks=0), "got 0"),
    (lambda g: rannc_py.profile("graph", BATCH, "a64fx"), "str"),
])
def test_profile_bad_arguments(graph: Any, call: Callable[[Any], object], shows: str) -> None:
    _check(lambda: call(graph), ConfigError, shows)


# ------------------------------------------------------------------- Plan
@pytest.mark.parametrize(("text", "shows"), [
    ("{not json", "does not parse"),
    ("[1, 2]", "malformed plan"),
    ("null", "malformed plan"),
    ('"plan"', "malformed plan"),
    ("{}", "'stages'"),
    (b"\xff\xfe", "does not parse"),
    (None, "NoneType"),
])
def test_plan_from_malformed_json(text: Any, shows: str) -> None:
    _check(lambda: rannc_py.Plan.from_json(text), PlanError, shows)


@pytest.mark.parametrize(("change", "shows"), [
    ({"stages": 5}, "malformed plan"),
    ({"batch_size": "eight"}, "'eight'"),
    ({"schedule": "zero_bubble"}, "'zero_bubble'"),
    ({"world_size": 7}, "world_size is 7"),
    ({"microbatches": 0}, "microbatches=0"),
])
def test_plan_from_malformed_dict(plan_dict: dict[str, Any], change: dict[str, Any], shows: str) -> None:
    _check(lambda: rannc_py.Plan.from_dict(plan_dict | change), PlanError, shows)


def test_plan_from_dict_missing_key(plan_dict: dict[str, Any]) -> None:
    bad = {k: v for k, v in plan_dict.items() if k != "step_time"}
    _check(lambda: rannc_py.Plan.from_dict(bad), PlanError, "'step_time'")


def test_plan_load_missing_or_unreadable(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-plan.json"
    _check(lambda: rannc_py.Plan.load(missing), PlanError, str(missing))
    _check(lambda: rannc_py.Plan.load(tmp_path), PlanError, str(tmp_path))
    garbage = tmp_path / "garbage.json"
    garbage.write_bytes(b"\x80\x81 not a plan")
    _check(lambda: rannc_py.Plan.load(garbage), PlanError, str(garbage))


# ---------------------------------------------------------------- Cluster
@pytest.mark.parametrize(("spec", "shows"), [
    ("", "got ''"),
    (None, "got None"),
    ("tpu", "'tpu'"),
    ("a64fx:nodes", "'nodes'"),
    ("a64fx:nodes=two", "'two'"),
    ("a64fx:nodes=2.5", "'2.5'"),
    ("a64fx:shape=4x8", "'4x8'"),
    ("a64fx:nodes=8,shape=2x2x3", "2x2x3"),
    ("a64fx:shape=0x2x2", "0x2x2"),
    ("local:ranks=0", "'0'"),
    ("h100:gpus=12", "gpus=12"),
    ("h100:gpus=8,nodes=1", "'h100:gpus=8,nodes=1'"),
    ("h100:memory=lots", "'lots'"),
    ("h100:memory=0", "'0'"),
])
def test_parse_cluster_bad_spec(spec: Any, shows: str) -> None:
    _check(lambda: parse_cluster(spec), ConfigError, shows)
    _check(lambda: rannc_py.Cluster.from_preset(spec), ConfigError, shows)


@pytest.mark.parametrize(("field", "value"), [
    ("num_devices", 0), ("num_devices", "2"), ("devices_per_node", 0), ("topology", "ring"),
])
def test_cluster_bad_fields(field: str, value: Any) -> None:
    import dataclasses

    good = parse_cluster(CLUSTER)
    _check(lambda: dataclasses.replace(good, **{field: value}), ConfigError, repr(value))


@pytest.mark.parametrize("memory", [0, -5, "8GiB"])
def test_device_bad_memory(memory: Any) -> None:
    import dataclasses

    good = parse_cluster(CLUSTER).device
    _check(lambda: dataclasses.replace(good, memory=memory), ConfigError, repr(memory))


@pytest.mark.parametrize("text", ["lots", "-1GB", "", "0", "0.5", "1e999", "nanGB", "infGB", "1.2.3MB", None, 4096])
def test_parse_size_bad_text(text: Any) -> None:
    _check(lambda: parse_size(text), ConfigError, repr(text))


@settings(max_examples=60, deadline=None)
@given(st.text("0123456789.eE+-KMGTiB ", max_size=10) | st.text(max_size=8))
def test_parse_size_returns_a_size_or_config_error(text: str) -> None:
    try:
        size = parse_size(text)
    except ConfigError as e:
        assert repr(text) in str(e)
    else:
        assert isinstance(size, int) and size > 0


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["a64fx", "h100", "a100-40g", "tpu", ""]),
       st.lists(st.tuples(st.sampled_from(["nodes", "gpus", "shape", "memory", "ranks", "x", ""]),
                          st.text("0123456789x-.GiB", max_size=6)), max_size=3))
def test_parse_cluster_returns_a_cluster_or_config_error(name: str, options: list[tuple[str, str]]) -> None:
    spec = name + (":" + ",".join(f"{k}={v}" for k, v in options) if options else "")
    try:
        cluster = parse_cluster(spec)
    except ConfigError:
        return
    assert isinstance(cluster, rannc_py.Cluster) and cluster.num_devices >= 1


# ------------------------------------------------------------------ split
@pytest.mark.parametrize(("stages", "shows"), [
    (lambda n: 0, "got 0"),
    (lambda n: 10**6, "got 1000000"),
    (lambda n: "two", "str"),
    (lambda n: None, "NoneType"),
    (lambda n: [-1] * n, "stage -1"),
    (lambda n: [0.0] * n, "stage 0.0"),
    (lambda n: [0], "1 entries"),
    (lambda n: [0] * (n - 1) + [2], "[1]"),
    (lambda n: [1] + [0] * (n - 1), "backwards"),
    (lambda n: {"no_such_op": 0}, "'no_such_op'"),
])
def test_split_bad_assignment(graph: Any, stages: Callable[[int], Any], shows: str) -> None:
    _check(lambda: graph.split(stages(len(graph.ops))), PartitionError, shows)


# -------------------------------------------------------------- schedules
@settings(max_examples=30, deadline=None)
@given(st.sampled_from([schedule.gpipe, schedule.one_f_one_b, schedule.forward_only]),
       st.integers(-5, 4), st.integers(-5, 4))
def test_schedule_sizes_below_one(generator: Callable[[int, int], Any], p: int, m: int) -> None:
    if p >= 1 and m >= 1:
        assert generator(p, m).num_stages == p
        return
    _check(lambda: generator(p, m), ConfigError, f"got {p if p < 1 else m}")


@pytest.mark.parametrize(("call", "error", "shows"), [
    (lambda: schedule.by_name("zero_bubble", 2, 2), ConfigError, "'zero_bubble'"),
    (lambda: schedule.by_name(None, 2, 2), ConfigError, "None"),
    (lambda: schedule.by_name("gpipe", 0, 2), ConfigError, "got 0"),
    (lambda: schedule.gpipe(2.0, 2), ConfigError, "got 2.0"),
    (lambda: schedule.parse_action("FWD", 0), PlanError, "'FWD'"),
    (lambda: schedule.parse_action(3, 0), PlanError, "3"),
    (lambda: schedule.simulate(schedule.gpipe(2, 2), []), PlanError, "0 stage costs"),
])
def test_schedule_bad_arguments(call: Callable[[], object], error: type[RaNNCError], shows: str) -> None:
    _check(call, error, shows)


# ------------------------------------------------------------- comm costs
LINK = {"alpha": 1e-6, "beta": 1e9}


@pytest.mark.parametrize(("call", "shows"), [
    (lambda: comm_cost.allreduce_time("ring", -1, 4, **LINK), "-1"),
    (lambda: comm_cost.allreduce_time("ring", 100, 0, **LINK), "got 0"),
    (lambda: comm_cost.allreduce_time("ring", 100, 4, alpha=1e-6, beta=0), "0"),
    (lambda: comm_cost.allreduce_time("ring", 100, 4, alpha=-1.0, beta=1e9), "-1.0"),
    (lambda: comm_cost.allreduce_time("tree", 100, 4, **LINK), "'tree'"),
    (lambda: comm_cost.allreduce_time("torus", 100, 4, **LINK, torus_shape=(3,)), "(3,)"),
    (lambda: comm_cost.reduce_scatter_time(100, 4, **LINK, algorithm="tree"), "'tree'"),
    (lambda: comm_cost.reduce_scatter_time(-1, 4, **LINK), "-1"),
    (lambda: comm_cost.allgather_time(100, 4, **LINK, algorithm="tree"), "'tree'"),
    (lambda: comm_cost.allgather_time(-1, 4, **LINK), "-1"),
    (lambda: comm_cost.best_allreduce(100, 4), "alpha and beta"),
    (lambda: comm_cost.best_allreduce(100, 4, **LINK, algorithms=()), "[]"),
    (lambda: comm_cost.best_allreduce(100, 4, **LINK, algorithms=("tree",)), "'tree'"),
])
def test_comm_cost_bad_numbers(call: Callable[[], object], shows: str) -> None:
    _check(call, ConfigError, shows)


# ------------------------------------------------------------- optimizers
def _params() -> list[nn.Parameter]:
    return [nn.Parameter(torch.zeros(3))]


@pytest.mark.parametrize(("make", "shows"), [
    (lambda: optim.FusedAdam(_params(), lr=-1.0), "-1.0"),
    (lambda: optim.FusedAdam(_params(), lr="fast"), "'fast'"),
    (lambda: optim.FusedAdam(_params(), lr=math.nan), "nan"),
    (lambda: optim.FusedAdam(_params(), eps=-1e-8), "-1e-08"),
    (lambda: optim.FusedAdam(_params(), betas=(0.9, 1.0)), "(0.9, 1.0)"),
    (lambda: optim.FusedAdam(_params(), betas=(0.9,)), "(0.9,)"),
    (lambda: optim.FusedAdam(_params(), betas=0.9), "0.9"),
    (lambda: optim.FusedAdam(_params(), weight_decay=-0.1), "-0.1"),
    (lambda: optim.FusedAdamW(_params(), lr=-1.0), "-1.0"),
    (lambda: optim.FusedAdamW(_params(), weight_decay=-0.1), "-0.1"),
    (lambda: optim.FusedAdam([]), "empty parameter list"),
    (lambda: optim.FusedAdam(torch.zeros(3)), "Tensor"),
    (lambda: optim.FusedAdam([nn.Parameter(torch.zeros(3, dtype=torch.float64))]), "float64"),
    (lambda: optim.FusedSGD(_params(), lr=-1.0), "-1.0"),
    (lambda: optim.FusedSGD(_params(), lr=0.1, momentum=-0.5), "-0.5"),
    (lambda: optim.FusedSGD(_params(), lr=0.1, momentum="heavy"), "'heavy'"),
    (lambda: optim.FusedSGD(_params(), lr=0.1, weight_decay=-0.1), "-0.1"),
    (lambda: optim.FusedSGD(_params(), lr=0.1, nesterov=True), "momentum=0"),
    (lambda: optim.FusedSGD([], lr=0.1), "empty parameter list"),
    (lambda: optim.set_num_threads(0), "got 0"),
])
def test_optimizer_bad_hyperparameters(make: Callable[[], object], shows: str) -> None:
    _check(make, ConfigError, shows)


@pytest.mark.parametrize(("torch_make", "ours"), [
    (lambda p: torch.optim.Adam(p, lr=-1.0), lambda p: optim.FusedAdam(p, lr=-1.0)),
    (lambda p: torch.optim.AdamW(p, betas=(0.9, 1.5)), lambda p: optim.FusedAdamW(p, betas=(0.9, 1.5))),
    (lambda p: torch.optim.SGD(p, lr=0.1, momentum=-1.0), lambda p: optim.FusedSGD(p, lr=0.1, momentum=-1.0)),
    (lambda p: torch.optim.SGD([], lr=0.1), lambda p: optim.FusedSGD([], lr=0.1)),
])
def test_optimizers_reject_what_torch_rejects(torch_make: Callable[[Any], object],
                                              ours: Callable[[Any], object]) -> None:
    # torch raises ValueError; ours raises ConfigError, which is one, so callers catching ValueError still do.
    with pytest.raises(ValueError):
        torch_make(_params())
    with pytest.raises(ConfigError):
        ours(_params())


# ------------------------------------------------------------ RaNNCModule
def test_rannc_module_wraps_only_modules() -> None:
    _check(lambda: rannc_py.RaNNCModule("model"), ConfigError, "str")
    _check(lambda: rannc_py.RaNNCModule(None), ConfigError, "NoneType")


@pytest.mark.parametrize(("options", "error", "shows"), [
    ({"microbatches": 3}, ConfigError, "microbatches=3"),
    ({"microbatches": 0}, ConfigError, "got 0"),
    ({"cluster": "tpu"}, ConfigError, "'tpu'"),
    ({"memory_limit": "lots"}, ConfigError, "'lots'"),
    ({"memory_limit": -5}, ConfigError, "-5"),
    ({"memory_margin": 2.0}, ConfigError, "got 2.0"),
    ({"schedules": ("zero_bubble",)}, ConfigError, "'zero_bubble'"),
    ({"plan": 5}, ConfigError, "int"),
    ({"plan": {"stagez": 1}}, ConfigError, "'stagez'"),
    ({"plan": "no-such-dir/plan.json"}, PlanError, "no-such-dir/plan.json"),
])
def test_rannc_module_bad_options_one_process(options: dict[str, Any], error: type[RaNNCError],
                                              shows: str) -> None:
    # One process (no mpiexec): an option is checked in the constructor where it can be (the planning
    # options), else while planning, on the first call (what needs the traced model).
    torch.manual_seed(0)
    _check(lambda: rannc_py.RaNNCModule(TwoLayer(), **options)(torch.randn(4, 6)), error, shows)
