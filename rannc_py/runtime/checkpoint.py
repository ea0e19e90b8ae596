"""Checkpoints: every rank writes what it owns; any layout reads what it needs.

A checkpoint is a directory::

    index.json              what is where (below)
    rank00000.safetensors   the tensors rank 0 owns, one file per rank that owns any
    ...
    COMMITTED               written last: the file names and sizes of a finished save

Each rank writes only what it owns (``Placement.owned``: the lowest rank of
each stage's replicas, a tied weight once) -- its parameters and buffers
under their canonical names and the optimizer state of its parameters -- as
safetensors, so loading never unpickles anything. ``index.json`` maps every
name of the unwrapped model's ``state_dict()`` to its canonical tensor and
records each tensor's shape, dtype and *shards*: ``{file, key, slice}``
pieces whose ``slice = [start, stop)`` ranges over the flattened tensor.
A tensor written whole is one shard ``[0, numel)``. On a stage whose
optimizer state is sharded over its replicas
(:mod:`rannc_py.runtime.sharding`) every replica writes the state of its
*pieces* -- elements ``[lo, hi)`` of a parameter -- so a sharded parameter's
state record has one shard per replica holding a piece of it, and no rank
ever holds or writes another's share. Optimizer state that is not a tensor
of rank >= 1 (Adam's ``step``, the same in every piece) and the param
groups' hyperparameters are JSON values in the index; so is the user's
``extra``.

Atomicity: the ranks write into a temporary directory beside the target,
each fsyncs its file, and rank 0 -- after every rank has reported success --
writes the index, then the ``COMMITTED`` marker, fsyncs the directory and
swaps it into place (``renameat2(RENAME_EXCHANGE)`` where available, else two
renames), deleting the previous checkpoint only then. A save killed at any
moment leaves the previous checkpoint at ``path``; a directory without the
marker, or whose files do not match it, is refused by the loader.

Loading reads the index (JSON), checks every key and shape against the model
on every rank (the same answer everywhere, as all ranks read the same
files), and reads with ``safe_open`` only the tensors this rank holds; of a
parameter it holds a piece of, only the elements of its piece, from
whichever shards overlap them (so any layout, at any sharding level, loads
a checkpoint written by any other). Before the wrapped model's first call
nothing is partitioned yet: the whole state goes into the unwrapped model
and the optimizer, and the first call's placement and optimizer rebinding
carry it to each rank's share.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import shutil
import signal
import uuid
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from mpi4py import MPI
from safetensors import safe_open
from safetensors.torch import save as st_save
from safetensors.torch import save_file
from torch import Tensor, nn

from rannc_py.errors import CommError, ConfigError
from rannc_py.runtime import params as P
from rannc_py.runtime.optim_state import Where

FORMAT, VERSION = "rannc_py.checkpoint", 1
INDEX, MARKER = "index.json", "COMMITTED"
# Test hook: "<rank>:<point>" makes that rank SIGKILL itself at that point of a save.
KILL_ENV = "RANNC_TEST_CHECKPOINT_KILL"
KILL_POINTS = ("before_tensors", "during_tensors", "after_tensors", "before_commit", "before_rename")
PathArg = str | os.PathLike[str]


@dataclass
class _Holdings:
    """What this rank holds of ``model``'s state, under canonical names.

    Attributes:
        comm: the job's communicator.
        model: the unwrapped model.
        keys: state-dict key -> canonical name (persistent tensors only).
        tensors: canonical name -> the tensor this rank holds (loaded into).
        owned: canonical names this rank writes.
        param_names: ``id(parameter)`` -> canonical name, for the optimizer.
        partitioned: False before the first call (the model holds everything).
        layout: each stage's replica count, or None before the first call.
        pieces: ``id(piece parameter)`` -> its parameter's canonical name and
            element range, for the pieces a sharded stage's optimizer steps.
    """

    comm: MPI.Comm
    model: nn.Module
    keys: dict[str, str]
    tensors: dict[str, Tensor]
    owned: set[str]
    param_names: dict[int, str]
    partitioned: bool
    layout: list[int] | None
    pieces: dict[int, Where]


def _holdings(model: nn.Module) -> _Holdings:
    from rannc_py.runtime.module import RaNNCModule

    if not isinstance(model, nn.Module):
        raise ConfigError(f"a checkpoint is of an nn.Module or RaNNCModule, got {type(model).__name__}")
    if not isinstance(model, RaNNCModule):
        return _whole(model, MPI.COMM_WORLD)
    if model._closed:
        raise ConfigError("this RaNNCModule was closed; save or load a checkpoint before close()")
    if not model._ready:
        return _whole(model._model, model._comm)
    if model._tensor is not None:
        raise ConfigError("save_checkpoint / load_checkpoint do not support tensor > 1 yet (each rank holds "
                          "shards of the split parameters); save model.state_dict() (full tensors) instead, "
                          "or train with tensor=1")
    if model._plan.chunks > 1:
        raise ConfigError(f"save_checkpoint / load_checkpoint do not support plans with several model chunks per "
                          f"rank yet (schedule {model._plan.schedule!r}, chunks={model._plan.chunks}); save "
                          "model.state_dict() and optimizer_state_dict() instead, or train with one stage per rank")
    inner = model._model
    keys = {k: model._names.get(k, k) for k in inner.state_dict(keep_vars=True)}
    persistent = set(keys.values())
    param_names = {id(p): f for f, p in model._params.items()}
    return _Holdings(
        comm=model._comm, model=inner, keys=keys,
        tensors={f: t for f, t in model._local.items() if f in persistent},
        owned=model._owned & persistent, param_names=param_names,
        partitioned=True, layout=[st.replicas for st in model._plan.stages],
        pieces={id(pc.shard): (param_names[id(pc.param)], pc.lo, pc.hi)
                for pcs in model._shards.pieces.values() for pc in pcs},
    )


def _whole(model: nn.Module, comm: MPI.Comm) -> _Holdings:
    """Every rank holds the whole model (a plain module, or before the first call); rank 0 writes it."""
    names = P.canonical_names(model)
    keys = {k: names.get(k, k) for k in model.state_dict(keep_vars=True)}
    persistent = set(keys.values())
    return _Holdings(
        comm=comm, model=model, keys=keys, tensors={f: P.get_tensor(model, f) for f in persistent},
        owned=persistent if comm.Get_rank() == 0 else set(),
        param_names={id(p): names[n] for n, p in model.named_parameters(remove_duplicate=False)},
        partitioned=False, layout=None, pieces={},
    )


# ------------------------------------------------------------------ save
def save_checkpoint(path: PathArg, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    extra: Any = None) -> None:
    """Write a checkpoint of ``model`` (and ``optimizer``) to the directory ``path``, atomically.

    Collective over the job's ranks (the wrapped model's communicator; for a
    plain ``nn.Module``, ``MPI.COMM_WORLD``, where rank 0 writes it all).
    Before or after the first call. The previous checkpoint at ``path``, if
    any, stays until the new one is complete (see the module docstring).
    Optimizer state sharded over a stage's replicas is written by each
    replica for its own shard.

    Args:
        path: the checkpoint directory (created; its parent must be shared by all ranks).
        model: a :class:`rannc_py.RaNNCModule` or a plain ``nn.Module``.
        optimizer: the optimizer over ``model``'s parameters, or None.
        extra: any JSON-serialisable value (e.g. the step), returned by :func:`load_checkpoint`.

    Raises:
        ConfigError: ``extra`` is not JSON, the optimizer holds a tensor that
            is not a parameter of ``model``, or the module was closed.
        CommError: a rank could not write its part (the same error on every rank).
    """
    h = _holdings(model)
    comm, rank = h.comm, h.comm.Get_rank()
    try:
        json.dumps(extra)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"extra must be JSON-serialisable (numbers, strings, lists, dicts), got: {e}") from None
    target = Path(path)
    tmp = Path(comm.bcast(str(_begin(target)) if rank == 0 else None, root=0))
    _kill_point(rank, "before_tensors")
    error, part = None, None
    try:
        part = _write_part(tmp, h, optimizer, rank)
    except (OSError, RuntimeError) as e:
        error = f"rank {rank} could not write its part of {target}: {e}"
    _kill_point(rank, "after_tensors")
    parts = comm.gather((error, part), root=0)
    status = None
    if rank == 0:
        assert parts is not None
        status = next((err for err, _ in parts if err), None)
        if status is None:
            try:
                _commit(target, tmp, _index(h, optimizer, [p for _, p in parts], extra))
            except OSError as e:
                status = f"rank 0 could not commit {target}: {e}"
        if status is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    status = comm.bcast(status, root=0)
    if status is not None:
        raise CommError(f"checkpoint not saved: {status}; the previous checkpoint at {target}, if any, is intact")


def _begin(target: Path) -> Path:
    """Rank 0: a fresh temporary directory beside ``target`` (stale ones from killed saves removed)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}.partial-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = target.parent / f".{target.name}.partial-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    return tmp


def _kill_point(rank: int, point: str) -> None:
    if os.environ.get(KILL_ENV) == f"{rank}:{point}":
        os.kill(os.getpid(), signal.SIGKILL)


def _write_part(tmp: Path, h: _Holdings, optimizer: torch.optim.Optimizer | None, rank: int) -> dict[str, Any]:
    """Write this rank's safetensors file; return its records for the index."""
    file = f"rank{rank:05d}.safetensors"
    tensors: dict[str, Tensor] = {}
    records: dict[str, Any] = {}
    for f in sorted(h.owned):
        tensors[f] = h.tensors[f].detach().cpu().contiguous()
        records[f] = _record(tensors[f], file, f)
    part: dict[str, Any] = {"tensors": records, "optimizer": None}
    if optimizer is not None:
        part["optimizer"] = _optimizer_part(optimizer, h, file, tensors)
    if tensors:
        _write_file(tmp / file, tensors, rank)
    return part


def _record(t: Tensor, file: str, key: str) -> dict[str, Any]:
    return {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."),
            "shards": [{"file": file, "key": key, "slice": [0, t.numel()]}]}


def _write_file(file: Path, tensors: dict[str, Tensor], rank: int) -> None:
    if os.environ.get(KILL_ENV) == f"{rank}:during_tensors":
        data = st_save(tensors)
        with open(file, "wb") as out:
            out.write(data[: len(data) // 2])
            out.flush()
            os.fsync(out.fileno())
        _kill_point(rank, "during_tensors")
    save_file(tensors, str(file))
    _fsync(file)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _optimizer_part(opt: torch.optim.Optimizer, h: _Holdings, file: str,
                    tensors: dict[str, Tensor]) -> dict[str, Any]:
    """This rank's optimizer records: the state of the whole parameters it owns and of every
    piece it steps; its state tensors are added to ``tensors``."""
    sd = opt.state_dict()
    where = _optimizer_where(opt, h)
    state: dict[str, Any] = {}
    for i, (name, lo, hi) in enumerate(where):
        if i not in sd["state"] or (lo is None and name not in h.owned):
            continue
        rec: dict[str, Any] = {}
        for k, v in sd["state"][i].items():
            if isinstance(v, Tensor) and v.dim() > 0:
                key = f"optimizer/{name}/{k}"
                tensors[key] = v.detach().cpu().contiguous()
                rec[k] = _record(tensors[key], file, key)
                if lo is not None and hi is not None and v.dim() == 1 and v.numel() == hi - lo:
                    # a piece's slice of a parameter-shaped tensor: a shard of the whole one
                    rec[k]["shape"] = list(h.tensors[name].shape)
                    rec[k]["shards"][0]["slice"] = [lo, hi]
            else:
                rec[k] = _encode(v, f"optimizer state {k!r} of {name}")
        state[name] = rec
    groups, start = [], 0
    for g in opt.param_groups:
        mine = where[start:start + len(g["params"])]
        start += len(g["params"])
        groups.append(list(dict.fromkeys(n for n, lo, _ in mine if lo is not None or n in h.owned)))
    hyper = [{k: _encode(v, f"param group option {k!r}") for k, v in g.items() if k != "params"}
             for g in sd["param_groups"]]
    return {"state": state, "group_params": groups, "hyper": hyper}


def _optimizer_where(opt: torch.optim.Optimizer, h: _Holdings) -> list[Where]:
    """Where each of ``opt``'s parameters is in the model, in its state-dict order: the
    canonical name, and for a piece of a sharded parameter its element range."""
    where: list[Where] = []
    for g, group in enumerate(opt.param_groups):
        for p in group["params"]:
            name = h.param_names.get(id(p))
            if name is not None:
                where.append((name, None, None))
            elif id(p) in h.pieces:
                where.append(h.pieces[id(p)])
            else:
                raise ConfigError(
                    f"optimizer param group {g} holds a tensor of shape {tuple(p.shape)} that is not a "
                    "parameter this rank holds of the model; pass the optimizer given to RaNNCModule "
                    "(or built on model.parameters())"
                )
    return where


def _encode(v: Any, what: str) -> dict[str, Any]:
    if isinstance(v, Tensor):
        return {"tensor": v.item(), "dtype": str(v.dtype).removeprefix("torch.")}
    try:
        json.dumps(v)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} is a {type(v).__name__}, which a checkpoint cannot store as JSON") from None
    return {"value": v}


def _decode(rec: dict[str, Any], like: Any = None) -> Any:
    if "tensor" in rec:
        return torch.tensor(rec["tensor"], dtype=getattr(torch, rec["dtype"]))
    v = rec["value"]
    return tuple(v) if isinstance(like, tuple) and isinstance(v, list) else v


def _index(h: _Holdings, optimizer: torch.optim.Optimizer | None, parts: list[dict[str, Any]],
           extra: Any) -> dict[str, Any]:
    """Rank 0: the index of a save from every rank's part (in rank order)."""
    tensors: dict[str, Any] = {}
    for part in parts:
        tensors.update(part["tensors"])
    index: dict[str, Any] = {
        "format": FORMAT, "version": VERSION, "world_size": h.comm.Get_size(), "layout": h.layout,
        "model": dict(sorted(h.keys.items())), "tensors": tensors, "optimizer": None, "extra": extra,
        "config": _hf_config(h.model),
    }
    if optimizer is not None:
        state: dict[str, Any] = {}
        groups: list[list[str]] = [[] for _ in parts[0]["optimizer"]["hyper"]]
        for part in parts:
            for name, rec in part["optimizer"]["state"].items():
                _merge_state(state.setdefault(name, {}), rec)
            for g, names in enumerate(part["optimizer"]["group_params"]):
                groups[g] = list(dict.fromkeys(groups[g] + names))
        order = {f: i for i, f in enumerate(dict.fromkeys(h.keys.values()))}  # the model's, whatever the layout
        groups = [sorted(names, key=lambda f: order.get(f, len(order))) for names in groups]
        index["optimizer"] = {
            "param_groups": [{**hyper, "params": names} for hyper, names in zip(parts[0]["optimizer"]["hyper"], groups)],
            "state": state,
        }
    return index


def _merge_state(into: dict[str, Any], rec: dict[str, Any]) -> None:
    """Add one rank's state record of a parameter to the index's: the shards of a sharded
    parameter's pieces are joined in element order; values (a step count, the same in
    every piece) are taken from the first rank."""
    for k, r in rec.items():
        have = into.get(k)
        if have is None:
            into[k] = r
        elif "shards" in have and "shards" in r and r["shards"][0]["slice"] != [0, math.prod(r["shape"])]:
            have["shards"] = sorted(have["shards"] + r["shards"], key=lambda sh: sh["slice"][0])


def _hf_config(model: nn.Module) -> dict[str, Any] | None:
    """A Hugging Face model's config as ``config.json`` holds it (None for other models)."""
    cfg = getattr(model, "config", None)
    if not callable(getattr(cfg, "to_json_string", None)):
        return None
    data: dict[str, Any] = json.loads(cfg.to_json_string(use_diff=False))  # type: ignore[union-attr]
    if not data.get("architectures"):
        data["architectures"] = [type(model).__name__]
    return data


def _commit(target: Path, tmp: Path, index: dict[str, Any]) -> None:
    """Rank 0: index, then the marker, then swap ``tmp`` into place; the old checkpoint goes last."""
    _write_json(tmp / INDEX, index)
    _kill_point(0, "before_commit")
    files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
    _write_json(tmp / MARKER, {"format": FORMAT, "files": files})
    _fsync(tmp)
    _kill_point(0, "before_rename")
    if not target.exists():
        os.rename(tmp, target)
    elif _exchange(tmp, target):
        shutil.rmtree(tmp)  # now the previous checkpoint
    else:
        old = tmp.with_name(tmp.name.replace(".partial-", ".old-"))
        os.rename(target, old)
        os.rename(tmp, target)
        shutil.rmtree(old)
    _fsync(target.parent)


def _write_json(file: Path, data: Any) -> None:
    with open(file, "w") as out:
        json.dump(data, out, indent=1)
        out.flush()
        os.fsync(out.fileno())


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one step (Linux ``renameat2``); False where unsupported."""
    fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if fn is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


# ------------------------------------------------------------------ load
def read_index(path: PathArg) -> dict[str, Any]:
    """The index of the committed checkpoint at ``path`` (JSON only; no tensor is read).

    Raises:
        ConfigError: ``path`` is no checkpoint, or an unfinished one (no
            commit marker, or a file missing or of another size than committed).
    """
    root = Path(path)
    if not root.is_dir():
        left = sorted(p.name for p in root.parent.glob(f".{root.name}.*")) if root.parent.is_dir() else []
        hint = f"; left by an interrupted save: {left}" if left else ""
        raise ConfigError(f"no checkpoint at {root} (no such directory){hint}")
    if not (root / MARKER).is_file():
        raise ConfigError(
            f"checkpoint {root} is incomplete: its commit marker {MARKER} is missing, so the save that "
            "wrote it did not finish; load an earlier checkpoint"
        )
    marker = json.loads((root / MARKER).read_text())
    for name, size in marker["files"].items():
        file = root / name
        if not file.is_file() or file.stat().st_size != size:
            seen = file.stat().st_size if file.is_file() else "missing"
            raise ConfigError(f"checkpoint {root} is damaged: {name} was committed with {size} bytes, "
                              f"found {seen}; load an earlier checkpoint")
    index: dict[str, Any] = json.loads((root / INDEX).read_text())
    if index.get("format") != FORMAT or index.get("version") != VERSION:
        raise ConfigError(f"{root} holds format {index.get('format')!r} version {index.get('version')!r}, "
                          f"this rannc_py reads {FORMAT!r} version {VERSION}")
    return index


def read_tensors(root: Path, records: dict[str, dict[str, Any]],
                 ranges: Mapping[str, tuple[int, int]] | None = None) -> dict[str, Tensor]:
    """Read each record's tensor, joining its shards, opening each file once.

    With ``ranges``, a record named there is read as elements ``[lo, hi)`` of
    the flattened tensor only (a 1-D tensor), from the shards that overlap them.

    Raises:
        ConfigError: a record's shards do not cover it (or its range) exactly.
    """
    ranges = ranges or {}
    span = {name: ranges.get(name, (0, math.prod(rec["shape"]))) for name, rec in records.items()}
    by_file: dict[str, list[tuple[str, str, int, int, int]]] = defaultdict(list)
    for name, rec in records.items():
        lo, hi = span[name]
        for shard in rec["shards"]:
            start, stop = shard["slice"]
            a, b = max(start, lo), min(stop, hi)
            if a < b:
                by_file[shard["file"]].append((name, shard["key"], start, a, b))
    pieces: dict[str, list[tuple[int, int, Tensor]]] = defaultdict(list)
    for file, wanted in sorted(by_file.items()):
        with safe_open(str(root / file), framework="pt") as f:
            for name, key, start, a, b in wanted:
                pieces[name].append((a, b, _read_range(f, key, a - start, b - start)))
    out = {}
    for name, rec in records.items():
        lo, hi = span[name]
        parts = sorted(pieces[name], key=lambda p: p[0])
        at = lo
        for start, stop, t in parts:
            if start != at or t.numel() != stop - start:
                raise ConfigError(f"checkpoint {root}: the shards of {name} do not cover it "
                                  f"(slice {[start, stop]} at element {at})")
            at = stop
        if at != hi:
            raise ConfigError(f"checkpoint {root}: the shards of {name} cover {at - lo} of {hi - lo} elements")
        if not parts:
            joined = torch.empty(0, dtype=getattr(torch, rec["dtype"]))
        else:
            joined = parts[0][2] if len(parts) == 1 else torch.cat([p[2] for p in parts])
        out[name] = joined if name in ranges else joined.reshape(rec["shape"])
    return out


def _read_range(f: Any, key: str, a: int, b: int) -> Tensor:
    """Elements ``[a, b)`` of the flattened tensor ``key`` of the open file ``f``, reading
    only the rows of its first dimension that hold them."""
    sl = f.get_slice(key)
    shape = sl.get_shape()
    numel = math.prod(shape)
    if len(shape) == 0 or (a == 0 and b == numel):
        t: Tensor = f.get_tensor(key).reshape(-1)
        return t[a:b]
    row = numel // shape[0]
    first, last = a // row, -(-b // row)
    rows: Tensor = sl[first:last]
    return rows.reshape(-1)[a - first * row : b - first * row]


def load_checkpoint(path: PathArg, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> Any:
    """Load the checkpoint at ``path`` into ``model`` (and ``optimizer``); return its ``extra``.

    Collective in effect (call it on every rank); any layout may load a
    checkpoint written by any other, before the first call (the usual
    "wrap, load, train") or after. Each rank reads only the tensors it holds.
    Nothing is unpickled: the index is JSON, tensors are safetensors.

    Raises:
        ConfigError: ``path`` is not a finished checkpoint, its keys or
            shapes differ from the model's, it has no optimizer state but an
            optimizer was given, or a rank could not read it (the same error
            on every rank).
    """
    h = _holdings(model)
    root = Path(path)
    index = read_index(root)
    _check_keys(root, index, h)
    want = {f: index["tensors"][index["model"][f]] for f in h.tensors}
    error, values, opt_values = None, {}, {}
    try:
        values = read_tensors(root, want)
        if optimizer is not None:
            opt_values = _read_optimizer(root, index, optimizer, h)
    except (OSError, RuntimeError, KeyError, ConfigError) as e:
        error = f"could not read checkpoint {root}: {type(e).__name__}: {e}"
    _agree(h.comm, error)
    _load_model(h, values)
    if optimizer is not None:
        optimizer.load_state_dict(opt_values)
    return index["extra"]


def _check_keys(root: Path, index: dict[str, Any], h: _Holdings) -> None:
    """Every rank checks every key and shape (the model keeps meta placeholders of what it frees)."""
    missing = sorted(set(h.keys) - set(index["model"]))
    unexpected = sorted(set(index["model"]) - set(h.keys))
    if missing or unexpected:
        raise ConfigError(f"checkpoint {root} does not match the model: missing {len(missing)} key(s) "
                          f"{missing[:3]}, unexpected {len(unexpected)} {unexpected[:3]}; load a checkpoint "
                          "of the same model")
    for key in sorted(h.keys):
        shape = list(P.get_tensor(h.model, key).shape)
        saved = index["tensors"][index["model"][key]]["shape"]
        if shape != saved:
            raise ConfigError(f"checkpoint {root}: {key} has shape {saved}, the model's is {shape}")


def _read_optimizer(root: Path, index: dict[str, Any], opt: torch.optim.Optimizer,
                    h: _Holdings) -> dict[str, Any]:
    """The state dict for ``opt.load_state_dict``: this rank's parameters' saved state."""
    saved = index["optimizer"]
    if saved is None:
        raise ConfigError(f"checkpoint {root} holds no optimizer state; call load_checkpoint without the optimizer")
    current = opt.state_dict()
    if len(saved["param_groups"]) != len(current["param_groups"]):
        raise ConfigError(f"checkpoint {root} has {len(saved['param_groups'])} param groups, the optimizer "
                          f"{len(current['param_groups'])}")
    where = _optimizer_where(opt, h)
    records: dict[str, dict[str, Any]] = {}
    ranges: dict[str, tuple[int, int]] = {}
    for n, lo, hi in where:
        for k, rec in saved["state"].get(n, {}).items():
            if "shards" in rec:
                records[f"{n}\0{k}"] = rec
                # a piece reads its slice of the parameter-shaped state, whatever layout wrote it
                if lo is not None and hi is not None and rec["shape"] == list(h.tensors[n].shape):
                    ranges[f"{n}\0{k}"] = (lo, hi)
    tensors = read_tensors(root, records, ranges)
    state = {}
    for i, (n, _, _) in enumerate(where):
        if n in saved["state"]:
            state[i] = {k: tensors[f"{n}\0{k}"] if "shards" in rec else _decode(rec)
                        for k, rec in saved["state"][n].items()}
    groups = []
    for old, cur in zip(saved["param_groups"], current["param_groups"]):
        groups.append({**{k: _decode(v, cur.get(k)) for k, v in old.items() if k != "params"},
                       "params": cur["params"]})
    return {"state": state, "param_groups": groups}


def _agree(comm: MPI.Comm, error: str | None) -> None:
    """Raise the first failing rank's ``error`` on every rank (buffers only: nothing is pickled)."""
    data = (error or "").encode()
    if comm.Get_size() > 1:
        lengths = np.zeros(comm.Get_size(), np.int64)
        comm.Allgather(np.array([len(data)], np.int64), lengths)
        failed = np.flatnonzero(lengths)
        if not failed.size:
            return
        root = int(failed[0])
        buf = bytearray(data) if comm.Get_rank() == root else bytearray(int(lengths[root]))
        comm.Bcast([buf, MPI.BYTE], root=root)
        raise ConfigError(f"rank {root}: {buf.decode()}")
    if error:
        raise ConfigError(error)


def _load_model(h: _Holdings, values: dict[str, Tensor]) -> None:
    """Copy ``values`` into the held tensors; before the first call, meta tensors are replaced."""
    made: dict[str, Tensor] = {}
    with torch.no_grad():
        for key, canon in h.keys.items():
            t = P.get_tensor(h.model, key)
            if not h.partitioned and t.is_meta:  # a meta model before its first call: materialised here
                if canon not in made:
                    v = values[canon].to(t.dtype)
                    made[canon] = nn.Parameter(v, t.requires_grad) if isinstance(t, nn.Parameter) else v
                P.set_tensor(h.model, key, made[canon])
        for f, t in h.tensors.items():
            if not t.is_meta:
                t.copy_(values[f])


# ---------------------------------------------------------- consolidate
def consolidate(path: PathArg, out: PathArg) -> Path:
    """Write the checkpoint at ``path`` as one plain state dict, ``out/model.safetensors``.

    Every key of the model's ``state_dict()`` is written, so
    ``model.load_state_dict(safetensors.torch.load_file(...))`` loads it into
    the unwrapped model. For a Hugging Face model (its config was recorded at
    save time) tied copies are left out, as ``save_pretrained`` does, and
    ``out/config.json`` is written: ``from_pretrained(out)`` loads the
    directory. Runs on one process; reads no pickle.

    Returns the path of ``model.safetensors``.

    Raises:
        ConfigError: ``path`` is not a finished checkpoint.
    """
    root, dest = Path(path), Path(out)
    index = read_index(root)
    canon = index["model"]
    tensors = read_tensors(root, {f: index["tensors"][f] for f in sorted(set(canon.values()))})
    hf = index["config"] is not None
    state = {}
    for key, f in canon.items():
        if key == f:
            state[key] = tensors[f]
        elif not hf:  # safetensors stores no aliases: a tied copy is written again
            state[key] = tensors[f].clone()
    dest.mkdir(parents=True, exist_ok=True)
    file = dest / "model.safetensors"
    save_file(state, str(file), metadata={"format": "pt"})
    if hf:
        (dest / "config.json").write_text(json.dumps(index["config"], indent=2))
    return file
