"""One stage run by a tensor group over MPI: the ranks of a communicator share its ops' shards.

:class:`MPITensorGroup` is the :class:`~rannc_py.graph.tensor_program.TensorGroup`
of one rank: sums of float32 tensors go through the C++ engine's allreduce
(``rannc_py.comm.allreduce``, the MPI library's own algorithm: the messages
are small and on the critical path, so latency matters more than bandwidth),
gathers through the engine's allgather, and the cross-entropy's group max
(a few floats per row) through mpi4py. It works on a communicator of its own
(a duplicate of the one given), so its collectives never interleave with
other traffic of the ranks.

:class:`TensorParallelModule` runs a whole model as one stage whose ranks
form the tensor group: it traces the model, splits it
(:func:`~rannc_py.graph.tensor_split.find_tensor_split`), keeps this rank's
shards as its parameters and runs the rank program; its
``state_dict()`` / ``load_state_dict()`` take the unwrapped model's full
state. With a second communicator over the replicas of each rank's shards it
runs tensor x data parallelism (gradients averaged over the replicas). Every
rank still holds the traced model's full parameters (the rank program reads
its buffers from it). ``RaNNCModule`` runs tensor groups inside pipeline
stages with :class:`MPITensorGroup` (:mod:`rannc_py.runtime.tensor_stages`),
holding only each rank's shards.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.modules.module import _IncompatibleKeys

from rannc_py.comm import allgather, allreduce
from rannc_py.errors import ConfigError
from rannc_py.graph.tensor_program import build_rank_program, shard_parameters
from rannc_py.graph.tensor_rules import shard_tensor, unshard
from rannc_py.graph.tensor_split import TensorSplit, find_tensor_split
from rannc_py.graph.trace import trace
from rannc_py.runtime.params import check_state_dict

# isort: split
from mpi4py import MPI  # after rannc_py.comm, which sets the MPI thread level


class MPITensorGroup:
    """A tensor group over the ranks of an mpi4py communicator (see the module docstring).

    Takes the communicator; every rank of it must create the group, in the
    same order as any other communicator.
    """

    def __init__(self, comm: Any) -> None:
        self.comm = comm.Dup()
        self.rank: int = self.comm.Get_rank()
        self.size: int = self.comm.Get_size()

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """The element-wise sum (``"sum"``) or maximum (``"max"``) over the group, as a new tensor."""
        out = tensor.detach().contiguous().clone()
        if op == "sum" and out.dtype == torch.float32:
            allreduce(out, self.comm, check=False).wait()
        else:
            self.comm.Allreduce(MPI.IN_PLACE, out.numpy(), op=MPI.MAX if op == "max" else MPI.SUM)
        return out

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's tensor (same shape on every rank), in rank order."""
        x = tensor.detach().contiguous()
        out = torch.empty((self.size, *x.shape), dtype=x.dtype)
        allgather(x, out, self.comm, check=False).wait()
        return list(out.unbind(0))


class TensorParallelModule(nn.Module):
    """``model`` run by the ranks of ``comm`` as one tensor group.

    Takes the model, an example call (``args``, ``kwargs``, traced once) and
    the group's communicator. Call it like the model; it returns the model's
    output (split outputs allgathered). ``parameters()`` are this rank's
    shards and replicated parameters, so an optimizer built on them steps
    the rank's part; :meth:`full_parameters` gathers them back. Dropout
    (attention's too) draws what eager draws on the unsplit model and follows
    ``train()`` / ``eval()``; the ranks' torch generators are set to rank 0's
    state here so that they draw alike. Raises TraceError when the model
    cannot be traced.

    Tensor x data parallelism: ``data_comm`` joins this rank with the ranks
    holding the same shards in the other tensor groups (the replicas), each
    fed its own rows; :meth:`average_gradients`, called after backward,
    averages every shard's gradient over them, as DDP does.
    """

    def __init__(self, model: nn.Module, args: tuple[Any, ...] = (), kwargs: Mapping[str, Any] | None = None,
                 *, comm: Any, data_comm: Any = None) -> None:
        super().__init__()
        self.group = MPITensorGroup(comm)
        # the same rank's counterparts in the other replicas: sums over a communicator of their own
        self.replicas = None if data_comm is None else MPITensorGroup(data_comm)
        # Replicated dropout draws one mask on every rank, split dropout every rank's part of it:
        # both need the group's ranks in one generator state (rank 0's, as a per-rank seed may differ).
        torch.set_rng_state(self.group.comm.bcast(torch.get_rng_state(), root=0))
        self.traced = trace(model, args, dict(kwargs or {}))
        self.split: TensorSplit = find_tensor_split(self.traced.program, self.group.size)
        self.program = build_rank_program(self.traced.program, self.split, self.group)
        local = shard_parameters(self.traced.program, self.split, self.group.rank)
        self.names = list(local)
        self.shards = nn.ParameterList([nn.Parameter(t, requires_grad=t.requires_grad) for t in local.values()])

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        params = dict(zip(self.names, self.shards))
        outs = self.program(params, self.traced.flatten_inputs(args, kwargs))
        return self.traced.unflatten_outputs(outs)

    def average_gradients(self) -> None:
        """Average this rank's gradients over the data-parallel replicas (``data_comm``), in place.

        Call it on every rank after backward, before clipping and the step:
        each replica's gradient is of the loss over its rows, so the mean is
        the gradient of the mean loss over all rows (equal row counts). One
        allreduce of all gradients joined. Without ``data_comm``: nothing.
        Raises nothing.
        """
        if self.replicas is None or self.replicas.size == 1:
            return
        grads = [p.grad for p in self.shards if p.grad is not None]
        if not grads:
            return
        flat = self.replicas.all_reduce(torch.cat([g.detach().reshape(-1).float() for g in grads]))
        flat /= self.replicas.size
        for g, part in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(part.view_as(g))

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Scale the gradients so that their total 2-norm is at most ``max_norm``, as
        ``torch.nn.utils.clip_grad_norm_`` on the unsplit model: each split parameter's shards
        count once (summed over the group), each replicated one once. Returns the total norm
        before clipping; raises nothing."""
        grads = [(name, p.grad) for name, p in zip(self.names, self.shards) if p.grad is not None]
        zero = torch.zeros((), dtype=torch.float32)
        split = sum((g.detach().float().pow(2).sum() for n, g in grads if n in self.split.params), zero)
        whole = sum((g.detach().float().pow(2).sum() for n, g in grads if n not in self.split.params), zero)
        total = (self.group.all_reduce(split.reshape(1))[0] + whole).sqrt()
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for _, g in grads:
            g.mul_(coef.to(g.dtype))
        return total

    def full_parameters(self) -> dict[str, torch.Tensor]:
        """Every parameter whole, under its canonical name, on every rank (split ones allgathered)."""
        out: dict[str, torch.Tensor] = {}
        for name, p in zip(self.names, self.shards):
            shard = self.split.params.get(name)
            out[name] = p.detach().clone() if shard is None else unshard(self.group.all_gather(p.detach()), shard)
        return out

    def _canonical(self) -> dict[str, str]:
        """The model's state dict keys of parameters -> their canonical names (tied keys share one)."""
        model = self.traced.model
        by_id = {id(model.get_parameter(n)): n for n in self.names}
        return {k: by_id[id(v)] for k, v in model.state_dict(keep_vars=True).items() if id(v) in by_id}

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:  # type: ignore[override]
        """The model's full state under its original names, on every rank; collective: every rank calls it.

        Split parameters are allgathered from the group, replicated ones and
        buffers copied (tied names each get the one tensor). Loadable into the
        unwrapped model. torch's ``destination``, ``prefix`` and ``keep_vars``
        are not supported and are ignored. Raises nothing.
        """
        full, canonical = self.full_parameters(), self._canonical()
        state = self.traced.model.state_dict()
        return {k: full[canonical[k]] if k in canonical else v.detach().clone() for k, v in state.items()}

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True,  # type: ignore[override]
                        assign: bool = False) -> _IncompatibleKeys:
        """Load a full state dict (the unwrapped model's names and shapes); each rank keeps its shards.

        Every key and shape is checked before anything is copied, as torch's
        ``load_state_dict``; ``strict`` makes missing and unexpected keys
        errors. No communication: every rank needs the whole state dict.
        Returns torch's ``(missing_keys, unexpected_keys)``. Raises
        ConfigError when the state dict does not fit or ``assign`` is True
        (the optimizer is bound to this rank's shards).
        """
        if assign:
            raise ConfigError("TensorParallelModule.load_state_dict(assign=True) is not supported: the optimizer "
                              "is bound to this rank's shards; use assign=False")
        missing, unexpected = check_state_dict(self.traced.model, state_dict, strict)
        canonical, shards = self._canonical(), dict(zip(self.names, self.shards))
        own = self.traced.model.state_dict(keep_vars=True)
        with torch.no_grad():
            for key, value in state_dict.items():
                if key not in own:
                    continue
                name = canonical.get(key)
                if name is None:  # a buffer: the rank program reads the traced model's
                    own[key].copy_(value)
                    continue
                shard = self.split.params.get(name)
                local = value if shard is None else shard_tensor(value, shard, self.group.rank, self.group.size)
                shards[name].copy_(local)
        return _IncompatibleKeys(missing, unexpected)
