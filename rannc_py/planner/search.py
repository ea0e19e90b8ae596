"""The layout search: a bottleneck dynamic program per (pipelines, microbatches, schedule).

Cost of a layout with p stages on m microbatches, stage s taking ``c_s`` per
microbatch and ``a_s`` for its gradient allreduce and optimizer step (see
:mod:`rannc_py.planner.cost`): the ranking estimate is the flow-shop model
(fill and drain, steady state, final allreduce)

    T = sum_s c_s + (m - 1) * max_s c_s + max_s a_s.

Sums and maxima together do not decompose, so the DP minimises, exactly, the
single-bottleneck surrogate

    T_w = (m + p - 1) * max_s (c_s + w * a_s)

(for fixed p: the smallest bottleneck), building the pipeline from its last
stage: ``best[q][i][k]`` is the smallest bottleneck of blocks ``[i, n)`` cut
into q + 1 stages on k devices per pipeline. Building backwards means a stage
knows how many stages follow it, which fixes its 1F1B memory (min(q + 1, m)
microbatches in flight) when the DP needs it, and one DP gives the optimum for
every p (the ``DEPTHS_PER_PASS`` best depths become candidates). The DP's
``a_s`` includes the tied-weight sync (assuming the partner stage has as many
replicas; the simulation charges the real counts). The inner step is a
(min, max) product over the reachable part of the table only (a stage with q
stages after it ends by block n - q and leaves them at least q devices).
Four weights give the candidates: ``w = 1/m`` (the allreduce spread
over the microbatches), ``w = 1/(m + p* - 1)`` for the best depth p* of the
first pass (there ``T_w`` bounds the bubble model from below), ``w = 1`` and
``w = 1000`` (allreduce-dominated steps, e.g. few microbatches on many
replicas, where balancing gradient bytes matters most); at a tensor degree
above 1 (each degree a search of its own, on ``D / t`` tensor groups:
:func:`rannc_py.planner.api.search_tensor`) only the first two, which keeps
a search over several degrees within seconds. The
brute-force test checks that a pass returns the exact optimum of its ``T_w``.

Outer loops: d whole-pipeline copies (d divides the device count; a pipeline
has P = D / d devices), microbatch counts m (divisors of B), schedules; the
recompute policy is per stage inside the tables. Per-stage replicas r come from
a small set, may differ between stages and sum to P. The ``TOP_K`` layouts by T
are then simulated with their schedule's real action lists
(:func:`rannc_py.schedule.fast.step_time`, the simulator's arithmetic), together
with the best few layouts of the classic split rules
(:mod:`rannc_py.planner.baselines`: uniform, parameter- and time-balanced
splits with every replica count), so the pick is never slower, under this cost
model, than what those rules would pick. The smallest simulated step time wins,
ties going to the smaller T and then the enumeration order, so the result is
deterministic.

Several model chunks per rank (the :data:`CHUNKED` schedules, searched only
when named: interleaved 1F1B with v = 2, 3, 4 and ZB-V with v = 2): a layout
is p positions (groups of ranks) x v chunks, the chain cut into p * v
consecutive stages, stage s on position
:func:`~rannc_py.schedule.generators.stage_ranks` ``[s]``. The search does not
run a DP of its own over them: for every (tensor degree, d, m) it takes the
``CHUNK_FAMILIES`` best 1F1B layouts of that (d, m) with distinct replica
counts and p >= 2 (the families: positions, replicas per position,
microbatches; the same DP as above, run for 1F1B even when 1F1B itself is not
allowed), and for every v the chain and m allow (at least p * v blocks;
interleaved: m a multiple of p) re-cuts the chain into p * v stages by a
min-max DP over the stages' per-microbatch time ``c + a / m`` at their
position's replica count (every stage is then at most the bottleneck, so each
rank's sum of its v chunks at most v times it). Every stage of a position has
its replicas and tensor degree, and one sharding level (uniform per position:
the faster of those allowed for the sum of its chunks' syncs). Memory is per
rank (:meth:`CostModel.rank_memory`): every chunk's model state and buffers
plus the activations in flight at the rank's peaks
(:func:`held_counts`: exact for interleaved, a bound for ZB-V); a rank that
does not fit takes recompute on the subset of its chunks that adds the least
time and fits. Its ranking estimate is the slowest rank's m microbatches plus
the bubble, ``T = m max_r C_r + (sum_r C_r - max_r C_r) / k + max_r A_r``
(C_r: rank r's chunks' per-microbatch time, A_r their once-per-step time;
k = v for interleaved, 6 for ZB-V, whose bubble is about p - 1 chunk
forwards), and the ``CHUNK_TOP_K`` best by it are simulated beside the
``TOP_K`` one-chunk layouts (:func:`ranked`). In the simulated step a ZB-V
turn (stages p - 1 and p, one rank) sends nothing, tied weights of two stages
on one rank are summed there (no message), and a rank pays the step's fixed
work once. The re-cut costs a few numpy passes per family, so allowing the
chunked schedules adds a fraction of a degree-1 search.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from rannc_py.errors import ConfigError
from rannc_py.planner.cost import CostModel, StageTables
from rannc_py.schedule import StageCosts, Timeline, by_name, simulate
from rannc_py.schedule.fast import step_time
from rannc_py.schedule.generators import stage_ranks

REPLICA_SET = (1, 2, 3, 4, 6, 8)
# Layouts (best by the estimate T) whose schedules are simulated for the final pick.
TOP_K = 16
# Pipeline depths per DP pass turned into candidate layouts (best by that pass's objective).
DEPTHS_PER_PASS = 6


@dataclass(frozen=True, kw_only=True)
class Layout:
    """A candidate plan in chain terms.

    Attributes:
        d: whole-pipeline copies.
        m: microbatches.
        schedule: schedule name.
        bounds: block boundaries, ``bounds[s]..bounds[s+1]`` is stage s.
        replicas: total replicas of each stage (r_s * d).
        recompute: per stage.
        objective: the ranking estimate T (seconds), or for ``objective="memory"``
            searches the largest per-rank memory.
        memory: per stage peak bytes per rank.
        dp_objective: the surrogate ``T_w`` the DP minimised.
        weight: the allreduce weight w of that DP pass.
        origin: "dp" for the search's own candidates, else the baseline rule
            that proposed it (:mod:`rannc_py.planner.baselines`).
        shard: per stage, its sharding level (:attr:`rannc_py.planner.plan.StagePlan.shard_level`);
            empty: 0 everywhere.
        tensor: the tensor degree of every stage (``replicas`` count tensor
            groups of that many ranks); the cost model it is costed with has
            that degree (:attr:`CostModel.tp`).
        chunks: stages per rank (v) of a :data:`CHUNKED` schedule, else 1. With v > 1
            ``bounds`` cut p * v stages, stage s runs on position :meth:`position_of`,
            ``replicas``, ``recompute`` and ``shard`` list every stage (equal across a
            position's stages for the first and the last) and ``memory`` gives every stage
            its position's peak bytes per rank (all its chunks together).
    """

    d: int
    m: int
    schedule: str
    bounds: tuple[int, ...]
    replicas: tuple[int, ...]
    recompute: tuple[bool, ...]
    objective: float
    memory: tuple[float, ...]
    dp_objective: float = 0.0
    weight: float = 0.0
    origin: str = "dp"
    shard: tuple[int, ...] = ()
    tensor: int = 1
    chunks: int = 1

    @property
    def num_stages(self) -> int:
        """Stages (model chunks); the pipeline depth when :attr:`chunks` is 1."""
        return len(self.bounds) - 1

    @property
    def num_positions(self) -> int:
        """Pipeline positions p (groups of ranks holding :attr:`chunks` stages each)."""
        return self.num_stages // self.chunks

    def position_of(self, stage: int) -> int:
        """The position whose ranks run ``stage`` (:func:`rannc_py.schedule.generators.stage_ranks`)."""
        return stage if self.chunks == 1 else stage_ranks(self.schedule, self.num_positions, self.chunks)[stage]


def divisors(n: int) -> list[int]:
    """Divisors of n, ascending."""
    small = [k for k in range(1, math.isqrt(n) + 1) if n % k == 0]
    return sorted(set(small + [n // k for k in small]))


def spread(values: list[int], limit: int) -> list[int]:
    """At most ``limit`` of the sorted ``values``, evenly spaced on a log scale, ends included."""
    if len(values) <= limit:
        return values
    logs = np.log(np.asarray(values, dtype=float))
    targets = np.linspace(logs[0], logs[-1], limit)
    picked = sorted({int(np.argmin(np.abs(logs - x))) for x in targets})
    return [values[i] for i in picked]


def bottleneck_dp(obj_by_q: Sequence[np.ndarray], rvals: Sequence[int], devices: int,
                  allowed: Sequence[Sequence[int]] | None = None) -> np.ndarray:
    """Min-max DP over a chain.

    Args:
        obj_by_q: per q (stages after this one), an (n+1, n+1, len(rvals)) array of
            stage costs for blocks [i, j) with ``rvals[ri]`` devices (inf = infeasible).
        rvals: device counts a stage may use.
        devices: devices per pipeline (the k the full pipeline must use).
        allowed: optional per-q list of allowed replica indices (pins).
    Returns:
        ``best[q, i, k]``: the smallest bottleneck of blocks [i, n) in q + 1
        stages on exactly k devices (inf when impossible);
        :func:`reconstruct` recovers the cuts.

    Only the reachable part of each table is computed: with q stages after it,
    a stage ends at block n - q at the latest and leaves at least q devices to
    them. The inner step is a (min, max) product, ``min_j max(obj[i, j],
    best[q-1][j, k - r])``, reduced over a contiguous axis.
    """
    Q = len(obj_by_q)
    n = obj_by_q[0].shape[0] - 1
    K = devices
    best = np.full((Q, n + 1, K + 1), np.inf)
    for q in range(Q):
        obj = obj_by_q[q]
        hi = n - q  # the stage is blocks [i, j) with i < hi, j <= hi
        if hi < 1:
            break
        for ri in _replica_indices(rvals, q, allowed):
            r = rvals[ri]
            if q == 0:
                if r <= K:
                    best[0, :n, r] = np.minimum(best[0, :n, r], obj[:n, n, ri])
                continue
            if q + r > K:
                continue
            a = obj[:hi, 1:hi + 1, ri]  # (i, j)
            rest = best[q - 1, 1:hi + 1, q:K + 1 - r]  # (j, k - r)
            cand = np.maximum(a[:, None, :], rest.T[None, :, :]).min(axis=2)  # (i, k - r)
            view = best[q, :hi, q + r:]
            np.minimum(view, cand, out=view)
    return best


def _replica_indices(rvals: Sequence[int], q: int, allowed: Sequence[Sequence[int]] | None) -> Sequence[int]:
    return range(len(rvals)) if allowed is None else allowed[q]


def reconstruct(best: np.ndarray, obj_by_q: Sequence[np.ndarray], rvals: Sequence[int], p: int, devices: int,
                allowed: Sequence[Sequence[int]] | None = None) -> tuple[list[int], list[int]]:
    """Block bounds and per-pipeline replica counts of the DP's p-stage optimum.

    Re-derives each stage's argmin from the table with the same float operations
    (so the value found equals ``best`` exactly); ties go to the first replica
    index, then the smallest end block, so the result is deterministic.
    """
    n = best.shape[1] - 1
    rv = np.asarray(rvals)
    bounds, reps = [0], []
    i, k = 0, devices
    for q in range(p - 1, -1, -1):
        ris = np.asarray(_replica_indices(rvals, q, allowed), dtype=np.int64)
        if q == 0:
            ris = ris[rv[ris] == k]
            vals = obj_by_q[0][i, n, ris][:, None]
            ends = np.array([n])
        else:
            ris = ris[k - rv[ris] >= q]
            vals = np.maximum(obj_by_q[q][i, :, ris], best[q - 1, :, k - rv[ris]])  # (replica, j): advanced indices go first
            ends = np.arange(n + 1)
        flat = int(np.argmin(vals))  # first replica index, then smallest j, among ties
        ri, j = divmod(flat, vals.shape[1])
        assert vals[ri, j] == best[q, i, k], "DP table and reconstruction disagree"
        r = int(rv[ris[ri]])
        bounds.append(int(ends[j]))
        reps.append(r)
        i, k = int(ends[j]), k - r
    return bounds, reps


@dataclass(frozen=True, kw_only=True)
class SearchSpace:
    """The enumerated outer choices (shared by the search and the brute-force check)."""

    pipelines: tuple[int, ...]  # d values
    microbatches: tuple[int, ...]
    schedules: tuple[str, ...]
    recompute: bool | None
    max_stages: int
    rvals: tuple[int, ...]
    pinned_replicas: tuple[int, ...] | None = None
    num_stages: int | None = None
    max_microbatch_counts: int = 6  # MAX_MICROBATCH_COUNTS; fewer at a tensor degree above 1


# Schedules whose activations in flight depend on the pipeline depth, not only on the stages after.
DEPTH_DEPENDENT = ("zb-h1",)
# Schedules that split the backward into I and W (their stages need a weight-gradient share).
SPLIT_BACKWARD = ("zb-h1", "zb-v")
# Schedules with several stages (model chunks) per rank, and the chunk counts v searched for each.
CHUNKED: dict[str, tuple[int, ...]] = {"interleaved": (2, 3, 4), "zb-v": (2,)}
# 1F1B layouts (best by T) per (tensor degree, d, m) that the chunked schedules re-cut.
CHUNK_FAMILIES = 4
# Chunked layouts (best by their estimate) simulated for the final pick, beside TOP_K one-chunk ones.
CHUNK_TOP_K = 4


def in_flight(schedule: str, q: int, m: int, p: int = 0) -> int:
    """Microbatches whose activations a stage with q stages after it, in a pipeline of p
    stages, holds at once (until their backward, or their W): GPipe m, 1F1B
    ``min(q + 1, m)``, ZB-H1 ``min(p, m)`` (every stage 1F1B's peak; see
    :mod:`rannc_py.schedule.generators`). Only ZB-H1 reads ``p``."""
    if schedule == "gpipe":
        return m
    if schedule in DEPTH_DEPENDENT:
        return min(p, m)
    return min(q + 1, m)


def search_config(cost: CostModel, space: SearchSpace, d: int, m: int, schedule: str,
                  objective: str = "time", weights: Sequence[float] | None = None) -> list[Layout]:
    """Run the DP for one (d, m, schedule); return the best layout for every feasible p.

    ``objective="memory"`` minimises the largest per-rank memory instead
    (used to report the smallest memory that would fit). ``weights`` overrides
    the allreduce weights of the DP passes (default: the two of the module docstring).
    """
    D = cost.devices
    P = D // d
    if space.pinned_replicas is not None:
        p_pin = len(space.pinned_replicas)
        if max(space.pinned_replicas) > cost.batch_size // m:
            return []  # some replica would get no rows
        rvals = tuple(sorted(set(space.pinned_replicas)))
        allowed = [[rvals.index(space.pinned_replicas[p_pin - 1 - q])] for q in range(p_pin)]
        Q = p_pin
    else:
        rvals = tuple(r for r in space.rvals if r <= P and r * d <= cost.batch_size // m)
        allowed = None
        Q = min(space.max_stages, P, cost.chain.n)
    if not rvals or Q < 1:
        return []
    if schedule in DEPTH_DEPENDENT:  # one DP per depth, each with that depth's memory
        depths = [p for p in range(1, Q + 1) if space.num_stages in (None, p)
                  and (space.pinned_replicas is None or p == Q)]
        return [lay for p in depths for lay in _search_depth(cost, space, d, m, schedule, objective, weights,
                                                             rvals, allowed, p)]
    return _search_depth(cost, space, d, m, schedule, objective, weights, rvals, allowed, 0, Q)


def _search_depth(cost: CostModel, space: SearchSpace, d: int, m: int, schedule: str, objective: str,
                  weights: Sequence[float] | None, rvals: tuple[int, ...], allowed: list[list[int]] | None,
                  depth: int, Q: int = 0) -> list[Layout]:
    """:func:`search_config`'s passes with the DP over ``Q`` stage positions; ``depth`` > 0 pins
    the pipeline to that many stages (Q = depth) for a :data:`DEPTH_DEPENDENT` schedule."""
    P = cost.devices // d
    if depth:
        Q, space = depth, dataclasses.replace(space, num_stages=depth)
    flights = tuple(sorted({in_flight(schedule, q, m, depth) for q in range(Q)}))
    tabs = cost.stage_tables(d, m, rvals, flights, space.recompute, P)
    if objective == "memory":
        return _collect(tabs, [tabs[in_flight(schedule, q, m, depth)].mem_min for q in range(Q)], rvals, P,
                        allowed, space, d, m, schedule, 0.0, memory=True)
    out: list[Layout] = []
    passes: Sequence[float | None] = weights if weights is not None else (
        (1.0 / m, None, 1.0, 1000.0) if cost.tp == 1 else (1.0 / m, None))  # degree > 1: the bubble passes only
    for w in passes:
        if w is None:  # second pass: weight for the first pass's best depth
            if not out:
                break
            p_star = min(out, key=lambda lay: (lay.objective, lay.num_stages)).num_stages
            if p_star == 1:
                continue
            w = 1.0 / (m + p_star - 1)
        by_flight = {f: tab.c + w * tab.ar for f, tab in tabs.items()}
        obj = [by_flight[in_flight(schedule, q, m, depth)] for q in range(Q)]
        seen = {(lay.bounds, lay.replicas, lay.recompute) for lay in out}
        out += [lay for lay in _collect(tabs, obj, rvals, P, allowed, space, d, m, schedule, w)
                if (lay.bounds, lay.replicas, lay.recompute) not in seen]
    return out


def _collect(tabs, obj_by_q, rvals, P, allowed, space, d, m, schedule, w, memory=False) -> list[Layout]:
    Q = len(obj_by_q)
    best = bottleneck_dp(obj_by_q, rvals, P, allowed)
    depths = [p for p in range(1, Q + 1) if np.isfinite(best[p - 1, 0, P])
              and (space.num_stages is None or p == space.num_stages)
              and (space.pinned_replicas is None or p == Q)]
    # Only the depths whose DP objective is among the pass's best become candidates.
    depths.sort(key=lambda p: (best[p - 1, 0, P] * (1 if memory else m + p - 1), p))
    out = []
    for p in depths[:DEPTHS_PER_PASS]:
        val = best[p - 1, 0, P]
        bounds, reps = reconstruct(best, obj_by_q, rvals, p, P, allowed)
        rec, mem, cs, ars = [], [], [], []
        shard = []
        for s in range(p):
            tab = tabs[in_flight(schedule, p - 1 - s, m, p)]
            i, j, ri = bounds[s], bounds[s + 1], rvals.index(reps[s])
            shard.append(level_of(tab, i, j, ri))
            cs.append(float(tab.c[i, j, ri]))
            ars.append(float(tab.ar[i, j, ri]))
            if memory:  # the least-memory choice
                rec.append(bool(tab.mem_min[i, j, ri] < tab.mem[i, j, ri]) or bool(tab.recompute[i, j, ri]))
                mem.append(float(tab.mem_min[i, j, ri]))
            else:
                rec.append(bool(tab.recompute[i, j, ri]))
                mem.append(float(tab.mem[i, j, ri]))
        if memory:
            est = float(val)
            dp_val = float(val)
        else:
            est = sum(cs) + (m - 1) * max(cs) + max(ars)
            dp_val = (m + p - 1) * float(val)
        out.append(Layout(d=d, m=m, schedule=schedule, bounds=tuple(bounds), replicas=tuple(r * d for r in reps),
                          recompute=tuple(rec), objective=est, memory=tuple(mem), dp_objective=dp_val, weight=w,
                          shard=tuple(shard), tensor=tabs_degree(tabs)))
    return out


def tabs_degree(tabs: dict[int, StageTables]) -> int:
    """The tensor degree the tables were made at."""
    return next(iter(tabs.values())).tensor


def level_of(tab: StageTables, i: int, j: int, ri: int) -> int:
    """The sharding level the tables chose for stage [i, j) at replica index ``ri``."""
    return 0 if tab.shard is None else int(tab.shard[i, j, ri])


MAX_MICROBATCH_COUNTS = 6


def microbatch_candidates(space: SearchSpace, d: int, batch_size: int) -> list[int]:
    """Microbatch counts tried with d pipelines: those of ``space`` leaving every pipeline
    at least one row per microbatch, at most MAX_MICROBATCH_COUNTS of them, log-spaced
    with both ends kept (the largest keeps the bubble smallest); at most
    ``space.max_microbatch_counts`` when that is smaller."""
    ok = [m for m in space.microbatches if batch_size // m >= d]
    return spread(ok, min(MAX_MICROBATCH_COUNTS, space.max_microbatch_counts))


def enumerate_layouts(cost: CostModel, space: SearchSpace, objective: str = "time") -> list[Layout]:
    """Every (d, m, schedule) DP optimum, in enumeration order; for the :data:`CHUNKED`
    schedules of ``space``, the re-cuts of that (d, m)'s best 1F1B layouts
    (:func:`chunked_layouts`, after the one-chunk schedules' layouts)."""
    out = []
    chunked = [sched for sched in space.schedules if sched in CHUNKED]
    for d in space.pipelines:
        for m in microbatch_candidates(space, d, cost.batch_size):
            base: list[Layout] | None = None
            for sched in space.schedules:
                if sched not in CHUNKED:
                    lays = search_config(cost, space, d, m, sched, objective)
                    out += lays
                    base = lays if sched == "1f1b" else base
            if chunked:
                if base is None:
                    base = search_config(cost, space, d, m, "1f1b", objective)
                out += chunked_layouts(cost, space, base, chunked, objective)
    return out


@functools.lru_cache(maxsize=256)
def held_counts(schedule: str, p: int, m: int, chunks: int) -> tuple[tuple[tuple[int, ...], ...], ...]:
    """Per rank, vectors of microbatches in flight on each of its stages (ascending), one per
    moment its activations may peak: the rank's activation peak for any per-stage sizes is
    the largest weighted sum over them (what :meth:`CostModel.rank_memory` takes).

    Interleaved: exact, from the schedule's order (module docstring of
    :mod:`rannc_py.schedule.generators`): a rank's counts change only at its own F and B,
    which run in its list's order whatever the costs; its peaks are just before each
    steady-state backward, after ``w + k + 1`` forwards and ``k`` backwards, counted per
    chunk in closed form (forwards go in rounds of p microbatches through chunks 0..v-1,
    backwards through v-1..0). ZB-V (list-scheduled; generating its order per candidate
    would dominate the search): the corners of what its order allows, at most ``min(2p, 2m)``
    chunk-microbatches on rank r, of which at most ``min(max(2p - 1 - r, p + 1), m)`` on
    its first stage and ``min(p, m)`` on its second (the counts of the generated order,
    checked in the tests up to p = 12), so the weighted peak is an upper bound, exact on
    equal chunks (where it is the cap). One stage per rank: the in-flight count
    :func:`in_flight` gives.
    """
    if schedule == "zb-v":
        cap, out_v = min(2 * p, 2 * m), []
        for r in range(p):
            first, second = min(max(2 * p - 1 - r, p + 1), m, cap), min(p, m, cap)
            out_v.append(tuple(sorted({(first, min(cap - first, second)), (min(cap - second, first), second)})))
        return tuple(out_v)
    if schedule != "interleaved":
        return tuple(((in_flight(schedule, p - 1 - r, m, p),),) for r in range(p))
    v, period = chunks, chunks * p
    c = np.arange(v)[None, :]

    def counts(n: np.ndarray, offset: np.ndarray) -> np.ndarray:  # entries of chunk c among the first n
        return (n[:, None] // period) * p + np.clip(n[:, None] % period - offset * p, 0, p)

    out: list[tuple[tuple[int, ...], ...]] = []
    for r in range(p):
        w = min((p - r - 1) * 2 + (v - 1) * p, v * m)
        if w == v * m:  # every forward before the first backward
            out.append(((m,) * v,))
            continue
        k = np.arange(v * m - w)
        held = counts(k + w + 1, c) - counts(k, v - 1 - c)
        out.append(tuple(tuple(int(x) for x in row) for row in np.unique(held, axis=0)))
    return tuple(out)


def chunked_layouts(cost: CostModel, space: SearchSpace, base: Sequence[Layout], schedules: Sequence[str],
                    objective: str = "time") -> list[Layout]:
    """The layouts of the :data:`CHUNKED` ``schedules`` made from one (d, m)'s 1F1B layouts
    ``base`` (see the module docstring): the ``CHUNK_FAMILIES`` best with distinct replica
    counts and at least two positions, each re-cut into p * v stages for every chunk count v
    of :data:`CHUNKED` the chain and m allow (at least p * v blocks; interleaved: m a
    multiple of p)."""
    fams: list[Layout] = []
    seen: set[tuple[int, ...]] = set()
    for lay in sorted(base, key=lambda lay: lay.objective):
        if lay.num_stages >= 2 and lay.replicas not in seen:
            seen.add(lay.replicas)
            fams.append(lay)
    cache: dict[tuple, tuple[np.ndarray, ...]] = {}
    out = []
    for fam in fams[:CHUNK_FAMILIES]:
        p = fam.num_stages
        for sched in schedules:
            for v in CHUNKED[sched]:
                if cost.chain.n < p * v or (sched == "interleaved" and fam.m % p):
                    continue
                cut = _recut(cost, space, fam, sched, v, cache, objective)
                if cut is not None:
                    out.append(cut)
    return out


def _recut(cost: CostModel, space: SearchSpace, fam: Layout, sched: str, v: int, cache: dict,
           objective: str) -> Layout | None:
    """``fam``'s positions and replicas with the chain cut into p * v stages of ``sched``: the
    min-max DP over the stages' per-microbatch time (plus their once-per-step time / m), the
    sharding level per position, and where a position's ranks do not fit otherwise (with
    recompute searched), recompute on the subset of its stages that adds the least time and
    fits; None when some rank does not fit."""
    p, d, m, n = fam.num_stages, fam.d, fam.m, cost.chain.n
    P, S = sum(fam.replicas) // d, p * v
    pos = stage_ranks(sched, p, v)
    reps = tuple(fam.replicas[pos[s]] for s in range(S))

    def tables(R: int, level: int | None = None) -> tuple[np.ndarray, ...]:
        key = (m, R, P, level)
        if key not in cache:
            cache[key] = cost.stage_times(m, R, P) if level is None else cost.stage_state(R, level)
        return cache[key]

    force = space.recompute
    valid = np.triu(np.ones((n + 1, n + 1), dtype=bool), 1)
    prev = np.full(n + 1, np.inf)
    args: list[np.ndarray] = []
    for s in range(S):
        R = reps[s]
        c = tables(R)[1 if force else 0] + tables(R, cost.shard_options(R)[0])[1] / m
        if s == 0:
            cur = np.where(valid[0], c[0], np.inf)
            args.append(np.zeros(n + 1, dtype=np.int64))
        else:
            cand = np.where(valid, np.maximum(prev[:, None], c), np.inf)  # (i, j)
            arg = np.argmin(cand, axis=0)  # the first i among ties
            cur = cand[arg, np.arange(n + 1)]
            args.append(arg)
        prev = cur
    if not np.isfinite(prev[n]):
        return None
    bounds = [n]
    for s in range(S - 1, 0, -1):
        bounds.append(int(args[s][bounds[-1]]))
    bounds.append(0)
    bounds.reverse()
    mine = [[s for s in range(S) if pos[s] == r] for r in range(p)]
    levels = []
    for r in range(p):
        R = fam.replicas[r]
        opts = cost.shard_options(R)
        sync = {lvl: sum(float(tables(R, lvl)[1][bounds[s], bounds[s + 1]]) for s in mine[r]) for lvl in opts}
        # the faster sync and optimizer step; for the memory objective the least state (the highest level)
        levels.append(max(opts) if objective == "memory" else min(opts, key=lambda lvl: (sync[lvl], -lvl)))
    held = held_counts(sched, p, m, v)
    rec = [bool(force)] * S

    def memory(r: int, flags: Sequence[bool]) -> float:
        stages = [(bounds[s], bounds[s + 1], reps[s], levels[r], flags[s]) for s in mine[r]]
        return cost.rank_memory(m, stages, held[r], holds_last=S - 1 in mine[r])

    def extra(s: int) -> float:  # the time recomputing stage s adds per microbatch
        i, j = bounds[s], bounds[s + 1]
        c_plain, c_rec = tables(reps[s])
        return float(c_rec[i, j] - c_plain[i, j])

    mems = []
    for r in range(p):
        mem = memory(r, rec)
        if force is None and (mem > cost.limit or objective == "memory"):
            # the rank's stages to recompute: for time, the subset adding the least time that fits;
            # for memory, all of them (the least memory)
            subsets = [sub for k in range(1, v + 1) for sub in itertools.combinations(mine[r], k)]
            subsets.sort(key=lambda sub: (len(sub) < v, sum(map(extra, sub))) if objective == "memory"
                         else (sum(map(extra, sub)), len(sub)))
            for sub in subsets:
                flags = [rec[s] or s in sub for s in range(S)]
                got = memory(r, flags)
                if got < mem and (objective == "memory" or got <= cost.limit):
                    rec, mem = flags, got
                    break
        if objective != "memory" and mem > cost.limit:
            return None
        mems.append(mem)
    per_rank = [sum(float(tables(reps[s])[1 if rec[s] else 0][bounds[s], bounds[s + 1]]) for s in mine[r])
                for r in range(p)]
    once = [sum(float(tables(reps[s], levels[r])[1][bounds[s], bounds[s + 1]]) for s in mine[r]) for r in range(p)]
    # steady state at the slowest rank, plus the bubble: (p - 1) chunk-times of F + B (interleaved),
    # of F alone, a sixth of a two-chunk rank's F + B (zb-v)
    bubble = (sum(per_rank) - max(per_rank)) / (6 if sched == "zb-v" else v)
    est = max(mems) if objective == "memory" else m * max(per_rank) + bubble + max(once)
    return Layout(d=d, m=m, schedule=sched, bounds=tuple(bounds), replicas=reps, recompute=tuple(rec),
                  objective=float(est), memory=tuple(mems[pos[s]] for s in range(S)), dp_objective=float(prev[n]),
                  weight=1.0 / m, origin="dp", shard=tuple(levels[pos[s]] for s in range(S)), tensor=cost.tp,
                  chunks=v)


def stage_costs(cost: CostModel, lay: Layout) -> list[StageCosts]:
    """Per-stage simulator costs of a layout, including re-split messages and shared-weight sync."""
    t = cost.t
    p = lay.num_stages
    pos = [lay.position_of(s) for s in range(p)]
    pipe_devices = sum(lay.replicas[pos.index(r)] for r in range(lay.num_positions)) // lay.d
    rows = [cost.rows(lay.m, r) for r in lay.replicas]
    names = [_stage_params(cost, lay.bounds[s], lay.bounds[s + 1]) for s in range(p)]
    dev = cost.cluster.device
    split = lay.schedule in SPLIT_BACKWARD  # I and W are two actions, each with its fixed cost
    post = cost.link(pipe_devices).overhead
    if lay.tensor != cost.tp:
        raise ConfigError(f"a layout of tensor degree {lay.tensor} costed with a cost model of degree {cost.tp}; "
                          "cost it with the CostModel of its degree")
    fixed = cost.step_fixed()
    out = []
    for s in range(p):
        i, j, b = lay.bounds[s], lay.bounds[s + 1], rows[s]
        coll_f, coll_b = cost.group_tables(b)
        fwd = t.fwd_fixed[i, j] + t.fwd_ps[i, j] * b + coll_f[i, j]
        bwd = t.bwd_fixed[i, j] + t.bwd_ps[i, j] * b + coll_b[i, j] + (fwd if lay.recompute[s] else 0.0)
        send_act = send_grad = 0.0  # none between two stages of one rank (zb-v's turn)
        if s < p - 1 and pos[s + 1] != pos[s]:
            send_act = _resplit(cost, t.cut[j], b, rows[s + 1], lay.replicas[s], lay.replicas[s + 1], pipe_devices)
        if s > 0 and pos[s - 1] != pos[s]:
            send_grad = _resplit(cost, t.cut[i], b, rows[s - 1], lay.replicas[s], lay.replicas[s - 1], pipe_devices)
        ar = cost.allreduce(t.param_bytes[i, j], lay.replicas[s])
        for s2 in range(p):  # weights shared with a stage on other ranks: sum their gradients too
            if pos[s2] != pos[s]:
                shared = sum(nb for name, nb in names[s].items() if name in names[s2])
                ar += cost.allreduce(shared, lay.replicas[s] + lay.replicas[s2])
        update = float(t.param_bytes[i, j]) * cost.update_cost
        if lay.shard and lay.shard[s]:
            ar, update = _sharded_sync(cost, lay, names, s, pos)
        weight = weight_grad_time(cost, i, j, b, float(bwd)) + dev.action_overhead if split else 0.0
        fwd += dev.action_overhead
        bwd += dev.action_overhead * (2 if split else 1)
        step = fixed if pos.index(pos[s]) == s else 0.0  # a rank's step work once, with its first stage
        out.append(StageCosts(forward=float(fwd), backward=float(bwd), send_act=send_act, send_grad=send_grad,
                              allreduce=ar, update=update, backward_weight=weight, post=post,
                              fixed=step + float(t.param_count[i, j]) * dev.tensor_overhead))
    return out


def _sharded_sync(cost: CostModel, lay: Layout, names: list[dict[str, int]], s: int,
                  pos: Sequence[int]) -> tuple[float, float]:
    """(gradient sync, optimizer step) seconds of sharded stage ``s``: its own parameters
    reduce-scattered and allgathered over its replicas, those shared with another stage
    kept whole and summed across both stages' replicas when that stage runs on other
    ranks (``pos``: every stage's position; as the runtime does)."""
    tied: dict[str, int] = {}
    shared_sync = 0.0
    for s2 in range(lay.num_stages):
        if s2 != s:
            both = {name: nb for name, nb in names[s].items() if name in names[s2]}
            tied.update(both)
            if pos[s2] != pos[s]:
                shared_sync += cost.allreduce(sum(both.values()), lay.replicas[s] + lay.replicas[s2])
    gather, update = cost.sharded_step(float(sum(names[s].values())), float(sum(tied.values())), lay.replicas[s])
    return gather + shared_sync, update


def weight_grad_time(cost: CostModel, i: int, j: int, rows: int, backward: float) -> float:
    """Seconds of the backward of blocks [i, j) at ``rows`` rows that compute weight gradients
    (what a split backward's W costs).

    A measured profile gives each block's share (:attr:`Block.weight_fraction`):
    that share of the block's backward at ``rows``. Otherwise it is estimated:
    a block that reads parameters spends on its weight gradients about what
    its forward spends (each weight-gradient product mirrors one forward
    product, ``dW = x^T dy`` against ``y = x W``, same FLOPs); a block without
    parameters spends nothing on them. Capped at ``backward``.
    """
    total = 0.0
    for blk in cost.chain.blocks[i:j]:
        if blk.weight_fraction is not None:
            total += blk.weight_fraction * (blk.bwd_fixed + blk.bwd_per_sample * rows)
        elif blk.params:
            total += blk.fwd_fixed + blk.fwd_per_sample * rows
    return min(float(total), backward)


def _stage_params(cost: CostModel, i: int, j: int) -> dict[str, int]:
    out: dict[str, int] = {}
    for blk in cost.chain.blocks[i:j]:
        out.update(blk.params)
    return out


def _resplit(cost: CostModel, per_sample: float, rows_src: int, rows_dst: int, r_src: int, r_dst: int,
             pipe_devices: int) -> float:
    """One sender's time for a boundary between stages with r_src and r_dst replicas.

    A sender's rows overlap about ceil(r_dst / r_src) receivers (one more when
    neither count divides the other); the link carries the larger of its own
    and its receiver's share.
    """
    msgs = max(math.ceil(r_dst / r_src), 1) + (0 if r_src % r_dst == 0 or r_dst % r_src == 0 else 1)
    link = cost.link(pipe_devices)
    if per_sample <= 0:
        return 0.0
    return msgs * link.latency + per_sample * max(rows_src, rows_dst) / link.bandwidth


def simulate_layout(cost: CostModel, lay: Layout) -> Timeline:
    """Simulate a layout's schedule with its stage costs."""
    return simulate(by_name(lay.schedule, lay.num_positions, lay.m, lay.chunks), stage_costs(cost, lay))


def ranked(layouts: Sequence[Layout], top_k: int, chunk_top_k: int = CHUNK_TOP_K) -> list[Layout]:
    """The ``top_k`` distinct one-chunk layouts and the ``chunk_top_k`` distinct chunked ones
    by their estimate T (ties: enumeration order), in that order."""
    unique: dict[tuple, tuple[int, Layout]] = {}
    for order, lay in enumerate(layouts):  # the same layout can come from several DP passes
        unique.setdefault(_key(lay), (order, lay))
    out, counts = [], [0, 0]
    for _, lay in sorted(unique.values(), key=lambda il: (il[1].objective, il[0])):
        kind = int(lay.chunks > 1)
        if counts[kind] < (chunk_top_k if kind else top_k):
            counts[kind] += 1
            out.append(lay)
    return out


def _key(lay: Layout) -> tuple:
    return (lay.tensor, lay.d, lay.m, lay.schedule, lay.chunks, lay.bounds, lay.replicas, lay.recompute)


def layout_step_time(cost: CostModel, lay: Layout) -> float:
    """Simulated step time of a layout (:func:`rannc_py.schedule.fast.step_time`, equal to the simulator's)."""
    return step_time(lay.schedule, lay.m, stage_costs(cost, lay), lay.chunks)


def pick_best(cost: CostModel, layouts: Sequence[Layout], top_k: int = TOP_K,
              extra: Sequence[Layout] = ()) -> tuple[Layout, float]:
    """Simulate the ``top_k`` layouts by T and every layout of ``extra``; return the fastest
    simulated and its step time (ties: smaller T, then order: ``layouts`` first).

    Raises ConfigError when both ``layouts`` and ``extra`` are empty."""
    cands = ranked(layouts, top_k)
    seen = {_key(lay) for lay in cands}
    for lay in extra:
        if _key(lay) not in seen:
            seen.add(_key(lay))
            cands.append(lay)
    best = None
    for order, lay in enumerate(cands):
        key = (layout_step_time(cost, lay), lay.objective, order)
        if best is None or key < best[0]:
            best = (key, lay)
    if best is None:
        raise ConfigError("pick_best got no layouts and no extra layouts; pass at least one candidate "
                          "(enumerate_layouts returns none when nothing fits)")
    return best[1], best[0][0]
