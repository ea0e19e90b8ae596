"""The planner's entry: a pure-data graph and its block costs in, a :class:`Plan` out.

:func:`plan_graph` profiles analytically unless given a profile, builds the
chain of blocks, checks the options' pins (:func:`build_space`) and runs the
search (:func:`search_chain`) once per tensor degree (:func:`tensor_degrees`:
1, and those the graph's :class:`~rannc_py.graph.tensor_cost.TensorAnnotation`
allows, or the pinned one; the same degree for every stage in this version of
the search, though the Plan format allows one per stage), keeping the fastest
simulated layout; :func:`plan_chain` is the same from a chain.
Nothing here traces or runs a model: ``rannc_py.plan`` (in
:mod:`rannc_py.frontend`) does that first when it is given a module.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from typing import Any

import torch

from rannc_py._util import format_bytes
from rannc_py.errors import ConfigError, NoFeasiblePlanError, PlanError
from rannc_py.graph.ir import Graph
from rannc_py.graph.tensor_cost import TensorAnnotation
from rannc_py.hardware.cluster import Cluster, Link, as_cluster, parse_cluster
from rannc_py.planner.baselines import seed_layouts
from rannc_py.planner.chain import Block, Chain
from rannc_py.planner.cost import CostModel
from rannc_py.planner.options import PlanOptions, positive_int
from rannc_py.planner.plan import Plan, StagePlan
from rannc_py.planner.search import (
    CHUNKED,
    MAX_MICROBATCH_COUNTS,
    REPLICA_SET,
    TOP_K,
    Layout,
    SearchSpace,
    divisors,
    enumerate_layouts,
    held_counts,
    in_flight,
    layout_step_time,
    pick_best,
    ranked,
    spread,
    stage_costs,
)
from rannc_py.planner.tensor import TensorChain, tensor_chain
from rannc_py.profiling.analytic import analytic_profile, block_params, graph_dtype
from rannc_py.profiling.coarsen import coarsen, cut_bytes
from rannc_py.profiling.record import Profile
from rannc_py.schedule import StageCosts

# Devices per pipeline the search considers (the rest is whole-pipeline replication);
# also bounds the DP's device dimension, which keeps a search of thousands of devices in seconds.
MAX_PIPELINE_DEVICES = 64
# Pipeline counts kept (log-spaced, ends included) to bound the number of DPs.
MAX_PIPELINE_COUNTS = 7
# At a tensor degree above 1 (one more search per degree): pipeline and microbatch counts kept.
TENSOR_PIPELINE_COUNTS = 7
TENSOR_MICROBATCH_COUNTS = 5


def chain_from_graph(graph: Graph, prof: Profile) -> Chain:
    """Turn a graph and its block profile into the search's :class:`Chain`.

    Model inputs are not counted as saved activations (every stage reads them
    directly and they are small next to activations), so ``input_bytes`` is 0.
    """
    cuts = cut_bytes(graph)
    blocks, names = [], []
    for b, ops in enumerate(prof.blocks):
        fqns: list[str] = []
        for i in ops:
            op = graph.ops[i]
            for f in (*op.params, *op.buffers):
                if f not in fqns:
                    fqns.append(f)
        flops = sum(graph.ops[i].flops for i in ops) / graph.batch_size
        blocks.append(Block(
            ops=tuple(ops), fwd_fixed=prof.fwd_fixed[b], fwd_per_sample=prof.fwd_per_sample[b],
            bwd_fixed=prof.bwd_fixed[b], bwd_per_sample=prof.bwd_per_sample[b],
            act_bytes=prof.act_bytes_per_sample[b], out_bytes=cuts[ops[-1]],
            params=tuple(sorted(block_params(graph, ops).items())), flops=flops,
            weight_fraction=prof.bwd_weight_fraction[b] if prof.bwd_weight_fraction else None))
        names.append(tuple(fqns))
    return Chain(blocks=tuple(blocks), input_bytes=0.0, param_names=tuple(names),
                 output_bytes=model_output_bytes(graph))


def model_output_bytes(graph: Graph) -> float:
    """Bytes per sample of the model's batch-carrying outputs (logits; a scalar loss counts 0)."""
    return sum(t.nbytes for t in graph.output_metas() if t.batch_dim is not None) / graph.batch_size


def build_space(chain: Chain, cluster: Cluster, batch_size: int, options: PlanOptions, *,
                devices: int | None = None) -> SearchSpace:
    """Check ``options``' pins against the chain, cluster and batch, and build the enumerated
    :class:`SearchSpace`. ``devices``: what the search places, default the cluster's
    devices (at a tensor degree t, the ``D / t`` tensor groups, which pinned replicas count;
    fewer pipeline and microbatch counts are then tried, :data:`TENSOR_PIPELINE_COUNTS`
    and :data:`TENSOR_MICROBATCH_COUNTS`, which keeps a search over several degrees in seconds).
    Raises ConfigError on pins that cannot be met."""
    D = cluster.num_devices if devices is None else devices
    B = batch_size
    positive_int("batch_size", B)
    m = options.microbatches
    if m is not None:
        if B % m:
            raise ConfigError(f"batch_size={B} is not divisible by microbatches={m}; pick a divisor of {B}")
        ms = [m]
    else:
        ms = divisors(B)  # thinned per pipeline count by search.microbatch_candidates
    pinned, num_stages = options.replicas, options.num_stages
    if pinned is not None:
        if sum(pinned) != D:
            what = "devices" if D == cluster.num_devices else f"tensor groups of {cluster.num_devices // D} ranks"
            raise ConfigError(f"replicas {list(pinned)} use {sum(pinned)} {what} but the cluster has {D}")
        if num_stages is not None and num_stages != len(pinned):
            raise ConfigError(f"num_stages={num_stages} but replicas lists {len(pinned)} stages")
        if max(pinned) > B // min(ms):
            raise ConfigError(f"a stage with {max(pinned)} replicas needs microbatches of at least that many "
                              f"rows; batch_size={B} with {min(ms)} microbatches gives {B // min(ms)}")
        pipelines: tuple[int, ...] = (1,)
    else:
        counts = [D // P for P in divisors(D) if P <= MAX_PIPELINE_DEVICES]
        pipelines = tuple(spread(sorted(counts), MAX_PIPELINE_COUNTS if D == cluster.num_devices
                                 else TENSOR_PIPELINE_COUNTS))
    if num_stages is not None and num_stages > chain.n:
        raise ConfigError(f"num_stages={num_stages} exceeds the {chain.n} blocks the model has")
    stage_cap = chain.n if options.max_stages is None else options.max_stages
    if num_stages is not None:
        stage_cap = max(stage_cap, num_stages)
    if B < min(pipelines):
        raise ConfigError(f"batch_size={B} is smaller than the {min(pipelines)} pipelines the cluster needs; "
                          f"use a batch of at least {min(pipelines)}")
    return SearchSpace(pipelines=pipelines, microbatches=tuple(ms), schedules=options.schedules,
                       recompute=options.recompute, max_stages=stage_cap, rvals=REPLICA_SET,
                       pinned_replicas=pinned, num_stages=num_stages,
                       max_microbatch_counts=MAX_MICROBATCH_COUNTS if D == cluster.num_devices
                       else TENSOR_MICROBATCH_COUNTS)


def plan_cluster(options: PlanOptions, *, link: Link | None = None) -> Cluster:
    """The cluster ``options`` plan for, with ``options.memory_limit`` as its per-device memory.

    ``link``: figures measured by a job's own ranks for the ``local`` preset
    (see :func:`rannc_py.hardware.calibrate.measure_link`). Raises ConfigError
    when ``options.cluster`` is None or not a known preset.
    """
    if options.cluster is None:
        raise ConfigError("planning needs a cluster: pass cluster='a64fx:nodes=4', 'local:ranks=2', ... "
                          "or a rannc_py.Cluster")
    if isinstance(options.cluster, str):
        found = parse_cluster(options.cluster, link=link)
    else:
        found = as_cluster(options.cluster)
    if options.memory_limit is not None:
        found = dataclasses.replace(found, device=dataclasses.replace(found.device, memory=int(options.memory_limit)))
    return found


def plan_graph(graph: Graph, batch_size: int, options: PlanOptions, *, profile: Profile | None = None,
               cluster: Cluster | None = None, tensor: TensorAnnotation | None = None) -> Plan:
    """Find the fastest data/tensor/pipeline layout of ``graph`` that fits every device's memory.

    Every device of the cluster is used: stages are replicated (whole
    pipelines and single stages) to fill them; per-stage replicas need not be
    powers of two. The graph is read as pure data: nothing here runs a model.

    Args:
        graph: the traced model's :class:`~rannc_py.graph.ir.Graph`.
        batch_size: global batch per step.
        options: the planning options (:class:`PlanOptions`).
        profile: the block costs to plan with; default None: the analytic
            (roofline) profile of the cluster's device.
        cluster: the cluster already resolved from ``options`` (see
            :func:`plan_cluster`); default None: resolved here.
        tensor: the graph's tensor annotation
            (:func:`rannc_py.graph.tensor_annotate.tensor_annotation`): the
            degrees it allows are searched (or ``options.tensor`` pinned);
            default None: tensor degree 1 only, as without tensor parallelism.
    Returns:
        The :class:`Plan`; deterministic for the same inputs.
    Raises:
        ConfigError: bad batch size, pins, preset or tensor degree.
        PlanError: ``profile`` or ``tensor`` was made for another graph.
        NoFeasiblePlanError: nothing fits; the message gives the smallest
            per-device memory that would and the layout that needs it.
    """
    t0 = time.perf_counter()
    positive_int("batch_size", batch_size)
    cl = plan_cluster(options) if cluster is None else cluster
    if profile is None:
        profile = analytic_profile(graph, coarsen(graph), graph.batch_size, cl.device)
    elif profile.graph_fingerprint != graph.fingerprint():
        raise PlanError("the profile was made for a different graph (fingerprints differ); "
                        "profile this graph with rannc_py.profile(graph, ...)")
    chain = chain_from_graph(graph, profile)
    degrees = tensor_degrees(graph, tensor, options, cl)
    assert tensor is not None or degrees == [1]
    tchains = [None if t == 1 else tensor_chain(graph, chain, tensor.at(t), cl.device)  # type: ignore[union-attr]
               for t in degrees]
    dtype = graph_dtype(graph) if graph.params else torch.float32
    return plan_chain(chain, cl, batch_size, options, graph_fingerprint=graph.fingerprint(), dtype=dtype,
                      start_time=t0, tensor_chains=tchains)


def tensor_degrees(graph: Graph, tensor: TensorAnnotation | None, options: PlanOptions, cluster: Cluster) -> list[int]:
    """The tensor degrees to search: ``options.tensor`` when pinned (checked against the
    annotation and the device count), else 1 and every degree the annotation allows that
    divides the device count (only 1 when replicas are pinned without a degree: they then
    count ranks; with a pinned degree they count tensor groups).

    Raises ConfigError for a pinned degree the graph or cluster does not allow, PlanError for
    an annotation of another graph.
    """
    D = cluster.num_devices
    if tensor is not None and tensor.graph_fingerprint != graph.fingerprint():
        raise PlanError("the tensor annotation was made for a different graph (fingerprints differ); "
                        "make it from this graph with tensor_annotation(rannc_py.trace(model, ...))")
    pinned = options.tensor
    if pinned is not None and pinned > 1:
        if tensor is None:
            raise ConfigError(f"tensor={pinned} needs the graph's tensor annotation to know what splits; plan the "
                              "model with rannc_py.plan(model, ...) or pass tensor=tensor_annotation(traced_graph)")
        tensor.at(pinned)  # raises ConfigError naming the allowed degrees
        if D % pinned:
            raise ConfigError(f"tensor={pinned} does not divide the cluster's {D} devices; the degrees this graph "
                              f"allows that do: {[t for t in (1, *tensor.allowed) if D % t == 0]}")
        return [pinned]
    if pinned == 1 or tensor is None or options.replicas is not None:
        return [1]  # pinned replicas without a pinned degree count ranks, as before tensor parallelism
    return [1] + [t for t in tensor.allowed if D % t == 0]


def plan_chain(chain: Chain, cluster: Cluster, batch_size: int, options: PlanOptions | None = None, *,
               graph_fingerprint: str = "", dtype: torch.dtype = torch.float32, start_time: float | None = None,
               tensor_chains: Sequence[TensorChain | None] = (None,), **overrides: Any) -> Plan:
    """The search on an already-built chain (what :func:`plan_graph` does after profiling).

    ``options`` (default: all defaults) with ``overrides`` (planning options
    by name) replaced; ``options.cluster`` and ``memory_limit`` are not read:
    ``cluster`` is given. ``tensor_chains``: the tensor degrees to search,
    each as its :class:`~rannc_py.planner.tensor.TensorChain` (None: degree 1
    on ``chain``); the fastest simulated layout over all of them wins, ties
    going to the smaller degree. Same raises as :func:`plan_graph`.
    """
    t0 = time.perf_counter() if start_time is None else start_time
    opts = PlanOptions.from_kwargs(overrides, base=options)
    positive_int("batch_size", batch_size)
    models = []
    for tc in tensor_chains:
        cost = CostModel(chain if tc is None else tc.chain, cluster, batch_size, opts.optimizer, opts.memory_margin,
                         opts.return_outputs, opts.update_cost, shard_optimizer=opts.shard_optimizer, tensor=tc)
        models.append((cost, build_space(cost.chain, cluster, batch_size, opts, devices=cost.devices)))
    cost, lay, step = search_tensor(models)
    return layout_to_plan(cost, lay, step, graph_fingerprint, dtype, time.perf_counter() - t0)


def search_tensor(models: Sequence[tuple[CostModel, SearchSpace]]) -> tuple[CostModel, Layout, float]:
    """The chosen layout over several tensor degrees (one cost model and space each), its cost
    model and simulated step time.

    Degree 1 is searched as :func:`search_chain` does; the layouts of the
    degrees above 1 are ranked together by the estimate T and the ``TOP_K``
    best simulated (their cost is the search's: a degree above 1 adds no
    split-rule seeds). The fastest simulated layout wins, ties going to the
    smaller degree. Raises NoFeasiblePlanError when no degree has a layout
    that fits (the message of the degree that needs the least memory).
    """
    best: tuple[float, int, CostModel, Layout] | None = None
    tp_layouts: list[Layout] = []
    by_degree: dict[int, CostModel] = {}
    for cost, space in models:
        if cost.tp == 1:
            layouts = enumerate_layouts(cost, space)
            seeds = seed_layouts(cost, space)
            if layouts or seeds:
                lay, step = pick_best(cost, layouts, extra=seeds)
                best = (step, 1, cost, lay)
        else:
            by_degree[cost.tp] = cost
            tp_layouts += enumerate_layouts(cost, space)
    for lay in ranked(tp_layouts, TOP_K):
        cost = by_degree[lay.tensor]
        step = layout_step_time(cost, lay)
        if best is None or (step, lay.tensor) < (best[0], best[1]):
            best = (step, lay.tensor, cost, lay)
    if best is None:
        failures = [_infeasible(cost, space) for cost, space in models]
        raise min(failures, key=lambda e: (e.required_memory is None, e.required_memory or 0))
    return best[2], best[3], best[0]


def predict_plan(graph: Graph, plan: Plan, options: PlanOptions, *, profile: Profile | None = None,
                 cluster: Cluster | None = None, tensor: TensorAnnotation | None = None) -> Plan:
    """``plan`` with the predictions a searched plan carries: stage costs, step time, memory, MPI.

    For a layout given by hand (its stages' ops and ranks fixed): the
    profile's blocks are the plan's stages, and the same cost model and
    simulation as the search's give its step time (:meth:`Plan.timeline`
    works), peak memory per rank and each stage's allreduce algorithm. The
    stages' ops, parameters, ranks and recompute flags stay as given, and so
    does the plan when it does not fit the memory (it was asked for).

    Args:
        graph: the traced model's :class:`~rannc_py.graph.ir.Graph`.
        plan: the plan to predict (its stages contiguous in the graph's ops).
        options: the planning options (cluster, optimizer, margins).
        profile: block costs whose blocks are the plan's stages; default
            None: the analytic profile of those blocks on the cluster's device.
        cluster: the cluster already resolved from ``options``; default: resolved here.
        tensor: the graph's tensor annotation, needed when the plan's stages
            have a tensor degree above 1 (one degree for every stage).

    A plan of several stages per rank (``chunks`` > 1) is priced as the
    search prices one: each rank's memory over all its stages
    (:meth:`~rannc_py.planner.cost.CostModel.rank_memory` at the schedule's
    :func:`~rannc_py.planner.search.held_counts`).
    Raises:
        PlanError: ``profile`` or ``tensor`` was made for another graph or
            other blocks, or the stages' tensor degrees differ.
        ConfigError: a tensor degree above 1 without an annotation, or one the
            annotation does not allow.
    """
    t0 = time.perf_counter()
    cl = plan_cluster(options) if cluster is None else cluster
    blocks = [tuple(st.ops) for st in plan.stages]
    if profile is None:
        profile = analytic_profile(graph, blocks, graph.batch_size, cl.device)
    elif profile.graph_fingerprint != graph.fingerprint() or [tuple(b) for b in profile.blocks] != blocks:
        raise PlanError("predicting a plan needs a profile of this graph whose blocks are the plan's stages")
    chain = chain_from_graph(graph, profile)
    degrees = sorted({st.tensor for st in plan.stages})
    if len(degrees) > 1:
        raise PlanError(f"the plan's stages have tensor degrees {degrees}; predict_plan prices one tensor degree "
                        "for every stage")
    t = degrees[0]
    tc = None
    if t > 1:
        pinned = dataclasses.replace(options, tensor=t, replicas=None, num_stages=None)
        tensor_degrees(graph, tensor, pinned, cl)  # checks the annotation allows t
        assert tensor is not None
        tc = tensor_chain(graph, chain, tensor.at(t), cl.device)
    levels = tuple(st.shard_level for st in plan.stages)
    # one cost model per sharding level the stages use, so each stage's memory is its own level's
    costs = {lvl: CostModel(chain if tc is None else tc.chain, cl, plan.batch_size, options.optimizer,
                            options.memory_margin, options.return_outputs, options.update_cost, shard_optimizer=lvl,
                            tensor=tc) for lvl in set(levels)}
    p, m = plan.num_stages, plan.microbatches
    reps = tuple(st.replicas for st in plan.stages)
    recompute = tuple(st.recompute for st in plan.stages)
    if plan.chunks > 1:  # a rank's memory is the sum over its stages
        held = held_counts(plan.schedule, plan.num_positions, m, plan.chunks)
        by_rank = {pos: [s for s in range(p) if plan.position_of_stage(s) == pos] for pos in range(plan.num_positions)}
        peak = {pos: costs[levels[mine[0]]].rank_memory(
            m, [(s, s + 1, reps[s], levels[s], recompute[s]) for s in mine], held[pos], holds_last=p - 1 in mine)
            for pos, mine in by_rank.items()}
        memory = tuple(peak[plan.position_of_stage(s)] for s in range(p))
    else:
        rvals = tuple(sorted(set(reps)))
        flights = tuple(sorted({in_flight(plan.schedule, q, m, p) for q in range(p)}))
        tabs = {(lvl, flag): costs[lvl].stage_tables(1, m, rvals, flights, flag, plan.world_size // t)
                for lvl, flag in set(zip(levels, recompute))}
        memory = tuple(float(tabs[levels[s], recompute[s]][in_flight(plan.schedule, p - 1 - s, m, p)]
                             .mem[s, s + 1, rvals.index(r)]) for s, r in enumerate(reps))
    lay = Layout(d=1, m=m, schedule=plan.schedule, bounds=tuple(range(p + 1)), replicas=reps, recompute=recompute,
                 objective=0.0, memory=memory, origin="given", shard=levels, tensor=t, chunks=plan.chunks)
    cost = costs[levels[0]]  # the simulated step reads each stage's level from the layout
    dtype = graph_dtype(graph) if graph.params else torch.float32
    made = layout_to_plan(cost, lay, layout_step_time(cost, lay), graph.fingerprint(), dtype,
                          time.perf_counter() - t0)
    stages = tuple(dataclasses.replace(st, predicted_compute_time=new.predicted_compute_time,
                                       predicted_peak_memory=new.predicted_peak_memory, allreduce=new.allreduce,
                                       costs=new.costs, shard_level=new.shard_level,
                                       tensor_collectives=new.tensor_collectives)
                   for st, new in zip(plan.stages, made.stages))
    return dataclasses.replace(made, stages=stages)


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
        chunked = [sched for sched in space.schedules if sched in CHUNKED]
        hint = "" if not chunked else (
            f"; {' and '.join(chunked)} need at least 2 pipeline positions of p, a chain of at least 2p blocks "
            "and (interleaved) microbatches a multiple of p, or name 1f1b in schedules too")
        return NoFeasiblePlanError(
            f"no layout exists for batch_size={cost.batch_size} on {cost.cluster.num_devices} devices with "
            f"these pins; relax num_stages/replicas/microbatches{hint}")
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
    tp = f", tensor degree {lay.tensor} (replicas count tensor groups)" if lay.tensor > 1 else ""
    chunks = f" ({lay.chunks} per rank on {lay.num_positions} positions)" if lay.chunks > 1 else ""
    return f"{lay.num_stages} stages{chunks} ({stages}), {lay.m} microbatches, {lay.schedule}{tp}"


def layout_to_plan(cost: CostModel, lay: Layout, step_time: float, fingerprint: str, dtype: torch.dtype,
                   search_time: float) -> Plan:
    """Materialise a chain layout as a :class:`Plan` (contiguous rank ranges, stage by stage; at
    the cost model's tensor degree t, each replica a tensor group of t consecutive ranks, so a
    group never straddles a node where t divides the devices per node).

    Each stage records the simulator costs ``step_time`` was computed from, so
    :meth:`Plan.timeline` replays the same simulation. A chunked layout's positions get
    the rank ranges, position 0 first, and each stage lists its position's ranks; a
    stage's ``predicted_peak_memory`` is then its ranks' peak, all their chunks together.
    """
    chain = cost.chain
    # Plain floats (some come out as numpy scalars) so the plan's JSON and equality are exact.
    sc = [StageCosts(*(float(v) for v in dataclasses.astuple(c))) for c in stage_costs(cost, lay)]
    pos = [lay.position_of(s) for s in range(lay.num_stages)]
    # Each position's ranks, positions in order (a position's stages all run on them).
    position_ranks: list[tuple[int, ...]] = []
    mem_per_rank: list[int] = []
    for r in range(lay.num_positions):
        s = pos.index(r)
        width = lay.replicas[s] * cost.tp  # each replica a tensor group of consecutive ranks
        position_ranks.append(tuple(range(len(mem_per_rank), len(mem_per_rank) + width)))
        mem_per_rank += [int(lay.memory[s])] * width
    stages = []
    for s in range(lay.num_stages):
        i, j = lay.bounds[s], lay.bounds[s + 1]
        ops = tuple(o for blk in chain.blocks[i:j] for o in blk.ops)
        fqns: list[str] = []
        for names in chain.param_names[i:j]:
            fqns += [f for f in names if f not in fqns]
        ranks = position_ranks[pos[s]]
        mem = int(lay.memory[s])
        # The runtime sums the stage's own (untied) gradients over its replicas with this algorithm.
        algorithm = cost.allreduce_choice(float(cost.t.param_bytes[i, j]), lay.replicas[s])[0]
        level = lay.shard[s] if lay.shard and lay.replicas[s] > 1 else 0
        if level:  # reduce-scatter and allgather instead (see rannc_py.runtime.sharding)
            algorithm = cost.gather_choice(float(cost.t.param_bytes[i, j]), lay.replicas[s])[0]
        coll_f, coll_b = cost.group_tables(cost.rows(lay.m, lay.replicas[s]))
        group = float(coll_f[i, j] * (2 if lay.recompute[s] else 1) + coll_b[i, j])
        stages.append(StagePlan(index=s, ops=ops, param_fqns=tuple(fqns), ranks=ranks, recompute=lay.recompute[s],
                                predicted_compute_time=lay.m * (sc[s].forward + sc[s].backward),
                                predicted_peak_memory=mem, allreduce=algorithm, costs=sc[s], shard_level=level,
                                tensor=cost.tp, tensor_collectives=group))
    flops = 3 * float(cost.t.flops[0, chain.n]) * cost.batch_size
    peak = cost.cluster.device.flops(dtype) * cost.cluster.num_devices
    return Plan(batch_size=cost.batch_size, microbatches=lay.m, schedule=lay.schedule, stages=tuple(stages),
                world_size=cost.cluster.num_devices, graph_fingerprint=fingerprint, cluster=cost.cluster.describe(),
                step_time=step_time, peak_memory_per_rank=tuple(mem_per_rank),
                samples_per_second=cost.batch_size / step_time, mfu=flops / (step_time * peak),
                search_time=search_time, chunks=lay.chunks)
