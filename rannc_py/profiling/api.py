"""``rannc_py.profile``: a graph's per-block costs, measured here (cached on disk) or estimated for a device.

This is the one module of the layer that runs models (through
:mod:`rannc_py.profiling.measure`); the planner reads only the pure
:class:`~rannc_py.profiling.record.Profile` and the analytic estimate.
"""

from __future__ import annotations

import hashlib
import platform
from collections.abc import Mapping

import torch

from rannc_py._util import atomic_write, cache_dir
from rannc_py.errors import ConfigError
from rannc_py.graph.ir import Graph
from rannc_py.graph.traced import TracedGraph
from rannc_py.hardware.cluster import Cluster, Device, parse_cluster
from rannc_py.profiling.analytic import analytic_profile
from rannc_py.profiling.coarsen import coarsen
from rannc_py.profiling.record import Profile


def profile(
    graph: Graph,
    batch_size: int,
    device: Cluster | Device | str | None = None,
    *,
    inputs: Mapping[str, torch.Tensor] | None = None,
    max_blocks: int = 64,
    repeats: int = 3,
    blocks: list[tuple[int, ...]] | None = None,
) -> Profile:
    """Profile ``graph``'s blocks at ``batch_size`` rows.

    Args:
        graph: a traced model (``rannc_py.trace``).
        batch_size: rows per forward to time at (a replica's microbatch).
        device: None to measure in this process; a Cluster, Device or preset
            string (e.g. "a64fx") for the analytic roofline estimate.
        inputs: measured only: example inputs, ``graph.flatten_inputs(args, kwargs)``;
            resized along dim 0 to ``batch_size`` when the graph has a dynamic batch.
        max_blocks: coarsening bound (see :func:`rannc_py.profiling.coarsen.coarsen`).
        repeats: measured only: timed runs per block after one warm-up (median kept).
        blocks: the blocks to time, each a tuple of consecutive op indices
            covering the graph in order (e.g. a plan's stages); default None:
            :func:`~rannc_py.profiling.coarsen.coarsen`'s.
    Returns:
        The :class:`Profile`.
    Raises:
        ConfigError: ``graph`` is not a Graph, batch_size < 1, measuring
            without (all the graph's) inputs, with repeats < 1, a graph
            without its program or with parameters on the meta device,
            unknown preset.
    """
    if not isinstance(graph, Graph):
        raise ConfigError(f"profile() takes a Graph from rannc_py.trace(model, args), got {type(graph).__name__}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    blocks = coarsen(graph, max_blocks) if blocks is None else _check_blocks(graph, blocks)
    if device is not None:
        return analytic_profile(graph, blocks, batch_size, _as_device(device))
    from rannc_py.profiling.measure import measure_profile

    if inputs is None:
        raise ConfigError("measuring a profile needs example inputs: pass inputs=graph.flatten_inputs(args, "
                          "kwargs), or device='<preset>' for an analytic profile")
    if missing := [name for name in graph.input_names if name not in inputs]:
        raise ConfigError(f"inputs lack the graph's inputs {missing} (it takes {graph.input_names}); pass "
                          "inputs=graph.flatten_inputs(args, kwargs)")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ConfigError(f"repeats must be a positive integer (timed runs per block), got {repeats!r}")
    if not isinstance(graph, TracedGraph):
        raise ConfigError(f"measuring a profile runs the model, but got a {type(graph).__name__} without its program "
                          "(e.g. read from JSON); pass the graph rannc_py.trace() returned, or device='<preset>' "
                          "for an analytic profile")
    dev = f"{platform.node()}-cpu-t{torch.get_num_threads()}"
    # "fit4": two-point fixed + per-sample fit, timed on CPU time at one thread, with the
    # weight-gradient share (older entries: without it; fixed = 0; or wall-clock times).
    key = hashlib.sha256(f"fit4|{graph.fingerprint()}|{batch_size}|{dev}|{blocks}|{repeats}".encode()).hexdigest()[:24]
    path = cache_dir() / f"profile-{key}.json"
    if path.exists():
        return Profile.from_json(path.read_text())
    prof = measure_profile(graph, blocks, batch_size, dict(inputs), dev, repeats)
    atomic_write(path, prof.to_json())
    return prof


def _check_blocks(graph: Graph, blocks: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
    """``blocks`` as tuples when they are consecutive runs of ops covering the graph in order."""
    out = [tuple(int(i) for i in b) for b in blocks]
    if [i for b in out for i in b] != list(range(len(graph.ops))) or not all(out):
        raise ConfigError(f"blocks must be non-empty runs of consecutive op indices covering the graph's "
                          f"{len(graph.ops)} ops in order, got {len(out)} blocks")
    return out


def _as_device(device: Cluster | Device | str) -> Device:
    if isinstance(device, Device):
        return device
    if isinstance(device, Cluster):
        return device.device
    return parse_cluster(device).device
