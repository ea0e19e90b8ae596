"""The optimizer's state in torch's format for the unwrapped model, gathered from and scattered onto any layout.

torch's ``Optimizer.state_dict()`` numbers the parameters 0, 1, ... in the
order of its param groups and keys each one's state by that number. After
the first call a rank's optimizer holds only its parameters, and on a
sharded stage (:mod:`rannc_py.runtime.sharding`) only its pieces of them, so
that numbering is kept from the optimizer the user built on the unwrapped
model: each group's parameters by canonical name. Gathering joins every
rank's entries under those numbers (a sharded parameter's pieces end to end,
tensors shaped like the parameter rebuilt to its shape); scattering gives
each rank the entries of what it holds (a piece's the slice of each tensor).
On a tensor-parallel stage a split parameter's state is, per position of the
group, that position's shard: gathering joins the positions' shards
(:func:`~rannc_py.graph.tensor_rules.unshard`), scattering cuts each
position's out (:func:`~rannc_py.graph.tensor_rules.shard_tensor`). So a state dict gathered on one layout loads on any other, and into
``torch.optim.AdamW(unwrapped.parameters())``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from mpi4py import MPI
from torch import Tensor, nn

from rannc_py.errors import ConfigError
from rannc_py.graph.tensor_rules import shard_tensor, unshard
from rannc_py.runtime.params import SplitAt, canonical_names
from rannc_py.runtime.sharding import Piece, slice_state

Where = tuple[str, int | None, int | None]  # canonical name, and a piece's element range (None: whole)
Entry = tuple[int | None, int | None, int | None, dict[str, Any]]  # piece range, tensor position, state


def original_groups(opt: Any, model: nn.Module) -> list[list[str]] | None:
    """Each param group's parameters by canonical name, for an optimizer built on ``model``
    (None for a factory, or anything else, whose groups are known only once it has run)."""
    if not isinstance(opt, torch.optim.Optimizer):
        return None
    names = canonical_names(model)
    by_id = {id(p): names[n] for n, p in model.named_parameters(remove_duplicate=False)}
    return [list(dict.fromkeys(by_id[id(p)] for p in g["params"] if id(p) in by_id)) for g in opt.param_groups]


class OptimizerState:
    """Gather and scatter one optimizer's state over the ranks (each call collective on ``comm``).

    Args:
        opt: the optimizer over this rank's parameters and pieces.
        groups: :func:`original_groups` of it before the first call rebound
            it; None (an optimizer made by a factory on each rank's share):
            every rank's groups joined, in ``order`` (collective).
        names: ``id(parameter)`` -> canonical name of this rank's parameters.
        pieces: this rank's pieces of sharded parameters.
        shape: canonical name -> the parameter's shape (any rank's, held or not).
        owned: the names whose whole state this rank speaks for (its lowest holder).
        order: every canonical parameter name of the model, in model order.
        comm: the runtime's communicator.
        split: this rank's place in its stage's tensor split (None: parameters whole);
            ``owned`` then names, for a split parameter, the lowest holder at each position.
    """

    def __init__(self, opt: torch.optim.Optimizer, groups: list[list[str]] | None, names: dict[int, str],
                 pieces: list[Piece], shape: Callable[[str], torch.Size], owned: set[str], order: list[str],
                 comm: MPI.Comm, split: SplitAt | None = None) -> None:
        self._opt, self._shape, self._owned, self._comm, self._split = opt, shape, owned, comm, split
        self._where: dict[int, Where] = {i: (n, None, None) for i, n in names.items()}
        for pc in pieces:
            self._where[id(pc.shard)] = (names[id(pc.param)], pc.lo, pc.hi)
        if groups is None:
            mine = [[self._where[id(p)][0] for p in g["params"]] for g in opt.param_groups]
            everyone = comm.allgather(mine)
            if len({len(gs) for gs in everyone}) > 1:
                raise ConfigError(f"the optimizer factory made {sorted({len(gs) for gs in everyone})} param groups "
                                  "on different ranks; it must make the same groups on every rank")
            rank_of = {n: i for i, n in enumerate(order)}
            groups = [sorted({n for gs in everyone for n in gs[g]}, key=rank_of.__getitem__)
                      for g in range(len(mine))]
        self.groups = groups
        self._index: dict[str, int] = {}
        for g in groups:
            for n in g:
                self._index.setdefault(n, len(self._index))

    def gather(self, rank0_only: bool = True) -> dict[str, Any]:
        """The optimizer's torch-format state dict for the unwrapped model, on rank 0 ({} elsewhere),
        or on every rank when not ``rank0_only``."""
        mine: list[tuple[str, int | None, int | None, int | None, dict[str, Any]]] = []
        shards = {} if self._split is None else self._split.shards
        for group in self._opt.param_groups:
            for p in group["params"]:
                state = self._opt.state.get(p)
                name, lo, hi = self._where[id(p)]
                pos = self._split.position if self._split is not None and name in shards else None
                # a replicated parameter's pieces lie at every tensor position: position 0's speak for them
                copy = lo is not None and pos is None and self._split is not None and self._split.position != 0
                if state and (lo is not None or name in self._owned) and not copy:
                    mine.append((name, lo, hi, pos, {k: v.detach().clone() if isinstance(v, Tensor) else v
                                                     for k, v in state.items()}))
        parts = self._comm.gather(mine, root=0) if rank0_only else self._comm.allgather(mine)
        if parts is None:
            return {}
        entries: dict[str, list[Entry]] = {}
        for part in parts:
            for name, lo, hi, pos, state in part:
                entries.setdefault(name, []).append((lo, hi, pos, state))
        states = {self._index[n]: self._join(n, es) for n, es in entries.items() if n in self._index}
        groups = [dict({k: v for k, v in g.items() if k != "params"}, params=[self._index[n] for n in names])
                  for g, names in zip(self._opt.param_groups, self.groups)]
        return {"state": dict(sorted(states.items())), "param_groups": groups}

    def _local_shape(self, name: str) -> torch.Size:
        """The shape of this rank's shard of split parameter ``name``."""
        assert self._split is not None
        shape = list(self._shape(name))
        shape[self._split.shards[name].dim] //= self._split.degree
        return torch.Size(shape)

    def _join(self, name: str, entries: list[Entry]) -> dict[str, Any]:
        """One parameter's state from its whole entry, its tensor positions' shards (each whole or in
        pieces), or its pieces' end to end."""
        if entries[0][2] is not None:  # a split parameter: per tensor position, its shard's state
            assert self._split is not None
            local = self._local_shape(name)
            by_position: dict[int, list[Entry]] = {}
            for e in entries:
                by_position.setdefault(e[2] or 0, []).append(e)
            states = [self._pieces_joined(by_position[p], local) for p in sorted(by_position)]
            return {k: unshard([st[k] for st in states], self._split.shards[name])
                    if isinstance(v, Tensor) and v.dim() > 0 and v.shape == local else v
                    for k, v in states[0].items()}
        return self._pieces_joined(entries, self._shape(name))

    @staticmethod
    def _pieces_joined(entries: list[Entry], shape: torch.Size) -> dict[str, Any]:
        """The state of a tensor of ``shape`` from its whole entry or its pieces' end to end."""
        whole = [st for lo, _, _, st in entries if lo is None]
        if whole:
            return whole[0]
        entries = sorted(entries, key=lambda e: e[0] or 0)
        first = entries[0][3]
        out: dict[str, Any] = {}
        for k, v in first.items():
            split = all(isinstance(st.get(k), Tensor) and st[k].dim() == 1 and st[k].numel() == (hi or 0) - (lo or 0)
                        for lo, hi, _, st in entries)
            out[k] = torch.cat([st[k] for *_, st in entries]).reshape(shape) if split else v
        return out

    def check(self, sd: Mapping[str, Any]) -> None:
        """Raise ConfigError unless ``sd`` is a state dict of this optimizer's groups over the unwrapped model."""
        groups = sd.get("param_groups") if isinstance(sd, Mapping) else None
        if not isinstance(groups, list) or not isinstance(sd.get("state"), Mapping):
            raise ConfigError(f"an optimizer state dict has 'state' and 'param_groups', got {type(sd).__name__} "
                              f"with keys {sorted(sd) if isinstance(sd, Mapping) else '-'}; pass "
                              "optimizer_state_dict() or torch's optimizer.state_dict()")
        want = [len(g) for g in self.groups]
        got = [len(g.get("params", ())) for g in groups]
        if got != want:
            raise ConfigError(f"the state dict's param groups hold {got} parameters, this optimizer's {want}; "
                              "load a state dict of an optimizer built the same way on this model")
        for index, state in sd["state"].items():
            name = self._name_of(sd).get(int(index))
            if name is None:
                raise ConfigError(f"the state dict has state for parameter {index}, which no param group lists")
            numel = self._shape(name).numel()
            for k, v in state.items():
                if isinstance(v, Tensor) and v.dim() > 0 and v.numel() != numel:
                    raise ConfigError(f"state {k!r} of {name!r} has shape {tuple(v.shape)}, the parameter "
                                      f"{tuple(self._shape(name))}; load a state dict saved for this model")

    def _name_of(self, sd: Mapping[str, Any]) -> dict[int, str]:
        return {int(i): n for g, names in zip(sd["param_groups"], self.groups) for i, n in zip(g["params"], names)}

    def scatter(self, sd: Mapping[str, Any]) -> None:
        """Load ``sd`` (checked with :meth:`check`): each rank takes the state of what it holds."""
        full = {self._name_of(sd)[int(i)]: st for i, st in sd["state"].items()}
        state: dict[int, dict[str, Any]] = {}
        groups = []
        j = 0
        for saved, group in zip(sd["param_groups"], self._opt.param_groups):
            ids = []
            for p in group["params"]:
                name, lo, hi = self._where[id(p)]
                if name in full:
                    st = full[name]
                    split = self._split is not None and name in self._split.shards
                    if lo is not None and hi is not None:  # a piece (of this position's shard when split)
                        state[j] = (slice_state(self._shard_state(name, st), self._local_shape(name), lo, hi)
                                    if split else slice_state(st, self._shape(name), lo, hi))
                    elif split:
                        state[j] = self._shard_state(name, st)
                    else:
                        state[j] = {k: v.clone() if isinstance(v, Tensor) else v for k, v in st.items()}
                ids.append(j)
                j += 1
            groups.append(dict({k: v for k, v in saved.items() if k != "params"}, params=ids))
        self._opt.load_state_dict({"state": state, "param_groups": groups})

    def _shard_state(self, name: str, st: Mapping[str, Any]) -> dict[str, Any]:
        """This tensor position's shard of each of a split parameter's parameter-sized state tensors."""
        assert self._split is not None
        shape, sp = self._shape(name), self._split
        return {k: shard_tensor(v.reshape(shape), sp.shards[name], sp.position, sp.degree).clone()
                if isinstance(v, Tensor) and v.dim() > 0 and v.numel() == shape.numel()
                else (v.clone() if isinstance(v, Tensor) else v) for k, v in st.items()}
