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
- ``I i`` / ``W i``: the backward of i in two parts (zero-bubble schedules,
  :mod:`rannc_py.runtime.backward`): I computes the inputs' gradients, which
  SEND_B sends at once, and keeps the graph; W later accumulates the
  weight gradients and frees i. Bitwise the gradients of B. The gradient
  synchroniser is told before the last W (the weight gradients become final
  there, not at the last I).
- ``SEND_B i``: post sends of the inputs' gradients.
- ``ALLREDUCE``: hand over to the gradient synchroniser.

A rank of a schedule with several model chunks (interleaved, ZB-V) holds
several stages, one executor each; :func:`run_actions` walks the rank's one
action list and hands each action to the executor of its stage. Two adjacent
stages on the same ranks (ZB-V's turn) pass the activations and their
gradients in memory, without a message (the schedule has no send or receive
there). Messages carry the chunk of their boundary in their tag
(:func:`~rannc_py.runtime.routing.message_tag`), so two chunks exchanging with
the same pair of ranks cannot be confused. The gradient synchroniser is told
before the rank's last backward over all its stages, and the ALLREDUCE
actions (one per stage held) hand over once.

Rows follow the plan's rule (:mod:`rannc_py.runtime.routing`) along each
tensor's batch dimension, as the traced graph records it. Shapes are
exchanged once per input signature (first microbatch of the first step with
new input shapes), never per step. The last stage weights each of its
microbatch losses by its share of the global batch, so the sum over all
replicas and microbatches is the mean of per-microbatch losses.

What one step holds between its actions (posted receives, activations kept
for backward, sends in flight) lives in a :class:`_StepState` made by
:func:`run_actions` and dropped when it returns; the executor itself keeps
only what outlives a step (the stage, its partners, the tensor descriptions
exchanged per input signature).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from mpi4py import MPI
from torch import Tensor

from rannc_py.comm import p2p
from rannc_py.comm.work import Work, wait_all
from rannc_py.errors import ConfigError
from rannc_py.runtime.backward import WeightWork, backward_input, backward_weight
from rannc_py.runtime.routing import (
    ACTIVATION,
    GRADIENT,
    chunks,
    message_tag,
    meta_tag,
    stage_routes,
    unbatched_source,
)
from rannc_py.runtime.stage import StageProgram, WireMeta, describe
from rannc_py.runtime.trace import StepTracer, clock_ns
from rannc_py.schedule import Action, ActionKind

K = ActionKind


@dataclass
class StepInputs:
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


@dataclass(frozen=True)
class _Peers:
    """This replica's partners at one stage boundary, for one microbatch.

    Attributes:
        batched: ``(rank, row offset in this replica's chunk, rows)`` per
            partner exchanging rows (a batched tensor travels in these pieces).
        unbatched: the ranks a tensor without a batch dimension goes to or
            comes from (whole, one copy per rank).
    """

    batched: tuple[tuple[int, int, int], ...]
    unbatched: tuple[int, ...]


@dataclass
class _Incoming:
    """Receives posted for one microbatch: per tensor ``(name, meta, pieces)``, and their transfers."""

    tensors: list[tuple[str, WireMeta, list[Tensor]]]
    works: list[Work]


@dataclass
class _StepState:
    """What one run of the action list holds between actions; dropped when the run ends.

    Attributes:
        step: the step's inputs.
        rows: rows of one microbatch.
        lo: first row of this replica's chunk of a microbatch.
        n: rows of that chunk.
        prev: partners in the previous stage (None on the first stage).
        next: partners in the next stage (None on the last stage).
        last_backward: the microbatch whose backward (B, or W when split) is the step's last
            (None: no backward).
        before_last_backward: called just before that backward.
        result: what the last stage returns.
        incoming: receives posted, by microbatch.
        ins: inputs kept for backward, by microbatch.
        outs: outputs kept for sending and backward, by microbatch.
        rng: CPU RNG state and updated buffers before a recomputed forward, by microbatch.
        in_grads: gradients of the inputs received from the previous stage, by microbatch.
        weights: what W still has to do after I, by microbatch.
        sends: sends in flight.
        handoff: what adjacent stages on this rank pass each other in memory, by
            ``(ACTIVATION or GRADIENT, boundary (the lower stage), microbatch)``; one dict shared
            by the executors of a rank's stages.
    """

    step: StepInputs
    rows: int
    lo: int
    n: int
    prev: _Peers | None
    next: _Peers | None
    last_backward: int | None
    before_last_backward: Callable[[], None]
    result: StageResult
    incoming: dict[int, _Incoming] = field(default_factory=dict)
    ins: dict[int, dict[str, Tensor]] = field(default_factory=dict)
    outs: dict[int, dict[str, Tensor]] = field(default_factory=dict)
    rng: dict[int, tuple[Tensor, list[Tensor]]] = field(default_factory=dict)
    in_grads: dict[int, list[Tensor]] = field(default_factory=dict)
    weights: dict[int, WeightWork] = field(default_factory=dict)
    sends: list[Work] = field(default_factory=list)
    handoff: dict[tuple[int, int, int], Any] = field(default_factory=dict)


def _join(pieces: list[Tensor], meta: WireMeta) -> Tensor:
    """One tensor from its received pieces.

    Rows are concatenated along the batch dimension; copies of an unbatched
    tensor are summed (the gradients of one tensor sent to several replicas),
    and no copy at all is a zero tensor.
    """
    if meta.batch_dim is not None:
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=meta.batch_dim)
    if not pieces:
        return torch.zeros(meta.shape, dtype=meta.dtype)
    return pieces[0] if len(pieces) == 1 else torch.stack(pieces).sum(0)


class Executor:
    """Runs one stage replica's actions; one instance per stage a rank holds, reused every step.

    Args:
        program: the stage's program on this rank.
        stage: its index.
        stage_ranks: ``stage_ranks[s]`` are the ranks of ``comm`` holding stage s.
        comm: the runtime's communicator (a duplicate of the world).
        recompute: drop activations after forward, re-run forward in backward.
        keep_outputs: the last stage keeps every microbatch's outputs for the
            caller; False keeps only the scalar ones (the loss) after the
            first microbatch, whose outputs still describe them. Default True.
        positions: pipeline positions (stages per model chunk; a message's tag
            names its boundary's chunk, ``stage // positions``). Default None:
            one stage per rank, every boundary in chunk 0.
    """

    def __init__(
        self,
        program: StageProgram,
        stage: int,
        stage_ranks: list[list[int]],
        comm: MPI.Comm,
        recompute: bool,
        keep_outputs: bool = True,
        positions: int | None = None,
    ) -> None:
        self.prog = program
        self.keep_outputs = keep_outputs
        self.stage = stage
        self.ranks = stage_ranks
        self.comm = comm
        self.recompute = recompute
        self.replica = stage_ranks[stage].index(comm.Get_rank())
        self.last = stage == len(stage_ranks) - 1
        # an adjacent stage on the same ranks (ZB-V's turn) passes its tensors in memory
        self.local_prev = stage > 0 and stage_ranks[stage - 1] == stage_ranks[stage]
        self.local_next = not self.last and stage_ranks[stage + 1] == stage_ranks[stage]
        per_chunk = positions or len(stage_ranks)
        self._chunk_in = (stage - 1) // per_chunk if stage > 0 else 0  # the boundary with the previous stage
        self._chunk_out = stage // per_chunk  # the boundary with the next stage
        self._in_meta: dict[Hashable, list[WireMeta]] = {}
        self._out_meta_sent: set[Hashable] = set()

    # ----------------------------------------------------------------- step
    def _handlers(self) -> dict[ActionKind, Callable[[_StepState, int], None]]:
        return {
            K.RECV_ACT: self._recv_act,
            K.FORWARD: self._forward,
            K.SEND_ACT: self._send_act,
            K.RECV_GRAD: self._recv_grad,
            K.BACKWARD: self._backward,
            K.BACKWARD_INPUT: self._backward_input,
            K.BACKWARD_WEIGHT: self._backward_weight,
            K.SEND_GRAD: self._send_grad,
        }

    def _begin(self, step: StepInputs, last_backward: int | None, before_last_backward: Callable[[], None],
               handoff: dict[tuple[int, int, int], Any]) -> _StepState:
        rows = step.batch // step.microbatches
        lo, hi = chunks(rows, len(self.ranks[self.stage]))[self.replica]
        return _StepState(
            step=step,
            rows=rows,
            lo=lo,
            n=hi - lo,
            prev=self._peers(rows, self.stage - 1) if self.stage > 0 and not self.local_prev else None,
            next=None if self.last or self.local_next else self._peers(rows, self.stage + 1),
            last_backward=last_backward,
            before_last_backward=before_last_backward,
            result=StageResult(weight=(hi - lo) / (rows * step.microbatches), rows=hi - lo),
            handoff=handoff,
        )

    # -------------------------------------------------------------- helpers
    def _peers(self, rows: int, other: int) -> _Peers:
        """This replica's partners in the adjacent stage ``other`` for a microbatch of ``rows`` rows."""
        me, mine, theirs = self.replica, len(self.ranks[self.stage]), len(self.ranks[other])
        ranks = self.ranks[other]
        if other < self.stage:  # the previous stage sends to this one
            batched = tuple((ranks[r.src], r.dst_offset, r.rows) for r in stage_routes(rows, theirs, mine) if r.dst == me)
            return _Peers(batched, (ranks[unbatched_source(rows, theirs, mine, me)],))
        batched = tuple((ranks[r.dst], r.src_offset, r.rows) for r in stage_routes(rows, mine, theirs) if r.src == me)
        unbatched = tuple(ranks[d] for d in range(theirs) if unbatched_source(rows, mine, theirs, d) == me)
        return _Peers(batched, unbatched)

    def _post_recvs(self, specs: list[tuple[int, str, WireMeta]], peers: _Peers | None, kind: int,
                    mb: int) -> _Incoming:
        """Post the receives of tensors ``(index, name, meta)`` of microbatch ``mb`` from ``peers``."""
        assert peers is not None
        incoming = _Incoming(tensors=[], works=[])
        for k, name, meta in specs:
            if meta.batch_dim is None:
                sources = [(rank, meta.shape) for rank in peers.unbatched]
            else:
                sources = [(rank, meta.with_rows(rows)) for rank, _, rows in peers.batched]
            pieces = [torch.empty(shape, dtype=meta.dtype) for _, shape in sources]
            tag = message_tag(kind, mb, k, self._chunk_in if kind == ACTIVATION else self._chunk_out)
            incoming.works += [p2p.irecv(t, rank, tag, self.comm) for (rank, _), t in zip(sources, pieces)]
            incoming.tensors.append((name, meta, pieces))
        return incoming

    def _post_sends(self, st: _StepState, tensors: list[tuple[int, Tensor, WireMeta]], peers: _Peers | None,
                    kind: int, mb: int) -> None:
        """Post the sends of tensors ``(index, contiguous tensor, meta)`` of microbatch ``mb`` to ``peers``."""
        assert peers is not None
        for k, t, meta in tensors:
            tag = message_tag(kind, mb, k, self._chunk_out if kind == ACTIVATION else self._chunk_in)
            if meta.batch_dim is None:
                st.sends += [p2p.isend(t, rank, tag, self.comm) for rank in peers.unbatched]
            else:
                st.sends += [p2p.isend(meta.rows(t, offset, rows).contiguous(), rank, tag, self.comm)
                             for rank, offset, rows in peers.batched]

    def _user_inputs(self, st: _StepState, mb: int) -> dict[str, Tensor]:
        lo = mb * st.rows + st.lo
        out = {}
        for name, t in st.step.inputs.items():
            if name in self.prog.input_names:
                dim = self.prog.batch_dims.get(name)
                out[name] = t if dim is None else t.narrow(dim, lo, st.n)
        return out

    # ---------------------------------------------------------- activations
    def _recv_act(self, st: _StepState, mb: int) -> None:
        sig = st.step.signature
        if sig not in self._in_meta:  # every partner describes the same tensors
            assert st.prev is not None
            described = [self.comm.recv(source=rank, tag=meta_tag(self._chunk_in)) for rank, _, _ in st.prev.batched]
            self._in_meta[sig] = described[0]
        specs = [(k, name, meta) for k, (name, meta) in enumerate(zip(self.prog.recv_names, self._in_meta[sig]))]
        st.incoming[mb] = self._post_recvs(specs, st.prev, ACTIVATION, mb)

    def _forward(self, st: _StepState, mb: int) -> None:
        values = self._user_inputs(st, mb)
        train = st.step.training
        if self.local_prev:
            for name, t in st.handoff.pop((ACTIVATION, self.stage - 1, mb)).items():
                if train and t.is_floating_point():
                    t.requires_grad_(True)
                values[name] = t
        elif self.stage > 0:
            incoming = st.incoming.pop(mb)
            wait_all(incoming.works)
            for name, meta, pieces in incoming.tensors:
                t = _join(pieces, meta)
                if train and t.is_floating_point():
                    t.requires_grad_(True)
                values[name] = t
        if train and self.recompute:
            st.rng[mb] = torch.get_rng_state(), [b.clone() for b in self.prog.updated_buffers]
        with torch.set_grad_enabled(train and not self.recompute):
            outs = self.prog(values)
        if train:
            st.ins[mb] = values
        st.outs[mb] = outs
        if self.last:
            self._record(st, mb, outs)
        elif self.local_next:  # the next stage reads them here, as if received (a leaf of its own graph)
            st.handoff[(ACTIVATION, self.stage, mb)] = {n: outs[n].detach() for n in self.prog.send_names}
            if not train:
                st.outs.pop(mb)

    def _record(self, st: _StepState, mb: int, outs: dict[str, Tensor]) -> None:
        result = st.result
        if result.loss_name is None:
            scalars = [n for n, t in outs.items() if t.dim() == 0 and t.is_floating_point()]
            result.loss_name = scalars[0] if scalars else None
            if st.step.training and result.loss_name is None:
                raise ConfigError(
                    "the model returned no scalar loss (outputs: "
                    f"{ {n: tuple(t.shape) for n, t in outs.items()} }); a trained model must "
                    "return its loss, e.g. pass labels to a Hugging Face model"
                )
        keep = self.keep_outputs or not result.outputs
        # Not returned to the caller (e.g. logits at vocabulary size): not worth holding all step.
        result.outputs.append({n: t.detach() for n, t in outs.items() if keep or t.dim() == 0})
        if not st.step.training:
            st.outs.pop(mb)

    def _send_act(self, st: _StepState, mb: int) -> None:
        outs = st.outs[mb]
        names = self.prog.send_names
        tensors = [outs[n].detach().contiguous() for n in names]
        metas = [describe(t, n, self.prog.batch_dims.get(n), st.n) for n, t in zip(names, tensors)]
        sig = st.step.signature
        if sig not in self._out_meta_sent:
            assert st.next is not None
            for rank, _, _ in st.next.batched:
                self.comm.send(metas, dest=rank, tag=meta_tag(self._chunk_out))
            self._out_meta_sent.add(sig)
        self._post_sends(st, list(zip(range(len(names)), tensors, metas)), st.next, ACTIVATION, mb)
        if not st.step.training:
            st.outs.pop(mb)

    # ------------------------------------------------------------ gradients
    def _recv_grad(self, st: _StepState, mb: int) -> None:
        outs = st.outs[mb]
        specs = [
            (k, name, describe(outs[name], name, self.prog.batch_dims.get(name), st.n))
            for k, name in enumerate(self.prog.send_names)
            if outs[name].is_floating_point()
        ]
        st.incoming[mb] = self._post_recvs(specs, st.next, GRADIENT, mb)

    def _backward(self, st: _StepState, mb: int) -> None:
        values, tensors, grads = self._backward_roots(st, mb)
        if mb == st.last_backward:
            st.before_last_backward()
        if tensors:
            torch.autograd.backward(tensors, grads)
        if self.stage > 0:
            received = self._received(values)
            st.in_grads[mb] = [torch.zeros_like(t) if t.grad is None else t.grad for t in received]
            self._hand_back(st, mb)

    def _backward_input(self, st: _StepState, mb: int) -> None:
        values, tensors, grads = self._backward_roots(st, mb)
        received = self._received(values) if self.stage > 0 else []
        found: list[Tensor | None] = [None] * len(received)
        if tensors:
            params = [p for p in self.prog.module.parameters() if p.requires_grad]
            found, st.weights[mb] = backward_input(tensors, grads, received, params)
        if self.stage > 0:
            st.in_grads[mb] = [torch.zeros_like(t) if g is None else g for t, g in zip(received, found)]
            self._hand_back(st, mb)

    def _hand_back(self, st: _StepState, mb: int) -> None:
        """The inputs' gradients of ``mb`` to the previous stage when it is on this rank (no SEND_B)."""
        if self.local_prev:
            st.handoff[(GRADIENT, self.stage - 1, mb)] = st.in_grads.pop(mb)

    def _backward_weight(self, st: _StepState, mb: int) -> None:
        if mb == st.last_backward:
            st.before_last_backward()
        work = st.weights.pop(mb, None)
        if work is not None:
            backward_weight(work)

    def _received(self, values: dict[str, Tensor]) -> list[Tensor]:
        """The floating-point inputs received from the previous stage (those with a gradient to send)."""
        return [values[n] for n in self.prog.recv_names if values[n].is_floating_point()]

    def _backward_roots(self, st: _StepState, mb: int) -> tuple[dict[str, Tensor], list[Tensor], list[Tensor]]:
        """Microbatch ``mb``'s inputs (freed from the step state), and the outputs to back-propagate
        from with their gradients (the weighted loss, or the gradients from the next stage)."""
        values = st.ins.pop(mb)
        outs = st.outs.pop(mb)
        if self.recompute:
            outs = self._recompute(st, mb, values)
        if self.last:
            assert st.result.loss_name is not None  # checked when the forward recorded it
            loss = outs[st.result.loss_name]
            return values, [loss], [torch.full_like(loss, st.result.weight)]
        if self.local_next:  # the next stage's input gradients, in its received order (floating point)
            grads = st.handoff.pop((GRADIENT, self.stage, mb))
            names = [n for n in self.prog.send_names if outs[n].is_floating_point()]
            local = [(outs[n], g) for n, g in zip(names, grads, strict=True) if outs[n].requires_grad]
            return values, [t for t, _ in local], [g for _, g in local]
        incoming = st.incoming.pop(mb)
        wait_all(incoming.works)
        pairs = [(outs[name], _join(pieces, meta)) for name, meta, pieces in incoming.tensors
                 if outs[name].requires_grad]
        return values, [t for t, _ in pairs], [g for _, g in pairs]

    def _recompute(self, st: _StepState, mb: int, values: dict[str, Tensor]) -> dict[str, Tensor]:
        """Re-run microbatch ``mb``'s forward as it first ran: same RNG draws, same running statistics."""
        rng, buffers = st.rng.pop(mb)
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

    def _send_grad(self, st: _StepState, mb: int) -> None:
        grads = iter(st.in_grads.pop(mb))
        tensors = [
            (k, next(grads).contiguous(), meta)
            for k, meta in enumerate(self._in_meta[st.step.signature])
            if meta.dtype.is_floating_point
        ]
        self._post_sends(st, tensors, st.prev, GRADIENT, mb)


def run_actions(executors: Mapping[int, Executor], actions: tuple[Action, ...], step: StepInputs,
                before_last_backward: Callable[[], None], on_allreduce: Callable[[], None],
                tracer: StepTracer | None = None) -> StageResult:
    """Execute one rank's ``actions`` for ``step``, each by the executor of its stage.

    Args:
        executors: stage -> the executor of every stage this rank holds.
        actions: the rank's action list (of several stages with model chunks).
        step: the step's inputs.
        before_last_backward: runs just before the rank's last backward (B or W) over all
            its stages, when every later gradient is final.
        on_allreduce: runs at the first ALLREDUCE action (one per stage held; the others
            have nothing left to hand over).
        tracer: records each action's span when given.
    Returns:
        The last stage's outputs when this rank holds it, else an empty result.
    """
    backwards = [(a.stage, a.microbatch) for a in actions if a.kind in (K.BACKWARD, K.BACKWARD_WEIGHT)]
    last_stage, last_mb = backwards[-1] if backwards else (None, None)
    handoff: dict[tuple[int, int, int], Any] = {}
    states = {s: ex._begin(step, last_mb if s == last_stage else None, before_last_backward, handoff)
              for s, ex in executors.items()}
    handlers = {s: ex._handlers() for s, ex in executors.items()}
    handed_over = False
    for a in actions:
        start = clock_ns() if tracer is not None else 0
        if a.kind is K.ALLREDUCE:
            if not handed_over:
                on_allreduce()
                handed_over = True
        else:
            assert a.microbatch is not None
            handlers[a.stage][a.kind](states[a.stage], a.microbatch)
        if tracer is not None:
            tracer.action(a, start)
    for st in states.values():
        wait_all(st.sends)
    last = max(executors)
    return states[last].result
