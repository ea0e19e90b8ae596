"""Programs per call signature and mode, over the one training layout.

The first call traces the model, plans and places it (:mod:`placement`).
A later call whose *signature* differs gets a program of its own: another
input structure (no ``labels``, positional instead of keyword arguments,
another constant), another mode (``train()`` / ``eval()``), or a size the
cached programs cannot run at (a sequence length outside the range a trace
admits, any length of a model traced with a fixed one). The new program is
traced with the model in the call's mode (so an eval program has no dropout,
no attention dropout and batch norm reading its running statistics, by
construction) and placed on the *same* stages and the same parameter
objects: nothing is re-planned, moved or copied.

Mapping the new graph's ops to stages (:func:`map_stages`), in graph order:

* an op that reads parameters or buffers goes to a stage that holds all of
  them, preferring the stage of the training graph's op at the same place
  (same module path, same target, same occurrence), never before its inputs;
* an op that reads none goes to that matching op's stage, else the earliest
  stage of its module path, never before its inputs; an op with no inputs
  and no match (``arange``, ``full``) goes to its earliest consumer's stage.

A call that cannot be mapped this way (it reads a parameter on a stage that
its inputs come after, or its trace fails) raises :class:`ConfigError` on
every rank alike, naming how the call differs from the first one; the
module stays usable. Programs are cached by signature: a job retraces once
per (input structure, mode), plus once per sequence length for a model
whose length cannot be traced as dynamic.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree
from mpi4py import MPI
from torch import Tensor, nn

from rannc_py.errors import ConfigError, RaNNCError
from rannc_py.graph.ir import Graph
from rannc_py.graph.layout import InputLayout
from rannc_py.graph.traced import TracedGraph
from rannc_py.runtime import params as P
from rannc_py.runtime.executor import Executor
from rannc_py.runtime.placement import batch_dims, stage_program
from rannc_py.runtime.stage import StageProgram
from rannc_py.runtime.tensor_stages import TensorStages


@dataclass
class CallProgram:
    """The program of one call signature on this rank.

    Attributes:
        graph: the traced graph (flattens the call, rebuilds the output).
        executors: stage -> the executor running this rank's replica of it (every stage the
            rank holds: several with model chunks).
        modules: those stages' modules (they follow ``train()`` when traced in training mode).
        training: the mode it was traced in.
        input_dims: user input name -> its batch dimension.
        output_dims: model output name -> its batch dimension.
        sizes: user input name -> its traced size per dimension, None where
            the program runs at any size (batch) or the range in ``ranges``.
        ranges: (input name, dim) -> the (min, max) sizes a dynamic dimension admits.
        schedules: per (training, microbatches) this rank's actions.
        out_meta: the outputs' descriptions per input signature (see ``return_outputs``).
    """

    graph: TracedGraph
    executors: dict[int, Executor]
    modules: list[nn.Module]
    training: bool
    input_dims: dict[str, int | None]
    output_dims: dict[str, int | None]
    sizes: dict[str, tuple[int | None, ...]] = field(default_factory=dict)
    ranges: dict[tuple[str, int], tuple[float, float]] = field(default_factory=dict)
    schedules: dict[tuple[bool, int], Any] = field(default_factory=dict)
    out_meta: dict[Any, Any] = field(default_factory=dict)

    def runs(self, tensors: Mapping[str, Tensor]) -> bool:
        """Whether this program runs a call of these (already structure-matched) tensors."""
        for name, t in tensors.items():
            sizes = self.sizes.get(name)
            if sizes is None or len(sizes) != t.dim():
                return False
            for d, (want, got) in enumerate(zip(sizes, t.shape)):
                lo, hi = self.ranges.get((name, d), (got, got))
                if (want is not None and want != got) or not lo <= got <= hi:
                    return False
        return True


def describe_sizes(program: CallProgram) -> None:
    """Record in ``program`` the sizes of its traced inputs it runs at: the batch and the
    dynamic dimensions (within their range) at any, the others at the traced one."""
    traced = program.graph.program
    for node, kind in traced.kind.items():
        if kind != "input":
            continue
        name = traced.source[node]
        sizes: list[int | None] = []
        for d, size in enumerate(node.meta["val"].shape):
            if d == program.input_dims.get(name):  # the batch is the executor's business
                sizes.append(None)
            elif isinstance(size, torch.SymInt):
                sizes.append(None)
                vr = size.node.shape_env.var_to_range.get(size.node.expr)
                program.ranges[(name, d)] = (0, float("inf")) if vr is None else (_size(vr.lower), _size(vr.upper))
            else:
                sizes.append(int(size))
        program.sizes[name] = tuple(sizes)


def _size(bound: Any) -> float:
    """A range bound of a size symbol as a number (sympy's infinities become ``inf``)."""
    text = str(bound)
    return float("inf") if "oo" in text else float(int(text))


# ------------------------------------------------------------ signatures
def call_key(args: tuple[Any, ...], kwargs: dict[str, Any], training: bool
             ) -> tuple[tuple[Any, ...], dict[str, Tensor]]:
    """The hashable signature (input structure with its constants, mode) of a call, and its
    tensors by input name; raises TraceError on an input that cannot be traced."""
    layout = InputLayout(tuple(args), dict(kwargs))
    key = (repr(layout.spec), tuple(repr(c) for _, c in layout.leaves), training)
    return key, layout.flatten(tuple(args), dict(kwargs))


def agree(key: tuple[Any, ...], tensors: Mapping[str, Tensor], comm: MPI.Comm) -> None:
    """Check that every rank calls with this key and these shapes (collective).

    Raises:
        ConfigError: the ranks' calls differ (on every rank; not a mistake one
            rank can correct, so the runtime ends the job with it).
    """
    if comm.Get_size() == 1:
        return
    sig = repr((key, [(n, tuple(t.shape), str(t.dtype)) for n, t in tensors.items()]))
    digest = int.from_bytes(hashlib.sha256(sig.encode()).digest()[:8], "little", signed=True)
    digests = comm.allgather(digest)
    if len(set(digests)) == 1:
        return
    sigs = comm.allgather(sig)
    others = {r: s for r, s in enumerate(sigs) if s != sigs[0]}
    raise ConfigError(f"ranks passed inputs of different structure or shape: rank 0 {sigs[0][:300]}, others "
                      f"{str(others)[:300]}; every rank must pass the same structure and a local batch of the "
                      "same shape")


def agree_outcome(error: str | None, comm: MPI.Comm) -> str | None:
    """The first rank's error of a step every rank took (collective), or None when all succeeded."""
    if comm.Get_size() == 1:
        return error
    errors = comm.allgather(error)
    return next((e for e in errors if e is not None), None)


def _leaf_names(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """``{plain name: leaf}`` of a call: ``labels``, ``batch.mask``, ``positional argument 0``."""
    pairs, _ = pytree.tree_flatten_with_path((tuple(args), {k: kwargs[k] for k in sorted(kwargs)}))
    out = {}
    for path, leaf in pairs:
        keys = [getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))) for k in path]
        head, rest = (f"positional argument {keys[1]}", keys[2:]) if keys[0] == 0 else (str(keys[1]), keys[2:])
        out[".".join([head, *map(str, rest)])] = leaf
    return out


def _shown(leaf: Any) -> str:
    return f"a tensor of shape {tuple(leaf.shape)}" if isinstance(leaf, Tensor) else repr(leaf)


def difference(first: tuple[tuple[Any, ...], dict[str, Any], bool], now: tuple[tuple[Any, ...], dict[str, Any], bool]
               ) -> str:
    """How call ``now`` differs from call ``first``, in plain words; each is ``(args, kwargs, training)``."""
    a, b = _leaf_names(first[0], first[1]), _leaf_names(now[0], now[1])
    parts = [f"`{n}` was given on the first call and is missing now" for n in a if n not in b]
    parts += [f"`{n}` was not given on the first call and is given now" for n in b if n not in a]
    for n in a:
        if n in b and (isinstance(a[n], Tensor) != isinstance(b[n], Tensor)
                       or (not isinstance(a[n], Tensor) and a[n] != b[n])):
            parts.append(f"`{n}` was {_shown(a[n])} on the first call and is {_shown(b[n])} now")
        elif n in b and isinstance(a[n], Tensor) and tuple(a[n].shape[1:]) != tuple(b[n].shape[1:]):
            parts.append(f"`{n}` had shape {tuple(a[n].shape)} on the first call and has {tuple(b[n].shape)} now")
    if first[2] != now[2]:
        parts.append(f"the first call was in {'training' if first[2] else 'eval'} mode, this one in "
                     f"{'training' if now[2] else 'eval'} mode")
    return "; ".join(parts) or "the call has the first call's structure"


# -------------------------------------------------------------- mapping
def map_stages(base: Graph, assignment: list[int], new: Graph, names: Mapping[str, str]) -> list[int]:
    """A stage for every op of ``new`` on the layout ``assignment`` of ``base`` (see the module docstring).

    ``names`` maps parameter/buffer FQNs to canonical names (tied ones share one).
    Raises ConfigError naming an op that no stage can run.
    """
    canon = lambda f: names.get(f, f)
    held: dict[str, set[int]] = {}
    at: dict[tuple[str, str, int], int] = {}
    by_path: dict[str, int] = {}
    seen: Counter[tuple[str, str]] = Counter()
    for op, s in zip(base.ops, assignment):
        for f in (*op.params, *op.buffers):
            held.setdefault(canon(f), set()).add(s)
        at[(op.module_path, op.target, seen[(op.module_path, op.target)])] = s
        seen[(op.module_path, op.target)] += 1
        if op.module_path:
            by_path[op.module_path] = min(s, by_path.get(op.module_path, s))
    out = [-1] * len(new.ops)
    seen.clear()
    for op in new.ops:
        k = (op.module_path, op.target)
        # Top-level ops (no module path) match nothing reliably: they follow their inputs or consumers.
        hint = at.get((*k, seen[k]), by_path.get(op.module_path)) if op.module_path else None
        seen[k] += 1
        lower = max((out[j] for j in op.input_ops), default=0)
        tensors = [canon(f) for f in (*op.params, *op.buffers)]
        if tensors:
            ok = sorted(s for s in set.intersection(*(held.get(f, set()) for f in tensors)) if s >= lower)
            if not ok:
                raise ConfigError(
                    f"op {op.name} (module {op.module_path or '<top>'}) reads {tensors[:3]}, which the training "
                    f"layout holds on stages {sorted(set().union(*(held.get(f, set()) for f in tensors)))}, "
                    f"but its inputs are computed on stage {lower}"
                )
            out[op.index] = hint if hint in ok else ok[0]
        elif hint is not None or op.input_ops:
            out[op.index] = max(lower, hint if hint is not None else lower)
    for op in reversed(new.ops):  # free-standing ops: with their first consumer
        if out[op.index] == -1:
            out[op.index] = min((out[j] for j in op.output_ops), default=0)
    stages = max(assignment) + 1
    idle = sorted(set(range(stages)) - set(out))
    if idle:
        raise ConfigError(f"stages {idle} of the training layout would run nothing for this call")
    return out


@contextlib.contextmanager
def traceable(model: nn.Module, names: Mapping[str, str]) -> Iterator[None]:
    """Give the model's released (``meta``) tensors uninitialised CPU stand-ins while tracing.

    Tracing reads shapes and dtypes only, but the stand-ins must sit on the
    device of the tensors this rank holds; untouched, they take no memory.
    Tied names share one stand-in, so the trace sees the tie.
    """
    saved: dict[str, Tensor] = {}
    made: dict[str, Tensor] = {}
    for name, canon in names.items():
        t = P.get_tensor(model, name)
        if not t.is_meta:
            continue
        if canon not in made:
            blank = torch.empty(t.shape, dtype=t.dtype)
            made[canon] = nn.Parameter(blank, t.requires_grad) if isinstance(t, nn.Parameter) else blank
        saved[name] = t
        P.set_tensor(model, name, made[canon])
    try:
        yield
    finally:
        for name, t in saved.items():
            P.set_tensor(model, name, t)


def trace_call(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], training: bool,
               names: Mapping[str, str]) -> TracedGraph:
    """Trace a call with the model in ``training`` mode, autograd on (raises TraceError)."""
    from rannc_py.graph.trace import trace

    was = model.training
    try:
        with traceable(model, names), torch.enable_grad():
            model.train(training)
            return trace(model, args, kwargs, dynamic_seq=True)
    finally:
        model.train(was)


@dataclass
class Layout:
    """What every program of a job shares: the training graph's stages and this rank's tensors.

    Attributes:
        graph: the graph the plan was made for.
        assignment: its stage per op.
        stages: this rank's stages, ascending (several with model chunks).
        stage_ranks: the ranks of every stage this rank exchanges activations
            with (with tensor groups: those at its tensor position).
        names: FQN -> canonical name.
        local: canonical name -> this rank's tensors (its shards of split ones).
        recompute: stage -> whether it recomputes activations (this rank's stages).
        keep_outputs: the plan's ``return_outputs``.
        positions: pipeline positions (stages per model chunk; messages name their chunk).
        tensor: the tensor-parallel split of the stages (None: degree 1);
            another call's graph is split by it too, with the same shards.
    """

    graph: Graph
    assignment: list[int]
    stages: tuple[int, ...]
    stage_ranks: list[list[int]]
    names: dict[str, str]
    local: dict[str, Tensor]
    recompute: dict[int, bool]
    keep_outputs: bool
    positions: int
    tensor: TensorStages | None = None


def make_executors(layout: Layout, programs: Mapping[int, StageProgram], comm: MPI.Comm) -> dict[int, Executor]:
    """One executor per stage of ``programs`` (stage -> this rank's program of it) on ``layout``."""
    return {s: Executor(prog, s, layout.stage_ranks, comm, layout.recompute[s], layout.keep_outputs,
                        layout.positions) for s, prog in programs.items()}


def build_program(layout: Layout, graph: TracedGraph, training: bool, comm: MPI.Comm) -> CallProgram:
    """This rank's program of ``graph`` (a trace in ``training`` mode) on ``layout``.

    Raises ConfigError when the graph cannot be mapped onto the layout or
    reads a tensor this rank does not hold.
    """
    assignment = map_stages(layout.graph, layout.assignment, graph, layout.names)
    try:
        stages = graph.split(assignment).stages if layout.tensor is None else layout.tensor.stages(graph, assignment)
    except RaNNCError as e:
        raise ConfigError(f"the call's graph does not split along the training layout: {e}") from e
    programs = {}
    for s in layout.stages:
        need = [*stages[s].param_fqns, *stages[s].buffer_fqns]
        bound = {f: layout.local[layout.names.get(f, f)] for f in need if layout.names.get(f, f) in layout.local}
        programs[s] = stage_program(stages, s, bound, training)
    input_dims, output_dims = batch_dims(stages, graph)
    program = CallProgram(graph=graph, executors=make_executors(layout, programs, comm),
                          modules=[prog.module for prog in programs.values()], training=training,
                          input_dims=input_dims, output_dims=output_dims)
    describe_sizes(program)
    return program
