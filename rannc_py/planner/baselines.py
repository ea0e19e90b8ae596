"""The classic pipeline split rules, on the planner's cost model.

- ``uniform``: equal numbers of blocks per stage (DeepSpeed ``partition_method="uniform"``);
- ``params``: stages balanced by parameter bytes (DeepSpeed's default, ``"parameters"``);
- ``time``: stages balanced by compute time (torchgpipe's ``balance_by_time``).

Each rule cuts the chain into p parts minimising the heaviest part (exactly,
by a small DP), replicates every stage D / p times ("the best replica count":
every p dividing the device count D is tried), and tries the microbatch counts
and schedules of the search space, turning recompute on where a stage does not
fit otherwise. The search uses these layouts as extra candidates
(:func:`seed_layouts`) and the benchmark as its baselines (:func:`baseline_picks`),
so both rank and simulate them the same way.
"""

from __future__ import annotations

import numpy as np

from rannc_py.errors import ConfigError
from rannc_py.planner.chain import Chain
from rannc_py.planner.cost import CostModel
from rannc_py.planner.search import (
    CHUNKED,
    Layout,
    SearchSpace,
    divisors,
    in_flight,
    level_of,
    microbatch_candidates,
    pick_best,
    ranked,
    tabs_degree,
)

RULES = ("uniform", "params", "time")
# Layouts of one rule, best by the estimate T, that its pick simulates.
BASELINE_TOP_K = 8


def balanced_bounds(weights: np.ndarray, p: int) -> tuple[int, ...] | None:
    """Cut a sequence into p non-empty contiguous parts minimising the largest part's weight.

    Returns the p + 1 bounds, or None when p exceeds the length. Exact (linear partition DP);
    ties go to the leftmost cut.
    """
    n = len(weights)
    if p > n or p < 1:
        return None
    pre = np.concatenate([[0.0], np.cumsum(np.asarray(weights, dtype=float))])
    best = np.full((p + 1, n + 1), np.inf)
    arg = np.zeros((p + 1, n + 1), dtype=int)
    best[0, 0] = 0.0
    for k in range(1, p + 1):
        for j in range(k, n + 1):
            cand = np.maximum(best[k - 1, k - 1:j], pre[j] - pre[k - 1:j])
            i = int(np.argmin(cand))
            best[k, j], arg[k, j] = cand[i], k - 1 + i
    bounds, j = [n], n
    for k in range(p, 0, -1):
        j = int(arg[k, j])
        bounds.append(j)
    return tuple(reversed(bounds))


def rule_weights(chain: Chain, rule: str) -> np.ndarray:
    """Per-block weight a rule balances. Raises ConfigError for an unknown rule."""
    if rule == "uniform":
        return np.ones(chain.n)
    if rule == "params":
        return np.array([float(sum(nb for _, nb in b.params)) for b in chain.blocks])
    if rule == "time":
        return np.array([b.fwd_per_sample + b.bwd_per_sample for b in chain.blocks])
    raise ConfigError(f"unknown split rule {rule!r}; choose one of {RULES}")


def baseline_layouts(cost: CostModel, space: SearchSpace) -> dict[str, list[Layout]]:
    """Every feasible layout of each rule within ``space``'s pins, in a fixed order.

    Returns {rule: layouts}; empty lists when replicas are pinned (the rules
    replicate every stage equally).
    """
    out: dict[str, list[Layout]] = {rule: [] for rule in RULES}
    if space.pinned_replicas is not None:
        return out
    chain, D = cost.chain, cost.devices  # tensor groups at a degree > 1
    bounds_by: dict[str, dict[int, tuple[int, ...] | None]] = {rule: {} for rule in RULES}
    for p in divisors(D):
        if p > min(space.max_stages, chain.n) or (space.num_stages is not None and p != space.num_stages):
            continue
        for rule in RULES:
            bounds_by[rule][p] = balanced_bounds(rule_weights(chain, rule), p)
        R = D // p
        for m in microbatch_candidates(space, R, cost.batch_size):
            for sched in space.schedules:
                if sched in CHUNKED:  # the rules cut one stage per rank
                    continue
                flights = tuple(sorted({in_flight(sched, q, m) for q in range(p)}))
                tabs = cost.stage_tables(R, m, (1,), flights, space.recompute, p)
                for rule in RULES:
                    bounds = bounds_by[rule][p]
                    lay = None if bounds is None else _layout(tabs, bounds, R, m, sched, rule)
                    if lay is not None:
                        out[rule].append(lay)
    return out


def _layout(tabs: dict, bounds: tuple[int, ...], R: int, m: int, sched: str, rule: str) -> Layout | None:
    p = len(bounds) - 1
    cs, ars, mems, recs = [], [], [], []
    for s in range(p):
        tab = tabs[in_flight(sched, p - 1 - s, m)]
        i, j = bounds[s], bounds[s + 1]
        cs.append(float(tab.c[i, j, 0]))
        ars.append(float(tab.ar[i, j, 0]))
        mems.append(float(tab.mem[i, j, 0]))
        recs.append(bool(tab.recompute[i, j, 0]))
    shard = tuple(level_of(tabs[in_flight(sched, p - 1 - s, m)], bounds[s], bounds[s + 1], 0) for s in range(p))
    if not np.isfinite(max(cs)):
        return None
    # Ranked by the same estimate T as the search's own candidates.
    est = sum(cs) + (m - 1) * max(cs) + max(ars)
    return Layout(d=R, m=m, schedule=sched, bounds=tuple(bounds), replicas=(R,) * p, recompute=tuple(recs),
                  objective=est, memory=tuple(mems), origin=rule, shard=shard, tensor=tabs_degree(tabs))


def seed_layouts(cost: CostModel, space: SearchSpace) -> list[Layout]:
    """The layouts each rule's pick would simulate (its ``BASELINE_TOP_K`` best by T), all rules."""
    return [lay for lays in baseline_layouts(cost, space).values() for lay in ranked(lays, BASELINE_TOP_K)]


def baseline_picks(cost: CostModel, space: SearchSpace) -> dict[str, tuple[Layout, float] | None]:
    """Each rule's best layout and its simulated step time, picked as the search picks (None: nothing fits)."""
    return {rule: pick_best(cost, lays, top_k=BASELINE_TOP_K) if lays else None
            for rule, lays in baseline_layouts(cost, space).items()}
