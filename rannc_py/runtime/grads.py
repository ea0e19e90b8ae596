"""Gradients: held back until ``loss.backward()``, summed across holders, clipped.

Every parameter lives on a set of ranks: the replicas of its stage, plus the
replicas of every other stage that reads it when it is tied (GPT-2's
``wte``/``lm_head``); on stages split over tensor groups, the ranks at one
tensor position of those replicas (they hold the same shard; a replicated
parameter's gradient is already the whole one on every rank of a group, so
summing it over the positions too would count it t times). Its gradient is the sum over that set, so one bucketed
allreduce per distinct set does both the data-parallel sync and the tied-weight
sum (a stage's own replica set, when the plan shards it, is reduce-scattered
instead: :mod:`rannc_py.runtime.sharding`). Sets are visited in one global order on every rank, so collectives on
different communicators cannot wait on each other in a cycle.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from mpi4py import MPI
from torch import Tensor, nn

from rannc_py.comm import collectives
from rannc_py.comm.work import Work
from rannc_py.runtime.sharding import BucketShard, gather_algorithm


class GradSync:
    """Bucketed allreduce of the local parameters' gradients, started during backward.

    Each holder set's parameters are cut into buckets in the order their
    gradients become final in backward (the reverse of their first use in
    forward, the same order on every rank). While the step's last backward
    runs, a hook on each parameter counts its bucket's final gradients; a
    full bucket starts its asynchronous allreduce at once, so communication
    overlaps the rest of backward. Buckets of one communicator start in
    bucket order on every rank (a full bucket waits for the ones before it),
    since collectives on a communicator must be issued in the same order.
    Whatever did not start during backward (parameters without a gradient in
    the last microbatch) starts at the schedule's ALLREDUCE action.

    A started bucket's gradients are copied into one flat tensor and dropped;
    after the sum, each ``.grad`` is a view of its bucket's flat tensor
    (PyTorch DDP's ``gradient_as_bucket_view``), so the synchronised
    gradients take their own size once, not twice.

    Args:
        params: this rank's parameters by (canonical) FQN.
        holders: every parameter FQN of the model -> the ranks holding it
            (the same dict on every rank; it decides the communicators).
        order: every parameter FQN of the model, in the order their gradients
            become final (the same list on every rank).
        comm: the runtime's communicator; the constructor is collective on it.
        bucket_bytes: gradients are flattened into buckets of about this size
            so a few large messages replace many small ones.
        algorithms: holder set -> the allreduce algorithm to sum its
            gradients with (:data:`rannc_py.comm.cost.ALGORITHMS`); sets not
            listed use ``"mpi"``. Default None: ``"mpi"`` for every set.
        levels: holder set -> its sharding level (a stage's replicas, see
            :mod:`rannc_py.runtime.sharding`); at 1 or 2 its buckets are
            reduce-scattered and only this rank's shard of each sum comes
            back (as the pieces' ``.grad``). Sets not listed: level 0.
        sets: every rank's holder sets, when ``holders`` is this rank's own
            view (tensor groups: each position sums its shards over its own
            ranks); default None: ``holders`` is the same on every rank.
    """

    def __init__(
        self,
        params: dict[str, nn.Parameter],
        holders: dict[str, tuple[int, ...]],
        order: Sequence[str],
        comm: MPI.Comm,
        bucket_bytes: int,
        algorithms: Mapping[tuple[int, ...], str] | None = None,
        levels: Mapping[tuple[int, ...], int] | None = None,
        sets: Sequence[tuple[int, ...]] | None = None,
    ) -> None:
        me = comm.Get_rank()
        algorithms = algorithms or {}
        levels = levels or {}
        # Per communicator: its buckets in launch order, and its allreduce algorithm.
        self._groups: list[tuple[MPI.Comm, list[list[nn.Parameter]]]] = []
        self._algorithm: list[str] = []
        self._bucket_of: dict[int, tuple[int, int]] = {}  # id(param) -> (group, bucket)
        self._works: list[tuple[Work, Callable[[], None]]] = []
        self._hooks: list[Any] = []
        self._shards: dict[tuple[int, int], BucketShard] = {}  # (group, bucket) -> its shard, when sharded
        self.sharded: list[tuple[MPI.Comm, str, list[BucketShard]]] = []  # per sharded group, for ShardedStep
        self.started_in_backward = 0  # buckets started before ALLREDUCE in the last step
        for group in sorted({h for h in (holders.values() if sets is None else sets) if len(h) > 1}):
            sub = comm.Split(0 if me in group else MPI.UNDEFINED, me)
            if sub == MPI.COMM_NULL:
                continue
            buckets: list[list[nn.Parameter]] = [[]]
            size = 0
            for f in (f for f in order if holders.get(f) == group):
                p = params[f]
                if buckets[-1] and size + p.numel() * 4 > bucket_bytes:
                    buckets.append([])
                    size = 0
                buckets[-1].append(p)
                size += p.numel() * 4
            g = len(self._groups)
            self._groups.append((sub, buckets))
            self._algorithm.append(algorithms.get(group, "mpi"))
            if levels.get(group, 0):
                self._shard_group(g, levels[group])
            for b, ps in enumerate(buckets):
                for p in ps:
                    self._bucket_of[id(p)] = (g, b)
                    self._hooks.append(p.register_post_accumulate_grad_hook(self._on_grad))
        self._armed = False
        self._ready: list[list[int]] = []
        self._next: list[int] = []

    def _shard_group(self, g: int, level: int) -> None:
        sub, buckets = self._groups[g]
        shards = [BucketShard(ps, sub.Get_size(), sub.Get_rank(), level) for ps in buckets]
        for b, shard in enumerate(shards):
            self._shards[(g, b)] = shard
        self.sharded.append((sub, gather_algorithm(self._algorithm[g]), shards))

    def prepare(self) -> None:
        """Before a step's schedule (with the user's gradients set aside): level-1 buckets
        give their parameters ``.grad`` views of their kept flat buffers."""
        for _, _, shards in self.sharded:
            for shard in shards:
                shard.prepare()

    def arm(self) -> None:
        """The next backward is the step's last: start each bucket once its gradients are final."""
        self._armed = True
        self._ready = [[0] * len(buckets) for _, buckets in self._groups]
        self._next = [0] * len(self._groups)
        self.started_in_backward = 0

    def _on_grad(self, p: Tensor) -> None:
        if not self._armed:
            return
        g, b = self._bucket_of[id(p)]
        self._ready[g][b] += 1
        buckets = self._groups[g][1]
        while self._next[g] < len(buckets) and self._ready[g][self._next[g]] == len(buckets[self._next[g]]):
            self._start(g, self._next[g])
            self._next[g] += 1
            self.started_in_backward += 1

    def _start(self, g: int, b: int) -> None:
        sub, buckets = self._groups[g]
        shard = self._shards.get((g, b))
        if shard is not None:
            summed = torch.empty(shard.block, dtype=torch.float32)
            work = collectives.reduce_scatter(shard.take_grads(), summed, sub, gather_algorithm(self._algorithm[g]))
            self._works.append((work, lambda: shard.set_grads(summed)))
            return
        ps = buckets[b]
        flat = torch.empty(sum(p.numel() for p in ps), dtype=torch.float32)
        offset = 0
        for p in ps:
            piece = flat[offset : offset + p.numel()]
            if p.grad is None:
                piece.zero_()
            else:
                piece.copy_(p.grad.reshape(-1))
                p.grad = None  # final: the bucket holds it now, finish() points .grad back at it
            offset += p.numel()
        self._works.append((collectives.allreduce(flat, sub, self._algorithm[g]), lambda: _view_grads(flat, ps)))

    def start(self) -> None:
        """Start summing every bucket not yet started (missing gradients count as zero)."""
        if not self._armed:
            self._next = [0] * len(self._groups)
        for g, (_, buckets) in enumerate(self._groups):
            for b in range(self._next[g], len(buckets)):
                self._start(g, b)
            self._next[g] = len(buckets)
        self._armed = False

    def finish(self) -> None:
        """Wait for the sums; each ``.grad`` becomes a view of its bucket's summed flat tensor
        (a sharded bucket's: each of this rank's pieces', of the summed shard)."""
        for work, done in self._works:
            work.wait()
            done()
        self._works.clear()

    def free(self) -> None:
        """Remove the hooks and free the sub-communicators; a second call does nothing.

        Call it with no sum in flight (between steps). ``MPI_Comm_free`` is
        local in MPICH and Open MPI (see :meth:`rannc_py.RaNNCModule.close`).
        """
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for sub, _ in self._groups:
            sub.Free()
        self._groups.clear()
        self._algorithm.clear()
        self._bucket_of.clear()
        self._shards.clear()
        self.sharded.clear()


def _view_grads(flat: Tensor, ps: list[nn.Parameter]) -> None:
    """Point each parameter's ``.grad`` at its slice of the summed bucket ``flat``."""
    offset = 0
    for p in ps:
        p.grad = flat[offset : offset + p.numel()].view_as(p)
        offset += p.numel()


class HeldGrads:
    """Gradients computed during the forward call, applied when the loss's backward runs.

    The whole schedule (forward and backward of every microbatch) runs inside
    ``RaNNCModule.__call__``; the user's ``.grad`` values are set aside while
    it runs. :meth:`end` returns a function that adds ``scale`` times the
    call's gradients to ``.grad``, so ``(loss / k).backward()`` accumulates
    like eager, and two forward calls before one backward both count.
    """

    def __init__(self, params: Sequence[nn.Parameter]) -> None:
        self._params = list(params)
        self._user: list[Tensor | None] = []

    def begin(self) -> None:
        """Set the user's gradients aside so the schedule accumulates from zero."""
        self._user = [p.grad for p in self._params]
        for p in self._params:
            p.grad = None

    def end(self) -> Callable[[Tensor], None]:
        """Take the schedule's gradients, put the user's back, return their applier."""
        held: list[Tensor | None] = [p.grad for p in self._params]
        for p, g in zip(self._params, self._user):
            p.grad = g
        self._user = []
        params = self._params

        def apply(scale: Tensor) -> None:
            one = bool(scale == 1)
            for p, h in zip(params, held):
                if h is None:
                    continue
                if p.grad is None:
                    p.grad = h if one else h * scale
                else:
                    p.grad.add_(h if one else h * scale)
            held.clear()  # a second backward through the same loss adds nothing

        return apply


def clip_grad_norm_(
    params: dict[str, nn.Parameter],
    owned: set[str],
    comm: MPI.Comm,
    max_norm: float,
    norm_type: float = 2.0,
    shards: Sequence[nn.Parameter] = (),
    uncounted: Sequence[nn.Parameter] = (),
) -> Tensor:
    """Clip local gradients by the global norm over every parameter of the model.

    Each parameter counts once, on the rank in ``owned`` (its lowest holder),
    though replicas and tied copies hold equal gradients; a sharded
    parameter's gradient lives only in its pieces (``shards``), each element
    on one replica, so every piece counts where it is (``uncounted`` pieces,
    copies counted elsewhere, are only scaled). Returns the total
    norm (the same on every rank), like ``torch.nn.utils.clip_grad_norm_``.
    """
    norm_type = float(norm_type)
    grads = {f: p.grad for f, p in params.items() if p.grad is not None}
    pieces = [p.grad for p in shards if p.grad is not None]
    mine = [g for f, g in grads.items() if f in owned] + pieces
    pieces += [p.grad for p in uncounted if p.grad is not None]
    if math.isinf(norm_type):
        local = max((float(g.abs().max()) for g in mine), default=0.0)
        total = comm.allreduce(local, op=MPI.MAX)
    else:
        # float64 partial sums make the result independent of how stages split the model.
        local = sum(float(torch.linalg.vector_norm(g, norm_type, dtype=torch.float64)) ** norm_type for g in mine)
        total = comm.allreduce(local, op=MPI.SUM) ** (1.0 / norm_type)
    total_t = torch.tensor(total, dtype=torch.float32)
    coef = max_norm / (total + 1e-6)
    if coef < 1.0:
        for g in [*grads.values(), *pieces]:
            g.mul_(coef)
    return total_t
