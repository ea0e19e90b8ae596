"""``rannc_py.plan``: trace (if needed), profile, coarsen, search, and return a :class:`Plan`."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from rannc_py._util import format_bytes
from rannc_py.errors import ConfigError, NoFeasiblePlanError, PlanError
from rannc_py.hardware.cluster import Cluster, as_cluster
from rannc_py.planner.baselines import seed_layouts
from rannc_py.planner.chain import Block, Chain
from rannc_py.planner.cost import CostModel, optimizer_state_factor
from rannc_py.planner.plan import Plan, StagePlan
from rannc_py.planner.search import (
    REPLICA_SET,
    Layout,
    SearchSpace,
    divisors,
    enumerate_layouts,
    pick_best,
    spread,
    stage_costs,
)
from rannc_py.profiling import Profile
from rannc_py.profiling.coarsen import cut_bytes
from rannc_py.schedule import SCHEDULES, StageCosts

if TYPE_CHECKING:
    from rannc_py.graph.ir import Graph

# Devices per pipeline the search considers (the rest is whole-pipeline replication);
# also bounds the DP's device dimension, which keeps a search of thousands of devices in seconds.
MAX_PIPELINE_DEVICES = 64
# Pipeline counts kept (log-spaced, ends included) to bound the number of DPs.
MAX_PIPELINE_COUNTS = 7


def chain_from_graph(graph: Graph, prof: Profile) -> Chain:
    """Turn a graph and its block profile into the search's :class:`Chain`.

    Model inputs are not counted as saved activations (every stage reads them
    directly and they are small next to activations), so ``input_bytes`` is 0.
    """
    cuts = cut_bytes(graph)
    canon = {a: g[0] for g in graph.tied_params for a in g}
    blocks, names = [], []
    for b, ops in enumerate(prof.blocks):
        params: dict[str, int] = {}
        fqns: list[str] = []
        for i in ops:
            op = graph.ops[i]
            for f in op.params:
                params[canon.get(f, f)] = graph.params[f].nbytes
            for f in op.buffers:
                params[f] = graph.buffers[f].nbytes
            for f in (*op.params, *op.buffers):
                if f not in fqns:
                    fqns.append(f)
        flops = sum(graph.ops[i].flops for i in ops) / graph.batch_size
        blocks.append(Block(
            tuple(ops), prof.fwd_fixed[b], prof.fwd_per_sample[b], prof.bwd_fixed[b], prof.bwd_per_sample[b],
            prof.act_bytes_per_sample[b], cuts[ops[-1]], tuple(sorted(params.items())), flops))
        names.append(tuple(fqns))
    return Chain(tuple(blocks), 0.0, tuple(names), model_output_bytes(graph))


def model_output_bytes(graph: Graph) -> float:
    """Bytes per sample of the model's batch-carrying outputs (logits; a scalar loss counts 0)."""
    return sum(t.nbytes for t in graph.output_metas() if t.batch_dim is not None) / graph.batch_size


def _positive(name: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ConfigError(f"{name} must be a positive integer, got {v!r}")
    return v


def build_space(chain: Chain, cluster: Cluster, batch_size: int, *, schedules: Sequence[str],
                max_stages: int | None, num_stages: int | None, replicas: Sequence[int] | None,
                microbatches: int | None, recompute: bool | None) -> SearchSpace:
    """Check the pins and build the enumerated :class:`SearchSpace`. Raises ConfigError on bad pins."""
    D = cluster.num_devices
    B = batch_size
    scheds = tuple(schedules) if isinstance(schedules, Iterable) and not isinstance(schedules, str) else ()
    if not scheds or any(s not in SCHEDULES or s == "forward_only" for s in scheds):
        raise ConfigError(f"schedules must be a non-empty subset of ('1f1b', 'gpipe'), got {schedules!r}")
    if microbatches is not None:
        m = _positive("microbatches", microbatches)
        if B % m:
            raise ConfigError(f"batch_size={B} is not divisible by microbatches={m}; pick a divisor of {B}")
        ms = [m]
    else:
        ms = divisors(B)  # thinned per pipeline count by search.microbatch_candidates
    pinned = None
    if replicas is not None:
        if not isinstance(replicas, Iterable) or isinstance(replicas, str):
            raise ConfigError(f"replicas must be a list of replica counts, one per stage (e.g. [2, 2]), "
                              f"got {replicas!r}")
        pinned = tuple(_positive("replicas[i]", r) for r in replicas)
        if sum(pinned) != D:
            raise ConfigError(f"replicas {list(pinned)} use {sum(pinned)} devices but the cluster has {D}")
        if num_stages is not None and num_stages != len(pinned):
            raise ConfigError(f"num_stages={num_stages} but replicas lists {len(pinned)} stages")
        if max(pinned) > B // min(ms):
            raise ConfigError(f"a stage with {max(pinned)} replicas needs microbatches of at least that many "
                              f"rows; batch_size={B} with {min(ms)} microbatches gives {B // min(ms)}")
        pipelines: tuple[int, ...] = (1,)
    else:
        counts = [D // P for P in divisors(D) if P <= MAX_PIPELINE_DEVICES]
        pipelines = tuple(spread(sorted(counts), MAX_PIPELINE_COUNTS))
    if num_stages is not None:
        _positive("num_stages", num_stages)
        if num_stages > chain.n:
            raise ConfigError(f"num_stages={num_stages} exceeds the {chain.n} blocks the model has")
    stage_cap = chain.n if max_stages is None else _positive("max_stages", max_stages)
    if num_stages is not None:
        stage_cap = max(stage_cap, num_stages)
    if B < min(pipelines):
        raise ConfigError(f"batch_size={B} is smaller than the {min(pipelines)} pipelines the cluster needs; "
                          f"use a batch of at least {min(pipelines)}")
    return SearchSpace(pipelines, tuple(ms), scheds, recompute, stage_cap, REPLICA_SET, pinned, num_stages)


def plan(
    model_or_graph: torch.nn.Module | Graph,
    args: tuple[Any, ...] = (),
    kwargs: dict[str, Any] | None = None,
    *,
    batch_size: int,
    cluster: Cluster | str,
    memory_margin: float = 0.1,
    schedules: Sequence[str] = ("1f1b", "gpipe"),
    max_stages: int | None = None,
    num_stages: int | None = None,
    replicas: Sequence[int] | None = None,
    microbatches: int | None = None,
    recompute: bool | None = None,
    profile: Profile | None = None,
    optimizer: str | int = "adam",
    return_outputs: bool = True,
    update_cost: float | None = None,
) -> Plan:
    """Find the fastest data/pipeline layout of a model on a cluster that fits every device's memory.

    Every device of the cluster is used: stages are replicated (whole
    pipelines and single stages) to fill them; per-stage replicas need not be
    powers of two.

    Args:
        model_or_graph: an ``nn.Module`` (traced with ``args``/``kwargs``) or a Graph.
        args, kwargs: example inputs for tracing (and for measuring on "local").
        batch_size: global batch per step.
        cluster: a :class:`Cluster` or preset string ("a64fx:nodes=256", "local:ranks=4").
        memory_margin: fraction of device memory left free (default 0.1).
        schedules: schedules to consider (default both "1f1b" and "gpipe").
        max_stages: upper bound on pipeline depth (default: number of blocks).
        num_stages: pin the pipeline depth.
        replicas: pin the replica count of every stage (sums to the device count;
            implies the depth). Stage boundaries are still placed optimally.
        microbatches: pin the microbatch count (must divide batch_size).
        recompute: True/False forces activation recompute on every stage;
            None (default) turns it on only for stages that do not fit otherwise.
        profile: a :class:`Profile` to use; default: measured here for the
            "local" preset when ``args``/``kwargs`` are given, analytic otherwise.
        return_outputs: count the memory of returning the model's non-loss
            outputs (logits) to every rank, as ``RaNNCModule(return_outputs=True)``
            does (default True); False for training that uses only the loss.
        optimizer: "sgd", "sgd_momentum", "adam" (default) or "adamw", or the
            number of parameter-sized state buffers it keeps (its state memory,
            and the default ``update_cost``).
        update_cost: seconds per parameter byte of one optimizer step, once per
            step on every stage (``RaNNCModule`` measures the user's optimizer
            on the ``local`` preset); default: a fused step's memory traffic at
            the device's memory bandwidth (see :mod:`rannc_py.planner.cost`).
    Returns:
        The :class:`Plan`; deterministic for the same inputs.
    Raises:
        ConfigError: bad batch size, pins, preset, optimizer or update cost.
        PlanError: ``profile`` was made for another graph.
        NoFeasiblePlanError: nothing fits; the message gives the smallest
            per-device memory that would and the layout that needs it.
    """
    t0 = time.perf_counter()
    _positive("batch_size", batch_size)
    cl = as_cluster(cluster)
    optimizer_state_factor(optimizer)
    from rannc_py.graph.ir import Graph as GraphType

    if isinstance(model_or_graph, GraphType):
        graph = model_or_graph
    else:
        from rannc_py.graph.trace import trace

        graph = trace(model_or_graph, tuple(args), kwargs)
    if profile is None:
        from rannc_py.profiling import profile as make_profile

        if cl.device.name == "local" and (args or kwargs):
            inputs = graph.flatten_inputs(tuple(args), kwargs)
            profile = make_profile(graph, graph.batch_size, inputs=inputs)
        else:
            profile = make_profile(graph, graph.batch_size, cl)
    elif profile.graph_fingerprint != graph.fingerprint():
        raise PlanError("the profile was made for a different graph (fingerprints differ); "
                        "profile this graph with rannc_py.profile(graph, ...)")
    chain = chain_from_graph(graph, profile)
    dtype = torch.float32
    if graph.params:
        from rannc_py.profiling.analytic import graph_dtype

        dtype = graph_dtype(graph)
    return plan_chain(chain, cl, batch_size, graph_fingerprint=graph.fingerprint(), memory_margin=memory_margin,
                      schedules=schedules, max_stages=max_stages, num_stages=num_stages, replicas=replicas,
                      microbatches=microbatches, recompute=recompute, optimizer=optimizer, dtype=dtype,
                      start_time=t0, return_outputs=return_outputs, update_cost=update_cost)


def plan_chain(chain: Chain, cluster: Cluster, batch_size: int, *, graph_fingerprint: str = "",
               memory_margin: float = 0.1, schedules: Sequence[str] = ("1f1b", "gpipe"),
               max_stages: int | None = None, num_stages: int | None = None,
               replicas: Sequence[int] | None = None, microbatches: int | None = None,
               recompute: bool | None = None, optimizer: str | int = "adam", dtype: torch.dtype = torch.float32,
               start_time: float | None = None, return_outputs: bool = True,
               update_cost: float | None = None) -> Plan:
    """The search on an already-built chain (what :func:`plan` does after profiling). Same raises."""
    t0 = time.perf_counter() if start_time is None else start_time
    _positive("batch_size", batch_size)
    cost = CostModel(chain, cluster, batch_size, optimizer, memory_margin, return_outputs, update_cost)
    space = build_space(chain, cluster, batch_size, schedules=schedules, max_stages=max_stages,
                        num_stages=num_stages, replicas=replicas, microbatches=microbatches, recompute=recompute)
    lay, step = search_chain(cost, space)
    return layout_to_plan(cost, lay, step, graph_fingerprint, dtype, time.perf_counter() - t0)


def search_chain(cost: CostModel, space: SearchSpace) -> tuple[Layout, float]:
    """The chosen layout and its simulated step time: the DP's candidates plus the
    split rules' (:func:`rannc_py.planner.baselines.seed_layouts`), simulated, fastest wins.

    Raises:
        NoFeasiblePlanError: nothing fits (see :func:`plan`).
    """
    layouts = enumerate_layouts(cost, space)
    seeds = seed_layouts(cost, space)
    if not layouts and not seeds:
        raise _infeasible(cost, space)
    return pick_best(cost, layouts, extra=seeds)


def _infeasible(cost: CostModel, space: SearchSpace) -> NoFeasiblePlanError:
    lays = enumerate_layouts(cost, space, objective="memory")
    if not lays:
        return NoFeasiblePlanError(
            f"no layout exists for batch_size={cost.batch_size} on {cost.cluster.num_devices} devices with "
            "these pins; relax num_stages/replicas/microbatches")
    best = min(lays, key=lambda lay: lay.objective)
    need = best.objective / (1 - cost.margin)
    return NoFeasiblePlanError(
        f"no layout fits {format_bytes(cost.cluster.device.memory)} per device "
        f"(margin {cost.margin:.0%}); the smallest per-device memory that fits is {need:.0f} bytes "
        f"({format_bytes(need)}), needed by: {_describe(best)}. Use more devices or memory, recompute, "
        "a smaller batch, or a lighter optimizer.", required_memory=math.ceil(need))


def _describe(lay: Layout) -> str:
    stages = ", ".join(
        f"blocks {lay.bounds[s]}-{lay.bounds[s + 1] - 1} x{lay.replicas[s]}" for s in range(lay.num_stages))
    return f"{lay.num_stages} stages ({stages}), {lay.m} microbatches, {lay.schedule}"


def layout_to_plan(cost: CostModel, lay: Layout, step_time: float, fingerprint: str, dtype: torch.dtype,
                   search_time: float) -> Plan:
    """Materialise a chain layout as a :class:`Plan` (contiguous rank ranges, stage by stage).

    Each stage records the simulator costs ``step_time`` was computed from, so
    :meth:`Plan.timeline` replays the same simulation.
    """
    chain = cost.chain
    # Plain floats (some come out as numpy scalars) so the plan's JSON and equality are exact.
    sc = [StageCosts(*(float(v) for v in dataclasses.astuple(c))) for c in stage_costs(cost, lay)]
    stages, mem_per_rank, first = [], [], 0
    for s in range(lay.num_stages):
        i, j = lay.bounds[s], lay.bounds[s + 1]
        ops = tuple(o for blk in chain.blocks[i:j] for o in blk.ops)
        fqns: list[str] = []
        for names in chain.param_names[i:j]:
            fqns += [f for f in names if f not in fqns]
        ranks = tuple(range(first, first + lay.replicas[s]))
        first += lay.replicas[s]
        mem = int(lay.memory[s])
        mem_per_rank += [mem] * len(ranks)
        # The runtime sums the stage's own (untied) gradients over its replicas with this algorithm.
        algorithm = cost.allreduce_choice(float(cost.t.param_bytes[i, j]), lay.replicas[s])[0]
        stages.append(StagePlan(s, ops, tuple(fqns), ranks, lay.recompute[s],
                                lay.m * (sc[s].forward + sc[s].backward), mem, algorithm, sc[s]))
    flops = 3 * float(cost.t.flops[0, chain.n]) * cost.batch_size
    peak = cost.cluster.device.flops(dtype) * cost.cluster.num_devices
    return Plan(cost.batch_size, lay.m, lay.schedule, tuple(stages), cost.cluster.num_devices, fingerprint,
                cost.cluster.describe(), step_time, tuple(mem_per_rank), cost.batch_size / step_time,
                flops / (step_time * peak), search_time)
