"""Cluster presets and preset-string parsing."""

from __future__ import annotations

import pytest
import torch
from mpi_launch import REPO, run_mpi

import rannc_py
from rannc_py.errors import ConfigError
from rannc_py.hardware import calibrate
from rannc_py.hardware.cluster import Link, cubic_shape, parse_cluster, parse_size


def test_presets():
    a = parse_cluster("a64fx:nodes=256")
    assert a.num_devices == 256 and a.torus_shape == (4, 8, 8) and a.topology == "torus"
    assert a.device.flops("float32") == 6.76e12 and a.device.memory == 32 * 2**30
    assert parse_cluster("a64fx:nodes=24,shape=2x3x4").torus_shape == (2, 3, 4)
    h = rannc_py.Cluster.from_preset("h100:nodes=2")
    assert h.num_devices == 16 and h.devices_per_node == 8
    assert h.link(8) is h.intra_node and h.link(9) is h.inter_node
    assert parse_cluster("a100-80g:gpus=4,memory=2GiB").device.memory == 2 * 2**30
    assert parse_cluster("a100-40g").num_devices == 8


def test_local_preset_is_measured_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("RANNC_CACHE_DIR", str(tmp_path))
    c = parse_cluster("local:ranks=3,memory=1GiB")
    assert c.num_devices == 3 and c.device.memory == 2**30
    assert c.device.flops() > 0 and c.inter_node.bandwidth > 0 and c.inter_node.latency > 0
    assert len(list(tmp_path.glob("local-calibration-*.json"))) == 1
    assert parse_cluster("local:ranks=3,memory=1GiB") == c  # second call reads the cache


def _no_probe(*args, **kwargs):
    raise AssertionError("the nested mpiexec link probe ran")


def test_local_single_rank_measures_no_link(tmp_path, monkeypatch):
    monkeypatch.setenv("RANNC_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(calibrate, "measure_mpi", _no_probe)
    c = parse_cluster("local:ranks=1")
    assert c.num_devices == 1 and c.device.flops() > 0
    assert calibrate.cached_link() is None  # nothing measured, nothing cached


def test_local_link_from_the_job_is_cached_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("RANNC_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(calibrate, "measure_mpi", _no_probe)
    link = Link(3e9, 4e-6)
    c = parse_cluster("local:ranks=4", link=link)
    assert c.inter_node == link and c.intra_node == link
    assert calibrate.cached_link() == link
    assert parse_cluster("local:ranks=2").inter_node == link  # offline path: the cached figures
    with pytest.raises(ConfigError, match="'local' preset only"):
        parse_cluster("a64fx:nodes=2", link=link)


def test_job_link_skips_what_needs_no_measurement(tmp_path, monkeypatch):
    from rannc_py.runtime.autoplan import job_link

    class OneRank:
        def Get_size(self):
            return 1

    class FourRanks:
        def Get_size(self):
            return 4

    monkeypatch.setenv("RANNC_CACHE_DIR", str(tmp_path))
    assert job_link(None, OneRank()) is None  # one rank: no link at all
    assert job_link("a64fx:nodes=4", FourRanks()) is None  # a preset carries its own figures


def test_contention_is_measured_only_for_ranks_sharing_cores():
    from rannc_py.hardware.cluster import parse_cluster
    from rannc_py.runtime.autoplan import job_contention, with_contention

    class FourRanks:
        def Get_size(self):
            return 4  # any measurement would need a real communicator and fail

    assert job_contention(None, FourRanks(), dedicated=True) is None  # a core each: nothing to add
    assert job_contention("a64fx:nodes=4", FourRanks(), dedicated=False) is None  # a preset's own links
    c = parse_cluster("a64fx:nodes=4")
    assert with_contention(c, None) is c
    slow = with_contention(c, 1e-3)
    assert slow.intra_node.latency == 1e-3 and slow.inter_node.latency == 1e-3
    assert slow.inter_node.bandwidth == c.inter_node.bandwidth
    fast = with_contention(c, 1e-9)  # never lowers a latency
    assert fast.intra_node.latency == c.intra_node.latency and fast.inter_node.latency == c.inter_node.latency


def test_contention_probe_on_four_ranks():
    proc = run_mpi(4, REPO / "tests/mpi_scripts/contention.py", timeout=240)
    assert proc.stdout.count(": ok") == 4, proc.stdout + proc.stderr


@pytest.mark.parametrize(
    "spec,match",
    [
        ("tpu:nodes=4", "unknown cluster preset 'tpu'"),
        ("a64fx:nodes", "malformed cluster option"),
        ("a64fx:nodes=0", "positive integer"),
        ("a64fx:nodes=-3", "positive integer"),
        ("a64fx:gpus=4", "has no option 'gpus'"),
        ("a64fx:nodes=8,shape=2x2", "has 4 nodes"),
        ("h100:gpus=12", "multiple of 8"),
        ("h100:gpus=8,nodes=1", "either gpus= or nodes="),
        ("a100-80g:memory=lots", "cannot read memory size"),
        ("", "preset string"),
    ],
)
def test_bad_specs(spec, match):
    with pytest.raises(ConfigError, match=match):
        parse_cluster(spec)


def test_helpers():
    assert parse_size("512MB") == 512 * 10**6 and parse_size("1.5GiB") == 3 * 2**29
    assert cubic_shape(64) == (4, 4, 4) and cubic_shape(7) == (1, 1, 7)


@pytest.mark.parametrize(
    ("make", "states"),
    [
        (lambda ps: torch.optim.SGD(ps, lr=0.1), 0),
        (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), 1),
        (lambda ps: torch.optim.AdamW(ps, lr=1e-3), 2),
        (lambda ps: torch.optim.Adam(ps, amsgrad=True), 3),
    ],
)
def test_job_optimizer_counts_state_and_times_the_step(make, states):
    from rannc_py.runtime.autoplan import job_optimizer

    model = torch.nn.Linear(3, 3)
    for given in (make(model.parameters()), make):  # an optimizer, or a factory
        found, cost = job_optimizer(given, None, 1)
        assert found == states
        assert cost is not None and 0 < cost < 1e-6  # seconds per parameter byte: well under a microsecond
        # planning for another cluster: its own (fused) step time, the state count still counts
        assert job_optimizer(given, "a64fx:nodes=2", 2) == (states, None)
    slow = job_optimizer(make(model.parameters()), None, 8 * calibrate.usable_cores())[1]
    assert slow is not None and slow > cost  # eight ranks per core: each rank's step takes longer


def test_job_optimizer_that_cannot_be_rebuilt_is_planned_as_adam():
    from rannc_py.runtime.autoplan import job_optimizer

    class NeedsModel(torch.optim.SGD):
        def __init__(self, params, model):
            super().__init__(params, lr=0.1)

    opt = NeedsModel(torch.nn.Linear(2, 2).parameters(), model=None)
    with pytest.warns(UserWarning, match="could not measure the optimizer .*planning with Adam"):
        assert job_optimizer(opt, None, 1) == ("adam", None)
    assert job_optimizer(None, None, 1) == ("adam", None)


def test_local_preset_measures_half_precision_matmuls(tmp_path, monkeypatch):
    monkeypatch.setenv("RANNC_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(calibrate, "measure_mpi", _no_probe)
    dev = parse_cluster("local:ranks=1").device
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert dev.flops(dtype) > 0
    assert dev.flops(torch.bfloat16) != dev.flops(torch.float32)  # measured, not copied


def test_local_preset_falls_back_to_fp32_when_a_dtype_cannot_be_timed(tmp_path, monkeypatch):
    monkeypatch.setenv("RANNC_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(calibrate, "measure_mpi", _no_probe)
    real = calibrate.measure_matmul

    def no_half(dtype=torch.float32, n=512):
        if dtype != torch.float32:
            raise RuntimeError(f"no {dtype} matmul here")
        return real(dtype, n)

    monkeypatch.setattr(calibrate, "measure_matmul", no_half)
    with pytest.warns(UserWarning, match="fp32 rate"):
        dev = parse_cluster("local:ranks=1").device
    assert dev.flops(torch.bfloat16) == dev.flops(torch.float32) == dev.flops(torch.float16)


def test_a_bf16_model_plans_on_local(tmp_path, monkeypatch):
    import rannc_py

    monkeypatch.setenv("RANNC_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(calibrate, "measure_mpi", _no_probe)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1)).to(torch.bfloat16)
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    plan = rannc_py.plan(model, (x,), batch_size=4, cluster="local:ranks=1")  # measured here, bf16 rate
    assert plan.step_time > 0 and 0 < plan.mfu
