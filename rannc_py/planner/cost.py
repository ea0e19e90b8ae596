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
Memory per rank: parameters + gradients + optimizer state (SGD 0, SGD with
momentum 1, Adam/AdamW 2 extra copies of the parameters) + activations of the
microbatches in flight (GPipe: m; 1F1B: min(p - s, m)); with recompute only
the stage inputs of those plus one microbatch's full activations + one
microbatch's send and receive buffers + one temporary the size of the stage's
largest parameter (backward computes each later microbatch's weight gradient
before adding it to ``.grad``; the optimizer steps parameter by parameter
with temporaries of that size) + the model's batch-carrying outputs
(logits) the runtime returns: the last stage keeps its rows of every
microbatch's outputs until the step ends (m·b rows), and every rank holds its
own local rows of them (B / D rows) while the caller keeps the previous step's
outputs. A plan fits when every rank's memory is at most
``device memory * (1 - margin)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from rannc_py.comm.cost import (
    ALGORITHMS,
    allreduce_time,
    best_allreduce,
    grid_shape,
    p2p_time,
)
from rannc_py.errors import ConfigError
from rannc_py.hardware.cluster import Cluster, Device
from rannc_py.planner.chain import Chain


def _allreduce_lines(cluster: Cluster, ranks: int) -> list[tuple[float, float]]:
    """(intercept, seconds per byte) of each allreduce algorithm on ``ranks`` of ``cluster``."""
    link = cluster.link(ranks)
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
    Raises:
        ConfigError: bad optimizer, margin or update cost.
    """

    def __init__(self, chain: Chain, cluster: Cluster, batch_size: int, optimizer: str | int = "adam",
                 memory_margin: float = 0.1, return_outputs: bool = True, update_cost: float | None = None) -> None:
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
        link = c.link(ranks)
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
        link = self.cluster.link(pipeline_devices)
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
        lines = _allreduce_lines(self.cluster, ranks)
        best = np.min([a + b * nbytes for a, b in lines], axis=0)
        return np.where(nbytes > 0, best, 0.0)

    def _p2p_array(self, nbytes: np.ndarray, pipeline_devices: int) -> np.ndarray:
        link = self.cluster.link(pipeline_devices)
        return np.where(nbytes > 0, link.latency + nbytes / link.bandwidth, 0.0)

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
        ar_all = np.zeros(shape)
        out = {f: StageTables(np.full(shape, np.inf), ar_all, np.full(shape, np.inf), np.zeros(shape, dtype=bool),
                              np.full(shape, np.inf)) for f in in_flights}
        valid = np.triu(np.ones((n + 1, n + 1), dtype=bool), 1)
        state = t.param_bytes * self.state_factor
        cut_in = np.broadcast_to(t.cut[:, None], (n + 1, n + 1))
        cut_out = np.broadcast_to(t.cut[None, :], (n + 1, n + 1))
        not_first = (np.arange(n + 1) > 0)[:, None]
        is_last = (np.arange(n + 1) == n)[None, :]
        # this rank's rows of the returned outputs, and how many microbatches' outputs the last stage keeps
        returned = t.out * self.batch_size / self.cluster.num_devices if self.return_outputs else 0.0
        kept = m if self.return_outputs else 1
        dev = self.cluster.device
        # per microbatch: F and B, and the posts of RECV_F and SEND_B (not the first stage), SEND_F and RECV_B
        # (not the last); per step: per-tensor work and the step's fixed work
        posts = 2 * (not_first.astype(float) + (~is_last).astype(float)) * self.cluster.link(pipeline_devices).overhead
        per_mb = 2 * dev.action_overhead + posts
        per_step = t.param_count * dev.tensor_overhead + self.step_fixed()
        for ri, r in enumerate(rvals):
            b = self.rows(m, r * d)
            fwd = t.fwd_fixed + t.fwd_ps * b
            bwd = t.bwd_fixed + t.bwd_ps * b
            comm_t = self._p2p_array(cut_in * b, pipeline_devices) * not_first + self._p2p_array(
                cut_out * b, pipeline_devices)
            ar_all[:, :, ri] = self._allreduce_table(r * d) + t.param_bytes * self.update_cost + per_step
            c_plain = np.maximum(fwd + bwd, comm_t) + per_mb
            c_rec = np.maximum(2 * fwd + bwd, comm_t) + per_mb
            # model state + send/recv buffers + outputs kept to be returned (see the module docstring)
            base = state + 2 * (cut_in + cut_out) * b + t.max_param + returned + is_last * (kept * b * t.out)
            for f, tab in out.items():
                mem_plain = base + f * t.act * b
                mem_rec = base + (f * cut_in + t.act) * b
                use_rec = mem_plain > self.limit if recompute is None else np.full(shape[:2], recompute)
                m_sel = np.where(use_rec, mem_rec, mem_plain)
                ok = valid & (m_sel <= self.limit)
                tab.c[:, :, ri] = np.where(ok, np.where(use_rec, c_rec, c_plain), np.inf)
                m_min = m_sel if recompute is not None else np.minimum(mem_plain, mem_rec)
                tab.mem[:, :, ri] = np.where(valid, m_sel, np.inf)
                tab.mem_min[:, :, ri] = np.where(valid, m_min, np.inf)
                tab.recompute[:, :, ri] = use_rec & valid
        return out
