"""The cost model: time and memory of a stage, and of a whole plan's step.

A stage covers blocks ``[i, j)`` of the chain and has ``R = r * d`` replicas
(``r`` per pipeline, ``d`` whole-pipeline copies); each replica runs
``b = ceil((B / m) / R)`` rows of every microbatch (B global batch, m
microbatches).

Per replica and microbatch:
- compute: forward + backward of its blocks at ``b`` rows; a recompute stage
  pays its forward twice.
- communication: activations out and gradients in, alpha + bytes / beta per
  message on the cluster's link; overlapped with compute (the runtime's sends
  are nonblocking), so a stage's per-microbatch time is
  ``c = max(compute, comm)``.
- once per step: allreduce of the stage's gradients across its R replicas
  (fastest algorithm for the topology, :mod:`rannc_py.comm.cost`), plus, for
  parameters another stage also reads (tied weights), a sum across both
  stages' replicas. In the per-stage tables the other stage is assumed to
  have as many replicas (2R ranks); the simulated step time
  (:func:`rannc_py.planner.search.stage_costs`) uses the real counts.
- once per step, after the allreduce: the optimizer's step on the stage's
  parameters, ``update_cost`` seconds per parameter byte (every replica
  updates all of them). Default: a fused step's memory traffic, ``3 + 2k``
  fp32 words per parameter for an optimizer with k state buffers (read the
  parameter, gradient and states; write the parameter and states), at the
  device's memory bandwidth. ``RaNNCModule`` measures the user's own
  optimizer instead (:func:`rannc_py.runtime.autoplan.job_optimizer`).
- fixed costs of the runtime (measured on ``local``, assumed in presets:
  :class:`~rannc_py.hardware.device.Device`, :class:`~rannc_py.hardware.device.Link`):
  every compute action (F, B) pays ``action_overhead``, every posted send or
  receive the link's ``overhead`` of the rank's own time; once per step,
  ``tensor_overhead`` per parameter tensor of the stage and the step's fixed
  work (:meth:`CostModel.step_fixed`: its bookkeeping, ``STEP_COLLECTIVES``
  small collectives over all ranks, and moving the inputs in and the
  returned outputs out).
- sharding (``shard_optimizer``, per stage of R > 1 replicas, level 1 or 2,
  :mod:`rannc_py.runtime.sharding`): the stage's own parameters (bytes
  ``P - T``, T those another stage also reads, which stay whole) are
  reduce-scattered and allgathered instead of allreduced (the fastest of
  :data:`rannc_py.comm.cost.GATHER_ALGORITHMS`, the torus one on a torus
  network; a ring or torus allreduce is exactly that pair) and their
  optimizer step runs on ``1/R`` of them, so
  ``a = rs(P - T) + ag(P - T) + tied sum + ((P - T) / R + T) · update_cost``;
  the level per stage is the faster one of those allowed (less memory on a
  tie), the same choice in the tables and the simulated step.
- tensor parallelism (``tensor``, degree t, :mod:`rannc_py.planner.tensor`):
  every stage is run by tensor groups of t consecutive ranks; the search's
  devices are the ``D / t`` groups and R counts groups. The chain is the one
  a group's rank sees (split compute / t, replicated compute in full, sharded
  parameters and split activations / t); the group's collectives are added
  to the forward and the backward of every microbatch (a recompute stage
  re-runs the forward's), on the critical path; the links of R replicas are
  those of the ``R * t`` ranks they span, each rank of a group syncing its
  own shards with the same position of the other groups (one sync per rank,
  each on its own link: t concurrent syncs of ``1/t`` of the sharded bytes).
Memory per rank: parameters + gradients + optimizer state (SGD 0, SGD with
momentum 1, Adam/AdamW 2 extra copies of the parameters) + activations of the
microbatches in flight (GPipe: m; 1F1B: min(p - s, m); with several chunks per
rank, each chunk's state and buffers and the activations at the rank's peak,
:meth:`CostModel.rank_memory`); with recompute only
the stage inputs of those plus one microbatch's full activations + one
microbatch's send and receive buffers + one temporary the size of the stage's
largest parameter (backward computes each later microbatch's weight gradient
before adding it to ``.grad``; the optimizer steps parameter by parameter
with temporaries of that size) + the model's batch-carrying outputs
(logits) the runtime returns: the last stage keeps its rows of every
microbatch's outputs until the step ends (m·b rows), and every rank holds its
own local rows of them (B / D rows) while the caller keeps the previous step's
outputs. A plan fits when every rank's memory is at most
``device memory * (1 - margin)``. A sharded stage keeps the state of its own
parameters' shard, ``(P - T) · k / R`` (k state buffers) plus the tied ``T · k``,
and the summed gradient shard ``(P - T) / R``; its full gradients stay
(the schedule accumulates every microbatch's in full, at level 2 too, which
frees them only between steps).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from rannc_py.comm.cost import (
    ALGORITHMS,
    GATHER_ALGORITHMS,
    allgather_time,
    allreduce_time,
    best_allreduce,
    grid_shape,
    p2p_time,
    reduce_scatter_time,
)
from rannc_py.errors import ConfigError
from rannc_py.hardware.cluster import Cluster, Device, Link
from rannc_py.planner.chain import Chain
from rannc_py.planner.tensor import TensorChain, group_link


def _allreduce_lines(cluster: Cluster, ranks: int, link: Link) -> list[tuple[float, float]]:
    """(intercept, seconds per byte) of each allreduce algorithm on ``ranks`` of ``cluster`` over ``link``."""
    shape = grid_shape(ranks) if cluster.topology == "torus" else None
    lines = []
    for algo in ALGORITHMS:
        if algo == "torus" and shape is None:
            continue
        t1, t2 = (allreduce_time(algo, n, ranks, alpha=link.latency, beta=link.bandwidth, torus_shape=shape,
                                 concurrent_links=cluster.concurrent_links) for n in (1.0, 2.0**30))
        slope = (t2 - t1) / (2.0**30 - 1.0)
        lines.append((t1 - slope, slope))
    return lines


# Small collectives over all ranks a step makes outside the schedule: agreeing on the call's
# signature, gathering the inputs, returning the outputs, and the gradient clip's norm.
STEP_COLLECTIVES = 4

OPTIMIZER_STATE = {"sgd": 0, "sgd_momentum": 1, "momentum": 1, "adam": 2, "adamw": 2}


def _allowed_levels(shard_optimizer: bool | int | None) -> tuple[int, ...]:
    """The sharding levels a stage may take for the ``shard_optimizer`` option (see :class:`CostModel`)."""
    if shard_optimizer is None:
        return (0, 1)
    if isinstance(shard_optimizer, bool) or shard_optimizer in (0, 1, 2):
        return (int(shard_optimizer),)
    raise ConfigError(f"the planner takes shard_optimizer None, True/False or a level 0, 1 or 2, got "
                      f"{shard_optimizer!r}; a level per stage is for an explicit layout (plan=dict(...))")


def optimizer_state_bytes(nbytes: float, tied: float, ranks: int, level: int, buffers: int) -> float:
    """Optimizer-state bytes per rank of a stage whose parameters take ``nbytes`` (``tied`` of
    them shared with other stages, kept whole) over ``ranks`` replicas at sharding ``level``, for
    an optimizer keeping ``buffers`` parameter-sized state buffers (the shards' alignment
    moves a rank's share by at most a few vectors; the stage's total is exact)."""
    if level == 0 or ranks <= 1:
        return nbytes * buffers
    return (max(nbytes - tied, 0.0) / ranks + tied) * buffers


def _keep_better(tab: StageTables, ri: int, level: int, m: int, c: np.ndarray, ar: np.ndarray, mem: np.ndarray,
                 mem_min: np.ndarray, rec: np.ndarray) -> None:
    """Enter one sharding level's costs into column ``ri`` of ``tab`` where they beat what is
    there: fitting where it did not, else the faster stage step ``m·c + ar`` (a recompute the
    other level needs counts; the smaller memory on a tie); where nothing fits, the least
    memory (what the memory objective reads)."""
    old_ok = np.isfinite(tab.c[:, :, ri])
    ok = np.isfinite(c)
    first = np.isinf(tab.mem[:, :, ri])
    with np.errstate(invalid="ignore"):
        step, old_step = m * c + ar, m * tab.c[:, :, ri] + tab.ar[:, :, ri]
    old_mem = tab.mem[:, :, ri]
    better = first | (ok & ~old_ok) | (ok & old_ok & ((step < old_step) | ((step == old_step) & (mem < old_mem))))
    better |= ~ok & ~old_ok & (mem_min < tab.mem_min[:, :, ri])
    for name, value in (("c", c), ("ar", ar), ("mem", mem), ("mem_min", mem_min), ("recompute", rec)):
        getattr(tab, name)[:, :, ri] = np.where(better, value, getattr(tab, name)[:, :, ri])
    assert tab.shard is not None
    tab.shard[:, :, ri] = np.where(better, level, tab.shard[:, :, ri])


def optimizer_state_factor(optimizer: str | int) -> int:
    """Extra parameter-sized fp32 buffers the optimizer keeps: from its name, or the count itself.

    Raises ConfigError on unknown names and negative counts.
    """
    if isinstance(optimizer, int) and not isinstance(optimizer, bool):
        if optimizer < 0:
            raise ConfigError(f"an optimizer keeps 0 or more state buffers per parameter, got {optimizer}")
        return optimizer
    f = OPTIMIZER_STATE.get(str(optimizer).lower())
    if f is None:
        raise ConfigError(f"unknown optimizer {optimizer!r}; choose one of {sorted(OPTIMIZER_STATE)} "
                          "or give the number of parameter-sized state buffers it keeps")
    return f


def fused_update_cost(optimizer: str | int, device: Device) -> float:
    """Seconds per parameter byte of a fused optimizer step on ``device``: its memory traffic
    (``3 + 2k`` fp32 words per parameter, k state buffers) at the device's memory bandwidth."""
    words = 3 + 2 * optimizer_state_factor(optimizer)
    return words / (device.memory_bandwidth * device.bandwidth_efficiency)


@dataclass(frozen=True)
class StageTables:
    """Per (i, j, replica-index) arrays for one (d, m, schedule, in-flight count).

    ``c`` is the stage's per-microbatch time (inf when it does not fit),
    ``ar`` its gradient allreduce plus optimizer step, once per step, ``mem``
    its peak bytes per rank with the ``recompute`` choice made, ``mem_min``
    the least memory any allowed recompute choice needs.
    """

    c: np.ndarray
    ar: np.ndarray
    mem: np.ndarray
    recompute: np.ndarray
    mem_min: np.ndarray
    shard: np.ndarray | None = None  # the sharding level chosen per entry (None: 0 everywhere)
    tensor: int = 1  # the tensor degree of the cost model that made them


class CostModel:
    """Stage and step costs of a chain on a cluster.

    Args:
        chain: the model's blocks.
        cluster: devices and links.
        batch_size: global batch B.
        optimizer: "sgd", "sgd_momentum", "adam" or "adamw", or the number of
            parameter-sized state buffers it keeps.
        memory_margin: fraction of device memory kept free (0 <= margin < 1).
        return_outputs: the runtime returns the model's non-loss outputs
            (logits) to every rank, so the last stage keeps every microbatch's
            and each rank its own rows (RaNNCModule's ``return_outputs``).
            False counts only the one microbatch of outputs the last stage
            keeps to describe them. Default True, as in RaNNCModule.
        update_cost: seconds per parameter byte of one optimizer step; default
            :func:`fused_update_cost` of ``optimizer`` on the cluster's device.
        shard_optimizer: the sharding levels a stage may use
            (:class:`~rannc_py.planner.options.PlanOptions`): None chooses
            between 0 and 1 per stage (level 2 costs what level 1 does at the
            step's peak); False/0 (default), True/1 or 2 fixes it.
        tensor: the chain as one rank of a tensor group sees it
            (:func:`rannc_py.planner.tensor.tensor_chain`, whose ``chain`` is
            then ``chain``), or None (default) for tensor degree 1. With a
            degree t, the search's devices are the ``D / t`` tensor groups
            (:attr:`devices`), a stage's replicas are groups, and the links
            of r replicas are those of the ``r * t`` ranks they span.
    Raises:
        ConfigError: bad optimizer, margin, update cost or sharding level.
    """

    def __init__(self, chain: Chain, cluster: Cluster, batch_size: int, optimizer: str | int = "adam",
                 memory_margin: float = 0.1, return_outputs: bool = True, update_cost: float | None = None,
                 shard_optimizer: bool | int | None = False, tensor: TensorChain | None = None) -> None:
        if not isinstance(memory_margin, (int, float, np.floating)) or not 0 <= memory_margin < 1:
            raise ConfigError(f"memory_margin must be a number in [0, 1), got {memory_margin!r}")
        if update_cost is not None and not (isinstance(update_cost, (int, float, np.floating)) and math.isfinite(update_cost)
                                            and update_cost >= 0):
            raise ConfigError(f"update_cost must be a finite number of seconds >= 0, got {update_cost!r}")
        self.update_cost = fused_update_cost(optimizer, cluster.device) if update_cost is None else update_cost
        self.chain = chain
        self.t = chain.tables()
        self.cluster = cluster
        self.batch_size = batch_size
        self.state_factor = 2 + optimizer_state_factor(optimizer)
        self.limit = cluster.device.memory * (1 - memory_margin)
        self.margin = memory_margin
        self.return_outputs = return_outputs
        self.shard_levels = _allowed_levels(shard_optimizer)
        self.tensor = tensor
        self.tp = 1 if tensor is None else tensor.degree
        if cluster.num_devices % self.tp:
            raise ConfigError(f"tensor degree {self.tp} does not divide the cluster's {cluster.num_devices} devices; "
                              "pick a degree that does")
        self.devices = cluster.num_devices // self.tp
        self.group_link = group_link(cluster, self.tp)

    def link(self, groups: int) -> Link:
        """The link between ``groups`` consecutive tensor groups (ranks when the degree is 1)."""
        return self.cluster.link(groups * self.tp)

    def group_tables(self, rows: int) -> tuple[np.ndarray, np.ndarray]:
        """(forward, backward) seconds per microbatch of the tensor group's collectives of every
        block range at ``rows`` rows per replica (zeros at degree 1)."""
        cache = self.__dict__.setdefault("_group_cache", {})
        if rows not in cache:
            n = self.chain.n
            if self.tensor is None:
                cache[rows] = (np.zeros((n + 1, n + 1)), np.zeros((n + 1, n + 1)))
            else:
                fwd, bwd = self.tensor.collectives.block_times(rows, self.group_link)

                def rng(values: np.ndarray) -> np.ndarray:
                    pre = np.concatenate([[0.0], np.cumsum(values)])
                    return pre[None, :] - pre[:, None]

                cache[rows] = (rng(fwd), rng(bwd))
        return cache[rows]

    def rows(self, m: int, replicas: int) -> int:
        """Rows per replica per microbatch (the largest chunk)."""
        return math.ceil(self.batch_size // m / replicas)

    def allreduce(self, nbytes: float, ranks: int) -> float:
        """Seconds to allreduce ``nbytes`` over ``ranks`` consecutive ranks."""
        return self.allreduce_choice(nbytes, ranks)[1]

    def allreduce_choice(self, nbytes: float, ranks: int) -> tuple[str, float]:
        """The fastest allreduce algorithm for ``nbytes`` over ``ranks`` consecutive ranks,
        and its seconds (``("mpi", 0.0)`` when there is nothing to sum)."""
        if ranks <= 1 or nbytes <= 0:
            return "mpi", 0.0
        c = self.cluster
        link = self.link(ranks)
        shape = grid_shape(ranks) if c.topology == "torus" else None
        return best_allreduce(nbytes, ranks, alpha=link.latency, beta=link.bandwidth,
                              torus_shape=shape, concurrent_links=c.concurrent_links)

    def step_fixed(self) -> float:
        """Seconds per step of the runtime's fixed work outside the actions (see the module docstring).

        The bookkeeping (``step_overhead``), ``STEP_COLLECTIVES`` small
        collectives (each ``ceil(log2 D)`` rounds of a message's latency and
        its posting at both ends, over the link of all D ranks), and moving
        the global batch's inputs to every rank and the returned outputs to
        their ranks (``(D - 1) / D`` of their bytes over that link).
        """
        c = self.cluster
        fixed = c.device.step_overhead
        D = c.num_devices
        if D > 1:
            link = c.link(D)
            rounds = math.ceil(math.log2(D))
            fixed += STEP_COLLECTIVES * rounds * (link.latency + 2 * link.overhead)
            moved = self.t.cut[0] + (self.t.out if self.return_outputs else 0.0)
            fixed += (D - 1) / D * moved * self.batch_size / link.bandwidth
        return float(fixed)

    def p2p(self, nbytes: float, pipeline_devices: int) -> float:
        """Seconds for one message of ``nbytes`` between stages of a pipeline of that many devices."""
        if nbytes <= 0:
            return 0.0
        link = self.link(pipeline_devices)
        return p2p_time(nbytes, link.latency, link.bandwidth)

    def _allreduce_table(self, ranks: int) -> np.ndarray:
        """Gradient sync seconds of every range over ``ranks`` replicas (tied weights: see the module docstring).

        Every algorithm's time is affine in the byte count (alpha-beta model), so
        each is evaluated at two sizes and the table is the minimum of the lines.
        """
        cache = self.__dict__.setdefault("_ar_cache", {})
        if ranks not in cache:
            cache[ranks] = self._sync_table(self.t.param_bytes, ranks) + self._sync_table(
                self.t.tied_bytes, 2 * ranks)
        return cache[ranks]

    def _sync_table(self, nbytes: np.ndarray, ranks: int) -> np.ndarray:
        if ranks <= 1:
            return np.zeros_like(nbytes)
        lines = _allreduce_lines(self.cluster, ranks, self.link(ranks))
        best = np.min([a + b * nbytes for a, b in lines], axis=0)
        return np.where(nbytes > 0, best, 0.0)

    def _shard_candidates(self, ranks: int) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """The sharding levels a range over ``ranks`` replicas may take, each with the model
        state's bytes per rank (parameters, gradients, optimizer state) and the once-per-step
        seconds (gradient sync and optimizer step) of every range; see the module docstring."""
        cache = self.__dict__.setdefault("_shard_cache", {})
        if ranks in cache:
            return cache[ranks]
        t = self.t
        k = self.state_factor - 2
        out = []
        if 0 in self.shard_levels or ranks <= 1:
            out.append((0, t.param_bytes * self.state_factor, self._allreduce_table(ranks)
                        + t.param_bytes * self.update_cost))
        if ranks > 1 and self.shard_levels != (0,):
            own = np.maximum(t.param_bytes - t.tied_bytes, 0.0)
            state = 2 * t.param_bytes + own * (1 + k) / ranks + t.tied_bytes * k
            sync = (self._gather_table(own, ranks) + self._sync_table(t.tied_bytes, 2 * ranks)
                    + (own / ranks + t.tied_bytes) * self.update_cost)
            out.append((max(self.shard_levels), state, sync))
        cache[ranks] = out
        return out

    def _gather_table(self, nbytes: np.ndarray, ranks: int) -> np.ndarray:
        """Reduce-scatter plus allgather seconds of ``nbytes`` over ``ranks`` (the faster algorithm)."""
        best = np.min([a + b * nbytes for a, b in self._gather_lines(ranks).values()], axis=0)
        return np.where(nbytes > 0, best, 0.0)

    def _gather_lines(self, ranks: int) -> dict[str, tuple[float, float]]:
        """(intercept, seconds per byte) of reduce-scatter plus allgather over ``ranks`` for each
        algorithm of :data:`GATHER_ALGORITHMS` the network offers (``"torus"`` only on a torus,
        on the grid the runtime lays the ranks on)."""
        c = self.cluster
        link = self.link(ranks)
        shape = grid_shape(ranks) if c.topology == "torus" else None
        lines = {}
        for algo in GATHER_ALGORITHMS:
            if algo == "torus" and shape is None:
                continue
            t1, t2 = (reduce_scatter_time(n, ranks, alpha=link.latency, beta=link.bandwidth, algorithm=algo,
                                          torus_shape=shape, concurrent_links=c.concurrent_links)
                      + allgather_time(n, ranks, alpha=link.latency, beta=link.bandwidth, algorithm=algo,
                                       torus_shape=shape, concurrent_links=c.concurrent_links)
                      for n in (1.0, 2.0**30))
            slope = (t2 - t1) / (2.0**30 - 1.0)
            lines[algo] = (t1 - slope, slope)
        return lines

    def gather_choice(self, nbytes: float, ranks: int) -> tuple[str, float]:
        """The faster reduce-scatter + allgather algorithm for ``nbytes`` over ``ranks``, and its seconds."""
        if ranks <= 1 or nbytes <= 0:
            return "mpi", 0.0
        times = {algo: a + b * nbytes for algo, (a, b) in self._gather_lines(ranks).items()}
        algo = min(times, key=times.__getitem__)
        return algo, times[algo]

    def sharded_step(self, nbytes: float, tied: float, ranks: int) -> tuple[float, float]:
        """(reduce-scatter + allgather seconds, optimizer step seconds) of a sharded stage whose
        parameters take ``nbytes``, ``tied`` of them shared with other stages (kept whole)."""
        own = max(nbytes - tied, 0.0)
        return self.gather_choice(own, ranks)[1], (own / ranks + tied) * self.update_cost

    def state_bytes(self, nbytes: float, tied: float, ranks: int, level: int) -> float:
        """:func:`optimizer_state_bytes` with this model's optimizer."""
        return optimizer_state_bytes(nbytes, tied, ranks, level, self.state_factor - 2)

    def _p2p_array(self, nbytes: np.ndarray, pipeline_devices: int) -> np.ndarray:
        link = self.link(pipeline_devices)
        return np.where(nbytes > 0, link.latency + nbytes / link.bandwidth, 0.0)

    def stage_times(self, m: int, replicas: int, pipeline_devices: int) -> tuple[np.ndarray, np.ndarray]:
        """Per-microbatch seconds ``c`` of every stage [i, j) with ``replicas`` replicas in all
        (``r * d``), without and with recompute (``(n + 1, n + 1)`` arrays each): compute
        against the stage's messages (overlapped), plus the fixed costs of its actions and
        posted messages (see the module docstring)."""
        t = self.t
        n = t.n
        cut_in = np.broadcast_to(t.cut[:, None], (n + 1, n + 1))
        cut_out = np.broadcast_to(t.cut[None, :], (n + 1, n + 1))
        not_first = (np.arange(n + 1) > 0)[:, None]
        is_last = (np.arange(n + 1) == n)[None, :]
        # per microbatch: F and B, and the posts of RECV_F and SEND_B (not the first stage), SEND_F and RECV_B
        # (not the last)
        posts = 2 * (not_first.astype(float) + (~is_last).astype(float)) * self.link(pipeline_devices).overhead
        per_mb = 2 * self.cluster.device.action_overhead + posts
        b = self.rows(m, replicas)
        coll_f, coll_b = self.group_tables(b)
        fwd = t.fwd_fixed + t.fwd_ps * b + coll_f
        bwd = t.bwd_fixed + t.bwd_ps * b + coll_b
        comm_t = self._p2p_array(cut_in * b, pipeline_devices) * not_first + self._p2p_array(
            cut_out * b, pipeline_devices)
        return np.maximum(fwd + bwd, comm_t) + per_mb, np.maximum(2 * fwd + bwd, comm_t) + per_mb

    def stage_state(self, replicas: int, level: int) -> tuple[np.ndarray, np.ndarray]:
        """(model-state bytes per rank, once-per-step seconds) of every stage [i, j) over
        ``replicas`` replicas at sharding ``level`` (one of :meth:`shard_options`): parameters,
        gradients and optimizer state; gradient sync, optimizer step and the per-tensor and
        step's fixed work."""
        for lvl, state, sync in self._shard_candidates(replicas):
            if lvl == level:
                return state, sync + self.t.param_count * self.cluster.device.tensor_overhead + self.step_fixed()
        raise ConfigError(f"sharding level {level} is not one this cost model allows over {replicas} replicas "
                          f"(it allows {self.shard_options(replicas)})")

    def shard_options(self, replicas: int) -> tuple[int, ...]:
        """The sharding levels a stage over ``replicas`` replicas may take under this model's option."""
        return tuple(lvl for lvl, _, _ in self._shard_candidates(replicas))

    def rank_memory(self, m: int, stages: Sequence[tuple[int, int, int, int, bool]], held: Sequence[Sequence[int]],
                    holds_last: bool) -> float:
        """Peak bytes of one rank holding several stages (model chunks), each ``(i, j, replicas,
        level, recompute)``: every stage's model state and send/receive buffers, the largest
        parameter's temporary once, the rank's rows of the returned outputs once (and the last
        stage's kept outputs when ``holds_last``), and the activations in flight: the largest,
        over ``held`` (counts of microbatches in flight per stage, one vector per moment the
        schedule may peak), of the stages' activations (a recompute stage's inputs) at those
        counts, plus one microbatch's full activations of the largest recompute stage (its
        backward re-runs its forward). With one stage and ``held`` ``[[f]]`` this is the
        per-stage tables' memory at f in flight.
        """
        t = self.t
        returned = t.out * self.batch_size / self.devices if self.return_outputs else 0.0
        kept = m if self.return_outputs else 1
        total, temp, transient = returned, 0.0, 0.0
        weights = []
        for i, j, replicas, level, rec in stages:
            b = self.rows(m, replicas)
            state, _ = self.stage_state(replicas, level)
            total += float(state[i, j]) + 2 * float(t.cut[i] + t.cut[j]) * b
            temp = max(temp, float(t.max_param[i, j]))
            weights.append((float(t.cut[i]) if rec else float(t.act[i, j])) * b)
            if rec:
                transient = max(transient, float(t.act[i, j]) * b)
            if holds_last and j == t.n:
                total += kept * b * float(t.out)
        acts = max((sum(c * w for c, w in zip(vec, weights)) for vec in held), default=0.0)
        return total + temp + acts + transient

    def stage_tables(self, d: int, m: int, rvals: tuple[int, ...], in_flights: tuple[int, ...],
                     recompute: bool | None, pipeline_devices: int) -> dict[int, StageTables]:
        """Costs of every stage [i, j), for each per-pipeline replica count in ``rvals``
        and each number of microbatches in flight in ``in_flights``.

        ``recompute``: True/False forces it; None picks it per stage only when
        the stage does not fit otherwise. Returns {in_flight: StageTables}.
        """
        t = self.t
        n = t.n
        shape = (n + 1, n + 1, len(rvals))
        out = {f: StageTables(np.full(shape, np.inf), np.zeros(shape), np.full(shape, np.inf),
                              np.zeros(shape, dtype=bool), np.full(shape, np.inf), np.zeros(shape, dtype=np.int8),
                              tensor=self.tp)
               for f in in_flights}
        valid = np.triu(np.ones((n + 1, n + 1), dtype=bool), 1)
        cut_in = np.broadcast_to(t.cut[:, None], (n + 1, n + 1))
        cut_out = np.broadcast_to(t.cut[None, :], (n + 1, n + 1))
        is_last = (np.arange(n + 1) == n)[None, :]
        # this rank's rows of the returned outputs, and how many microbatches' outputs the last stage keeps
        returned = t.out * self.batch_size / self.devices if self.return_outputs else 0.0
        kept = m if self.return_outputs else 1
        dev = self.cluster.device
        # per step: per-tensor work and the step's fixed work (per microbatch: stage_times)
        per_step = t.param_count * dev.tensor_overhead + self.step_fixed()
        for ri, r in enumerate(rvals):
            b = self.rows(m, r * d)
            c_plain, c_rec = self.stage_times(m, r * d, pipeline_devices)
            for level, state, sync in self._shard_candidates(r * d):
                # model state + send/recv buffers + outputs kept to be returned (see the module docstring)
                base = state + 2 * (cut_in + cut_out) * b + t.max_param + returned + is_last * (kept * b * t.out)
                for f, tab in out.items():
                    mem_plain = base + f * t.act * b
                    mem_rec = base + (f * cut_in + t.act) * b
                    use_rec = mem_plain > self.limit if recompute is None else np.full(shape[:2], recompute)
                    m_sel = np.where(use_rec, mem_rec, mem_plain)
                    ok = valid & (m_sel <= self.limit)
                    m_min = m_sel if recompute is not None else np.minimum(mem_plain, mem_rec)
                    _keep_better(tab, ri, level, m, np.where(ok, np.where(use_rec, c_rec, c_plain), np.inf), sync + per_step,
                                 np.where(valid, m_sel, np.inf), np.where(valid, m_min, np.inf), use_rec & valid)
        return out
