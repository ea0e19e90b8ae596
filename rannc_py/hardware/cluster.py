"""Device and cluster descriptions, their presets, and preset-string parsing.

A :class:`Cluster` carries every number the cost model needs (peak FLOP/s,
memory, memory bandwidth, link bandwidth and latency, topology); nothing in
the cost model is a constant of its own. Presets: ``a64fx``, ``a100-40g``,
``a100-80g``, ``h100`` and ``local`` (this machine, measured; see
:mod:`rannc_py.hardware.calibrate`).

Preset strings: ``"<preset>[:key=value,...]"``. Keys: ``nodes`` (every preset
but local), ``gpus`` (GPU presets: total GPUs, a multiple of the node size),
``shape`` (a64fx: Tofu job shape ``AxBxC``, default the most cubic
factorisation of ``nodes``), ``ranks`` (local), ``memory`` (per device, e.g.
``2GiB``, ``512MB``, overrides the preset). Default size: one node (local: 2
ranks).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, replace

from rannc_py._util import format_bytes, grid_shape
from rannc_py.errors import ConfigError
from rannc_py.hardware.calibrate import HALF_DTYPES, core_share, local_figures
from rannc_py.hardware.device import Device, Link

__all__ = ["Cluster", "Device", "Link", "as_cluster", "cubic_shape", "local_cluster", "parse_cluster", "parse_size"]


@dataclass(frozen=True, kw_only=True)
class Cluster:
    """A set of identical devices and the network between them.

    Attributes:
        name: the preset string it was made from (or a user label).
        device: the device every rank runs on.
        num_devices: ranks in the job.
        devices_per_node: ranks sharing a node (and ``intra_node`` links).
        intra_node: link between ranks of one node (NVLink, shared memory).
        inter_node: link between nodes (InfiniBand, Tofu-D), per rank.
        topology: "torus" (Tofu: dimension-wise allreduce) or "switched" (fat tree).
        torus_shape: node grid for a torus, else None.
        concurrent_links: links one node drives at once (Tofu-D: 6 TNIs).

    Raises ConfigError for fewer than one device (or device per node) or an
    unknown topology.
    """

    name: str
    device: Device
    num_devices: int
    devices_per_node: int
    intra_node: Link
    inter_node: Link
    topology: str
    torus_shape: tuple[int, ...] | None = None
    concurrent_links: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.num_devices, int) or self.num_devices < 1:
            raise ConfigError(f"cluster needs at least one device, got num_devices={self.num_devices!r}")
        if not isinstance(self.devices_per_node, int) or self.devices_per_node < 1:
            raise ConfigError(f"cluster needs at least one device per node, got "
                              f"devices_per_node={self.devices_per_node!r}")
        if self.topology not in ("torus", "switched"):
            raise ConfigError(f"cluster topology must be 'torus' or 'switched', got {self.topology!r}")

    @classmethod
    def from_preset(cls, spec: str) -> Cluster:
        """Build a cluster from a preset string such as ``"a64fx:nodes=256"`` or ``"local:ranks=4,memory=2GiB"``.

        Raises:
            ConfigError: unknown preset, unknown or malformed key, bad value.
        """
        return parse_cluster(spec)

    def link(self, group_size: int) -> Link:
        """The slowest link a group of ``group_size`` consecutive ranks communicates over."""
        return self.intra_node if group_size <= self.devices_per_node else self.inter_node

    def describe(self) -> str:
        """One line: preset, device count, per-device memory and peak, links."""
        d = self.device
        return (
            f"{self.name}: {self.num_devices} x {d.name} ({format_bytes(d.memory)}, "
            f"{d.flops('float32') / 1e12:.3g} TFLOP/s fp32), {self.topology}"
            + (f" {'x'.join(map(str, self.torus_shape))}" if self.torus_shape else "")
            + f", inter-node {self.inter_node.bandwidth / 1e9:.3g} GB/s"
        )


GiB = 2**30

# --- presets: every figure names its source ---------------------------------

# Fugaku A64FX node (Fujitsu A64FX datasheet; RIKEN Fugaku system overview):
# 48 compute cores at 2.2 GHz, 2 x 512-bit SVE FMA pipes -> 48*2.2e9*32 = 3.38
# TFLOP/s fp64, 6.76 fp32, 13.5 fp16; 32 GiB HBM2 at 1024 GB/s.
# Tofu interconnect D (Ajima et al., IEEE Cluster 2018): 6.8 GB/s per link per
# direction, 10 ports, 6 TNIs (so 6 transfers at once), ~0.49 us put latency.
# Efficiencies are ASSUMPTIONS, not measurements: 0.7 of peak for fp32 GEMM-dominated
# training kernels on SVE (vendor BLAS reaches more on large GEMMs, framework
# kernels less), 0.8 of the HBM2 peak (STREAM triad on A64FX is reported at
# roughly 80 % of 1024 GB/s).
# The runtime's fixed costs are ASSUMPTIONS too (the local preset measures them): its
# Python-side work per action, per parameter tensor and per step, taken at three times
# this project's x86 figures (an A64FX core runs scalar Python about that much slower),
# and 5 us for a rank to post one MPI message from Python.
_A64FX = Device(name="a64fx", peak_flops=(("float32", 6.76e12), ("float16", 13.5e12), ("bfloat16", 13.5e12)),
                memory=32 * GiB, memory_bandwidth=1024e9, compute_efficiency=0.7, bandwidth_efficiency=0.8,
                action_overhead=150e-6, tensor_overhead=30e-6, step_overhead=1.5e-3)
_TOFU_D = Link(6.8e9, 0.49e-6, 5e-6)

# NVIDIA A100 SXM datasheet: 19.5 TFLOP/s fp32 (156 TF32), 312 bf16/fp16 dense;
# 40 GB HBM2 at 1555 GB/s, 80 GB HBM2e at 2039 GB/s; NVLink 3: 600 GB/s
# total = 300 GB/s per direction. DGX A100: 8 GPUs, one 200 Gb/s HDR
# InfiniBand HCA per GPU = 25 GB/s. Latencies: NVIDIA NCCL-tests typical
# small-message figures (~2 us NVLink, ~5 us IB across nodes).
_A100_FLOPS = (("float32", 19.5e12), ("tfloat32", 156e12), ("bfloat16", 312e12), ("float16", 312e12))
# Efficiencies (ASSUMPTIONS, as for H100 below): 0.8 of peak for large cuBLAS
# GEMMs, 0.85 of HBM peak (BabelStream-style copy/triad figures).
# Runtime fixed costs on GPU hosts (ASSUMPTIONS): the x86 host's Python work as measured
# on this project's CPUs (50 us per action, 10 us per parameter tensor, 0.5 ms per step)
# and 5 us to post one message.
_GPU_HOST = {"action_overhead": 50e-6, "tensor_overhead": 10e-6, "step_overhead": 0.5e-3}
_A100_40 = Device(name="a100-40g", peak_flops=_A100_FLOPS, memory=40 * 10**9, memory_bandwidth=1555e9,
                  compute_efficiency=0.8, bandwidth_efficiency=0.85, **_GPU_HOST)
_A100_80 = Device(name="a100-80g", peak_flops=_A100_FLOPS, memory=80 * 10**9, memory_bandwidth=2039e9,
                  compute_efficiency=0.8, bandwidth_efficiency=0.85, **_GPU_HOST)
_NVLINK3 = Link(300e9, 2e-6, 5e-6)
_IB_HDR = Link(25e9, 5e-6, 5e-6)

# NVIDIA H100 SXM datasheet: 67 TFLOP/s fp32, 989 bf16/fp16 dense; 80 GB HBM3
# at 3.35 TB/s; NVLink 4: 900 GB/s total = 450 per direction. DGX H100: one
# 400 Gb/s NDR InfiniBand port per GPU = 50 GB/s.
_H100 = Device(name="h100", peak_flops=(("float32", 67e12), ("bfloat16", 989e12), ("float16", 989e12)),
               memory=80 * 10**9, memory_bandwidth=3350e9, compute_efficiency=0.8, bandwidth_efficiency=0.85,
               **_GPU_HOST)
_NVLINK4 = Link(450e9, 2e-6, 5e-6)
_IB_NDR = Link(50e9, 5e-6, 5e-6)

_GPU_PRESETS = {
    "a100-40g": (_A100_40, _NVLINK3, _IB_HDR),
    "a100-80g": (_A100_80, _NVLINK3, _IB_HDR),
    "h100": (_H100, _NVLINK4, _IB_NDR),
}
_GPUS_PER_NODE = 8  # DGX/HGX A100 and H100 nodes

PRESETS = ("a64fx", *_GPU_PRESETS, "local")

_KEYS = {
    "a64fx": {"nodes", "shape", "memory"},
    "local": {"ranks", "memory"},
    **{k: {"nodes", "gpus", "memory"} for k in _GPU_PRESETS},
}


def parse_size(text: str) -> int:
    """Parse a byte size such as ``"2GiB"``, ``"512MB"``, ``"1.5e9"`` or ``"4096"``.

    Raises:
        ConfigError: not a string, or not a finite size of at least one byte.
    """
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([KMGT]i?B|B)?\s*", text) if isinstance(text, str) else None
    units = {None: 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12,
             "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}
    try:
        value = float(m.group(1)) * units[m.group(2)] if m else -1.0
    except ValueError:
        value = -1.0
    if not 1 <= value < math.inf:
        raise ConfigError(f"cannot read memory size {text!r}; write e.g. 2GiB, 512MB or a byte count")
    return int(value)


def _positive_int(key: str, text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise ConfigError(f"cluster option {key}={text!r} must be a positive integer")
    return int(text)


def cubic_shape(n: int) -> tuple[int, int, int]:
    """The most cubic 3-D factorisation a x b x c = n with a <= b <= c (:func:`rannc_py._util.grid_shape`)."""
    sides = sorted(grid_shape(n, 3))
    return (1,) * (3 - len(sides)) + tuple(sides)  # type: ignore[return-value]


def parse_cluster(spec: str, *, link: Link | None = None) -> Cluster:
    """Parse ``"<preset>[:key=value,...]"`` into a :class:`Cluster` (see the module docstring).

    ``link``: link figures already measured for the ``local`` preset (by the
    job's own ranks, :func:`rannc_py.hardware.calibrate.measure_link`); default
    None: cached or probed (see :func:`rannc_py.hardware.calibrate.local_cluster`).

    Raises:
        ConfigError: unknown preset, unknown or malformed key, bad value, or
            ``link`` given for a preset other than ``local``.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"cluster must be a Cluster or a preset string like 'a64fx:nodes=256', got {spec!r}")
    name, _, rest = spec.strip().partition(":")
    name = name.strip().lower()
    if name not in _KEYS:
        raise ConfigError(f"unknown cluster preset {name!r}; choose one of {list(PRESETS)}")
    opts: dict[str, str] = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or not value.strip():
            raise ConfigError(f"malformed cluster option {item!r} in {spec!r}; write key=value")
        if key not in _KEYS[name]:
            raise ConfigError(f"preset {name!r} has no option {key!r}; options: {sorted(_KEYS[name])}")
        opts[key] = value.strip()
    if link is not None and name != "local":
        raise ConfigError(f"measured link figures apply to the 'local' preset only, not to {spec!r}")
    memory = parse_size(opts["memory"]) if "memory" in opts else None

    if name == "local":
        ranks = _positive_int("ranks", opts.get("ranks", "2"))
        return local_cluster(ranks, memory=memory, name=spec.strip(), link=link)
    if name == "a64fx":
        nodes = _positive_int("nodes", opts.get("nodes", "1"))
        if "shape" in opts:
            try:
                shape = tuple(int(x) for x in opts["shape"].lower().split("x"))
            except ValueError:
                raise ConfigError(f"a64fx shape {opts['shape']!r} must look like 4x8x8") from None
            if math.prod(shape) != nodes or min(shape) < 1:
                raise ConfigError(f"a64fx shape {opts['shape']!r} has {math.prod(shape)} nodes, not nodes={nodes}; "
                                  "give sides >= 1 whose product is nodes")
        else:
            shape = cubic_shape(nodes)
        dev = _A64FX if memory is None else replace(_A64FX, memory=memory)
        # One rank per node; the intra-node link is never used (devices_per_node=1).
        return Cluster(name=spec.strip(), device=dev, num_devices=nodes, devices_per_node=1, intra_node=_TOFU_D,
                       inter_node=_TOFU_D, topology="torus", torus_shape=shape, concurrent_links=6)
    dev, intra, inter = _GPU_PRESETS[name]
    if "gpus" in opts and "nodes" in opts:
        raise ConfigError(f"give either gpus= or nodes= for {name!r}, not both ({spec!r})")
    if "gpus" in opts:
        gpus = _positive_int("gpus", opts["gpus"])
    else:
        gpus = _GPUS_PER_NODE * _positive_int("nodes", opts.get("nodes", "1"))
    per_node = min(gpus, _GPUS_PER_NODE)
    if gpus % per_node:
        raise ConfigError(f"{name} gpus={gpus} must be a multiple of {per_node} GPUs per node")
    if memory is not None:
        dev = replace(dev, memory=memory)
    return Cluster(name=spec.strip(), device=dev, num_devices=gpus, devices_per_node=per_node, intra_node=intra,
                   inter_node=inter, topology="switched")


def as_cluster(cluster: Cluster | str) -> Cluster:
    """Accept a :class:`Cluster` or a preset string. Raises ConfigError otherwise."""
    if isinstance(cluster, Cluster):
        return cluster
    return parse_cluster(cluster)


def local_cluster(ranks: int, *, memory: int | None = None, name: str = "local", link: Link | None = None
                  ) -> Cluster:
    """A :class:`Cluster` of ``ranks`` processes on this machine, from cached or fresh measurements.

    Args:
        ranks: number of MPI ranks to plan for; when they (times the torch
            threads) outnumber the usable cores, the device's compute and
            memory bandwidth are scaled by
            :func:`~rannc_py.hardware.calibrate.core_share`.
        memory: bytes per rank; default: physical memory divided by ``ranks``.
        name: label stored in the cluster.
        link: link figures measured by the caller (the job's own ranks, see
            :func:`~rannc_py.hardware.calibrate.measure_link`); they are
            cached. Default None: see :func:`~rannc_py.hardware.calibrate.local_figures`;
            with one rank no link is measured and the link stands for a local
            copy (memory bandwidth, no latency), which one rank never uses.
    Raises:
        ConfigError: the MPI probe fails.
    """
    data = local_figures(ranks, link)
    if memory is None:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // ranks
    share = core_share(ranks)  # ranks sharing too few cores each run that much slower
    rates = (("float32", data["flops"]), *((n, data.get(f"flops_{n}", data["flops"])) for n in HALF_DTYPES))
    # The runtime's own fixed costs run on a core too: shared cores stretch them alike.
    dev = Device(name="local", peak_flops=tuple((n, r * share) for n, r in rates), memory=memory,
                 memory_bandwidth=data["memory_bandwidth"] * share, action_overhead=data["action_overhead"] / share,
                 tensor_overhead=data["tensor_overhead"] / share, step_overhead=data["step_overhead"] / share)
    if "latency" in data and "bandwidth" in data:
        net = Link(data["bandwidth"], data["latency"], data.get("message_overhead", 0.0) / share)
    else:
        net = Link(data["memory_bandwidth"], 0.0)
    return Cluster(name=name, device=dev, num_devices=ranks, devices_per_node=ranks, intra_node=net,
                   inter_node=net, topology="switched")
