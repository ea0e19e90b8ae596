"""Sharded optimizer step over a stage's replicas (ZeRO-1/2 inside the pipeline).

A stage with r replicas at sharding level 1 or 2 (``StagePlan.shard_level``)
keeps each gradient bucket's parameters end to end in one flat fp32 buffer
of ``r * m`` elements (``m`` the bucket's size over r, rounded up to
:data:`ALIGN` elements so every shard starts on a SIMD vector boundary);
the parameters are views of it. Replica k's *shard* of the bucket is
elements ``[k*m, (k+1)*m)``: the *pieces* of the parameters that fall in it,
each a 1-D parameter viewing the flat buffer. Then, per step:

- the bucket's gradients are reduce-scattered instead of allreduced: replica
  k receives the sum of its shard only (``m`` elements), the pieces' ``.grad``;
- the user's optimizer, whose param groups now hold the pieces in place of
  the sharded parameters (same object, groups and hyperparameters, so LR
  schedulers keep working), steps only the shard and keeps state for it
  alone;
- an optimizer step post-hook allgathers every bucket's flat buffer from
  its shards, so each replica holds the updated parameters again.

A ring allreduce is a reduce-scatter followed by an allgather (so is the
dimension-wise torus one, whose halves run here when the plan names it), so
the bytes moved are those of level 0, while the optimizer's state and step
shrink by r.
Level 1 keeps each bucket's full flat gradient buffer from step to step and
points the parameters' ``.grad`` into it before the schedule, so backward
accumulates there (as PyTorch DDP's ``gradient_as_bucket_view``); level 2
lets backward allocate the gradients, copies them into a flat buffer when
the bucket starts and frees it once reduce-scattered, so between steps a
replica holds only its gradient shard. Either way the schedule accumulates
every microbatch's gradients in full, so both hold the full gradients while
it runs: level 2 lowers the memory between steps, not the step's peak.

Only an optimizer whose update is element-wise gives the same result on
pieces as on whole parameters; :func:`elementwise_problem` probes that once
(the runtime falls back to level 0 with a warning otherwise).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from mpi4py import MPI
from torch import Tensor, nn

from rannc_py.comm import collectives
from rannc_py.comm.cost import GATHER_ALGORITHMS
from rannc_py.comm.work import Work, wait_all

ALIGN = 16
"""Shards start at multiples of this many fp32 elements (64 bytes: one 512-bit SVE vector, two AVX2 vectors)."""


def shard_size(numel: int, ranks: int) -> int:
    """Elements of each of ``ranks`` shards of a bucket of ``numel`` elements (padded, aligned)."""
    return math.ceil(numel / (ranks * ALIGN)) * ALIGN if numel else 0


def gather_algorithm(allreduce: str) -> str:
    """The reduce-scatter/allgather algorithm for a stage whose plan names ``allreduce``
    (the ring where the planned algorithm has no reduce-scatter of its own: halving-doubling;
    the torus one on the default grid of the stage's replicas, as the planner costs it)."""
    return allreduce if allreduce in GATHER_ALGORITHMS else "ring"


@dataclass(frozen=True)
class Piece:
    """This replica's part of one sharded parameter.

    Attributes:
        param: the whole parameter (a view of its bucket's flat buffer).
        shard: elements ``[lo, hi)`` of ``param`` flattened: the 1-D parameter the optimizer steps.
        lo: first element of ``param`` in the piece.
        hi: one past its last.
        at: position of the piece's first element in its bucket's flat buffer.
    """

    param: nn.Parameter
    shard: nn.Parameter
    lo: int
    hi: int
    at: int


class BucketShard:
    """One gradient bucket of a sharded stage: its flat parameter buffer and this replica's shard of it.

    The constructor copies the parameters' values into the flat buffer and
    re-points each parameter's data at its slice, so the parameter objects
    (held by the stage program, the state dict, the user) stay the same.

    Args:
        params: the bucket's parameters (fp32), in bucket order.
        ranks: replicas sharing the bucket.
        index: this rank's position among them.
        level: 1 keeps the full flat gradient buffer between steps; 2 frees it.
    """

    def __init__(self, params: Sequence[nn.Parameter], ranks: int, index: int, level: int) -> None:
        self.params = list(params)
        total = sum(p.numel() for p in self.params)
        self.block = shard_size(total, ranks)
        self.index = index
        self.flat = torch.zeros(ranks * self.block, dtype=torch.float32)
        self.pieces: list[Piece] = []
        self._keep = level == 1
        self._grads: Tensor | None = None
        lo, hi = index * self.block, (index + 1) * self.block
        offset = 0
        with torch.no_grad():
            for p in self.params:
                n = p.numel()
                view = self.flat[offset : offset + n]
                view.copy_(p.detach().reshape(-1))
                p.data = view.view_as(p)
                a, b = max(lo, offset), min(hi, offset + n)
                if a < b:
                    shard = nn.Parameter(self.flat[a:b], requires_grad=p.requires_grad)
                    self.pieces.append(Piece(param=p, shard=shard, lo=a - offset, hi=b - offset, at=a))
                offset += n

    def own_block(self) -> Tensor:
        """This replica's shard of the flat parameter buffer."""
        return self.flat[self.index * self.block : (self.index + 1) * self.block]

    def prepare(self) -> None:
        """Level 1, before a step's schedule: each parameter's ``.grad`` becomes a zeroed view of
        the kept flat gradient buffer, so backward accumulates into it in place (no copy later)."""
        if not self._keep:
            return
        if self._grads is None:
            self._grads = torch.empty_like(self.flat)
        self._grads.zero_()
        offset = 0
        for p in self.params:
            n = p.numel()
            if p.requires_grad:
                p.grad = self._grads[offset : offset + n].view_as(p)
            offset += n

    def take_grads(self) -> Tensor:
        """The bucket's gradients in one flat buffer (missing ones zero); the parameters' ``.grad`` are dropped.

        Level 1 returns the kept buffer, which backward filled in place where
        :meth:`prepare` ran (other gradients are copied in); level 2 a new
        one, freed once reduce-scattered.
        """
        flat = self._grads if self._keep and self._grads is not None else torch.empty_like(self.flat)
        if self._keep:
            self._grads = flat
        offset = 0
        for p in self.params:
            n = p.numel()
            piece = flat[offset : offset + n]
            if p.grad is None:
                piece.zero_()
            elif p.grad.data_ptr() != piece.data_ptr():
                piece.copy_(p.grad.reshape(-1))
            p.grad = None  # final: the bucket holds it now
            offset += n
        flat[offset:].zero_()  # the padding
        return flat

    def set_grads(self, summed: Tensor) -> None:
        """Point each piece's ``.grad`` at its part of ``summed``, this replica's reduced shard."""
        start = self.index * self.block
        for pc in self.pieces:
            pc.shard.grad = summed[pc.at - start : pc.at - start + pc.hi - pc.lo]


class ShardedStep:
    """The optimizer side of the sharded buckets: pieces in the optimizer, parameters allgathered after its step.

    Args:
        buckets: per communicator of a sharded stage (this rank is in at
            most one), ``(communicator, algorithm, its buckets)``.
    """

    def __init__(self, buckets: Sequence[tuple[MPI.Comm, str, Sequence[BucketShard]]]) -> None:
        self._buckets = [(comm, algo, list(bs)) for comm, algo, bs in buckets]
        self.pieces: dict[int, list[Piece]] = {}  # id(whole parameter) -> its pieces here
        for _, _, bs in self._buckets:
            for b in bs:
                for pc in b.pieces:
                    self.pieces.setdefault(id(pc.param), []).append(pc)
        self.sharded: set[int] = {id(p) for _, _, bs in self._buckets for b in bs for p in b.params}
        self._hook: Any = None

    def shard_params(self) -> list[nn.Parameter]:
        """Every piece's 1-D parameter on this rank, in bucket order."""
        return [pc.shard for _, _, bs in self._buckets for b in bs for pc in b.pieces]

    def attach(self, opt: torch.optim.Optimizer) -> None:
        """Put the pieces into ``opt``'s param groups in place of the sharded parameters; allgather after its steps.

        Sharded parameters not in ``opt`` stay out of it (their pieces too).
        State the optimizer already keeps for a sharded parameter is cut to
        its pieces (param-shaped tensors sliced, the rest copied).
        """
        for group in opt.param_groups:
            new: list[Tensor] = []
            for p in group["params"]:
                if id(p) not in self.sharded:
                    new.append(p)
                    continue
                state = opt.state.pop(p, None)
                for pc in self.pieces.get(id(p), []):
                    new.append(pc.shard)
                    if state:
                        opt.state[pc.shard] = slice_state(state, p.shape, pc.lo, pc.hi)
            group["params"] = new
        self._hook = opt.register_step_post_hook(lambda *_: self.allgather())

    def allgather(self) -> None:
        """Every replica's shards of every bucket into every replica's flat buffers (collective on the stage)."""
        works: list[Work] = []
        for comm, algo, bs in self._buckets:
            for b in bs:
                if b.block:
                    works.append(collectives.allgather(b.own_block(), b.flat, comm, algo))
        wait_all(works)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop (or zero) the pieces' gradients: ``model.zero_grad()`` reaches them here,
        the optimizer's own ``zero_grad`` through its param groups."""
        for p in self.shard_params():
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    def detach(self) -> None:
        """Remove the step hook; a second call does nothing."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None


def stage_levels(stages: Sequence[tuple[tuple[int, ...], int]], opt: torch.optim.Optimizer | None,
                 params: dict[str, nn.Parameter], comm: MPI.Comm) -> dict[tuple[int, ...], int]:
    """The sharding level of each replicated stage's rank set that can run sharded (collective on ``comm``).

    ``stages`` lists each stage's ``(ranks, planned level)``. Sharding needs
    the optimizer (given to ``RaNNCModule``, so its step is known), fp32
    parameters and an element-wise update (:func:`elementwise_problem`); when
    any rank finds one missing, every stage runs level 0 and each rank warns
    (RuntimeWarning) with the lowest such rank's reason.
    """
    wanted = {ranks: level for ranks, level in stages if level and len(ranks) > 1}
    if not wanted:
        return {}
    problem: str | None = None
    if opt is None:
        problem = "no optimizer was given to RaNNCModule, so its step cannot be sharded; pass it (or a factory)"
    elif odd := sorted({str(p.dtype) for p in params.values() if p.dtype != torch.float32}):
        problem = f"sharded buckets hold float32 parameters, this rank has {odd}"
    else:
        problem = elementwise_problem(opt)
    first = next((p for p in comm.allgather(problem) if p), None)
    if first is not None:
        warnings.warn(f"the plan shards the optimizer step at levels {sorted(set(wanted.values()))}, but it runs "
                      f"unsharded (level 0): {first}", RuntimeWarning, stacklevel=3)
        return {}
    return wanted


def slice_state(state: Mapping[str, Any], shape: torch.Size, lo: int, hi: int) -> dict[str, Any]:
    """A whole parameter's optimizer state cut to elements ``[lo, hi)`` of the flattened
    parameter (of ``shape``): tensors of that shape are sliced (copies), everything else
    (a step count) is copied."""
    out: dict[str, Any] = {}
    for k, v in state.items():
        if isinstance(v, Tensor) and v.shape == shape and v.dim() > 0:
            out[k] = v.detach().reshape(-1)[lo:hi].clone()
        else:
            out[k] = v.clone() if isinstance(v, Tensor) else v
    return out


def elementwise_problem(opt: torch.optim.Optimizer) -> str | None:
    """Why ``opt``'s update cannot run on shards, or None when it is element-wise.

    Probes each param group once: a fresh optimizer of ``opt``'s class with
    the group's hyperparameters (learning rate raised to 0.01 so the update
    shows) steps a 5 x 7 tensor whole, another steps its flattening in two
    1-D halves; three steps of the same gradients must agree. An update that
    reads a whole tensor (a norm, a factored second moment: LAMB, Adafactor)
    differs, as does one that cannot be rebuilt from its param group.
    """
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(5, 7, generator=gen)
    grads = [torch.randn(5, 7, generator=gen) for _ in range(3)]
    cls: Any = type(opt)  # rebuilt from param groups alone, as subclasses of Optimizer take them
    name = cls.__name__
    for g, group in enumerate(opt.param_groups):
        hyper = {k: v for k, v in group.items() if k != "params"}
        if "lr" in hyper and not isinstance(hyper["lr"], Tensor):
            hyper["lr"] = 0.01
        whole = nn.Parameter(start.clone())
        halves = [nn.Parameter(start.reshape(-1)[:17].clone()), nn.Parameter(start.reshape(-1)[17:].clone())]
        try:
            a = cls([dict(hyper, params=[whole])])
            b = cls([dict(hyper, params=halves)])
            for grad in grads:
                whole.grad = grad.clone()
                flat = grad.reshape(-1)
                halves[0].grad, halves[1].grad = flat[:17].clone(), flat[17:].clone()
                a.step()
                b.step()
        except Exception as e:  # noqa: BLE001 - any failure means the class cannot be sharded
            return f"{name} could not be rebuilt on shards from param group {g} ({type(e).__name__}: {e})"
        got = torch.cat([h.detach() for h in halves])
        if not torch.allclose(got, whole.detach().reshape(-1), rtol=1e-5, atol=1e-7):
            return (f"{name}'s update of param group {g} is not element-wise (stepping a tensor whole and "
                    "in two halves disagree)")
    return None
