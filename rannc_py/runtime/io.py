"""The step's edges: gather the ranks' local batches, return outputs to each rank.

Inputs: every rank passes its local batch; the tensors that carry the batch
(the traced graph gives their batch dimension) are gathered into the global
batch (rank order), so each stage replica can read its rows of every
microbatch. Other tensors must be the same on every rank and are used as given.

Outputs: scalar outputs (the loss first among them) are combined as the
weighted mean over all microbatches and replicas and are the same on every
rank; batched outputs travel from the last stage to the rank whose local rows
they are (see :func:`rannc_py.runtime.routing.output_routes`), along their
batch dimension.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch
from mpi4py import MPI
from torch import Tensor

from rannc_py.comm import collectives, p2p
from rannc_py.comm.work import Work, wait_all
from rannc_py.errors import ConfigError
from rannc_py.runtime.executor import StageResult, StepInputs
from rannc_py.runtime.routing import OUTPUT, message_tag, output_routes

# (name, kind, shape per chunk, dtype, batch dim, entries per row) of one output; see _describe_outputs.
_OutputDesc = tuple[str, str, tuple[int, ...], torch.dtype, int | None, int]


@dataclass
class StepOutputs:
    """The model's outputs on this rank after one step.

    Attributes:
        values: every output by name (None for batched ones not returned).
        loss_name: the output that is the loss (the first scalar one), or
            None when the model returned no scalar.
    """

    values: dict[str, Any]
    loss_name: str | None


def _allgather(t: Tensor, comm: MPI.Comm) -> Tensor:
    """Every rank's ``t`` stacked in rank order (shape ``(ranks, *t.shape)``).

    Through the communication engine, not a blocking MPI call: a rank that
    arrives early (e.g. the last pipeline stage, idle while the first one
    runs its last backward) sleeps on a condition variable instead of
    busy-polling MPI, which would take a core from the ranks still computing.
    """
    t = t.contiguous()
    out = torch.empty((comm.Get_size(), *t.shape), dtype=t.dtype)
    collectives.allgather(t, out, comm).wait()
    return out


def _digest(sig: list[tuple[str, tuple[int, ...], str]]) -> Tensor:
    """A fixed-size fingerprint of an input signature, to compare across ranks without pickling."""
    h = hashlib.sha256(repr(sig).encode()).digest()[:8]
    return torch.frombuffer(bytearray(h), dtype=torch.int64)


def gather_inputs(
    local: dict[str, Tensor], batch_dims: dict[str, int | None], comm: MPI.Comm
) -> tuple[dict[str, Tensor], int]:
    """Concatenate the ranks' local batches; return ``(global inputs, global batch rows)``.

    ``batch_dims`` maps input names to their batch dimension (None or absent:
    not batched).

    Raises:
        ConfigError: the ranks' inputs differ in names, shapes or dtypes, or
            carry no batch.
    """
    batched = {n: d for n, d in batch_dims.items() if d is not None and n in local}
    if not batched:
        raise ConfigError(f"none of the inputs {list(local)} carries the batch; pass batched tensors")
    name0, dim0 = next(iter(batched.items()))
    rows = int(local[name0].shape[dim0])
    sig = [(n, tuple(t.shape), str(t.dtype)) for n, t in local.items()]
    world = comm.Get_size()
    if world == 1:
        return dict(local), rows
    digests = _allgather(_digest(sig), comm)
    if bool((digests != digests[0]).any()):
        sigs = comm.allgather(sig)  # every rank saw the mismatch: spell it out
        diff = {r: s for r, s in enumerate(sigs) if s != sigs[0]}
        raise ConfigError(
            f"ranks passed inputs of different structure or shape: rank 0 {sigs[0]}, others {diff}; "
            "every rank must pass a local batch of the same shape"
        )
    out = {}
    for name, t in local.items():
        dim = batched.get(name)
        if dim is None:
            out[name] = t
            continue
        full = _allgather(t, comm)
        out[name] = torch.cat(full.unbind(0), dim=dim) if dim else full.view(rows * world, *t.shape[1:])
    return out, rows * world


def _describe_outputs(result: StageResult, batch_dims: dict[str, int | None]) -> list[_OutputDesc]:
    """(name, kind, shape per chunk, dtype, batch dim, entries per row) of each output.

    kind is scalar/batched/other; a batched output's batch dimension holds
    ``entries per row`` entries for each row (more than 1 when flattened with
    another dimension).
    """
    out = []
    for name, t in result.outputs[0].items():
        dim = batch_dims.get(name)
        per_row = 1
        if t.dim() == 0 and t.is_floating_point():
            kind = "scalar"
        elif dim is not None and t.shape[dim] % result.rows == 0:
            kind, per_row = "batched", t.shape[dim] // result.rows
        else:
            kind = "other"
        out.append((name, kind, tuple(t.shape), t.dtype, dim, per_row))
    return out


def return_outputs(
    result: StageResult,
    step: StepInputs,
    output_names: list[str],
    batch_dims: dict[str, int | None],
    stage_ranks: list[list[int]],
    comm: MPI.Comm,
    cache: dict[Any, Any],
    with_batched: bool,
) -> StepOutputs:
    """Every output of the model for this rank, and which of them is the loss.

    ``batch_dims`` gives the outputs' batch dimensions. ``cache`` keeps the
    outputs' description per input signature, so it is broadcast from the
    last stage once, not every step. ``with_batched`` False skips moving
    batched outputs (returned as None).

    Raises:
        ConfigError: the last stage did not produce every name in ``output_names``.
    """
    last = stage_ranks[-1]
    rank = comm.Get_rank()
    replica = last.index(rank) if rank in last else None
    if step.signature not in cache:
        described = _describe_outputs(result, batch_dims) if replica == 0 else None
        cache[step.signature] = comm.bcast(described, root=last[0])
    desc: list[_OutputDesc] = cache[step.signature]
    scalars = [d for d in desc if d[1] == "scalar"]
    values: dict[str, Any] = _scalar_outputs(result, scalars, replica, comm)
    works: list[Work] = []
    for k, (name, kind, *_rest) in enumerate(desc):
        if kind == "other":
            values[name] = comm.bcast(result.outputs[0][name] if replica == 0 else None, root=last[0])
        elif kind == "batched" and not with_batched:
            values[name] = None
        elif kind == "batched":
            values[name] = _post_batched_output(result, step, desc[k], k, last, replica, comm, works)
    wait_all(works)
    missing = [n for n in output_names if n not in values]
    if missing:
        raise ConfigError(f"the last stage did not produce outputs {missing}")
    return StepOutputs(values=values, loss_name=scalars[0][0] if scalars else None)


def _scalar_outputs(
    result: StageResult, scalars: list[_OutputDesc], replica: int | None, comm: MPI.Comm
) -> dict[str, Tensor]:
    """The scalar outputs: weighted sums over the last stage's replicas and microbatches, on every rank."""
    acc = torch.zeros(len(scalars), dtype=torch.float64)
    if replica is not None:
        for k, (name, *_rest) in enumerate(scalars):
            acc[k] = sum(float(o[name]) for o in result.outputs) * result.weight
    if comm.Get_size() > 1 and scalars:
        # Summed in rank order on every rank, so every rank gets the same value.
        acc = _allgather(acc, comm).sum(0)
    return {name: torch.tensor(float(acc[k]), dtype=dtype) for k, (name, _, _, dtype, _, _) in enumerate(scalars)}


def _post_batched_output(
    result: StageResult,
    step: StepInputs,
    desc: _OutputDesc,
    k: int,
    last: list[int],
    replica: int | None,
    comm: MPI.Comm,
    works: list[Work],
) -> Tensor:
    """This rank's rows of batched output ``k``; its transfers are appended to ``works``.

    The returned tensor is complete once ``works`` are waited for.
    """
    name, _, shape, dtype, dim, per_row = desc
    assert dim is not None
    rank, world = comm.Get_rank(), comm.Get_size()
    # Received with the batch dimension first, so every piece is a contiguous block.
    first = (shape[dim], *shape[:dim], *shape[dim + 1 :])
    buf = torch.empty(((step.batch // world) * per_row, *first[1:]), dtype=dtype)
    for i, seg in output_routes(step.batch, step.microbatches, len(last), world):
        tag = message_tag(OUTPUT, i, k)
        mine = seg.src == replica
        piece = result.outputs[i][name].movedim(dim, 0).narrow(0, seg.src_offset * per_row, seg.rows * per_row) if mine else None
        view = buf.narrow(0, seg.dst_offset * per_row, seg.rows * per_row) if seg.dst == rank else None
        if piece is not None and view is not None:  # this rank's own rows: no message
            view.copy_(piece)
        elif piece is not None:
            works.append(p2p.isend(piece.contiguous(), seg.dst, tag, comm))
        elif view is not None:
            works.append(p2p.irecv(view, last[seg.src], tag, comm))
    return buf.movedim(0, dim)
