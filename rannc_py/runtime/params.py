"""Parameters: names, materialising a rank's share, the optimizer, state dicts.

A parameter may have several names (tied weights); the *canonical* name is the
first one ``model.named_parameters()`` yields. Everything the runtime
exchanges about parameters (holders, state dicts) uses canonical names.

On a stage split over a tensor group a rank holds only its shard of a split
parameter (:class:`SplitAt`): state dicts join the group's shards into the
full tensor, and loading keeps the rank's shard of the full one.
"""

from __future__ import annotations

import zlib
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import torch
from mpi4py import MPI
from torch import Tensor, nn

from rannc_py.errors import ConfigError
from rannc_py.graph import ir
from rannc_py.graph.lowered import tied_groups
from rannc_py.graph.tensor_rules import Shard, shard_tensor, unshard


@dataclass(frozen=True)
class SplitAt:
    """A rank's place in a tensor split: ``shards`` (canonical FQN -> its shard) at ``position``
    of a group of ``degree`` ranks."""

    shards: Mapping[str, Shard]
    position: int
    degree: int


def canonical_names(model: nn.Module) -> dict[str, str]:
    """Every parameter and buffer name of ``model`` -> its canonical name."""
    canonical = ir.canonical_names(tied_groups(model, buffers=True))
    named = [
        *model.named_parameters(remove_duplicate=False),
        *model.named_buffers(remove_duplicate=False),
    ]
    return {name: canonical.get(name, name) for name, _ in named}


def get_tensor(module: nn.Module, fqn: str) -> Tensor:
    """The parameter or buffer ``fqn`` of ``module``."""
    owner, _, leaf = fqn.rpartition(".")
    return getattr(module.get_submodule(owner), leaf)


def set_tensor(module: nn.Module, fqn: str, value: Tensor) -> None:
    """Replace the parameter or buffer ``fqn`` of ``module`` by ``value``."""
    owner, _, leaf = fqn.rpartition(".")
    mod = module.get_submodule(owner)
    if leaf in mod._parameters:
        mod._parameters[leaf] = value if isinstance(value, nn.Parameter) else nn.Parameter(value)
    else:
        mod._buffers[leaf] = value


def materialize(
    model: nn.Module,
    fqns: Iterable[str],
    seed: int,
    param_init: Callable[[nn.Module], None] | None,
) -> None:
    """Allocate and initialise, on CPU, only the meta parameters/buffers named in ``fqns``.

    Each module owning one of them is materialised with ``to_empty`` (its own
    tensors only) and initialised by ``param_init(module)`` if given, else by
    its ``reset_parameters()``, under a seed derived from ``seed`` and the
    module's name, so every rank that materialises a module (replicas, tied
    copies) gets the same values. Aliases of a materialised tensor (tied
    weights) are re-pointed at it.

    Raises:
        ConfigError: a module to materialise has no ``reset_parameters`` and
            no ``param_init`` was given.
    """
    names = canonical_names(model)
    aliases: dict[str, list[str]] = defaultdict(list)
    for name, canon in names.items():
        aliases[canon].append(name)
    owners = sorted({names[f].rpartition(".")[0] for f in fqns if get_tensor(model, names[f]).is_meta})
    for path in owners:
        mod = model.get_submodule(path)
        if param_init is None and not callable(getattr(mod, "reset_parameters", None)):
            raise ConfigError(
                f"module {path!r} ({type(mod).__name__}) is on the meta device and has no "
                "reset_parameters(); pass param_init=callable(module) to initialise it"
            )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + zlib.crc32(path.encode()))
            mod.to_empty(device="cpu", recurse=False)
            if param_init is not None:
                param_init(mod)
            else:
                # checked callable above; nn.Module's typed __getattr__ would say Tensor
                cast(Callable[[], None], mod.reset_parameters)()
        for leaf, t in [*mod._parameters.items(), *mod._buffers.items()]:
            own = names.get(f"{path}.{leaf}" if path else leaf)
            if t is None or own is None:  # an optional tensor left unset (e.g. bias=None)
                continue
            for alias in aliases.get(own, []):
                if alias != own:
                    set_tensor(model, alias, t)


def copy_from_source(
    model: nn.Module, holders: dict[str, tuple[int, ...]], comm: MPI.Comm, from_rank0: bool
) -> None:
    """Make every holder's copy of each tensor equal to its source's (collective over ``comm``).

    The source is rank 0 when ``from_rank0`` (it holds the whole model, as
    DDP assumes), else each tensor's first holder. ``holders`` maps canonical
    names to the ranks holding them. Sends are nonblocking and receives run
    in one global name order, so no rank waits on a rank that waits on it.
    """
    rank = comm.Get_rank()
    sends: list[MPI.Request] = []
    keep: list[Tensor] = []
    for f in sorted(holders):
        src = 0 if from_rank0 else holders[f][0]
        dsts = [r for r in holders[f] if r != src]
        if rank == src and dsts:
            t = get_tensor(model, f).detach().contiguous()
            keep.append(t)
            sends += [comm.Isend(_raw(t), dest=d, tag=0) for d in dsts]
        elif rank in dsts:
            t = get_tensor(model, f)
            if t.device.type == "cpu" and t.is_contiguous():
                comm.Recv(_raw(t), source=src, tag=0)  # in place: no second copy of the tensor
                continue
            buf = torch.empty_like(t, device="cpu")
            comm.Recv(_raw(buf), source=src, tag=0)
            with torch.no_grad():
                t.copy_(buf)
    MPI.Request.Waitall(sends)


def _raw(t: Tensor) -> list:
    return [t.detach().reshape(-1).view(torch.uint8).numpy(), MPI.BYTE]


def release(model: nn.Module, keep: set[str]) -> None:
    """Replace every parameter/buffer of ``model`` whose canonical name is not in
    ``keep`` by a meta tensor of the same shape, freeing its memory."""
    names = canonical_names(model)
    for name, canon in names.items():
        if canon in keep:
            continue
        t = get_tensor(model, name)
        if not t.is_meta:
            meta = torch.empty_like(t, device="meta")
            set_tensor(model, name, nn.Parameter(meta, t.requires_grad) if isinstance(t, nn.Parameter) else meta)


def rebind_optimizer(opt: torch.optim.Optimizer, model: nn.Module, local: dict[str, nn.Parameter]) -> None:
    """Point ``opt`` at this rank's parameters, keeping its param groups and hyperparameters.

    Groups keep their order and options (so LR schedulers built on ``opt``
    keep working); a group may end up empty on a rank that holds none of its
    parameters. Existing optimizer state moves with its parameter.

    Raises:
        ConfigError: ``opt`` holds a tensor that is not a parameter of ``model``.
    """
    names = canonical_names(model)
    by_id = {id(p): names[n] for n, p in model.named_parameters(remove_duplicate=False)}
    moved: dict[int, nn.Parameter] = {}
    for g, group in enumerate(opt.param_groups):
        new: list[nn.Parameter] = []
        for p in group["params"]:
            canon = by_id.get(id(p))
            if canon is None:
                raise ConfigError(
                    f"optimizer param group {g} holds a tensor of shape {tuple(p.shape)} that is not a "
                    "parameter of the wrapped model; build the optimizer on model.parameters()"
                )
            q = local.get(canon)
            if q is not None and all(q is not r for r in new):
                new.append(q)
                moved[id(p)] = q
        group["params"] = new
    old_state = opt.state
    opt.state = defaultdict(dict)
    for p, st in old_state.items():
        if id(p) in moved:
            opt.state[moved[id(p)]] = st


def gather_state_dict(
    model: nn.Module, names: dict[str, str], local: dict[str, Tensor], owned: set[str], comm: MPI.Comm,
    rank0_only: bool = True, split: SplitAt | None = None,
) -> dict[str, Tensor]:
    """The full state dict, with the original names, on rank 0 of ``comm`` ({} elsewhere), or
    on every rank when not ``rank0_only``. Collective over ``comm``.

    Each rank contributes the tensors it owns (``owned``, canonical names);
    every name of the unwrapped model's ``state_dict()`` (aliases included) is
    filled from its canonical tensor. ``names`` is :func:`canonical_names` of
    the model taken before :func:`release` (which unties what it frees).
    With ``split``, an owned split parameter is this rank's shard: it is sent
    as ``(FQN, position)`` and joined with the other positions' shards.
    """
    shards = {} if split is None else split.shards
    mine: dict[Any, Tensor] = {(f, split.position) if f in shards and split else f: t.detach().clone()
                               for f, t in local.items() if f in owned}
    parts = comm.gather(mine, root=0) if rank0_only else comm.allgather(mine)
    if parts is None:
        return {}
    full: dict[Any, Tensor] = {}
    for part in parts:
        full.update(part)
    for f, shard in shards.items():
        pieces = [full.pop((f, p), None) for p in range(split.degree)] if split else []
        if pieces and all(x is not None for x in pieces):
            full[f] = unshard(cast(list[Tensor], pieces), shard)
    out: dict[str, Tensor] = {}
    for key, t in model.state_dict(keep_vars=True).items():
        canon = names.get(key, key)
        out[key] = full[canon] if canon in full else t.detach().clone()
    return out


def check_state_dict(model: nn.Module, state: Mapping[str, Any], strict: bool) -> tuple[list[str], list[str]]:
    """Compare ``state``'s keys and shapes with ``model``'s state dict, as ``nn.Module.load_state_dict`` does.

    ``model`` may hold meta placeholders (only the shapes are read), so every
    rank checks every key, whichever it holds.

    Returns:
        ``(missing keys, unexpected keys)``, in the model's and the state's order.

    Raises:
        ConfigError: a key has a value that is not a tensor or a shape other
            than the model's (whatever ``strict``; nothing is broadcast), or,
            when ``strict``, a key is missing or unexpected.
    """
    expected = model.state_dict(keep_vars=True)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    problems: list[str] = []
    if strict and unexpected:
        problems.append(f"unexpected key(s) {unexpected}")
    if strict and missing:
        problems.append(f"missing key(s) {missing}")
    for key, want in expected.items():
        if key not in state:
            continue
        got = state[key]
        if not isinstance(got, Tensor):
            problems.append(f"{key!r} is a {type(got).__name__}, not a tensor")
        elif got.shape != want.shape:
            problems.append(f"size mismatch for {key!r}: the state dict has shape {tuple(got.shape)}, "
                            f"the model {tuple(want.shape)}")
    if problems:
        raise ConfigError(
            f"cannot load the state dict into {type(model).__name__}: " + "; ".join(problems)
            + "; pass a state dict of this model (strict=False allows missing and unexpected keys, "
            "never other shapes); nothing was loaded"
        )
    return missing, unexpected


def load_local_state(local: dict[str, Tensor], names: dict[str, str], state: Mapping[str, Tensor],
                     split: SplitAt | None = None) -> None:
    """Copy the entries of ``state`` (original names) that this rank holds into ``local``
    (with ``split``, this rank's shard of each split parameter).

    ``names`` maps every original name to its canonical one (:func:`canonical_names`);
    a tensor is read under any of its names. Check ``state`` with
    :func:`check_state_dict` first: shapes are not checked here, and tensors
    missing from ``state`` are left as they are.
    """
    by_canon: dict[str, Tensor] = {}
    for key, t in state.items():
        by_canon.setdefault(names.get(key, key), t)
    with torch.no_grad():
        for f, t in local.items():
            if f in by_canon:
                shard = None if split is None else split.shards.get(f)
                value = by_canon[f]
                t.copy_(value if shard is None or split is None
                        else shard_tensor(value, shard, split.position, split.degree))
