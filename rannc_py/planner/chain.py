"""A model as the planner sees it: a chain of blocks with per-sample costs.

Stage boundaries may only fall between blocks. Times follow a linear model in
the rows a replica processes, ``t(b) = fixed + per_sample * b``, which both the
measured and the analytic profile produce.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, kw_only=True)
class Block:
    """A run of consecutive ops that always stays in one stage.

    Attributes:
        ops: op indices of the graph (empty for synthetic chains).
        fwd_fixed, fwd_per_sample: forward seconds = fixed + per_sample * rows.
        bwd_fixed, bwd_per_sample: backward seconds, same form.
        act_bytes: bytes per sample kept from forward for backward.
        out_bytes: bytes per sample of the tensors crossing the cut after this
            block (what stage j sends to stage j + 1 when a stage ends here).
        params: (FQN, bytes) of the parameters and buffers the block reads;
            tied weights carry their group's canonical name so a stage counts
            them once.
        flops: forward FLOPs per sample.
        weight_fraction: the measured share of the backward that computes
            weight gradients (:attr:`Profile.bwd_weight_fraction`), or None
            when unknown (then estimated; see
            :func:`rannc_py.planner.search.weight_grad_time`).
    """

    ops: tuple[int, ...]
    fwd_fixed: float
    fwd_per_sample: float
    bwd_fixed: float
    bwd_per_sample: float
    act_bytes: float
    out_bytes: float
    params: tuple[tuple[str, int], ...]
    flops: float
    weight_fraction: float | None = None


@dataclass(frozen=True, kw_only=True)
class Chain:
    """Blocks in pipeline order plus the model's input bytes per sample.

    Attributes:
        blocks: the chain.
        input_bytes: bytes per sample of the model's inputs (stage 0's saved
            inputs under recompute).
        param_names: per block, the FQNs of ``params`` under their own names
            (tied aliases included) for the Plan's ``param_fqns``.
        output_bytes: bytes per sample of the model's batch-carrying outputs
            (e.g. a language model's logits), which the runtime keeps to
            return them. Default 0.
    """

    blocks: tuple[Block, ...]
    input_bytes: float
    param_names: tuple[tuple[str, ...], ...] = ()
    output_bytes: float = 0.0

    @property
    def n(self) -> int:
        """Number of blocks."""
        return len(self.blocks)

    def tables(self) -> ChainTables:
        """Prefix sums and range tables the cost model indexes by (first block, end block)."""
        return ChainTables(self)


class ChainTables:
    """Range sums over blocks: ``X[i, j]`` is the value of blocks i..j-1 (``j > i``).

    Attributes (all (n+1) x (n+1) float arrays, meaningful for j > i):
        fwd_fixed, fwd_ps, bwd_fixed, bwd_ps, act, flops: sums.
        param_bytes: bytes of the distinct parameters of the range.
        param_count: how many distinct parameter tensors the range has.
        max_param: bytes of the range's largest parameter.
        tied_bytes: bytes of those parameters that blocks outside the range
            also read (tied weights: their gradients need a sum across stages).
    Attributes (length n+1): ``cut[k]`` bytes per sample crossing the
        boundary before block k (``cut[0]`` the model input, ``cut[n]`` 0).
    Attribute ``out``: the chain's ``output_bytes``.
    """

    def __init__(self, chain: Chain) -> None:
        n = chain.n
        bl = chain.blocks

        def rng(values: list[float]) -> np.ndarray:
            pre = np.concatenate([[0.0], np.cumsum(np.asarray(values, dtype=np.float64))])
            return pre[None, :] - pre[:, None]

        self.n = n
        self.fwd_fixed = rng([b.fwd_fixed for b in bl])
        self.fwd_ps = rng([b.fwd_per_sample for b in bl])
        self.bwd_fixed = rng([b.bwd_fixed for b in bl])
        self.bwd_ps = rng([b.bwd_per_sample for b in bl])
        self.act = rng([b.act_bytes for b in bl])
        self.flops = rng([b.flops for b in bl])
        self.cut = np.array([chain.input_bytes] + [b.out_bytes for b in bl[:-1]] + [0.0])
        self.out = float(chain.output_bytes)
        pb = np.zeros((n + 1, n + 1))
        pcount = np.zeros((n + 1, n + 1))
        pmax = np.zeros((n + 1, n + 1))
        for i in range(n):
            seen: set[str] = set()
            total = largest = 0
            for j in range(i, n):
                for name, nbytes in bl[j].params:
                    if name not in seen:
                        seen.add(name)
                        total += nbytes
                        largest = max(largest, nbytes)
                pb[i, j + 1] = total
                pcount[i, j + 1] = len(seen)
                pmax[i, j + 1] = largest
        self.param_bytes = pb
        self.param_count = pcount
        self.max_param = pmax
        self.tied_bytes = np.zeros((n + 1, n + 1))
        holders: dict[str, list[int]] = {}
        sizes: dict[str, int] = {}
        for k, b in enumerate(bl):
            for name, nbytes in b.params:
                holders.setdefault(name, []).append(k)
                sizes[name] = nbytes
        for name, ks in holders.items():
            if len(ks) < 2:
                continue
            inside = rng([1.0 if k in ks else 0.0 for k in range(n)])  # holders within [i, j)
            self.tied_bytes += np.where((inside > 0) & (inside < len(ks)), sizes[name], 0.0)
