"""Interpret one stage's action list for one step (the schedule is data).

For every action of :mod:`rannc_py.schedule` the executor does one thing:

- ``RECV_F i``: post receives for microbatch i's input activations.
- ``F i``: wait for them, run the stage (without keeping the autograd graph
  on a recompute stage, whose CPU RNG state and running statistics are saved
  instead).
- ``SEND_F i``: post sends of the outputs the next stage reads.
- ``RECV_B i``: post receives for the gradients of those outputs.
- ``B i``: (re-run the forward with the saved RNG state and running
  statistics on a recompute stage, so dropout masks match and batch norm
  counts once) backpropagate, keep the inputs' gradients, free i. Before the
  last backward the gradient synchroniser is told, so it can start summing
  each bucket as soon as its gradients are final.
- ``SEND_B i``: post sends of the inputs' gradients.
- ``ALLREDUCE``: hand over to the gradient synchroniser.

Rows follow the plan's rule (:mod:`rannc_py.runtime.routing`) along each
tensor's batch dimension, as the traced graph records it. Shapes are
exchanged once per input signature (first microbatch of the first step with
new input shapes), never per step. The last stage weights each of its
microbatch losses by its share of the global batch, so the sum over all
replicas and microbatches is the mean of per-microbatch losses.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

import torch
from mpi4py import MPI
from torch import Tensor

from rannc_py.errors import ConfigError
from rannc_py.runtime import transport
from rannc_py.runtime.routing import chunks, stage_routes, unbatched_source
from rannc_py.runtime.stage import StageProgram, TensorMeta, describe
from rannc_py.schedule import Action, ActionKind

K = ActionKind
_TAG_META = 32767 - 1
_ACT, _GRAD = 0, 1


def _tag(kind: int, mb: int, k: int) -> int:
    # Matching is already fixed by MPI's in-order delivery per (pair, tag);
    # distinct tags only make mismatches loud. Stays under the guaranteed 32767.
    return (kind * 128 + mb % 128) * 64 + k % 64


@dataclass
class Step:
    """The inputs of one step, the same on every rank.

    Attributes:
        batch: global batch rows.
        microbatches: microbatches in this step.
        inputs: the model's flattened inputs for the global batch (rows first).
        signature: hashable description of the inputs' shapes and dtypes.
        training: run backward actions (autograd enabled and a training schedule).
    """

    batch: int
    microbatches: int
    inputs: dict[str, Tensor]
    signature: Hashable
    training: bool


@dataclass
class StageResult:
    """What the last stage produced: per microbatch, its outputs (detached)."""

    outputs: list[dict[str, Tensor]] = field(default_factory=list)
    loss_name: str | None = None
    weight: float = 0.0  # share of the global batch in one of this replica's microbatches
    rows: int = 0  # rows of this replica's chunk of a microbatch


class Executor:
    """Runs one stage replica's actions; one instance per rank, reused every step.

    Args:
        program: this rank's stage.
        stage: its index.
        stage_ranks: ``stage_ranks[s]`` are the ranks of ``comm`` holding stage s.
        comm: the runtime's communicator (a duplicate of the world).
        recompute: drop activations after forward, re-run forward in backward.
        keep_outputs: the last stage keeps every microbatch's outputs for the
            caller; False keeps only the scalar ones (the loss) after the
            first microbatch, whose outputs still describe them. Default True.
    """

    def __init__(
        self,
        program: StageProgram,
        stage: int,
        stage_ranks: list[list[int]],
        comm: MPI.Comm,
        recompute: bool,
        keep_outputs: bool = True,
    ) -> None:
        self.prog = program
        self.keep_outputs = keep_outputs
        self.stage = stage
        self.ranks = stage_ranks
        self.comm = comm
        self.recompute = recompute
        self.replica = stage_ranks[stage].index(comm.Get_rank())
        self.last = stage == len(stage_ranks) - 1
        self._in_meta: dict[Hashable, list[TensorMeta]] = {}
        self._out_meta_sent: set[Hashable] = set()

    # ----------------------------------------------------------------- step
    def run(self, actions: tuple[Action, ...], step: Step, before_last_backward: Callable[[], None],
            on_allreduce: Callable[[], None]) -> StageResult:
        """Execute ``actions`` for ``step``; return the last stage's outputs (empty elsewhere).

        ``before_last_backward`` runs just before the last microbatch's
        backward, ``on_allreduce`` at the ALLREDUCE action.
        """
        self._step = step
        self._rows = step.batch // step.microbatches
        lo, hi = chunks(self._rows, len(self.ranks[self.stage]))[self.replica]
        self._lo, self._n = lo, hi - lo
        self._recv: dict[int, list[tuple[list[Tensor], TensorMeta]]] = {}
        self._recv_work: dict[int, list[transport.Work]] = {}
        self._ins: dict[int, dict[str, Tensor]] = {}
        self._outs: dict[int, dict[str, Tensor]] = {}
        self._rng: dict[int, tuple[Tensor, list[Tensor]]] = {}
        backwards = [a.microbatch for a in actions if a.kind is K.BACKWARD]
        self._last_b = backwards[-1] if backwards else None
        self._before_last_backward = before_last_backward
        self._in_grads: dict[int, list[Tensor]] = {}
        self._sends: list[transport.Work] = []
        self.result = StageResult(weight=self._n / (self._rows * step.microbatches), rows=self._n)
        handlers = {
            K.RECV_ACT: self._recv_act,
            K.FORWARD: self._forward,
            K.SEND_ACT: self._send_act,
            K.RECV_GRAD: self._recv_grad,
            K.BACKWARD: self._backward,
            K.SEND_GRAD: self._send_grad,
        }
        for a in actions:
            if a.kind is K.ALLREDUCE:
                on_allreduce()
            else:
                assert a.microbatch is not None
                handlers[a.kind](a.microbatch)
        transport.wait_all(self._sends)
        result, self.result = self.result, StageResult()
        return result

    # -------------------------------------------------------------- helpers
    def _peer(self, stage: int, replica: int) -> int:
        return self.ranks[stage][replica]

    def _routes(self, src_stage: int) -> list:
        return stage_routes(self._rows, len(self.ranks[src_stage]), len(self.ranks[src_stage + 1]))

    def _user_inputs(self, mb: int) -> dict[str, Tensor]:
        lo = mb * self._rows + self._lo
        out = {}
        for name, t in self._step.inputs.items():
            if name in self.prog.input_names:
                dim = self.prog.batch_dims.get(name)
                out[name] = t if dim is None else t.narrow(dim, lo, self._n)
        return out

    # ---------------------------------------------------------- activations
    def _recv_act(self, mb: int) -> None:
        prev, me = self.stage - 1, self.replica
        routes = [r for r in self._routes(prev) if r.dst == me]
        sig = self._step.signature
        if sig not in self._in_meta:
            metas = None
            for r in routes:  # every partner describes the same tensors
                got = self.comm.recv(source=self._peer(prev, r.src), tag=_TAG_META)
                metas = metas or got
            assert metas is not None
            self._in_meta[sig] = metas
        src_un = unbatched_source(self._rows, len(self.ranks[prev]), len(self.ranks[self.stage]), me)
        pending, works = [], []
        for k, meta in enumerate(self._in_meta[sig]):
            pieces = []
            if meta.batch_dim is None:
                pieces.append(torch.empty(meta.shape, dtype=meta.dtype))
                works.append(transport.irecv(pieces[-1], self._peer(prev, src_un), _tag(_ACT, mb, k), self.comm))
            else:
                for r in routes:
                    pieces.append(torch.empty(meta.with_rows(r.rows), dtype=meta.dtype))
                    works.append(transport.irecv(pieces[-1], self._peer(prev, r.src), _tag(_ACT, mb, k), self.comm))
            pending.append((pieces, meta))
        self._recv[mb], self._recv_work[mb] = pending, works

    def _forward(self, mb: int) -> None:
        values = self._user_inputs(mb)
        if self.stage > 0:
            transport.wait_all(self._recv_work.pop(mb))
            for name, (pieces, meta) in zip(self.prog.recv_names, self._recv.pop(mb)):
                t = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=meta.batch_dim or 0)
                if self._step.training and t.is_floating_point():
                    t.requires_grad_(True)
                values[name] = t
        train = self._step.training
        if train and self.recompute:
            self._rng[mb] = torch.get_rng_state(), [b.clone() for b in self.prog.updated_buffers]
        with torch.set_grad_enabled(train and not self.recompute):
            outs = self.prog(values)
        if train:
            self._ins[mb] = values
        self._outs[mb] = outs
        if self.last:
            self._record(mb, outs)

    def _record(self, mb: int, outs: dict[str, Tensor]) -> None:
        if self.result.loss_name is None:
            scalars = [n for n, t in outs.items() if t.dim() == 0 and t.is_floating_point()]
            self.result.loss_name = scalars[0] if scalars else None
            if self._step.training and self.result.loss_name is None:
                raise ConfigError(
                    "the model returned no scalar loss (outputs: "
                    f"{ {n: tuple(t.shape) for n, t in outs.items()} }); a trained model must "
                    "return its loss, e.g. pass labels to a Hugging Face model"
                )
        keep = self.keep_outputs or not self.result.outputs
        # Not returned to the caller (e.g. logits at vocabulary size): not worth holding all step.
        self.result.outputs.append({n: t.detach() for n, t in outs.items() if keep or t.dim() == 0})
        if not self._step.training:
            self._outs.pop(mb)

    def _send_act(self, mb: int) -> None:
        nxt, me = self.stage + 1, self.replica
        routes = [r for r in self._routes(self.stage) if r.src == me]
        outs = self._outs[mb]
        tensors = [outs[n].detach().contiguous() for n in self.prog.send_names]
        metas = [describe(t, n, self.prog.batch_dims.get(n), self._n) for n, t in zip(self.prog.send_names, tensors)]
        sig = self._step.signature
        if sig not in self._out_meta_sent:
            for r in routes:
                self.comm.send(metas, dest=self._peer(nxt, r.dst), tag=_TAG_META)
            self._out_meta_sent.add(sig)
        n_next = len(self.ranks[nxt])
        un_dsts = [d for d in range(n_next) if unbatched_source(self._rows, len(self.ranks[self.stage]), n_next, d) == me]
        for k, (t, meta) in enumerate(zip(tensors, metas)):
            if meta.batch_dim is None:
                for d in un_dsts:
                    self._sends.append(transport.isend(t, self._peer(nxt, d), _tag(_ACT, mb, k), self.comm))
            else:
                for r in routes:
                    piece = meta.rows(t, r.src_offset, r.rows).contiguous()
                    self._sends.append(transport.isend(piece, self._peer(nxt, r.dst), _tag(_ACT, mb, k), self.comm))
        if not self._step.training:
            self._outs.pop(mb)

    # ------------------------------------------------------------ gradients
    def _recv_grad(self, mb: int) -> None:
        nxt, me = self.stage + 1, self.replica
        routes = [r for r in self._routes(self.stage) if r.src == me]
        n_next = len(self.ranks[nxt])
        un_dsts = [d for d in range(n_next) if unbatched_source(self._rows, len(self.ranks[self.stage]), n_next, d) == me]
        outs = self._outs[mb]
        pending, works = [], []
        for k, name in enumerate(self.prog.send_names):
            t = outs[name]
            if not t.is_floating_point():
                continue
            meta = describe(t, name, self.prog.batch_dims.get(name), self._n)
            pieces = []
            if meta.batch_dim is None:
                for d in un_dsts:
                    pieces.append(torch.empty(meta.shape, dtype=meta.dtype))
                    works.append(transport.irecv(pieces[-1], self._peer(nxt, d), _tag(_GRAD, mb, k), self.comm))
            else:
                for r in routes:
                    pieces.append(torch.empty(meta.with_rows(r.rows), dtype=meta.dtype))
                    works.append(transport.irecv(pieces[-1], self._peer(nxt, r.dst), _tag(_GRAD, mb, k), self.comm))
            pending.append((name, pieces, meta))
        self._recv[mb], self._recv_work[mb] = pending, works  # type: ignore[assignment]

    def _backward(self, mb: int) -> None:
        values = self._ins.pop(mb)
        outs = self._outs.pop(mb)
        if self.recompute:
            outs = self._recompute(mb, values)
        tensors: list[Tensor] = []
        grads: list[Tensor] = []
        if self.last:
            loss = outs[self.result.loss_name]  # type: ignore[index]
            tensors, grads = [loss], [torch.full_like(loss, self.result.weight)]
        else:
            transport.wait_all(self._recv_work.pop(mb))
            for name, pieces, meta in self._recv.pop(mb):  # type: ignore[misc]
                t = outs[name]
                if meta.batch_dim is None:
                    g = torch.stack(pieces).sum(0) if pieces else torch.zeros_like(t)
                else:
                    g = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=meta.batch_dim)
                if t.requires_grad:
                    tensors.append(t)
                    grads.append(g)
        if mb == self._last_b:
            self._before_last_backward()
        if tensors:
            torch.autograd.backward(tensors, grads)
        if self.stage > 0:
            grads_in: list[Tensor] = []
            for n in self.prog.recv_names:
                if values[n].is_floating_point():
                    grad = values[n].grad
                    grads_in.append(grad if grad is not None else torch.zeros_like(values[n]))
            self._in_grads[mb] = grads_in

    def _recompute(self, mb: int, values: dict[str, Tensor]) -> dict[str, Tensor]:
        """Re-run microbatch ``mb``'s forward as it first ran: same RNG draws, same running statistics."""
        rng, buffers = self._rng.pop(mb)
        saved_rng = torch.get_rng_state()
        saved = [b.clone() for b in self.prog.updated_buffers]
        torch.set_rng_state(rng)
        with torch.no_grad():
            for b, v in zip(self.prog.updated_buffers, buffers):
                b.copy_(v)
        with torch.enable_grad():
            outs = self.prog(values)
        torch.set_rng_state(saved_rng)
        with torch.no_grad():
            for b, v in zip(self.prog.updated_buffers, saved):
                b.copy_(v)
        return outs

    def _send_grad(self, mb: int) -> None:
        prev, me = self.stage - 1, self.replica
        routes = [r for r in self._routes(prev) if r.dst == me]
        src_un = unbatched_source(self._rows, len(self.ranks[prev]), len(self.ranks[self.stage]), me)
        grads = iter(self._in_grads.pop(mb))
        for k, meta in enumerate(self._in_meta[self._step.signature]):
            if not meta.dtype.is_floating_point:
                continue
            g = next(grads).contiguous()
            if meta.batch_dim is None:
                self._sends.append(transport.isend(g, self._peer(prev, src_un), _tag(_GRAD, mb, k), self.comm))
            else:
                for r in routes:
                    piece = meta.rows(g, r.dst_offset, r.rows).contiguous()
                    self._sends.append(transport.isend(piece, self._peer(prev, r.src), _tag(_GRAD, mb, k), self.comm))
