"""Ask the planner for a layout of the traced model on this job's ranks.

:func:`job_link` is collective (every rank); :func:`job_cluster`,
:func:`job_profile` and :func:`job_optimizer` run on rank 0, which plans
(:func:`rannc_py.planner.api.plan_graph`) and broadcasts the plan
(:func:`quiet_bcast`).

For the ``local`` preset the block times come from measuring the model here
(``rannc_py.profile``, cached on disk), not from the roofline estimate of
the calibrated device: the measured times include what the roofline misses
(per-op dispatch, small-matrix efficiency, fixed per-call costs, which the
measured profile fits as a per-block fixed term). When the job's ranks share
fewer cores than they need, the times are stretched by the share of a core
each rank gets (:func:`rannc_py.hardware.calibrate.core_share`).

The user's optimizer is measured too (:func:`job_optimizer`): how many
parameter-sized state buffers it keeps (its memory) and, on ``local``, how
long its step takes per parameter byte (torch's default AdamW on one CPU
thread runs several times slower than a fused step at memory bandwidth).
"""

from __future__ import annotations

import dataclasses
import inspect
import time
import warnings
from collections.abc import Mapping
from typing import Any

import torch

from rannc_py.errors import ConfigError
from rannc_py.graph.tensor_cost import TensorAnnotation
from rannc_py.hardware.cluster import Cluster, Link
from rannc_py.planner.api import plan_cluster
from rannc_py.planner.options import PlanOptions
from rannc_py.planner.plan import Plan
from rannc_py.profiling.record import Profile

# How often ranks waiting for rank 0's plan look for it (seconds): planning
# takes seconds, and a sleeping rank leaves the cores to rank 0's profiling.
_POLL_S = 0.01


def _is_local(cluster: Cluster | str | None) -> bool:
    return cluster is None or (isinstance(cluster, str) and cluster.strip().partition(":")[0].strip().lower() == "local")


def job_link(cluster: Cluster | str | None, comm: Any) -> Link | None:
    """Measure the link with the job's own ranks when the planner will need it (collective over ``comm``).

    Needed when the cluster is the ``local`` preset (``cluster`` None or a
    ``"local..."`` string), the job has more than one rank, and this host
    has no cached link figures (rank 0 decides and tells the others).
    Returns the measured :class:`Link` (the same on every rank), or None
    when nothing was measured.
    """
    if comm.Get_size() < 2 or not _is_local(cluster):
        return None
    from rannc_py.hardware import calibrate
    from rannc_py.runtime.link_probe import EngineMessenger

    need = comm.bcast(calibrate.cached_link() is None if comm.Get_rank() == 0 else None, root=0)
    # through the engine the pipeline's transfers use, so the figures are theirs
    return calibrate.measure_link(comm, EngineMessenger(comm)) if need else None


def job_contention(cluster: Cluster | str | None, comm: Any, dedicated: bool) -> float | None:
    """Per-message cost of the ranks sharing cores, for the ``local`` preset (collective over ``comm``).

    Measured (:func:`rannc_py.runtime.link_probe.contended_latency`) when the
    job has several ranks on the ``local`` preset and this node's ranks do not
    each have a core (``dedicated`` False, from :func:`rannc_py.comm.dedicate_cores`);
    never cached, since it depends on the job. None otherwise.
    """
    if comm.Get_size() < 2 or not _is_local(cluster) or dedicated:
        return None
    from rannc_py.runtime.link_probe import contended_latency

    with torch.random.fork_rng(devices=[]):  # the probe draws its operands; the caller's stream stays
        return contended_latency(comm)


def with_contention(cluster: Cluster, latency: float | None) -> Cluster:
    """``cluster`` with its links' latency at least ``latency`` (:func:`job_contention`; None: as it is)."""
    if latency is None:
        return cluster

    def slower(link: Link) -> Link:
        return dataclasses.replace(link, latency=max(link.latency, latency))

    return dataclasses.replace(cluster, intra_node=slower(cluster.intra_node), inter_node=slower(cluster.inter_node))


def job_cluster(options: PlanOptions, world_size: int, link: Link | None = None) -> Cluster:
    """The cluster the planner plans for: ``options.cluster`` (a Cluster or preset string),
    or by default ``"local:ranks=<world_size>"`` (this machine, calibrated), with
    ``options.memory_limit`` as its per-rank memory when set.

    ``link``: figures from :func:`job_link` for the ``local`` preset (cached
    by it); default None: cached or probed.

    Raises:
        ConfigError: an unknown preset, or a cluster of another size than the job.
    """
    if options.cluster is None:
        options = dataclasses.replace(options, cluster=f"local:ranks={world_size}")
    found = plan_cluster(options, link=link)
    if found.num_devices != world_size:
        raise ConfigError(
            f"cluster {found.name!r} has {found.num_devices} devices but the job runs {world_size} ranks; "
            "describe the job's ranks (e.g. a preset with the matching ranks/nodes/gpus)"
        )
    return found


def job_profile(graph: Any, inputs: Mapping[str, torch.Tensor], cluster: Cluster | str | None,
                world_size: int, on_meta: bool, blocks: list[tuple[int, ...]] | None = None) -> Profile | None:
    """The block profile to plan with: measured here for the ``local`` preset, else None (analytic).

    Measures ``graph`` at its traced (local) batch on ``inputs``
    (``graph.flatten_inputs(args, kwargs)``), cached on disk by
    :func:`rannc_py.profile`, then stretches every time by
    ``1 / core_share(world_size)``. Returns None for other clusters and when
    ``on_meta`` (the model's parameters are on the ``meta`` device: nothing to run).
    ``blocks``: the blocks to time (a given layout's stages); default the coarsening's.
    """
    if not _is_local(cluster) or on_meta:
        return None
    from rannc_py.hardware.calibrate import core_share
    from rannc_py.profiling.api import profile

    prof = profile(graph, graph.batch_size, inputs=inputs, blocks=blocks)
    stretch = 1.0 / core_share(world_size)
    if stretch == 1.0:
        return prof
    return dataclasses.replace(
        prof,
        fwd_fixed=tuple(t * stretch for t in prof.fwd_fixed),
        fwd_per_sample=tuple(t * stretch for t in prof.fwd_per_sample),
        bwd_fixed=tuple(t * stretch for t in prof.bwd_fixed),
        bwd_per_sample=tuple(t * stretch for t in prof.bwd_per_sample),
    )


# Elements of the probe parameter the optimizer is timed on: 16 MiB each for
# the parameter, its gradient and every state buffer, past a CPU's last-level cache.
_PROBE_NUMEL = 2**22


def job_optimizer(optimizer: Any, cluster: Cluster | str | None, world_size: int) -> tuple[int | str, float | None]:
    """``(optimizer, update_cost)`` for :func:`rannc_py.plan` from the user's optimizer.

    ``optimizer`` is the torch optimizer ``RaNNCModule`` was given, or its
    factory. A fresh one of the same kind and hyperparameters steps a probe
    parameter of ``_PROBE_NUMEL`` elements: the state buffers of its size
    are counted, and on the ``local`` preset the median of three steps gives
    seconds per parameter byte, stretched by ``1 / core_share(world_size)``
    as the profile is. Returns ``("adam", None)`` (Adam's state, the default
    cost) when there is no optimizer, or when one cannot be built on a probe
    (with a warning naming why).
    """
    if optimizer is None:
        return "adam", None
    from rannc_py._util import median_time
    from rannc_py.hardware.calibrate import core_share

    local = _is_local(cluster)
    probe = torch.nn.Parameter(torch.zeros(_PROBE_NUMEL if local else 1024))
    probe.grad = torch.randn(probe.shape, generator=torch.Generator().manual_seed(0)) * 1e-3
    try:
        opt = _fresh_optimizer(optimizer, [probe])
        with torch.no_grad():
            opt.step()  # creates the state
    except Exception as e:  # noqa: BLE001 - an optimizer that cannot be rebuilt is planned as Adam, said aloud
        warnings.warn(f"could not measure the optimizer ({type(e).__name__}: {e}); planning with Adam's state "
                      "memory and a fused step's time", stacklevel=3)
        return "adam", None
    states = sum(1 for v in opt.state[probe].values() if torch.is_tensor(v) and v.shape == probe.shape)
    if not local:
        return states, None

    def step() -> None:
        with torch.no_grad():
            opt.step()

    seconds = median_time(step, repeats=3) / core_share(world_size)
    return states, seconds / (probe.numel() * probe.element_size())


# Parameter tensors the per-tensor probe steps (one element each: only the per-tensor work counts).
_PROBE_TENSORS = 64


def job_tensor_overhead(optimizer: Any, cluster: Cluster | str | None, world_size: int) -> float | None:
    """Seconds per parameter tensor per step of the runtime's and the user's per-tensor work, on ``local``.

    A fresh optimizer of the user's kind steps ``_PROBE_TENSORS`` one-element
    parameters after the runtime hands them their gradients (the held
    gradients applied at ``loss.backward()``) and clips them by their global
    norm (:func:`rannc_py.runtime.grads.clip_grad_norm_`, as a training loop
    that clips does), then zeroes them; the median of five rounds over the
    tensor count, stretched by ``1 / core_share(world_size)``. Returns None
    off ``local``, without an optimizer, or when one cannot be built (the
    device's calibrated figure then stands).
    """
    if optimizer is None or not _is_local(cluster):
        return None
    from mpi4py import MPI

    from rannc_py._util import median_time
    from rannc_py.hardware.calibrate import core_share
    from rannc_py.runtime.grads import HeldGrads, clip_grad_norm_

    params = [torch.nn.Parameter(torch.zeros(1)) for _ in range(_PROBE_TENSORS)]
    grads = [torch.full((1,), 1e-3) for _ in params]
    try:
        opt = _fresh_optimizer(optimizer, params)
    except Exception:  # noqa: BLE001 - job_optimizer has warned already; keep the calibrated figure
        return None
    held = HeldGrads(params)
    named = {str(k): p for k, p in enumerate(params)}
    one = torch.ones(())

    def step() -> None:
        held.begin()
        for p, g in zip(params, grads):
            p.grad = g.clone()
        held.end()(one)
        clip_grad_norm_(named, set(named), MPI.COMM_SELF, 1.0)
        with torch.no_grad():
            opt.step()
        opt.zero_grad()

    with torch.random.fork_rng():
        seconds = median_time(step, repeats=5)
    return seconds / _PROBE_TENSORS / core_share(world_size)


def job_tensor_annotation(graph: Any, options: PlanOptions, world_size: int,
                          given: Plan | None = None) -> TensorAnnotation | None:
    """The traced graph's tensor annotation for the job's plan, or None for tensor degree 1 only.

    For a layout given by hand, at its stages' degree (None at degree 1). For
    a search, at ``options.tensor`` when pinned, else at every degree of
    :data:`~rannc_py.graph.tensor_annotate.DEGREES` that divides the world
    size, with every schedule and sharding level (each tensor position's
    replicas shard its state; a split backward's I runs the group's backward
    collectives on the path to the stage's inputs, W those on the weight side,
    each once, in the same order on every rank of the group).
    """
    from rannc_py.graph.tensor_annotate import DEGREES, annotate

    if given is not None:
        return annotate(graph, max(st.tensor for st in given.stages))
    return annotate(graph, options.tensor, [t for t in DEGREES if world_size % t == 0])


def _fresh_optimizer(optimizer: Any, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """A new optimizer of the user's kind (an instance's class and hyperparameters, or the factory) on ``params``."""
    if isinstance(optimizer, torch.optim.Optimizer):
        return type(optimizer)(params, **_constructor_args(type(optimizer), optimizer.defaults))
    return optimizer(params)


def _constructor_args(cls: type, defaults: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of an optimizer's ``defaults`` its constructor takes (some record derived flags)."""
    params = inspect.signature(cls).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(defaults)
    return {k: v for k, v in defaults.items() if k in params}


def quiet_bcast(text: str | None, comm: Any) -> str:
    """Broadcast rank 0's ``text`` to every rank, the others waiting asleep (collective).

    A blocking MPI broadcast busy-polls on the ranks that wait, which would
    take the cores rank 0 needs to profile and plan (and skew its timings).
    """
    req = comm.Ibarrier()
    while not req.Test():
        time.sleep(_POLL_S)
    return comm.bcast(text, root=0)
